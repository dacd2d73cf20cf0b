"""Reading input images and masks for image-to-image, inpainting and outpainting.

Images become RGB uint8 arrays whatever their mode: L / LA / P / RGBA / CMYK are
converted by PIL (transparent pixels are composited on black, as dropping alpha
does); 16-bit integer images (I;16, I;16B, I) are scaled by 65535 to 0..255.
Sizes must be multiples of 8 for the VAE: `fit_to_multiple_of_8` crops the
right/bottom remainder (at most 7 pixels), keeping the content where it was.
Masks are greyscale, white = repaint; they are binarised at 50% grey.
"""

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_INPUT_PIXELS = 4096 * 4096


def _open(source, what):
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path!r} does not exist.")
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_INPUT_PIXELS:
                    raise ValueError(
                        f"{what} {path!r} is {img.width}x{img.height}; at most {MAX_INPUT_PIXELS} pixels are accepted."
                    )
                img.load()
                return img.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{what} {path!r} is not a readable image ({e}).") from None
    array = np.asarray(source)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"{what} array has dtype {array.dtype}; give uint8 pixels (0..255) or a PIL image."
                )
            array = (array.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image.fromarray(array)
    raise ValueError(f"{what} has shape {array.shape}; expected [H, W], [H, W, 3] or [H, W, 4].")


def _sixteen_bit_to_8(img):
    array = np.asarray(img, dtype=np.float64)
    return Image.fromarray((array * (255.0 / 65535.0)).clip(0, 255).round().astype(np.uint8), "L")


def to_rgb(img):
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _sixteen_bit_to_8(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img)
    return img.convert("RGB")


def load_image(source, what="image"):
    """A path, PIL image or array -> RGB uint8 [H, W, 3]."""
    return np.asarray(to_rgb(_open(source, what)), dtype=np.uint8)


def load_mask(source, size=None, what="mask"):
    """A path, PIL image or array -> float32 [H, W] in {0, 1} (1 = repaint).

    `size` = (height, width) of the image: a mask of another size is resized
    (nearest) to it with a warning.
    """
    import warnings

    img = _open(source, what)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _sixteen_bit_to_8(img)
    if img.mode in ("RGBA", "LA"):  # transparent = keep
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    grey = img.convert("L")
    if size is not None and (grey.height, grey.width) != tuple(size):
        warnings.warn(
            f"{what} is {grey.width}x{grey.height} but the image is {size[1]}x{size[0]}; "
            "the mask is resized (nearest) to the image."
        )
        grey = grey.resize((size[1], size[0]), Image.NEAREST)
    return (np.asarray(grey, dtype=np.float32) >= 127.5).astype(np.float32)


def fit_to_multiple_of_8(array):
    """Crop the bottom/right remainder so both sides are multiples of 8 (at most 7 pixels)."""
    h, w = array.shape[:2]
    h8, w8 = h - h % 8, w - w % 8
    if h8 == 0 or w8 == 0:
        raise ValueError(f"image of {w}x{h} pixels is too small; at least 8x8 is needed.")
    return array[:h8, :w8]
