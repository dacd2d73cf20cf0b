"""Conv2D that computes large 3x3 convolutions with the Winograd F(4x4, 3x3) algorithm.

On CPU a direct 3x3 convolution already runs at the machine's fp32 FMA peak, so it can
only get faster by doing fewer multiplications. Winograd's minimal filtering (Lavin and
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes each 4x4 output
tile from a 6x6 input tile with 36 multiplications per channel pair instead of 144:

    Y = A^T [ (G g G^T) . (B^T d B) ] A

for a 3x3 filter g and an input tile d; summed over input channels, the elementwise
product becomes 36 matrix products [tiles, C_in] x [C_in, C_out]. The transforms are
Toom-Cook matrices for the interpolation points (0, 1, -1, 1/2, -2, inf), built exactly
with fractions below. The choice of points sets the float32 error (Barabasz et al., "Error
analysis and improving the accuracy of Winograd convolution for deep neural networks",
2020): 1/2 and -2 instead of Lavin's 2 and -2 put one convolution several times closer to a
float64 one (measured: benchmarks/README.md, "Figures behind the code's rules").

The filter transform G g G^T runs inside every call (the weights stay the checkpoint's
[3, 3, C_in, C_out] kernel, no 4x larger copy), so Winograd pays only when there are many
output pixels per weight; `winograd_applies` picks those convolutions from the static
shapes and the runtime options. Float32 only; `DIFFUSION_TF_WINOGRAD=0`
(`runtime.Options.winograd`, read when a convolution is traced) gives the direct
convolution everywhere.
"""

from fractions import Fraction

import keras
import numpy as np
from keras import ops

from diffusion_tf import runtime

OUTPUT_TILE = 4
POINTS = (0, 1, -1, Fraction(1, 2), -2)
# Shape rule (benchmarks/micro/winograd_conv.py; figures in benchmarks/README.md): at least
# MIN_PIXELS output pixels (batch x height x width) and MIN_CHANNELS input and output channels
# (below, the input and output transforms outweigh the saved multiplications), and at most
# MAX_WEIGHTS_PER_PIXEL kernel channel pairs per output pixel (above, the per-call filter
# transform outweighs them). The filter transform's cost depends on the heap: with glibc's
# defaults its 4x larger output is faulted in at every call; with large blocks kept
# (`compiler_memory.keep_large_blocks`) it is reused, and convolutions up to
# MAX_WEIGHTS_PER_PIXEL_KEPT pairs per pixel pay. The bound follows the keep_heap runtime
# option, not whether the heap setting has been applied yet, so that a convolution's path
# (and its float rounding) is the same whenever it is traced.
# Memory: the tile tensors are 2.25x the input and the output, so inputs above
# MAX_INPUT_BYTES stay direct (by Winograd, the VAE decoder's largest levels raised the peak
# memory of a whole generation).
MIN_PIXELS = 2048
MIN_CHANNELS = 256
MAX_WEIGHTS_PER_PIXEL = 128
MAX_WEIGHTS_PER_PIXEL_KEPT = 320
MAX_INPUT_BYTES = 48 * 2**20


