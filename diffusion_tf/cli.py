"""The `text2image.py` command line (Stable Diffusion 1.x/2.x on Keras 3 / TensorFlow).

    python text2image.py --prompt "an astronaut riding a horse"

Run with --help for every option. The arguments become one `GenerationRequest`, checked by
its rules (`diffusion_tf.pipeline.request`) before TensorFlow is imported, so --help and
argument errors are instant.
"""

import argparse
import math
import os
import re
import sys
import time

from diffusion_tf import a1111
from diffusion_tf.pipeline import request as rules
from diffusion_tf.pipeline.request import MAX_SEED, MAX_STEPS, GenerationRequest, RequestError

DEFAULT_MODEL = "sd-v1-5"  # when its converted weights are cached; else BUILTIN_MODEL
BUILTIN_MODEL = "shapes"
DEFAULT_OUTPUT = "output.png"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
examples:
  # 512x512 with Stable Diffusion 1.5 (its weights are downloaded and converted once):
  python text2image.py --prompt "an astronaut riding a horse"

  # four images, reproducible, 30 steps, saved as out/horse_1.png .. out/horse_4.png:
  python text2image.py --prompt "an astronaut riding a horse" --seed 1234 \\
      --steps 30 --batch-size 4 --output out/horse.png

  # a checkpoint you converted yourself:
  python -m weights_port v1-5-pruned-emaonly.safetensors sd15 --config sd-v1-5
  python text2image.py --model sd15 --prompt "a watercolor fox" \\
      --negative-prompt "blurry, low quality" --height 512 --width 768

  # LoRAs: a file at scale 0.7, and one of the --lora-dir folder named in the prompt:
  python text2image.py --prompt "a castle <lora:watercolor:0.8>" --lora ~/loras/ink.safetensors:0.7

  # again, from an image this program or AUTOMATIC1111's web UI wrote:
  python text2image.py --from-png castle.png --output again.png

Every PNG carries its generation parameters (prompt, negative prompt, steps,
sampler, CFG scale, seed, size, model, clip skip, LoRA hashes) in a text chunk
named "parameters", in the format of AUTOMATIC1111's web UI.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Never breaks a help line inside a hyphenated word (scheduler names like "dpm++2m-karras")."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _prog():
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("text2image", "text2image.py") else "text2image.py"


def scheduler_names():
    """Every name diffusion_tf.schedulers.get accepts, from its Keras-free names module
    (importing the schedulers themselves would import TensorFlow, which --help must not wait for)."""
    from diffusion_tf.schedulers.names import NAMES

    return list(NAMES)


def _preset_names():
    try:
        from diffusion_tf.presets import list_presets

        return list_presets()
    except Exception:  # --help must work even with a damaged preset folder
        return []


