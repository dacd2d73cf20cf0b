"""The web UI: `python -m diffusion_tf.app` (or `python sd_gradio.py`) starts a Gradio page.

    python -m diffusion_tf.app [--model MODEL] [--host 127.0.0.1] [--port 7860] [--share]
                               [--output-dir DIR] [--max-upload-mb 10] [--jit-compile]
                               [--lora-dir DIR] [--embedding-dir DIR]

Tabs: text-to-image, image-to-image, inpainting (draw the area to repaint on the image),
outpainting. Every image is written to the output folder as a PNG that carries its
parameters (`diffusion_tf.png_info`, the same as the command line's: one `GenerationRequest` and
`png_parameters`), shown in a gallery and downloadable from it; "Reuse parameters" fills the
controls from an uploaded PNG (ours or AUTOMATIC1111's). Every tab has clip skip (A1111's
numbering on the page) and LoRAs chosen from the LoRA folder with one scale; they become
`<lora:NAME:SCALE>` tags at the end of the recorded prompt, with `Lora hashes`.

How it behaves:
- One model in memory (`Generator`); requests queue and run one at a time; each
  session's Stop button cancels its own running generation at the next denoising step.
- Safe by default: listens on 127.0.0.1, no share link unless `--share`; the only files
  served are the app's own output folder (Gradio's upload cache lives in it too); any
  request path with `..`, a backslash or a NUL byte, plain or percent-encoded in any case,
  gets 403 before it reaches Gradio; uploads are limited in size (`--max-upload-mb`) and
  decoded with PIL as images only (anything else is a message on the page).
- Bad input (no prompt, a file that is not an image, a PNG without parameters, a mask
  drawn on nothing, a size the model refuses) is a message on the page; the app keeps
  serving. A port already in use is one line on the console and exit code 2.

Gradio is an optional dependency: `pip install "diffusion_tf[app]"`.
"""

import argparse
import datetime
import os
import secrets
import socket
import sys
import threading
import urllib.parse

import numpy as np

EXIT_USAGE = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 10
MAX_BATCH = 8
SIZES = list(range(64, 1025, 64))
ATTENTIONS = ("model default", "standard", "linear")
CACHE_SUBDIR = ".gradio"


class Cancelled(Exception):
    """Raised inside the denoising loop when the session asked to stop."""


class AppError(ValueError):
    """A message for the page (bad input); the app keeps serving."""