def toom_cook(points, m=OUTPUT_TILE, r=3):
    """Exact B^T [n, n], G [n, r], A^T [m, n] (n = m + r - 1) for F(m, r) with the given
    finite interpolation points and infinity, such that
    y_i = sum_k g_k d_{i+k} = (A^T [(G g) . (B^T d)])_i. Returned as float64 arrays."""
    pts = [Fraction(p) for p in points]
    n = m + r - 1
    if len(pts) != n - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points!r}.")

    def poly_times(a, b):
        out = [Fraction(0)] * (len(a) + len(b) - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                out[i + j] += x * y
        return out

    def product_without(skip):
        poly = [Fraction(1)]
        for j, q in enumerate(pts):
            if j != skip:
                poly = poly_times(poly, [-q, Fraction(1)])
        return poly + [Fraction(0)] * (n - len(poly))

    at = [[p**i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            f *= p - q
        g.append([p**k / f for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt = [product_without(j) for j in range(n - 1)] + [product_without(None)]
    for i in range(m):  # the identity, exactly
        for k in range(r):
            for col in range(n):
                if sum(at[i][j] * g[j][k] * bt[j][col] for j in range(n)) != int(col == i + k):
                    raise AssertionError("Toom-Cook construction failed")
    return tuple(np.array(x, dtype=np.float64) for x in (bt, g, at))


BT, G, AT = toom_cook(POINTS)
# The 2-D transforms as matrices over the flattened tile (Kronecker products):
# (G g G^T) for all 36 (a, b) at once is GG [36, 9] times the kernel as [9, C_in * C_out],
# B^T d B is BB [36, 36] times the tiles as [36, ...], A^T M A is AA [16, 36] times [36, ...].
GG = np.kron(G, G).astype("float32")
BB = np.kron(BT, BT).astype("float32")
AA = np.kron(AT, AT).astype("float32")


def winograd_conv3x3(x, kernel):
    """A stride-1 'same' 3x3 convolution of x [B, H, W, C_in] (H, W multiples of 4) with
    kernel [3, 3, C_in, C_out], both float32, by Winograd F(4x4, 3x3).

    Each transform is one matrix product over the flattened tile axis."""
    m, a = OUTPUT_TILE, BT.shape[0]
    b, h, w = ops.shape(x)[0], x.shape[1], x.shape[2]
    c_in, c_out = kernel.shape[2], kernel.shape[3]
    th, tw = h // m, w // m
    # 1. Filter transform U = G g G^T: [36, C_in, C_out]. U does not depend on the input, so
    #    XLA would compute every convolution's U at the start and keep them all alive (0.15
    #    GiB more peak memory for the SD UNet at 256 px); a zero taken from the input ties
    #    each U to its own convolution.
    first = x[0, 0, 0, 0]
    zero = ops.where(ops.isfinite(first), first, 0.0) * 0.0
    u = ops.matmul(GG + zero, ops.reshape(kernel, (9, c_in * c_out)))
    u = ops.reshape(u, (a * a, c_in, c_out))
    # 2. Input transform V = B^T d B over the overlapping 6x6 tiles (stride 4) of the
    #    zero-padded input; element (i, j) of every tile is a strided slice.
    xp = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    d = ops.stack([xp[:, i:i + m * th:m, j:j + m * tw:m, :] for i in range(a) for j in range(a)], axis=0)
    v = ops.reshape(ops.matmul(BB, ops.reshape(d, (a * a, -1))), (a * a, -1, c_in))
    # 3. 36 matrix products over the input channels.
    prod = ops.matmul(v, u)  # [36, B * th * tw, C_out]
    # 4. Output transform Y = A^T M A, then the 4x4 tiles back into the image.
    y = ops.reshape(ops.matmul(AA, ops.reshape(prod, (a * a, -1))), (m, m, b, th, tw, c_out))
    y = ops.transpose(y, (2, 3, 0, 4, 1, 5))  # [B, th, 4, tw, 4, C_out]
    return ops.reshape(y, (b, h, w, c_out))


def winograd_enabled(options=None):
    """Whether Winograd convolutions are on (`options`: a runtime.Options, default this
    process's)."""
    return (options or runtime.options()).winograd


def winograd_applies(input_shape, kernel_shape, options=None):
    """Whether a stride-1 'same' convolution of these static shapes is faster by Winograd
    (an unknown batch counts as 1) under `options` (a runtime.Options, default this
    process's): its keep_heap option selects the bound on channel pairs per pixel."""
    _, h, w, c_in = input_shape
    kh, kw, _, c_out = kernel_shape
    if (kh, kw) != (3, 3) or not isinstance(h, int) or not isinstance(w, int):
        return False
    if h % OUTPUT_TILE or w % OUTPUT_TILE:
        return False
    pixels = (input_shape[0] if isinstance(input_shape[0], int) else 1) * h * w
    per_pixel = MAX_WEIGHTS_PER_PIXEL_KEPT if (options or runtime.options()).keep_heap else MAX_WEIGHTS_PER_PIXEL
    return (pixels >= MIN_PIXELS and min(c_in, c_out) >= MIN_CHANNELS
            and c_in * c_out <= per_pixel * pixels and pixels * c_in * 4 <= MAX_INPUT_BYTES)


class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D (same weights, same config) whose large float32 3x3 'same'
    convolutions run as Winograd F(4x4, 3x3) when `winograd_applies`."""

    def convolution_op(self, inputs, kernel):
        options = runtime.options()
        if (
            winograd_enabled(options)
            and self.strides == (1, 1)
            and self.dilation_rate == (1, 1)
            and self.padding == "same"
            and self.data_format == "channels_last"
            and self.groups == 1
            and keras.backend.standardize_dtype(inputs.dtype) == "float32"
            and keras.backend.standardize_dtype(kernel.dtype) == "float32"
            and winograd_applies(tuple(inputs.shape), tuple(kernel.shape), options)
        ):
            return winograd_conv3x3(inputs, kernel)
        return super().convolution_op(inputs, kernel)