def build_parser():
    schedulers = scheduler_names()
    presets = _preset_names()
    p = _Parser(
        prog=_prog(),
        description="Generate images from a text prompt with Stable Diffusion 1.x/2.x\n"
        "(diffusion_tf: Keras 3 on TensorFlow) and save them as PNG files.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--prompt", default=None, help="the text describing the image (required unless --from-png).")
    p.add_argument(
        "--negative-prompt", metavar="TEXT", default=None,
        help="what the image should not show; replaces the empty prompt of classifier-free "
        "guidance (used when --guidance is above 1). Default: none.",
    )
    p.add_argument(
        "--steps", metavar="N", default=None,
        help=f"number of denoising steps, 1 to {MAX_STEPS}; more is slower and usually finer. "
        "Default: the model's (50 for Stable Diffusion).",
    )
    p.add_argument(
        "--guidance", metavar="SCALE", default=None,
        help="classifier-free guidance scale (CFG), >= 0: how strongly the image follows the "
        "prompt; 1 or less turns guidance off (one UNet pass per step). Default: the model's (7.5 for "
        "Stable Diffusion).",
    )
    p.add_argument(
        "--seed", metavar="N", default=None,
        help=f"random seed, 0 to {MAX_SEED}; the same seed and options give the same image. "
        "Image i of a batch uses seed + i. Default: a random seed, which is printed and saved in the PNG.",
    )
    p.add_argument(
        "--batch-size", metavar="N", default="1",
        help="number of images generated together (one per seed). Default: 1.",
    )
    p.add_argument(
        "--height", metavar="PX", default=None,
        help="image height in pixels, a positive multiple of 8. Default: the model's native size "
        "(512 for SD 1.x and SD 2.1-base, 768 for SD 2.1); only --width given: the same as --width.",
    )
    p.add_argument(
        "--width", metavar="PX", default=None,
        help="image width in pixels, a positive multiple of 8. Default: the model's native size; "
        "only --height given: the same as --height.",
    )
    p.add_argument(
        "--model", metavar="FOLDER|PRESET", default=None,
        help="a model folder (converted with `python -m weights_port`, or trained with "
        "`python -m diffusion_tf.train`), a preset name"
        + (f" ({', '.join(presets)})" if presets else "")
        + f", or {BUILTIN_MODEL} (the built-in 64x64 shapes model); a preset's weights are downloaded and "
        f"converted the first time. Default: {DEFAULT_MODEL} if it is already downloaded, else {BUILTIN_MODEL}.",
    )
    p.add_argument(
        "--vae", metavar="FOLDER|FILE|PRESET", default=None,
        help="decode (and encode) with another VAE: taesd or taesdxl (madebyollin's tiny autoencoders, downloaded "
        "and converted once), a VAE folder (`python -m weights_port --vae SRC DST`), a model folder, a TAESD or "
        "AutoencoderKL file (.safetensors or .pth/.ckpt, read without running code) or diffusers folder. It must "
        "fit the model: the same latent channels, and an AutoencoderKL the model's scaling factor. Default: the "
        "model's own.",
    )
    p.add_argument(
        "--attention", choices=("standard", "linear"), default=None,
        help="UNet self-attention: standard (softmax) or linear (LinearAttention: an approximation "
        "for softmax-trained weights, less memory at large sizes). Default: the model's own "
        "(standard for Stable Diffusion, linear for the shapes model).",
    )
    p.add_argument(
        "--scheduler", metavar="NAME", default=None,
        help=f"sampling algorithm, one of: {', '.join(schedulers)}. Default: the model's (ddim).",
    )
    p.add_argument(
        "--jit-compile", action=argparse.BooleanOptionalAction, default=False,
        help="compile the denoising with XLA: slower first step, often faster after "
        "(--no-jit-compile: a plain TensorFlow graph). Default: off.",
    )
    p.add_argument(
        "--output", metavar="PATH.png", default=DEFAULT_OUTPUT,
        help=f"where to save the PNG; with --batch-size above 1 the images are numbered: "
        f"out.png -> out_1.png, out_2.png, ... Its folder is created if missing. Default: {DEFAULT_OUTPUT}.",
    )
    p.add_argument(
        "--from-png", metavar="IMAGE.png", default=None,
        help="regenerate from the parameters stored in a PNG written by this program, its web UI or "
        "AUTOMATIC1111's (prompt with its <lora:...> tags, negative prompt, seed, steps, guidance, sampler, "
        "size, model, attention, clip skip); options given on the command line override them. What is "
        "used is printed; a LoRA whose file's hash differs from the recorded one is a warning.",
    )
    p.add_argument(
        "--grid", action="store_true",
        help="also save a contact sheet of all the images as <output stem>_grid.png.",
    )
    p.add_argument(
        "--preview", metavar="N", type=_preview_every, default=None,
        help="every N steps, write what the image looks like so far to <output stem>_preview.png "
        "(all the batch's images on one sheet; replaced each time): the latents through a fixed "
        "latent-to-RGB map, or the tiny decoder's image when --vae is a TAESD. N >= 1.",
    )
    p.add_argument(
        "--temperature", metavar="T", default="1.0",
        help="scale of the fresh noise of stochastic samplers (ddpm, euler_a), >= 0; "
        "deterministic ones ignore it. Default: 1.0.",
    )
    text = p.add_argument_group(
        "prompts, LoRA and embeddings",
        "prompts use AUTOMATIC1111's syntax: (word:1.2) emphasis, BREAK, any length, <lora:NAME:SCALE> "
        "(NAME.safetensors of --lora-dir) and the embeddings of --embedding-dir as words.",
    )
    text.add_argument(
        "--lora", metavar="PATH[:SCALE]", action="append", default=[],
        help="merge a LoRA file (kohya/A1111 or diffusers .safetensors; .pt/.ckpt/.bin) at SCALE (a finite "
        "number, default 1); repeat for several. Only a trailing :number is a scale, so C:\\x.safetensors "
        "is a path. Recorded in the PNG as <lora:STEM:SCALE> at the end of the prompt; a <lora:STEM:S> tag "
        "in the prompt uses this file at scale S.",
    )
    text.add_argument(
        "--lora-dir", metavar="FOLDER", default=None,
        help="where <lora:NAME:SCALE> in a prompt finds NAME (.safetensors, .pt, .ckpt, .bin). Default: "
        "$DIFFUSION_TF_HOME/loras (~/.cache/diffusion_tf/loras).",
    )
    text.add_argument(
        "--embedding", metavar="PATH[:TOKEN]", action="append", default=[],
        help="add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds) as the "
        "word TOKEN (default: the file's own name, else its stem); repeat for several.",
    )
    text.add_argument(
        "--embedding-dir", metavar="FOLDER", default=None,
        help="a folder of embeddings whose file names work as words in prompts (loaded when a prompt uses "
        "them). Default: $DIFFUSION_TF_HOME/embeddings.",
    )
    text.add_argument(
        "--clip-skip", metavar="N", default=None,
        help="leave out the text encoder's last N layers, as diffusers' clip_skip: 1 = the penultimate "
        "layer = AUTOMATIC1111's \"Clip skip: 2\" (the PNG records A1111's number). Default: 0 (none).",
    )
    text.add_argument(
        "--prompt-syntax", choices=("a1111", "plain"), default="a1111",
        help="a1111: (word:1.2), [word], BREAK are syntax; plain: brackets are text, as diffusers "
        "(<lora:...> tags are read in both). Default: a1111.",
    )
    text.add_argument(
        "--long-prompts", choices=("chunks", "truncate"), default="chunks",
        help="chunks: a prompt over 75 tokens is encoded in 77-token chunks (as A1111); truncate: cut at 77 "
        "tokens with a warning (as diffusers). Default: chunks.",
    )
    edit = p.add_argument_group(
        "editing", "image-to-image (--init-image), inpainting (+ --mask) and outpainting (+ --outpaint); "
        "the output has the input image's size (cropped to a multiple of 8); --height/--width are ignored.",
    )
    edit.add_argument(
        "--init-image", metavar="PATH", default=None,
        help="start from this image (PNG, JPEG, ...) instead of pure noise. Default: none (text-to-image).",
    )
    edit.add_argument(
        "--strength", metavar="S", default="0.8",
        help="with --init-image: how much of the schedule runs, 0 to 1 (0 = the image back, 1 = all "
        "steps from noise). Default: 0.8.",
    )
    edit.add_argument(
        "--mask", metavar="PATH", default=None,
        help="with --init-image: inpainting mask, white = repaint (binarised at 50%% grey, resized to the "
        "image if needed); outside the mask the output keeps the input's pixels.",
    )
    edit.add_argument(
        "--outpaint", metavar="SIDE=PX,...", default=None,
        help="with --init-image: extend the canvas, e.g. left=128,right=0,top=64,bottom=0 (pixels, "
        "multiples of 8) and paint the new area (strength 1); the old area is kept.",
    )
    xl = p.add_argument_group(
        "SDXL", "micro-conditioning and the base + refiner ensemble (diffusers' names and defaults; pairs as "
        "H,W or HxW in pixels). SD 1.x/2.x models refuse them.")
    for flag, what in (
        ("--original-size", "the size the model is told the training image had. Default: the output size."),
        ("--target-size", "the size the model is told to aim for. Default: the output size."),
        ("--crops-coords-top-left", "TOP,LEFT: the crop the model is told the image was cut at. Default: 0,0."),
        ("--negative-original-size", "original size of the unconditional pass. Default: --original-size."),
        ("--negative-target-size", "target size of the unconditional pass. Default: --target-size."),
        ("--negative-crops-coords-top-left", "crop of the unconditional pass. Default: --crops-coords-top-left."),
    ):
        xl.add_argument(flag, metavar="H,W", default=None, help=what)
    xl.add_argument("--aesthetic-score", metavar="S", default=None,
                    help="a refiner's aesthetic score, 0 to 10. Default: 6.0.")
    xl.add_argument("--negative-aesthetic-score", metavar="S", default=None,
                    help="a refiner's aesthetic score of the unconditional pass, 0 to 10. Default: 2.5.")
    xl.add_argument("--guidance-rescale", metavar="F", default=None,
                    help="rescale the guided output towards the conditional one's spread (Lin et al. 2023), "
                    "0 to 1; any model. Default: 0 (off).")
    xl.add_argument("--refiner", metavar="FOLDER|PRESET", default=None,
                    help="an SDXL refiner (e.g. sdxl-refiner-1.0) that runs the last part of the schedule on the "
                    "base's latents (diffusers' ensemble of experts); the base is released first.")
    xl.add_argument("--denoising-end", metavar="F", default=None,
                    help="with --refiner: the share of the schedule the base runs, strictly between 0 and 1 "
                    "(A1111's 'Refiner switch at'). Default: 0.8.")
    p.scheduler_names = schedulers
    return p


