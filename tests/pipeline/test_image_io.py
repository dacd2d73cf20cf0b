"""Input images and masks: every PIL mode, 16-bit scaling, bad files, size rules."""

import numpy as np
import pytest
from PIL import Image

from diffusion_tf.image_io import fit_to_multiple_of_8, load_image, load_mask


def rgb(h=16, w=24):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    src = Image.fromarray(rgb()).convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    src.save(path)
    out = load_image(str(path))
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, np.asarray(Image.open(path).convert("RGB")), atol=0)


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom transparent
    for mode in ("RGBA", "LA"):
        img = Image.fromarray(rgba).convert(mode) if mode == "LA" else Image.fromarray(rgba)
        out = load_image(img)
        assert out[:4].max() > 0 and out[4:].max() == 0


def test_sixteen_bit_is_scaled_by_65535(tmp_path):
    values = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # I;16
    out = load_image(str(path))
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 1]])
    np.testing.assert_array_equal(load_image(values)[..., 1], [[0, 255], [128, 1]])


def test_masks_are_binarised_and_resized_with_a_warning():
    mask = np.array([[0, 127], [128, 255]], np.uint8)
    np.testing.assert_array_equal(load_mask(mask), [[0, 0], [1, 1]])
    with pytest.warns(UserWarning, match="resized"):
        out = load_mask(mask, size=(4, 4))
    assert out.shape == (4, 4) and set(np.unique(out)) == {0.0, 1.0}


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"))
    (tmp_path / "not.png").write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(str(tmp_path / "not.png"))
    with pytest.raises(ValueError, match="dtype float"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((8, 8, 5), np.uint8))


def test_fit_to_multiple_of_8_crops_bottom_right():
    img = rgb(21, 35)
    out = fit_to_multiple_of_8(img)
    assert out.shape == (16, 32, 3)
    np.testing.assert_array_equal(out, img[:16, :32])
    with pytest.raises(ValueError, match="too small"):
        fit_to_multiple_of_8(rgb(5, 40))
