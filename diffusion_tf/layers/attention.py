"""Multi-head attention with the diffusers key names (to_q, to_k, to_v, to_out.0)."""

import keras
from keras import ops

from diffusion_tf.layers.ops_util import dense
from diffusion_tf.layers.base import Layer


# The largest float32 score block one attention call holds at a time. Longer sequences are
# processed one batch element and head at a time, in chunks of queries; each query's softmax
# row does not depend on the others, so chunking changes only float rounding (matmul
# blocking). At 1024x1024 standard attention would otherwise hold
# 2 x 8 x 16384^2 x 4 bytes = 16 GiB of scores (batch 2, 8 heads).
MAX_SCORE_BYTES = 256 * 2**20
# Speed, not memory: a score block that the max, exp, sum and matmul passes find in cache is
# faster even at the price of more loop iterations. Above CACHE_SCORE_BYTES of scores in
# all, the loop runs over (batch element, head, chunk of queries) with HEAD_BLOCK_BYTES of
# scores per iteration (at least MIN_CHUNK queries). Measured with
# benchmarks/micro/attention_chunks.py (figures: benchmarks/README.md, "Figures behind the
# code's rules").
CACHE_SCORE_BYTES = 16 * 2**20
HEAD_BLOCK_BYTES = 4 * 2**20
MIN_CHUNK = 64


def _query_chunk(b, h, nq, nk, max_bytes):
    """Queries per iteration of the loop over (batch element, head, chunk): about
    HEAD_BLOCK_BYTES of float32 scores and at most `max_bytes`; None when the shapes are
    unknown or one [B, H, Nq, Nk] block is small enough (no loop)."""
    if None in (nq, nk, h) or not isinstance(nq, int) or not isinstance(nk, int):
        return None
    b = b if isinstance(b, int) else 2
    per_query = nk * 4
    total = b * h * nq * per_query
    if total <= min(max_bytes, CACHE_SCORE_BYTES):
        return None
    chunk = min(max(MIN_CHUNK, HEAD_BLOCK_BYTES // per_query), max(1, max_bytes // per_query))
    return min(chunk, nq)


def _attend(q, k, v, mask, dtype):
    """q [..., Nq, D] (already scaled), k and v [..., Nk, D] (q, k float32) -> [..., Nq, D]
    in `dtype`.

    Batched matmuls on head-major tensors (XLA on CPU runs these about a third faster
    than the equivalent einsums on [B, N, H, D]). In float32 the softmax normalisation is
    applied to the [Nq, D] output instead of the [Nq, Nk] probabilities: one pass fewer
    over the scores, the same numbers up to rounding.
    """
    scores = ops.matmul(q, ops.swapaxes(k, -1, -2))
    if mask is not None:
        scores = scores + ops.cast(mask, "float32")
    if keras.backend.standardize_dtype(dtype) == "float32" and mask is None:
        weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))
        return ops.matmul(weights, v) / ops.sum(weights, axis=-1, keepdims=True)
    probs = ops.cast(ops.softmax(scores, axis=-1), dtype)
    return ops.matmul(probs, v)


def scaled_dot_product_attention(q, k, v, scale, mask=None, max_score_bytes=None):
    """Softmax attention on [B, N, H, D] tensors; scores and softmax in float32.

    The queries are multiplied by `scale` (not the [Nq, Nk] scores: a pass fewer over
    them). `mask` is added to the [B, H, Nq, Nk] scores (0 = keep, -inf = drop). Above
    CACHE_SCORE_BYTES of scores, or when the whole score matrix would exceed
    `max_score_bytes` (default `MAX_SCORE_BYTES`), attention runs one batch element and head
    at a time in chunks of queries, so that no N x N matrix per head is held for the whole
    batch.
    """
    dtype = q.dtype
    q = ops.transpose(ops.cast(q, "float32"), (0, 2, 1, 3)) * scale
    k = ops.transpose(ops.cast(k, "float32"), (0, 2, 1, 3))
    v = ops.transpose(v, (0, 2, 1, 3))
    limit = MAX_SCORE_BYTES if max_score_bytes is None else max_score_bytes
    chunk = _query_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[2], limit)
    if chunk is None or mask is not None:
        out = _attend(q, k, v, mask, dtype)
    else:
        out = _chunked_attend(q, k, v, dtype, chunk)
    return ops.transpose(out, (0, 2, 1, 3))


