"""LinearAttention: efficient attention with the same weights as `Attention`.

Shen et al., "Efficient Attention: Attention with Linear Complexities" (2021):
the queries are normalised with a softmax over the feature axis, the keys with a
softmax over the positions, and the values are summarised first,

    context = softmax_N(K)^T V            # [H, D, D], cost O(N D^2)
    out     = softmax_D(Q) context        # [N, H, D]

instead of softmax(Q K^T / sqrt(D)) V with its N x N matrix, O(N^2 D).
The projections (to_q, to_k, to_v, to_out.0) are those of `Attention`, so
checkpoints trained for softmax attention load unchanged; the result is then
an approximation of what those weights were trained for.
"""

from keras import ops

from diffusion_tf.layers.attention import Attention


class LinearAttention(Attention):
    """Drop-in replacement for `Attention` with O(N) cost in the sequence length."""

    def attend(self, q, k, v):
        dtype = q.dtype
        # Head-major [B, H, N, D]: both products become batched matmuls (XLA on CPU runs
        # einsums over [B, N, H, D] with transposes around every one of them).
        q, k, v = (ops.transpose(ops.cast(t, "float32"), (0, 2, 1, 3)) for t in (q, k, v))
        q = ops.softmax(q, axis=-1)  # over features
        k = ops.softmax(k, axis=2)  # over positions
        context = ops.matmul(ops.swapaxes(k, -1, -2), v)  # [B, H, D, D]
        out = ops.matmul(q, context)  # [B, H, N, D]
        return ops.cast(ops.transpose(out, (0, 2, 1, 3)), dtype)
