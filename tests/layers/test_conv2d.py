"""Conv2D's Winograd F(4x4, 3x3) path: the transforms, the numbers, and when it is used."""

from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from diffusion_tf import runtime
from diffusion_tf.layers import conv2d
from diffusion_tf.layers.conv2d import Conv2D, toom_cook, winograd_applies


def correlate_1d(g, d, m):
    return np.array([sum(g[k] * d[i + k] for k in range(len(g))) for i in range(m)])


@pytest.mark.parametrize("points, m", [((0, 1, -1), 2), ((0, 1, -1, Fraction(1, 2), -2), 4), ((0, 1, -1, 2, -2), 4)])
def test_toom_cook_computes_the_1d_correlation(points, m):
    bt, g, at = toom_cook(points, m=m)
    assert bt.shape == (m + 2, m + 2) and g.shape == (m + 2, 3) and at.shape == (m, m + 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        filt, data = rng.standard_normal(3), rng.standard_normal(m + 2)
        np.testing.assert_allclose(at @ ((g @ filt) * (bt @ data)), correlate_1d(filt, data, m), atol=1e-12)


def test_toom_cook_gives_lavins_f2_matrices():
    bt, g, at = toom_cook((0, 1, -1), m=2)
    np.testing.assert_array_equal(at, [[1, 1, 1, 0], [0, 1, -1, 1]])
    np.testing.assert_array_equal(g, [[-1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    np.testing.assert_array_equal(np.abs(bt), [[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]])


def test_toom_cook_refuses_repeated_or_missing_points():
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook((0, 1, 1, 2, -2))
    with pytest.raises(ValueError, match="needs 5"):
        toom_cook((0, 1, -1))


def direct_float64(x, kernel, bias):
    out = tf.nn.conv2d(tf.constant(x, tf.float64), tf.constant(kernel, tf.float64), 1, "SAME")
    return out.numpy() + bias


def make_conv(rng, c_in, c_out):
    layer = Conv2D(c_out, 3, padding="same")
    layer.build((None, None, None, c_in))
    layer.kernel.assign((rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype("float32"))
    layer.bias.assign(rng.standard_normal(c_out).astype("float32"))
    return layer


def test_winograd_convolution_matches_the_direct_one(monkeypatch):
    """A shape the rule picks (2x32x32, 256 -> 256): eager and XLA within 2e-5 of the largest
    output of a float64 convolution (the direct float32 one is within ~1e-6)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 256)).astype("float32")
    layer = make_conv(rng, 256, 256)
    assert winograd_applies(x.shape, layer.kernel.shape)
    calls = []
    original = conv2d.winograd_conv3x3
    monkeypatch.setattr(conv2d, "winograd_conv3x3", lambda *a: calls.append(1) or original(*a))
    reference = direct_float64(x, layer.kernel.numpy(), layer.bias.numpy())
    scale = np.abs(reference).max()
    for fn in (layer, tf.function(layer, jit_compile=True)):
        out = np.asarray(fn(x))
        error = np.abs(out - reference).max() / scale
        assert 1e-8 < error < 2e-5, error  # not the direct convolution, and close to it
    assert len(calls) == 2
    with runtime.overridden(winograd=False):
        direct = np.asarray(layer(x))
    assert len(calls) == 2
    np.testing.assert_array_equal(direct, np.asarray(tf.nn.conv2d(x, layer.kernel, 1, "SAME") + layer.bias))


@pytest.mark.parametrize(
    "input_shape, kernel_shape, applies, applies_kept",
    [
        ((2, 64, 64, 320), (3, 3, 320, 320), True, True),  # SD 512 px, first level
        ((2, 32, 32, 320), (3, 3, 320, 320), True, True),  # SD 256 px, first level
        ((1, 128, 128, 512), (3, 3, 512, 512), True, True),  # VAE decoder at 512 px
        ((None, 64, 64, 512), (3, 3, 512, 512), True, True),  # unknown batch counts as 1
        ((2, 16, 16, 1280), (3, 3, 1280, 1280), False, False),  # few pixels per weight
        ((2, 32, 32, 640), (3, 3, 640, 640), False, True),  # SD 512 px, second level
        ((2, 32, 32, 960), (3, 3, 960, 640), False, True),
        ((2, 32, 32, 1280), (3, 3, 1280, 640), False, False),
        ((2, 16, 16, 640), (3, 3, 640, 640), False, False),  # too few pixels
        ((1, 512, 512, 128), (3, 3, 128, 128), False, False),  # few channels
        ((1, 256, 256, 512), (3, 3, 512, 256), False, False),  # input above MAX_INPUT_BYTES
        ((2, 64, 64, 4), (3, 3, 4, 320), False, False),  # conv_in
        ((2, 62, 62, 320), (3, 3, 320, 320), False, False),  # not a multiple of 4
        ((2, None, None, 320), (3, 3, 320, 320), False, False),
        ((2, 64, 64, 320), (1, 1, 320, 320), False, False),
    ],
)
def test_winograd_shape_rule(input_shape, kernel_shape, applies, applies_kept):
    """The bound on weights per pixel follows the keep_heap option (with large heap blocks
    kept, the filter transform's output is not faulted in at every call)."""
    assert winograd_applies(input_shape, kernel_shape, runtime.Options(keep_heap=False)) is applies
    assert winograd_applies(input_shape, kernel_shape, runtime.Options(keep_heap=True)) is applies_kept
    with runtime.overridden(keep_heap=False):
        assert winograd_applies(input_shape, kernel_shape) is applies
    with runtime.overridden(keep_heap=True):
        assert winograd_applies(input_shape, kernel_shape) is applies_kept


def test_strided_half_precision_and_small_convolutions_stay_direct(monkeypatch):
    monkeypatch.setattr(conv2d, "winograd_conv3x3", lambda *a: pytest.fail("Winograd used"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 32, 256)).astype("float32")
    strided = Conv2D(256, 3, strides=2, padding="valid")
    assert tuple(strided(x).shape) == (2, 15, 15, 256)
    half = Conv2D(256, 3, padding="same", dtype="mixed_float16")
    assert half(x).dtype == "float16"
    small = Conv2D(32, 3, padding="same")
    assert tuple(small(x[..., :32]).shape) == (2, 32, 32, 32)


# In a fresh process: the same convolution (2x32x32x640, Winograd only under the wider bound
# of the default keep_heap option) traced before any network ran, after a network's first
# call, and after the heap setting was applied, takes the same path each time.
SAME_PATH_SCRIPT = r"""
import json, sys
import numpy as np
from diffusion_tf import compiler_memory, runtime
from diffusion_tf.layers import conv2d
from diffusion_tf.models import AutoencoderKL

calls = []
original = conv2d.winograd_conv3x3
conv2d.winograd_conv3x3 = lambda *a: calls.append(1) or original(*a)
x = np.ones((2, 32, 32, 640), np.float32)

def path():
    layer = conv2d.Conv2D(640, 3, padding="same")
    n = len(calls)
    layer(x)
    return "winograd" if len(calls) > n else "direct"

paths = [path()]
vae = AutoencoderKL(block_out_channels=[8], layers_per_block=1, norm_num_groups=4, latent_channels=4)
vae.build_weights()
vae(np.zeros((1, 8, 8, 3), np.float32))
paths.append(path())
runtime.apply()
paths.append(path())
print(json.dumps({"paths": paths, "kept": compiler_memory.large_blocks_kept()}))
"""


@pytest.mark.parametrize("keep_heap, expected", [(None, "winograd"), pytest.param("0", "direct", marks=pytest.mark.heavy)])
def test_the_same_convolution_takes_the_same_path_whatever_ran_before(keep_heap, expected):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSION_TF_KEEP_HEAP", "DIFFUSION_TF_WINOGRAD")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    if keep_heap is not None:
        env["DIFFUSION_TF_KEEP_HEAP"] = keep_heap
    out = subprocess.run([sys.executable, "-c", SAME_PATH_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["paths"] == [expected] * 3, result
