"""The refinement stage's data: the UNet's own image-to-image latents of clean latents
(through the pipeline's public generation: `init_latents=`, `output_type="latent"`)."""

import numpy as np


def image_to_image_latents(pipe, clean, captions, strengths, seed=0, batch=100):
    """Final latents (sampler space) of image-to-image from each clean latent (sampler space:
    the image's posterior mean x scaling factor) with its caption, at the pipeline's
    generation defaults: row k runs at strength strengths[k % len(strengths)], from the
    noise of seed `seed * 1_000_003 + k`. One compiled function serves every batch."""
    steps, guidance = pipe.defaults["num_steps"], float(pipe.defaults["guidance"])
    out = np.zeros((len(clean),) + tuple(pipe.latent_shape), np.float32)
    for j, strength in enumerate(strengths):
        rows = np.arange(j, len(clean), len(strengths))
        for b in range(0, len(rows), batch):
            r = rows[b: b + batch]
            noise = pipe.noise([seed * 1_000_003 + int(k) for k in r])
            out[r] = pipe.generate(
                [captions[k] for k in r], num_steps=steps, unconditional_guidance_scale=guidance, seed=seed,
                latents=noise, init_latents=clean[r], strength=strength, output_type="latent",
            )
    return out
