"""Micro-benchmark: the score budget of chunked softmax attention (`max_score_bytes`), under
XLA, at the SD UNet self-attention shapes (batch 2, 8 heads, 40 channels per head).

Above 16 MiB of scores, attention loops over (batch element, head, chunk of queries); the
budget caps the scores of one iteration, so smaller budgets mean more, smaller query chunks:
the float32 score block of a chunk may stay in cache between the max, exp, sum and matmul
passes, at the cost of more loop iterations.
Prints milliseconds per call (median of `--repeats`), the queries per iteration and the largest
difference from the first budget's result. See benchmarks/README.md.

    python benchmarks/micro/attention_chunks.py --tokens 1024 4096
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from diffusion_tf.layers.attention import _query_chunk, scaled_dot_product_attention  # noqa: E402

MIB = 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--budgets-mib", type=float, nargs="+", default=[256, 16, 4, 1, 0.25])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'tokens':>6} {'budget MiB':>10} {'chunk':>6} {'ms':>9} {'max |diff|':>10}")
    for n in args.tokens:
        q, k, v = (tf.constant(rng.standard_normal((2, n, 8, 40), np.float32)) for _ in range(3))
        reference = None
        for budget in args.budgets_mib:
            limit = int(budget * MIB)
            f = tf.function(lambda q, k, v, limit=limit: scaled_dot_product_attention(q, k, v, 40**-0.5,
                            max_score_bytes=limit), jit_compile=True)
            out = f(q, k, v).numpy()
            if reference is None:
                reference = out
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                f(q, k, v).numpy()
                times.append(time.perf_counter() - t)
            chunk = _query_chunk(2, 8, n, n, limit) or n
            print(f"{n:>6} {budget:>10g} {chunk:>6} {1e3 * np.median(times):>9.1f} "
                  f"{np.abs(out - reference).max():>10.2e}", flush=True)


if __name__ == "__main__":
    main()