def free_port(host, port):
    """None if (host, port) can be bound, else the OSError's text."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def is_traversal(raw_path):
    """True if a request path tries to leave its folder: `..` segments, backslashes or NUL bytes,
    plain, percent-encoded (any case, repeatedly) or mixed."""
    path = raw_path
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    if "\\" in path or "\x00" in path:
        return True
    return any(part == ".." for part in path.replace("=", "/").split("/"))


# ------------------------------------------------------------------ generation
class Generator:
    """One model in memory, one generation at a time, PNGs with parameters in `output_dir`."""

    def __init__(self, model=None, output_dir="outputs", jit_compile=False, log=print, lora_dir=None,
                 embedding_dir=None):
        self.model = model
        self.lora_dir, self.embedding_dir = lora_dir, embedding_dir
        self.output_dir = os.path.abspath(output_dir)
        self.jit_compile = bool(jit_compile)
        self.log = log
        self._lock = threading.Lock()
        self._pipe = None
        self._pipe_attention = None
        self._cancel = {}
        self.model_name = None

    def pipeline(self, attention=None):
        """The loaded Text2Image; rebuilt only when another attention type is asked for."""
        from diffusion_tf.presets import model_label
        from diffusion_tf.pipeline.text_to_image import Text2Image

        if self._pipe is None or (attention is not None and attention != self._pipe.attention):
            self._pipe = None  # free the old one first: one model in memory
            self._pipe = Text2Image(model=self.model, jit_compile=self.jit_compile, attention=attention,
                                    lora_dir=self.lora_dir, embedding_dir=self.embedding_dir)
            self.model_name = model_label(self.model, self._pipe.model_path)
        return self._pipe

    def defaults(self):
        pipe = self.pipeline()
        return {
            "steps": pipe.defaults["num_steps"], "guidance": pipe.defaults["guidance"],
            "scheduler": pipe.scheduler.name, "width": pipe.img_width, "height": pipe.img_height,
            "text_layers": pipe.text_layers, "xl": pipe.is_xl,
        }

    def lora_folder(self):
        """Where `<lora:NAME>` finds its file: `lora_dir`, else `$DIFFUSION_TF_HOME/loras`."""
        if self.lora_dir is not None:
            return os.path.abspath(self.lora_dir)
        from diffusion_tf.presets.cache import cache_dir

        return os.path.join(cache_dir(), "loras")

    def lora_names(self):
        """The names of the LoRA files of the LoRA folder (what the page offers)."""
        from diffusion_tf import a1111

        return list(a1111.lora_files(self.lora_folder()))

    def example_prompts(self, n=8):
        """Prompts the model understands, for a model that only knows its own grammar (the
        built-in shapes model: captions of its dataset); [] for others."""
        from diffusion_tf import presets

        if self.model_name != presets.BUILTIN_MODEL:
            return []
        from diffusion_tf.shapes import dataset

        return list(dataset.sample_prompts(n, seed=0))

    def cancel(self, session):
        event = self._cancel.get(session)
        if event is not None:
            event.set()
        return event is not None

    def _unique_path(self, seed):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return os.path.join(self.output_dir, f"{stamp}-{seed}-{secrets.token_hex(3)}.png")

    def run(self, prompt, negative_prompt="", steps=None, guidance=None, seed=None, scheduler=None,
            width=None, height=None, batch=1, attention=None, init_image=None, strength=0.8, mask=None,
            outpaint=None, clip_skip=None, loras=(), lora_scale=1.0, guidance_rescale=0.0, original_size=None,
            target_size=None, crops_coords_top_left=None, progress=None, session=None, preview=None):
        """Generate and save; returns [(path, caption)]. AppError for bad input, Cancelled when stopped.

        `preview`: sink(k, n, images) for live previews (uint8 images of the latents so far, about
        ten per generation: `preview_every`), called from this thread while it denoises.
        `clip_skip`: diffusers' (1 = A1111's Clip skip 2). `loras`: names of the LoRA folder's files,
        each merged at `lora_scale` as a `<lora:NAME:SCALE>` tag added to the prompt (a name the prompt
        already tags keeps the prompt's scale); the PNG records that prompt and the LoRAs' hashes.
        SDXL: `original_size`, `target_size`, `crops_coords_top_left` as "H,W" text or pairs (blank: the
        default), `guidance_rescale` 0 to 1 (any model)."""
        import math

        from diffusion_tf import a1111
        from diffusion_tf.pipeline import request as rules
        from diffusion_tf.pipeline.request import MAX_SEED, GenerationRequest, png_parameters
        from diffusion_tf.png_info import save_png
        from diffusion_tf.prompts.syntax import extract_networks

        if not isinstance(prompt, str) or not prompt.strip():
            raise AppError("Write a prompt first.")
        loras = list(loras or [])
        if loras:
            try:
                scale = float(lora_scale)
            except (TypeError, ValueError):
                scale = math.nan
            if not math.isfinite(scale):
                raise AppError(f"LoRA scale {lora_scale!r}: must be a finite number.")
            available = self.lora_names()
            missing = [n for n in loras if n not in available]
            if missing:
                raise AppError(f"LoRA {', '.join(missing)}: no such file in {self.lora_folder()} "
                               f"(it holds {', '.join(available) or 'none'}).")
            try:
                tags = extract_networks(prompt)[1] + extract_networks(negative_prompt or "")[1]
            except ValueError as e:
                raise AppError(str(e)) from None
            tagged = {n.lower() for n, _ in tags}
            added = [a1111.lora_tag(n, scale) for n in loras if n.lower() not in tagged]
            if added:
                prompt = " ".join([prompt.rstrip()] + added)
        micro = {}
        for field, value in (("original_size", original_size), ("target_size", target_size),
                             ("crops_coords_top_left", crops_coords_top_left)):
            if isinstance(value, str):
                value = value.strip() or None
                if value is not None:
                    try:
                        value = rules.parse(field, value)
                    except ValueError as e:
                        raise AppError(str(e)) from None
            micro[field] = value
        batch = int(batch)
        if not 1 <= batch <= MAX_BATCH:
            raise AppError(f"batch={batch}; allowed: 1 to {MAX_BATCH}.")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        editing = init_image is not None
        request = GenerationRequest(
            prompt, negative_prompt=negative_prompt or None, num_steps=steps, guidance_scale=guidance,
            seed=int(seed), batch_size=batch, height=None if editing or height is None else int(height),
            width=None if editing or width is None else int(width), scheduler=scheduler, init_image=init_image,
            strength=strength, mask=mask, outpaint=outpaint, model=self.model, attention=attention,
            clip_skip=None if clip_skip is None else int(clip_skip),
            guidance_rescale=float(guidance_rescale or 0.0), **micro,
        )
        try:
            request.validate()
        except ValueError as e:
            raise AppError(str(e)) from None
        event = threading.Event()
        self._cancel[session] = event
        try:
            with self._lock:
                pipe = self.pipeline(attention)
                request = request.replace(
                    num_steps=steps or pipe.defaults["num_steps"],
                    guidance_scale=guidance if guidance is not None else pipe.defaults["guidance"],
                )

                def callback(k, n, _t):
                    if event.is_set():
                        raise Cancelled()
                    if progress is not None:
                        progress((k, n), desc="denoising")

                shown = None
                if preview is not None:
                    from diffusion_tf.pipeline.preview import Preview

                    shown = Preview(preview_every(request.num_steps), preview)
                try:
                    images = pipe.run(request, callback=callback, preview=shown)
                except Cancelled:
                    raise
                except ValueError as e:
                    raise AppError(str(e)) from None
                os.makedirs(self.output_dir, exist_ok=True)
                sampler = scheduler or pipe.scheduler.name
                texts = [request.prompt, request.negative_prompt or ""]
                names = list(dict.fromkeys(n for t in texts for n, _ in extract_networks(t)[1]))
                lora_hashes = a1111.lora_hashes(pipe.loras, names)
                ti_hashes = a1111.embedding_hashes(pipe.conditioning.embeddings, texts)
                out = []
                for image, image_seed in zip(images, pipe.last_seeds):
                    params = png_parameters(request, image_seed, image, sampler, pipe.attention, self.model_name,
                                            loras=lora_hashes, embeddings=ti_hashes)
                    path = self._unique_path(int(image_seed))
                    save_png(path, np.asarray(image), params)
                    out.append((path, f"seed {int(image_seed)}"))
                return out
        finally:
            self._cancel.pop(session, None)


def preview_every(num_steps):
    """Steps between the web UI's previews: about ten per generation, at least one step apart."""
    return max(1, int(num_steps) // 10)


def previews_while(run):
    """Run `run(sink)` in a thread; yields ("preview", images) for each preview it sinks, then
    ("done", result) or ("error", exception). The page's generator shows the images as they come."""
    import queue

    items = queue.Queue()

    def work():
        try:
            items.put(("done", run(lambda _k, _n, images: items.put(("preview", images)))))
        except BaseException as e:  # handed to the caller's thread, which raises it
            items.put(("error", e))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, value = items.get()
        yield kind, value
        if kind != "preview":
            return


# ------------------------------------------------------------------ inputs from the page
def load_upload(path, what="image"):
    """An uploaded file decoded as an image (RGB uint8), or AppError."""
    from diffusion_tf.image_io import load_image

    if not path:
        raise AppError(f"Upload an {what} first.")
    try:
        return load_image(path, what=what)
    except ValueError as e:
        raise AppError(f"The uploaded file is not an image we can read ({os.path.basename(str(path))}).") from e


def mask_from_editor(value):
    """(image RGB uint8, mask uint8 0/255) from a gr.ImageEditor value; AppError if no image or
    nothing was drawn."""
    if not value or value.get("background") is None:
        raise AppError("Upload an image to inpaint first.")
    background = np.asarray(value["background"])
    if background.ndim != 3:
        raise AppError("The uploaded file is not an RGB image.")
    image = background[..., :3].astype(np.uint8)
    drawn = np.zeros(image.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[:2] == drawn.shape:
            drawn |= (layer[..., 3] > 0) if layer.shape[-1] == 4 else layer.any(axis=-1)
    if not drawn.any():
        raise AppError("The mask is empty: draw over the area to repaint with the brush.")
    return image, (drawn * 255).astype(np.uint8)


def parameters_from_png(path):
    """The parameters stored in an uploaded PNG, or AppError."""
    from diffusion_tf.png_info import read_parameters

    if not path:
        raise AppError("Upload a PNG written by diffusion_tf (or the web-UI convention) first.")
    try:
        params = read_parameters(path)
    except ValueError as e:
        raise AppError(f"{os.path.basename(str(path))}: {e}") from None
    if not params:
        raise AppError(f"{os.path.basename(str(path))} carries no generation parameters.")
    return params


# ------------------------------------------------------------------ the page
def build_demo(generator, max_upload_mb=DEFAULT_MAX_UPLOAD_MB):
    import gradio as gr

    from diffusion_tf.pipeline.request import MAX_SEED
    from diffusion_tf.schedulers.names import NAMES

    d = generator.defaults()
    schedulers = list(NAMES)
    lora_names = generator.lora_names()

    def page_error(e):
        return gr.Error(str(e), print_exception=False)

    def controls(tab, sizes=True):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt", scale=4)
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}-negative", scale=3)
        with gr.Row():
            steps = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps", elem_id=f"{tab}-steps")
            guidance = gr.Slider(0, 20, value=d["guidance"], step=0.5, label="Guidance", elem_id=f"{tab}-guidance")
            scheduler = gr.Dropdown(schedulers, value=d["scheduler"], label="Scheduler", elem_id=f"{tab}-scheduler")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id=f"{tab}-seed", minimum=0, maximum=MAX_SEED)
            random_seed = gr.Checkbox(value=True, label="Random seed", elem_id=f"{tab}-random")
            batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch", elem_id=f"{tab}-batch")
            attention = gr.Dropdown(list(ATTENTIONS), value="model default", label="Attention", elem_id=f"{tab}-attention")
        width = height = None
        if sizes:
            with gr.Row():
                width = gr.Dropdown(SIZES, value=d["width"], label="Width", elem_id=f"{tab}-width")
                height = gr.Dropdown(SIZES, value=d["height"], label="Height", elem_id=f"{tab}-height")
        with gr.Row():
            clip_skip = gr.Slider(1, max(d["text_layers"], 1), value=1, step=1, elem_id=f"{tab}-clip-skip",
                                  label="Clip skip (A1111's numbering: 1 = none, 2 = the penultimate layer)")
            loras = gr.Dropdown(lora_names, value=[], multiselect=True, elem_id=f"{tab}-loras",
                                label=f"LoRAs (from {generator.lora_folder()}; or <lora:NAME:SCALE> in the prompt)")
            lora_scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id=f"{tab}-lora-scale")
        with gr.Accordion("SDXL micro-conditioning (diffusers' defaults when blank)", open=False, visible=d["xl"]):
            with gr.Row():
                original = gr.Textbox(value="", label="Original size (H,W)", elem_id=f"{tab}-original-size")
                target = gr.Textbox(value="", label="Target size (H,W)", elem_id=f"{tab}-target-size")
                crops = gr.Textbox(value="", label="Crop top-left (top,left)", elem_id=f"{tab}-crops")
                rescale = gr.Slider(0, 1, value=0.0, step=0.05, label="Guidance rescale",
                                    elem_id=f"{tab}-guidance-rescale")
        return dict(prompt=prompt, negative=negative, steps=steps, guidance=guidance, scheduler=scheduler,
                    seed=seed, random_seed=random_seed, batch=batch, attention=attention, width=width, height=height,
                    clip_skip=clip_skip, loras=loras, lora_scale=lora_scale, original_size=original,
                    target_size=target, crops_coords_top_left=crops, guidance_rescale=rescale)

    base_keys = ("prompt", "negative", "steps", "guidance", "scheduler", "seed", "random_seed", "batch", "attention",
                 "width", "height")
    # The last inputs of every tab, after the tab's own (API callers may leave them out: the page's defaults).
    network_keys = ("clip_skip", "loras", "lora_scale", "original_size", "target_size", "crops_coords_top_left",
                    "guidance_rescale")

    def common(c, values, network):
        keys = [k for k in base_keys if c[k] is not None]
        v = dict(zip(keys, values))
        n = dict(zip(network_keys, network))
        return dict(
            prompt=v["prompt"], negative_prompt=v["negative"], steps=int(v["steps"]), guidance=float(v["guidance"]),
            scheduler=v["scheduler"], seed=None if v["random_seed"] else int(v["seed"] or 0), batch=int(v["batch"]),
            attention=None if v["attention"] == "model default" else v["attention"],
            width=v.get("width"), height=v.get("height"),
            clip_skip=max(int(n.get("clip_skip") or 1) - 1, 0),  # A1111's number on the page
            loras=list(n.get("loras") or []), lora_scale=n.get("lora_scale", 1.0),
            **{k: n.get(k) for k in ("original_size", "target_size", "crops_coords_top_left", "guidance_rescale")},
        )

    def inputs_of(c, extra_inputs=()):
        return [c[k] for k in base_keys if c[k] is not None] + list(extra_inputs) + [c[k] for k in network_keys]

    def runner(mode, c, n_extra=0):
        def run(*values, progress=gr.Progress(), request: gr.Request = None):
            split = len(values) - n_extra - len(network_keys)
            control_values, extra = values[:split], values[split:split + n_extra]
            kwargs = common(c, control_values, values[split + n_extra:])
            session = getattr(request, "session_hash", None)
            try:
                if mode == "img2img":
                    image_path, strength = extra
                    kwargs.update(init_image=load_upload(image_path), strength=float(strength))
                elif mode == "inpaint":
                    editor, strength = extra
                    image, mask = mask_from_editor(editor)
                    kwargs.update(init_image=image, mask=mask, strength=float(strength))
                elif mode == "outpaint":
                    image_path, left, right, top, bottom = extra
                    sides = {"left": int(left), "right": int(right), "top": int(top), "bottom": int(bottom)}
                    if not any(sides.values()):
                        raise AppError("Choose how many pixels to add on at least one side.")
                    kwargs.update(init_image=load_upload(image_path), outpaint={k: v for k, v in sides.items() if v})
            except AppError as e:
                raise page_error(e) from None
            for kind, value in previews_while(
                    lambda sink: generator.run(progress=progress, session=session, preview=sink, **kwargs)):
                if kind == "preview":  # the images so far, in the gallery's place
                    yield [(image, "denoising") for image in value], "denoising..."
                elif kind == "error" and isinstance(value, AppError):
                    raise page_error(value) from None
                elif kind == "error" and isinstance(value, Cancelled):
                    gr.Info("Generation stopped.")
                    yield gr.update(), "stopped"
                elif kind == "error":
                    raise value
                else:
                    yield value, f"{len(value)} image(s) in {generator.output_dir}"

        return run

    def cancel(request: gr.Request = None):
        generator.cancel(getattr(request, "session_hash", None))

    def reuse(path):
        """The controls from a PNG's parameters (ours or A1111's), read by the request's own
        `fields_from_png`; a sampler we lack keeps the page's with a warning."""
        from diffusion_tf.pipeline.request import fields_from_png

        try:
            p = parameters_from_png(path)
            f = fields_from_png(p, ignore=("scheduler",))
        except AppError as e:
            raise page_error(e) from None
        except ValueError as e:
            raise page_error(AppError(f"{os.path.basename(str(path))}: {e}")) from None
        scheduler = d["scheduler"]
        if p.get("sampler") is not None:
            try:
                only = {"sampler": p["sampler"], "schedule_type": p.get("schedule_type")}
                scheduler = fields_from_png(only)["scheduler"]
            except ValueError as e:
                gr.Warning(f"{e} The scheduler is left as it was.")
        clip = (f.get("clip_skip") or 0) + 1
        return (
            f.get("prompt", ""), f.get("negative_prompt", ""), f.get("num_steps", d["steps"]),
            f.get("guidance_scale", d["guidance"]), scheduler if scheduler in schedulers else d["scheduler"],
            f.get("seed", 0), False,
            f.get("width", d["width"]) if f.get("width") in SIZES else d["width"],
            f.get("height", d["height"]) if f.get("height") in SIZES else d["height"],
            min(clip, max(d["text_layers"], 1)), [],  # the LoRAs are the prompt's <lora:...> tags
        )

    def generate_section(tab, c, extra_inputs=()):
        """Generate and Stop buttons, the gallery and the status line of a tab, wired through
        the one shared queue; returns the Generate event."""
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate")
            stop = gr.Button("Stop", elem_id=f"{tab}-stop")
        gallery = gr.Gallery(label="Results", columns=4, elem_id=f"{tab}-gallery", format="png")
        status = gr.Textbox(label="Status", interactive=False, elem_id=f"{tab}-status")
        extra_inputs = list(extra_inputs)
        event = go.click(runner(tab, c, len(extra_inputs)), inputs_of(c, extra_inputs), [gallery, status],
                         api_name=tab, concurrency_id="gpu", concurrency_limit=1)
        stop.click(cancel, None, None, cancels=[event], queue=False)
        return event

    with gr.Blocks(title="diffusion_tf") as demo:
        gr.Markdown(f"## diffusion_tf: Stable Diffusion in Keras 3\nModel: `{generator.model_name}`; "
                    f"images are saved with their parameters in `{generator.output_dir}`.")
        with gr.Tabs():
            with gr.Tab("Text to image", id="txt2img"):
                c = controls("txt2img")
                generate_section("txt2img", c)
                examples = generator.example_prompts()
                if examples:  # a model that only understands its own grammar
                    gr.Examples([[e] for e in examples], [c["prompt"]], label="Prompts this model understands")
                with gr.Accordion("Reuse the parameters of an image", open=False):
                    png = gr.File(label="PNG with parameters", file_types=[".png"], elem_id="reuse-file")
                    reuse_button = gr.Button("Reuse parameters", elem_id="reuse")
                    reuse_button.click(reuse, [png], [c["prompt"], c["negative"], c["steps"], c["guidance"],
                                                      c["scheduler"], c["seed"], c["random_seed"], c["width"],
                                                      c["height"], c["clip_skip"], c["loras"]], api_name="reuse")

            with gr.Tab("Image to image", id="img2img"):
                c2 = controls("img2img", sizes=False)
                image = gr.Image(label="Input image", type="filepath", elem_id="img2img-image")
                strength = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Strength")
                generate_section("img2img", c2, [image, strength])

            with gr.Tab("Inpainting", id="inpaint"):
                c3 = controls("inpaint", sizes=False)
                editor = gr.ImageEditor(label="Image: paint over the area to repaint", type="numpy",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                        elem_id="inpaint-editor")
                strength3 = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")
                generate_section("inpaint", c3, [editor, strength3])

            with gr.Tab("Outpainting", id="outpaint"):
                c4 = controls("outpaint", sizes=False)
                image4 = gr.Image(label="Input image", type="filepath")
                with gr.Row():
                    sides = [gr.Slider(0, 256, value=v, step=8, label=f"Add {k} (px)")
                             for k, v in (("left", 0), ("right", 64), ("top", 0), ("bottom", 0))]
                generate_section("outpaint", c4, [image4] + sides)
    demo.queue(max_size=64, default_concurrency_limit=1)
    return demo


