"""Images of shapes prompts from a text-to-image model: one 64x64 image per prompt, seeded
per prompt (TensorFlow is imported only when a model is built)."""

import time

import numpy as np

from diffusion_tf.shapes import dataset as shapes


def generate_images(prompts, model=None, steps=None, seed=0, batch=10, guidance=None, scheduler=None, log=print,
                    jit_compile=False, pipeline=None, loras=None):
    """One 64x64 image per prompt from `diffusion_tf.Text2Image`; prompt k uses seed + k
    (batches of `batch` prompts). `model=None` uses Text2Image's default model; `steps`
    and `guidance` None use `generate`'s defaults. `loras`: LoRA files merged into the
    model, each a path or (path, scale). `pipeline`: a Text2Image to use instead of
    building one (then `model`, `scheduler`, `jit_compile` and `loras` are its own)."""
    if pipeline is not None:
        t2i = pipeline
    else:
        from diffusion_tf.pipeline.text_to_image import Text2Image  # lazy: TensorFlow only when a model runs

        kwargs = {"img_height": shapes.IMAGE_SIZE, "img_width": shapes.IMAGE_SIZE, "jit_compile": jit_compile}
        if model is not None:
            kwargs["model"] = model
        if scheduler is not None:
            kwargs["scheduler"] = scheduler
        if loras:
            kwargs["loras"] = list(loras)
        t2i = Text2Image(**kwargs)
    options = {}
    if steps is not None:
        options["num_steps"] = steps
    if guidance is not None:
        options["unconditional_guidance_scale"] = guidance
    out = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        # a short last batch is padded to the same size (one compiled graph); prompt k keeps seed + k
        padded = chunk + [chunk[-1]] * (min(batch, len(prompts)) - len(chunk))
        images = np.asarray(t2i.generate(padded, seed=seed + b, batch_size=1, **options))
        if images.shape[0] != len(padded):
            raise ValueError(f"the model returned {images.shape[0]} images for {len(padded)} prompts.")
        out.append(images[:len(chunk)])
        log(f"generated {b + len(chunk)}/{len(prompts)} ({time.perf_counter() - start:.1f} s)")
    return np.concatenate(out, axis=0)
