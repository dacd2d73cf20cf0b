"""Micro-benchmark: diffusion_tf's Winograd F(4x4, 3x3) convolution
(`diffusion_tf.layers.conv2d.winograd_conv3x3`, filter transform included in every call)
against the direct tf.nn.conv2d, both under XLA, at the SD UNet and VAE convolution shapes,
with the shape rule's choice (`winograd_applies`) next to each. See benchmarks/README.md.

    python benchmarks/micro/winograd_conv.py [--sizes 32 64]
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from diffusion_tf.layers.conv2d import winograd_applies, winograd_conv3x3  # noqa: E402

# (batch, side, C_in, C_out): UNet at batch 2 (256 px: sides 32-8, 512 px: 64-16), VAE decoder at batch 1
SHAPES = [(2, 64, 320, 320), (2, 64, 640, 320), (2, 32, 320, 320), (2, 32, 320, 640), (2, 32, 640, 640),
          (2, 32, 1280, 640), (2, 32, 1920, 640), (2, 32, 1280, 1280),
          (2, 32, 960, 640), (2, 16, 640, 640), (2, 16, 1280, 1280), (2, 8, 1280, 1280), (1, 64, 512, 512),
          (1, 128, 512, 512), (1, 256, 256, 256), (1, 256, 512, 256), (1, 512, 128, 128), (1, 512, 256, 128)]


def median_seconds(fn, x, repeats):
    fn(x).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", help="only these spatial sides")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    print("shape                     direct ms  winograd ms  speed-up  rel. error  rule")
    for b, side, c_in, c_out in SHAPES:
        if args.sizes and side not in args.sizes:
            continue
        x = tf.constant(rng.standard_normal((b, side, side, c_in)).astype(np.float32))
        w = tf.Variable((rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32))
        direct = tf.function(lambda x: tf.nn.conv2d(x, w, 1, "SAME"), jit_compile=True)
        wino = tf.function(lambda x: winograd_conv3x3(x, w), jit_compile=True)
        reference = direct(x).numpy()
        error = np.abs(wino(x).numpy() - reference).max() / np.abs(reference).max()
        repeats = args.repeats if side < 256 else max(1, args.repeats // 2)
        td, tw = median_seconds(direct, x, repeats), median_seconds(wino, x, repeats)
        rule = "winograd" if winograd_applies((b, side, side, c_in), (3, 3, c_in, c_out)) else "direct"
        print(f"{b}x{side}x{side}x{c_in}->{c_out:<5} {td * 1e3:>14.1f} {tw * 1e3:>12.1f} {td / tw:>8.2f}x "
              f"{error:>10.1e}  {rule}", flush=True)


if __name__ == "__main__":
    main()