# ---------------------------------------------------------------- validation
# request field -> its option; the values are checked by the request's rules.
FLAGS = {
    "num_steps": "--steps", "batch_size": "--batch-size", "guidance_scale": "--guidance",
    "temperature": "--temperature", "height": "--height", "width": "--width", "seed": "--seed",
    "strength": "--strength", "clip_skip": "--clip-skip",
    **{f: "--" + f.replace("_", "-") for f in rules.MICRO_CONDITIONING + ("guidance_rescale", "denoising_end")},
}
DEFAULT_SWITCH = 0.8  # the base's share with --refiner (diffusers' and A1111's example value)
EDIT_OPTIONS = {"init_image": "--init-image", "mask": "--mask", "outpaint": "--outpaint"}
DESTS = {"num_steps": "steps", "guidance_scale": "guidance", "batch_size": "batch_size", "scheduler": "scheduler",
         "strength": "strength", "outpaint": "outpaint"}


def _dest(field):
    return DESTS.get(field, field)


def _option(field):
    return FLAGS.get(field) or "--" + _dest(field).replace("_", "-")


def _parse(parser, field, text):
    """A field's value from its option's text (exit 2 naming the option when it breaks the rule)."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return rules.parse(field, text)
    except RequestError as e:
        parser.error(f"{FLAGS[field]} {text}: must be {e.allowed}")


def apply_png_parameters(parser, args, argv):
    """Fill the options not given on the command line from the PNG's parameters (exit 2 when
    the file is unreadable, holds none, or names a sampler we lack); returns {option: value} of
    what was taken. The parsed parameters are kept in `args.png_params`."""
    from diffusion_tf.png_info import read_parameters

    path = args.from_png
    try:
        params = read_parameters(path)
    except FileNotFoundError:
        parser.error(f"--from-png {path}: no such file")
    except (OSError, ValueError, SyntaxError) as e:
        parser.error(f"--from-png {path}: not a readable PNG ({_one_line(e)})")
    if not params:
        parser.error(f"--from-png {path}: the image holds no generation parameters (no 'parameters' text chunk)")
    given = {a.split("=", 1)[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    overridden = [field for field in rules.PNG_FIELDS.values() if _option(field) in given]
    try:
        fields = rules.fields_from_png(params, ignore=overridden)
    except ValueError as e:
        parser.error(f"--from-png {path}: {_one_line(e)}")
    if params.get("denoising_strength") is not None and args.init_image is None:
        parser.error(f"--from-png {path}: the image was made from an input image (strength "
                     f"{params['denoising_strength']}); pass that image with --init-image")
    if params.get("mask") == "yes" and args.mask is None:
        parser.error(f"--from-png {path}: the image was inpainted; pass its mask with --mask")
    args.png_params = params
    used = {}
    if params.get("refiner") and "--refiner" not in given:
        args.refiner = used["--refiner"] = str(params["refiner"])
    for field, value in fields.items():
        setattr(args, _dest(field), value)
        used[_option(field)] = rules.format_outpaint(value) if field == "outpaint" else value
    return used


def _outpaint(parser, text):
    if text is None or isinstance(text, dict):
        return text
    try:
        return rules.parse_outpaint(text)
    except ValueError as e:
        message = _one_line(e)
        prefix = f"outpaint {text!r}: "
        parser.error(f"--outpaint {text}: {message[len(prefix):] if message.startswith(prefix) else message}")


_LORA_TAG = re.compile(r"<lora:([^>:]+)(?::[^>]*)?>")


def _strip_tags(text, names):
    """`text` without its <lora:NAME...> tags whose NAME (case-insensitive) is in `names`."""
    if not text:
        return text
    return _LORA_TAG.sub(lambda m: "" if m.group(1).strip().lower() in names else m.group(0), text)


def _tags(parser, option, text):
    """[(name, scale)] of the <lora:...> tags of a prompt (exit 2 on a bad tag)."""
    from diffusion_tf.prompts.syntax import extract_networks

    if not text:
        return []
    try:
        return extract_networks(text)[1]
    except ValueError as e:
        parser.error(f"{option}: {_one_line(e)}")


def plan_networks(parser, args):
    """Check --lora/--embedding/--lora-dir/--embedding-dir and the prompts' <lora:...> tags (exit 2
    naming the bad one), and set:
      args.loras        [(path, scale)] merged by the CLI (a --lora file; a tag naming its stem sets
                        its scale);
      args.embeddings   [(path, token or None)];
      args.prompt_text, args.negative_text: the prompts given to the pipeline (without the tags that
                        the --lora files serve);
      args.prompt       the prompt recorded in the PNG: as written, plus <lora:STEM:SCALE> for each
                        --lora file no tag names.
    Tags that no --lora file serves must name a file of the LoRA folder."""
    for option, folder in (("--lora-dir", args.lora_dir), ("--embedding-dir", args.embedding_dir)):
        if folder is not None and not os.path.isdir(folder):
            parser.error(f"{option} {folder}: no such folder")
    tags = _tags(parser, "--prompt", args.prompt) + _tags(parser, "--negative-prompt", args.negative_prompt)
    tag_scales = {}
    for name, scale in tags:
        tag_scales.setdefault(name.lower(), scale)
    loras, served, appended, stems = [], set(), [], {}
    for spec in args.lora:
        try:
            path, scale = a1111.split_lora_spec(spec)
        except ValueError as e:
            parser.error(f"--lora {spec}: {e}; write PATH or PATH:SCALE, e.g. style.safetensors:0.7")
        if not os.path.isfile(path):
            parser.error(f"--lora {spec}: no such file" + (f" ({path})" if path != spec else ""))
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() not in a1111.LORA_EXTENSIONS:
            parser.error(f"--lora {spec}: not a LoRA file; allowed: {', '.join(a1111.LORA_EXTENSIONS)}")
        if stem.lower() in stems:
            parser.error(f"--lora {spec}: the LoRA {stem!r} is already given ({stems[stem.lower()]})")
        stems[stem.lower()] = spec
        if stem.lower() in tag_scales:  # <lora:STEM:S> in the prompt: this file, at the tag's scale
            served.add(stem.lower())
            loras.append((path, tag_scales[stem.lower()]))
        else:
            scale = 1.0 if scale is None else scale
            loras.append((path, scale))
            appended.append(a1111.lora_tag(stem, scale))
    folder = args.lora_dir if args.lora_dir is not None else _default_folder("loras")
    for name, _ in tags:
        if name.lower() not in served and a1111.find_lora(folder, name) is None:
            there = list(a1111.lora_files(folder))
            parser.error(
                f"<lora:{name}> in the prompt: no LoRA file named {name!r} (.safetensors, .pt, .ckpt or .bin) in "
                f"{folder} (--lora-dir)" + (f"; it holds {', '.join(there[:20])}" if there else "; it holds none")
                + "; or give the file with --lora PATH")
    embeddings = []
    for spec in args.embedding:
        path, token = a1111.split_embedding_spec(spec)
        if not os.path.isfile(path):
            parser.error(f"--embedding {spec}: no such file" + (f" ({path})" if path != spec else ""))
        if token is not None and not token.strip():
            parser.error(f"--embedding {spec}: the token after ':' is empty")
        embeddings.append((path, token))
    args.loras, args.embeddings = loras, embeddings
    args.prompt_text = _strip_tags(args.prompt, served)
    args.negative_text = _strip_tags(args.negative_prompt, served)
    if appended:
        args.prompt = " ".join([args.prompt] + appended) if args.prompt else " ".join(appended)
    return args


def _default_folder(name):
    from diffusion_tf.presets.cache import cache_dir

    return os.path.join(cache_dir(), name)


def validate(parser, args, argv=None):
    """Check the arguments (exit 2 on the first bad one) and set `args.request`, the
    `GenerationRequest` they describe."""
    args.png_params = None
    args.from_png_used = apply_png_parameters(parser, args, argv) if args.from_png else None
    if args.prompt is None:
        parser.error("--prompt is required (or --from-png IMAGE.png)")
    values = {field: _parse(parser, field, getattr(args, _dest(field))) for field in FLAGS}
    if not args.output.lower().endswith(".png") or os.path.basename(args.output)[:-4] in ("", "."):
        parser.error(f"--output {args.output}: must be a file name ending in .png")
    if args.model is not None and not args.model:
        parser.error("--model: must be a model folder or a preset name")
    if args.scheduler is not None and args.scheduler not in parser.scheduler_names:
        parser.error(f"--scheduler {args.scheduler}: unknown scheduler; choose from {', '.join(parser.scheduler_names)}")
    if args.attention is not None and args.attention not in rules.ATTENTIONS:
        parser.error(f"--attention {args.attention}: allowed: {', '.join(rules.ATTENTIONS)}")
    for option, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{option} {path}: no such file")
    outpaint = _outpaint(parser, args.outpaint)
    if args.refiner is not None and not args.refiner:
        parser.error("--refiner: must be a model folder or a preset name")
    if args.vae is not None:
        from diffusion_tf.presets.vae import list_vae_presets

        if not args.vae or not (os.path.exists(args.vae) or args.vae in list_vae_presets()):
            parser.error(f"--vae {args.vae}: no such file or folder, and not a VAE preset "
                         f"({', '.join(list_vae_presets())})")
    if values["denoising_end"] is not None and args.refiner is None:
        parser.error(f"--denoising-end {args.denoising_end}: only with --refiner (the base hands its latents over)")
    if args.refiner is not None and values["denoising_end"] is None:
        values["denoising_end"] = DEFAULT_SWITCH
    plan_networks(parser, args)
    defaults = GenerationRequest.__dataclass_fields__
    values = {f: v for f, v in values.items() if v is not None or defaults[f].default is None}  # unset: the default
    request = GenerationRequest(
        args.prompt, negative_prompt=args.negative_prompt, scheduler=args.scheduler, init_image=args.init_image,
        mask=args.mask, outpaint=outpaint, model=args.model, attention=args.attention, **values,
    )
    try:
        request.validate(names=EDIT_OPTIONS)
    except ValueError as e:  # the combinations: a mask or outpaint without an image, both, ...
        parser.error(_one_line(e))
    args.request = request
    return args


def _preview_every(text):
    """--preview N: an integer >= 1 (argparse turns the error into exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1 (steps between previews)")
    return value


def preview_path(output):
    """Where --preview writes: <output stem>_preview.png."""
    return os.path.splitext(output)[0] + "_preview.png"


def _preview(args):
    """The Preview of --preview N (None without it)."""
    if getattr(args, "preview", None) is None:
        return None
    from diffusion_tf.pipeline.preview import Preview

    return Preview(args.preview, preview_writer(preview_path(args.output)))


def preview_writer(path):
    """A preview sink that writes the images as one sheet to `path` (save_png: through a temporary
    name, so that a viewer never reads a half-written file)."""
    from diffusion_tf.png_info import save_png

    def sink(_k, _n, images):
        save_png(path, contact_sheet(list(images)) if len(images) > 1 else images[0], None)

    return sink


def output_paths(output, count):
    """`output` for one image; `stem_1.png`, `stem_2.png`, ... for several."""
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}_{i}{ext}" for i in range(1, count + 1)]


