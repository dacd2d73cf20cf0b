"""The refinement stage's data: the UNet's own image-to-image latents of clean latents
(through the pipeline's compiled generation function)."""

import numpy as np
import tensorflow as tf
from keras import ops


def image_to_image_latents(pipe, clean, captions, strengths, seed=0, batch=100):
    """Final latents (sampler space) of image-to-image from each clean latent (sampler space:
    the image's posterior mean x scaling factor) with its caption, at the pipeline's
    generation defaults: row k runs at strength strengths[k % len(strengths)], from the
    noise of seed `seed * 1_000_003 + k`. One compiled function serves every batch."""
    from diffusion_tf import editing

    sched = pipe.scheduler
    steps, guidance = pipe.defaults["num_steps"], float(pipe.defaults["guidance"])
    sched.set_timesteps(steps)
    tables = {k: tf.constant(v) for k, v in sched.tables.items()}
    shape = pipe.latent_shape
    fn = pipe._generate_fn(guidance > 1.0, sched, (), shape[:2])
    out = np.zeros((len(clean),) + tuple(shape), np.float32)
    for j, strength in enumerate(strengths):
        rows = np.arange(j, len(clean), len(strengths))
        start = editing.start_index(steps, strength, sched)
        for b in range(0, len(rows), batch):
            r = rows[b: b + batch]
            if start >= steps:  # strength 0: nothing runs
                out[r] = clean[r]
                continue
            noise = pipe.noise([seed * 1_000_003 + int(k) for k in r], shape)
            x = editing.add_noise_at(sched, tf.constant(clean[r]), noise, start, tables)
            _, lat = fn(tf.constant(pipe.tokenizer([captions[k] for k in r])), tf.constant(pipe.tokenizer([""] * len(r))),
                        x, tables, tf.constant(guidance, "float32"), tf.constant(1.0, "float32"),
                        tf.constant(seed, "int64"), tf.constant(start, "int32"), {})
            out[r] = ops.convert_to_numpy(lat)
    return out
