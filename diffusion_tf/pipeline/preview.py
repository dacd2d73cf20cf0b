"""Live previews: what the latents look like part-way through the denoising loop.

Cheap by default: a fixed linear map from the 4 latent channels to RGB, one per model family,
applied to the scaled latents the UNet works on (the community's approximation that ComfyUI
calls "latent2rgb" and A1111 "Approx cheap"; its coefficients were fitted on the official VAEs'
encodings). It costs a [h*w, 4] x [4, 3] product on the host, nothing against a UNet step. With a
tiny decoder (TAESD) as the pipeline's VAE, the preview is that decoder's image instead.

`Preview(every, sink)` is what `Text2Image.generate(..., preview=...)` takes: `sink(step, steps,
images)` receives uint8 RGB images [B, H, W, 3] (H, W the output size) after every `every`-th step
except the last (the final image follows it).
"""

import numpy as np

# family -> (4x3 factors, RGB bias), for latents in the UNet's (scaled) space; images = (x + 1) / 2
LATENT_RGB = {
    "sd": (((0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0)),
    "sdxl": (((0.3651, 0.4232, 0.4341),
              (-0.2533, -0.0042, 0.1068),
              (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011)),
}


def approximate_rgb(latents, family, factor=8):
    """Latents [B, h, w, 4] -> uint8 RGB [B, h * factor, w * factor, 3] through the family's
    linear map (each latent pixel becomes a factor x factor block)."""
    if family not in LATENT_RGB:
        raise ValueError(f"family={family!r}; allowed: {', '.join(map(repr, LATENT_RGB))}.")
    x = np.asarray(latents, np.float32)
    if x.ndim != 4 or x.shape[-1] != 4:
        raise ValueError(f"latents of shape {x.shape}: a latent-to-RGB preview needs [B, h, w, 4].")
    weights, bias = (np.asarray(v, np.float32) for v in LATENT_RGB[family])
    rgb = (x @ weights + bias + 1.0) / 2.0
    rgb = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=1), factor, axis=2)
    return rgb


def check_every(every):
    """A preview interval: an integer >= 1 (steps between previews)."""
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"preview every={every!r}; must be an integer >= 1 (steps between previews).")
    return int(every)


class Preview:
    """Previews every `every` steps, delivered to `sink(step, steps, images)` (see the module)."""

    def __init__(self, every, sink):
        self.every = check_every(every)
        if not callable(sink):
            raise ValueError(f"preview sink {sink!r} is not callable; give sink(step, steps, images).")
        self.sink = sink

    def due(self, k, n):
        """Whether a preview follows step index `k` of `n` (never after the last)."""
        return (k + 1) % self.every == 0 and k + 1 < n
