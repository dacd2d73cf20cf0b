"""The command line of `python -m diffusion_tf.train`: its parser (every flag a field of
`TrainOptions`) and `main`, whose usage errors are one line on stderr, exit code 2."""

import argparse
import dataclasses
import sys

from diffusion_tf.training.imagefolder import DataError
from diffusion_tf.training.options import DEFAULT_PROMPT, PRESETS, STAGES, TrainOptions
from diffusion_tf.training.plan import plan
from diffusion_tf.training.run import train

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(
        prog="python -m diffusion_tf.train",
        description="Train a small text-to-image latent diffusion model (Stable Diffusion classes) "
        "from scratch on the captioned-shapes dataset, or a LoRA for a model on a folder of captioned images.",
    )
    a = p.add_argument
    a("--stage", choices=STAGES, default="all", help="vae, decoder (fine-tune the VAE decoder, encoder frozen), unet (+ text encoder, VAE frozen), refine (the decoder fine-tuned on the trained UNet's image-to-image latents), all (default: the four in order), or lora (a LoRA for --base trained on --data; writes FOLDER/<FOLDER name>.safetensors, kohya format)")
    a("--config", choices=tuple(PRESETS), default=None, help="architecture preset (default small; tiny for tests)")
    a("--epochs", type=int, help="epochs of the stage trained (the UNet's with --stage all); the total when resuming")
    a("--steps", type=int, help="steps per epoch")
    a("--lr", type=float, help="Adam learning rate (after the warm-up)")
    a("--batch-size", type=int, help="global batch size")
    a("--vae-epochs", type=int, help="with --stage all: epochs of the VAE stage")
    a("--vae-steps", type=int, help="with --stage all: steps per epoch of the VAE stage")
    a("--vae-lr", type=float, help="with --stage all: learning rate of the VAE stage")
    a("--vae-batch-size", type=int, help="with --stage all: batch size of the VAE stage")
    a("--decoder-epochs", type=int, help="with --stage all: epochs of the decoder fine-tuning stage")
    a("--decoder-steps", type=int, help="with --stage all: steps per epoch of the decoder stage")
    a("--decoder-lr", type=float, help="with --stage all: learning rate of the decoder stage")
    a("--decoder-batch-size", type=int, help="with --stage all: batch size of the decoder stage")
    a("--refine-epochs", type=int, help="with --stage all: epochs of the refinement stage (the decoder on the UNet's samples)")
    a("--refine-steps", type=int, help="with --stage all: steps per epoch of the refinement stage")
    a("--refine-lr", type=float, help="with --stage all: learning rate of the refinement stage")
    a("--refine-batch-size", type=int, help="with --stage all: batch size of the refinement stage")
    a("--T", type=int, help="diffusion steps (default 1000)")
    a("--schedule", help="beta schedule: linear (default), scaled_linear or cosine")
    a("--prediction", help="epsilon (default) or v_prediction")
    a("--save", default="shapes_model", help="output folder: model folder, checkpoints/, loss.png, GIFs")
    a("--resume", action="store_true", help="continue the run whose checkpoints are in --save")
    a("--overwrite", action="store_true", help="start again over existing checkpoints in --save")
    a("--vae", help="with --stage unet: take the VAE from this model folder")
    a("--gif", action="store_true", help="write forward.gif and reverse.gif")
    a("--gif-steps", type=int, default=50, help="denoising steps of reverse.gif (default 50)")
    a("--gif-prompt", default=DEFAULT_PROMPT, help="prompt of reverse.gif")
    a("--seed", type=int, help="seed of the dataset, the initial weights and the training noise (default 0)")
    a("--dataset-size", type=int, help="number of captioned shapes generated")
    a("--ema-decay", type=float, help="EMA decay of the weights (default 0.999)")
    a("--warmup", type=int, help="learning-rate warm-up steps")
    a("--kl-weight", type=float, help="weight of the VAE's KL term")
    a("--cfg-drop", type=float, help="probability of training on the empty caption (default 0.1)")
    a("--position-steps", type=int, help="UNet stage: the first N steps train only on captions naming a position "
      "and a background, at high noise, without caption drop (default: the preset's; 0: no position phase)")
    a("--position-t-min", type=int, help="the position phase's lowest timestep (default 0.8 T)")
    a("--devices", type=int, default=0, help="0: every GPU, or every logical CPU, if several (default); 1: one device; N: the first N")
    a("--jit-compile", action="store_true", help="XLA-compile the train step")
    a("--run-eagerly", action="store_true", help="run the train step eagerly (debugging; no tracing)")
    a("--deterministic", action="store_true", help="tf.config.experimental.enable_op_determinism()")
    a("--weights-dtype", choices=("float16", "float32"), default=None, help="dtype of the written weights (default float16 for a model folder, float32 for a LoRA file)")
    a("--eval-every", type=int, default=0, help="UNet stage: judge prompt adherence (diffusion_tf.eval) every N epochs; 0: never (default)")
    a("--eval-prompts", type=int, default=50, help="prompts judged by --eval-every (default 50)")
    a("--verbose", type=int, default=1, help="Keras fit verbosity: 0 silent, 1 progress bar (default), 2 one line per epoch")
    lora = p.add_argument_group("--stage lora (defaults: 10 epochs x 100 steps, batch 16, lr 1e-3, warm-up 50, EMA 0.99)")
    b = lora.add_argument
    b("--base", metavar="MODEL_FOLDER", help="the model the LoRA is for: a model folder, 'shapes' (the built-in model) or a converted preset")
    b("--data", metavar="FOLDER", help="images (png/jpg/webp) with same-named .txt captions; kohya's N_name subfolders repeat their images N times")
    b("--rank", type=int, help="rank of the low-rank factors (default 8)")
    b("--alpha", type=float, help="kohya's alpha: the update is alpha / rank * up @ down (default: the rank)")
    b("--lora-ff", action="store_true", default=None, help="also the UNet's feed-forward layers (default: attention projections only)")
    b("--lora-conv", action="store_true", default=None, help="also the UNet's resnet 3x3 convolutions (kohya's LoCon: down 3x3, up 1x1)")
    b("--lora-text-encoder", action="store_true", default=None, help="also the text encoder's q/k/v/out_proj")
    return p


def options_from_args(args):
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        plan(options)
    except ValueError as e:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    try:
        train(options)
    except DataError as e:  # an image that cannot be decoded (plan() checked the rest)
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0