def _chunked_attend(q, k, v, dtype, chunk):
    """Attention in a loop (a while loop under XLA and in graphs) over (batch element, head,
    chunk of `chunk` queries), so that one block of chunk x Nk scores is alive at a time and
    stays in cache: unrolled chunks let XLA schedule them all at once (32 GiB for the SD
    UNet at 1024 px). The queries are zero-padded to a whole number of chunks; the padding
    rows are dropped."""
    b, h, nq, d = ops.shape(q)
    nk, dv = ops.shape(k)[2], ops.shape(v)[-1]
    n = -(-nq // chunk)
    if n * chunk != nq:
        q = ops.pad(q, [[0, 0], [0, 0], [0, n * chunk - nq], [0, 0]])
    q = ops.reshape(q, (b * h, n * chunk, d))
    k = ops.reshape(k, (b * h, nk, d))
    v = ops.reshape(v, (b * h, nk, dv))

    def body(i, out):
        head, start = i // n, (i % n) * chunk
        rows = ops.slice(q, (head, start, 0), (1, chunk, d))
        keys = ops.slice(k, (head, 0, 0), (1, nk, d))
        values = ops.slice(v, (head, 0, 0), (1, nk, dv))
        return ops.slice_update(out, (head, start, 0), _attend(rows, keys, values, None, dtype))

    out = ops.fori_loop(0, b * h * n, body, ops.zeros((b * h, n * chunk, dv), dtype))
    return ops.reshape(out, (b, h, n * chunk, dv))[:, :, :nq]


class Attention(Layer):
    """Self- or cross-attention over token sequences [B, N, C].

    Args:
        query_dim: channels of the queries (and of the output).
        heads: number of heads.
        dim_head: channels per head.
        cross_attention_dim: channels of the context; `None` for self-attention.
        qkv_bias: whether to_q/to_k/to_v have a bias (the UNet's do not,
            the VAE's do).
    """

    def __init__(
        self,
        query_dim,
        heads,
        dim_head,
        cross_attention_dim=None,
        qkv_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        inner = heads * dim_head

        # === Layers ===
        self.to_q = dense(inner, "to_q", self.dtype_policy, use_bias=qkv_bias)
        self.to_k = dense(inner, "to_k", self.dtype_policy, use_bias=qkv_bias)
        self.to_v = dense(inner, "to_v", self.dtype_policy, use_bias=qkv_bias)
        self.to_out = [dense(query_dim, "to_out_0", self.dtype_policy)]

        # === Config ===
        self.query_dim = query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.cross_attention_dim = cross_attention_dim
        self.qkv_bias = qkv_bias

    def split_heads(self, x):
        b, n = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(x, (b, n, self.heads, self.dim_head))

    def attend(self, q, k, v):
        """Combine [B, N, H, D] queries, keys and values; overridden by LinearAttention."""
        return scaled_dot_product_attention(q, k, v, self.dim_head**-0.5)

    def call(self, x, context=None):
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        out = self.attend(q, k, v)
        b, n = ops.shape(out)[0], ops.shape(out)[1]
        out = ops.reshape(out, (b, n, self.heads * self.dim_head))
        return self.to_out[0](out)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "query_dim": self.query_dim,
                "heads": self.heads,
                "dim_head": self.dim_head,
                "cross_attention_dim": self.cross_attention_dim,
                "qkv_bias": self.qkv_bias,
            }
        )
        return config
