"""What `attention="linear"` changes, for a model whose weights were trained for softmax attention.

    python benchmarks/linear_attention_difference.py [--model FOLDER] [--steps 10] [--size PX]

Loads the same weights twice (standard and linear UNet self-attention) and reports:
  * the relative difference of one UNet evaluation (same latents, timestep, prompt);
  * the difference of whole generations with the same seed (mean and max absolute
    pixel difference out of 255, and PSNR).
Without --model it uses the tiny random-weight SD 1.x test model, which shows the
mechanics, not the visual effect; run it with a converted SD 1.5 folder for that.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the tiny test model)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    args = p.parse_args()

    from diffusion_tf import Text2Image

    model = args.model
    if model is None:
        from support.tiny_models import converted_folder

        model = converted_folder("tiny-sd1")
    pipes = {a: Text2Image(model=model, img_height=args.size, img_width=args.size, attention=a)
             for a in ("standard", "linear")}
    std = pipes["standard"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1,) + std.latent_shape).astype("float32")
    context = std.encode_text([args.prompt])
    outs = {a: np.asarray(p.predict_noise(latents, np.array([500]), context)) for a, p in pipes.items()}
    unet_rel = float(np.linalg.norm(outs["linear"] - outs["standard"]) / np.linalg.norm(outs["standard"]))
    images = {a: p.generate(args.prompt, num_steps=args.steps, seed=0).astype("float64") for a, p in pipes.items()}
    diff = np.abs(images["linear"] - images["standard"])
    mse = float((diff**2).mean())
    result = {
        "model": os.path.basename(os.path.abspath(model)),
        "size": [std.img_height, std.img_width],
        "steps": args.steps,
        "unet_relative_l2_difference": unet_rel,
        "image_mean_abs_difference_of_255": float(diff.mean()),
        "image_max_abs_difference_of_255": float(diff.max()),
        "image_psnr_db": float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