def grid_output_path(output):
    stem, ext = os.path.splitext(output)
    return f"{stem}_grid{ext}"


def contact_sheet(images, gap=2):
    """The images (uint8 [N, H, W, 3], one size) tiled in a near-square grid, white gaps."""
    import numpy as np

    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    sheet = np.full((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y:y + h, x:x + w] = image
    return sheet


# ---------------------------------------------------------------- progress
class ProgressBar:
    """`step 7/20 [=======>    ] 2.1 s/it` on a stream; redrawn in place on a terminal."""

    def __init__(self, stream=None, width=30):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.first_done = None
        self.drawn = False

    def __call__(self, i, n, t=None):
        now = time.perf_counter()
        done = i + 1
        if self.first_done is None:
            self.first_done = now
            rate = now - self.start  # the first step includes tracing/compiling
        else:
            rate = (now - self.first_done) / (done - 1)
        filled = int(self.width * done / n)
        arrow = ">" if filled < self.width else ""
        bar = "=" * max(filled - len(arrow), 0) + arrow
        speed = f"{rate:.1f} s/it" if rate >= 1 else f"{rate:.2f} s/it"
        line = f"step {done}/{n} [{bar:<{self.width}}] {speed}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == n else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = done < n

    def close(self):
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _one_line(message):
    """An error message on one line (some, e.g. PresetUnavailableError's, span several)."""
    return " ".join(str(message).split())


# ---------------------------------------------------------------- LoRA, embeddings, clip skip
def load_networks(t2i, args, request):
    """Merge the --lora files, add the --embedding tokens and check --clip-skip against the
    model; None, or the message (naming the option) of the first that fails."""
    if request.clip_skip:
        layers = t2i.text_layers
        if request.clip_skip >= layers:
            return (f"--clip-skip {request.clip_skip}: must be 0 to {layers - 1} for this model's {layers}-layer "
                    f"text encoder (diffusers' numbering: 1 = A1111's Clip skip 2)")
    for spec, (path, scale) in zip(args.lora, args.loras):
        try:
            lora = t2i.load_lora(path, scale)
        except ValueError as e:
            return f"--lora {spec}: {_one_line(e)}"
        sys.stderr.write(f"LoRA {lora} at scale {scale:g} ({path})\n")
    for spec, (path, token) in zip(args.embedding, args.embeddings):
        try:
            tokens = t2i.load_textual_inversion(path, token)
        except ValueError as e:
            return f"--embedding {spec}: {_one_line(e)}"
        sys.stderr.write(f"embedding {tokens[0]} ({len(tokens)} vector{'s' if len(tokens) > 1 else ''}, {path})\n")
    return None


def _tag_names(*texts):
    from diffusion_tf.prompts.syntax import extract_networks

    names = []
    for text in texts:
        for name, _ in extract_networks(text or "")[1]:
            if name not in names:
                names.append(name)
    return names


def network_hashes(t2i, request, args):
    """([(name, hash)] of the LoRAs the recorded prompts name, [(token, hash)] of the embeddings
    the prompts use): the PNG's `Lora hashes` and `TI hashes`."""
    names = _tag_names(request.prompt, request.negative_prompt)
    loras = a1111.lora_hashes(list(getattr(t2i, "loras", [])), names)
    conditioning = getattr(t2i, "conditioning", None)
    embeddings = getattr(conditioning, "embeddings", None) or {}
    used = a1111.embedding_hashes(embeddings, [args.prompt_text, args.negative_text]) if embeddings else []
    return loras, used


def hash_warnings(args, loras, embeddings, t2i):
    """With --from-png: one line for each LoRA or embedding whose hash differs from the PNG's."""
    params = args.png_params or {}
    files = {e.name.lower(): e.path for e in getattr(t2i, "loras", [])}  # a LoRA's name -> its file
    lines = []
    for label, key, used, what in (("Lora hashes", "lora_hashes", loras, "LoRA"),
                                   ("TI hashes", "ti_hashes", embeddings, "embedding")):
        recorded = {k.lower(): v for k, v in a1111.parse_hashes(params.get(key)).items()}
        for name, value in used:
            old = recorded.get(name.lower())
            if old is not None and old.lower() != value.lower():
                where = files.get(name.lower()) if what == "LoRA" else None
                lines.append(f"{what} {name}: the file{f' {where}' if where else ''} has hash {value}, "
                             f"{args.from_png} records {old} ({label}); the image may differ")
    return lines


# ---------------------------------------------------------------- main
def generate_kwargs(request):
    """Text2Image.generate's arguments (all but the prompts and callback) for a request."""
    kw = dict(num_steps=request.num_steps, unconditional_guidance_scale=request.guidance_scale,
              temperature=request.temperature, batch_size=request.batch_size, seed=request.seed,
              init_image=request.init_image, strength=request.strength, mask=request.mask,
              outpaint=request.outpaint, clip_skip=request.clip_skip)
    kw.update({f: getattr(request, f) for f in rules.MICRO_CONDITIONING + ("guidance_rescale", "denoising_end")
               if getattr(request, f) != GenerationRequest.__dataclass_fields__[f].default})
    return kw


def _base_then_refiner(t2i, request, args, bar, err):
    """diffusers' ensemble of experts: the base denoises up to denoising_end and returns latents,
    the refiner (loaded after the base's UNet is released: both would not fit many GPUs) runs the
    rest from there with the same prompts, seed, steps and guidance. Returns (images, refiner label)."""
    import gc

    from diffusion_tf import presets
    from diffusion_tf.pipeline import text_to_image
    from diffusion_tf.prompts import syntax

    kw = generate_kwargs(request)
    latents = t2i.generate(args.prompt_text, negative_prompt=args.negative_text, callback=bar, output_type="latent",
                           preview=_preview(args), **kw)
    bar.close()
    t2i.unet = None
    gc.collect()
    err.write(f"loading refiner {args.refiner} ...\n")
    err.flush()
    refiner = text_to_image.Text2Image(model=args.refiner, jit_compile=args.jit_compile, attention=request.attention,
                                       prompt_syntax=args.prompt_syntax, long_prompts=args.long_prompts)
    if not refiner.is_xl:
        raise ValueError(f"--refiner {args.refiner}: {refiner.model_path!r} is not an SDXL model.")
    # The base's LoRAs (<lora:...> tags) are for the base's networks: the refiner reads the plain prompts.
    plain = lambda text: text if text is None else syntax.extract_networks(text)[0]  # noqa: E731
    for edit in ("init_image", "mask", "outpaint", "strength", "denoising_end"):
        kw.pop(edit, None)
    bar = ProgressBar(err)  # the refiner's steps: a bar of their own
    images = refiner.generate(plain(args.prompt_text), negative_prompt=plain(args.negative_text), callback=bar,
                              init_latents=latents, denoising_start=request.denoising_end, preview=_preview(args),
                              scheduler=request.scheduler, **kw)
    bar.close()
    return images, presets.model_label(args.refiner, refiner.model_path)


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 1 write error, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = validate(parser, parser.parse_args(argv), argv)
    prog = parser.prog
    err = sys.stderr
    paths = output_paths(args.output, args.request.batch_size)
    bar = None
    written = []
    try:
        folder = os.path.dirname(os.path.abspath(args.output))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            parser.error(f"--output {args.output}: cannot create the folder {folder} ({e.strerror or e})")

        request = args.request
        if request.seed is None:
            import secrets

            request.seed = secrets.randbelow(MAX_SEED + 1)

        import diffusion_tf  # noqa: F401  (sets the Keras backend and quiets TensorFlow's logging first)
        from diffusion_tf import presets
        from diffusion_tf.pipeline import text_to_image
        from diffusion_tf.png_info import save_png

        if args.from_png_used is not None:
            err.write(f"parameters from {args.from_png}: "
                      + ", ".join(f"{k} {v!r}" for k, v in args.from_png_used.items()) + "\n")
        err.write(f"loading model {args.model or '(default)'} ...\n")
        err.flush()
        try:
            t2i = text_to_image.Text2Image(
                model=request.model,
                img_height=request.height,
                img_width=request.width,
                jit_compile=args.jit_compile,
                attention=request.attention,
                scheduler=request.scheduler,
                lora_dir=args.lora_dir,
                embedding_dir=args.embedding_dir,
                prompt_syntax=args.prompt_syntax,
                long_prompts=args.long_prompts,
            )
        except OSError as e:  # an unreadable file of the model folder (ValueErrors: below)
            err.write(f"{prog}: error: cannot load model {args.model}: {_one_line(e)}\n")
            return EXIT_USAGE
        if args.vae is not None:
            err.write(f"loading VAE {args.vae} ...\n")
            err.flush()
            try:
                t2i.load_vae(args.vae)
            except ValueError as e:
                message = _one_line(e)
                message = message[len(f"vae={args.vae!r}: "):] if message.startswith(f"vae={args.vae!r}: ") else message
                err.write(f"{prog}: error: --vae {args.vae}: {message}\n")
                return EXIT_USAGE
        problem = load_networks(t2i, args, request)
        if problem:
            err.write(f"{prog}: error: {problem}\n")
            return EXIT_USAGE
        name = presets.model_label(request.model, t2i.model_path)
        request = request.replace(
            num_steps=request.num_steps if request.num_steps is not None else t2i.defaults["num_steps"],
            guidance_scale=request.guidance_scale if request.guidance_scale is not None else t2i.defaults["guidance"],
        )
        source = t2i.config.get("source") if isinstance(t2i.config, dict) else None
        err.write(
            f"model {name} ({t2i.model_path}"
            + (f", converted from {source}" if isinstance(source, str) and source else "")
            + ("), size of the input image" if request.init_image else f"), {t2i.img_width}x{t2i.img_height}")
            + f", {request.num_steps} steps, {t2i.scheduler.name}, "
            f"CFG {request.guidance_scale:g}, seed {request.seed}"
            + (f"..{(request.seed + request.batch_size - 1) % (MAX_SEED + 1)}" if request.batch_size > 1 else "")
            + (f", clip skip {request.clip_skip}" if request.clip_skip else "")
            + (f", VAE {args.vae}" if args.vae is not None else "")
            + (", XLA" if args.jit_compile else "")
            + (f", refiner {args.refiner} from {request.denoising_end:g} of the schedule" if args.refiner else "")
            + "\n"
        )
        err.flush()

        bar = ProgressBar(err)
        if args.refiner is None:
            images = t2i.generate(args.prompt_text, negative_prompt=args.negative_text, callback=bar,
                                  preview=_preview(args), **generate_kwargs(request))
        else:
            images, refiner_name = _base_then_refiner(t2i, request, args, bar, err)
        bar.close()
        loras, embeddings = network_hashes(t2i, request, args)
        for line in hash_warnings(args, loras, embeddings, t2i):
            err.write(f"{prog}: warning: {line}\n")
        for path, image, seed in zip(paths, images, list(t2i.last_seeds)):
            params = rules.png_parameters(request, seed, image, t2i.scheduler.name, t2i.attention, name,
                                          loras=loras, embeddings=embeddings,
                                          refiner=refiner_name if args.refiner is not None else None)
            try:
                save_png(path, image, params)
                written.append(path)
            except OSError as e:
                err.write(f"{prog}: error: cannot write {path}: {e.strerror or e}\n")
                return 1
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        saved = f"; saved (complete): {', '.join(written)}" if written else "; no image was saved"
        err.write(f"{prog}: interrupted{saved}.\n")
        return EXIT_INTERRUPTED
    except ValueError as e:  # bad model/size/weights, preset unavailable, ...
        if bar is not None:
            bar.close()
        err.write(f"{prog}: error: {_one_line(e)}\n")
        return EXIT_USAGE
    if args.grid:
        grid_path = grid_output_path(args.output)
        try:
            save_png(grid_path, contact_sheet(images), None)
        except OSError as e:
            err.write(f"{prog}: error: cannot write {grid_path}: {e.strerror or e}\n")
            return 1
        paths = paths + [grid_path]
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