class TraversalGuard:
    """ASGI middleware: 403 for any request whose path or query tries to leave its folder."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = scope.get("raw_path", b"").decode("latin-1") or scope.get("path", "")
            query = scope.get("query_string", b"").decode("latin-1")
            if is_traversal(raw) or is_traversal(query.replace("&", "/")):
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("forbidden", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def launch(generator, host=DEFAULT_HOST, port=DEFAULT_PORT, share=False, max_upload_mb=DEFAULT_MAX_UPLOAD_MB,
           block=True):
    """Serve the page: the traversal guard in front, Gradio serving only `generator.output_dir`."""
    from starlette.middleware import Middleware

    demo = build_demo(generator, max_upload_mb)
    demo.launch(
        server_name=host, server_port=port, share=share, allowed_paths=[generator.output_dir],
        max_file_size=int(max_upload_mb * 1024 * 1024), show_error=True, ssr_mode=False, quiet=True,
        app_kwargs={"middleware": [Middleware(TraversalGuard)]}, prevent_thread_lock=not block,
    )
    return demo


def build_parser():
    p = argparse.ArgumentParser(prog="python -m diffusion_tf.app", description="The diffusion_tf web UI (Gradio).")
    p.add_argument("--model", default=None, help="model folder or preset (default: SD v1.5 if cached, else the built-in model)")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--output-dir", default="outputs", help="where images are written and served from (default ./outputs)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted (default 10)")
    p.add_argument("--jit-compile", action="store_true", help="compile generation with XLA")
    p.add_argument("--lora-dir", default=None,
                   help="the LoRA files the page offers and <lora:NAME:SCALE> finds (default $DIFFUSION_TF_HOME/loras)")
    p.add_argument("--embedding-dir", default=None,
                   help="embeddings usable as words in prompts (default $DIFFUSION_TF_HOME/embeddings)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: --port {args.port}: must be 1 to 65535.\n")
    for option, folder in (("--lora-dir", args.lora_dir), ("--embedding-dir", args.embedding_dir)):
        if folder is not None and not os.path.isdir(folder):
            parser.exit(EXIT_USAGE, f"{parser.prog}: error: {option} {folder}: no such folder.\n")
    if args.max_upload_mb <= 0:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: --max-upload-mb {args.max_upload_mb}: must be positive.\n")
    busy = free_port(args.host, args.port)
    if busy:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: cannot listen on {args.host}:{args.port} ({busy}); "
                                "is another app running there? Choose another --port.\n")
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    # Gradio's upload/download cache inside the output folder: nothing is served from elsewhere.
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(output_dir, CACHE_SUBDIR)
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: the web UI needs Gradio: pip install \"diffusion_tf[app]\"\n")
    generator = Generator(args.model, output_dir, jit_compile=args.jit_compile, lora_dir=args.lora_dir,
                          embedding_dir=args.embedding_dir)
    try:
        generator.pipeline()
    except ValueError as e:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    print(f"diffusion_tf web UI on http://{args.host}:{args.port} (model {generator.model_name}; "
          f"outputs in {output_dir}); Ctrl-C to stop", flush=True)
    try:
        launch(generator, args.host, args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
