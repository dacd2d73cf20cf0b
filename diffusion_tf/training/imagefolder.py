"""The LoRA stage's data: a folder of captioned images in the kohya convention.

    FOLDER/cat.png  FOLDER/cat.txt            an image and its caption (the .txt's first line)
    FOLDER/10_cross/a.png  .../a.txt          kohya's "N_name" subfolders: each image counts N times

Images are .png, .jpg, .jpeg or .webp (any case); each needs a same-named .txt beside it
(kohya's `caption_extension`), whose first line, stripped, is the caption (an empty file
is an error, as in kohya). Images directly in FOLDER count once; a subfolder named
`<N>_<name>` (N >= 1) counts its images N times (kohya's repeats); other subfolders are
skipped (kohya skips them too) and reported. A .txt without an image is ignored.

`scan_folder` checks all of this without decoding the pixels (each file's header is read
and verified by PIL) and returns a `FolderData`; `load_images` decodes them, RGB, centre-
cropped to a square and resized (Lanczos) to the model's size. Every problem is a
`DataError` (a ValueError) naming the folder or the file.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"
_REPEATS = re.compile(r"^(\d+)_(.+)$")


class DataError(ValueError):
    """A LoRA data folder that cannot be used (the message names the folder or the file)."""


@dataclasses.dataclass(frozen=True)
class Item:
    path: str        # the image file
    caption: str
    repeats: int
    subset: str      # "" for FOLDER itself, else the subfolder's name ("10_cross")


@dataclasses.dataclass
class FolderData:
    folder: str
    items: list      # [Item], sorted by subset then file name
    skipped: list    # subfolders that are not "N_name" (skipped)
    digest: str      # sha256 of every item's relative path, repeats, caption and file bytes

    @property
    def rows(self):
        """int32 [sum of repeats]: the item of each training row (item k appears repeats_k times)."""
        return np.repeat(np.arange(len(self.items), dtype=np.int32), [i.repeats for i in self.items])

    def subsets(self):
        """{subset: {"n_repeats", "img_count"}} (kohya's ss_dataset_dirs)."""
        out = {}
        for item in self.items:
            entry = out.setdefault(item.subset or ".", {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def tag_frequency(self):
        """{subset: {tag: count}}: the comma-separated tags of the captions (kohya's ss_tag_frequency)."""
        out = {}
        for item in self.items:
            counts = out.setdefault(item.subset or ".", {})
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return out


def _images_in(folder):
    names = sorted(os.listdir(folder))
    return [n for n in names if os.path.splitext(n)[1].lower() in EXTENSIONS
            and os.path.isfile(os.path.join(folder, n))]


def _caption(image_path):
    path = os.path.splitext(image_path)[0] + CAPTION_EXTENSION
    if not os.path.isfile(path):
        raise DataError(f"image {image_path!r} has no caption: {path!r} does not exist "
                        "(each image needs a same-named .txt file).")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"caption {path!r} cannot be read ({type(e).__name__}: {e}).") from None
    text = lines[0].strip() if lines else ""
    if not text:
        raise DataError(f"caption {path!r} is empty (its first line is the caption).")
    return text


def _verify(path):
    """Reads the header and checks the file with PIL (no pixel decoding); DataError if it is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path!r} cannot be read ({type(e).__name__}: {e}).") from None


def scan_folder(folder):
    """The captioned images of `folder` (`FolderData`); DataError naming what is wrong."""
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise DataError(f"data={folder!r}; must be a folder of images with .txt captions.")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"data folder {folder!r} {what}.")
    subsets, skipped = [("", 1)], []
    for name in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, name)) and not name.startswith("."):
            m = _REPEATS.match(name)
            if m and int(m.group(1)) >= 1:
                subsets.append((name, int(m.group(1))))
            else:
                skipped.append(name)
    items = []
    digest = hashlib.sha256()
    for subset, repeats in subsets:
        where = os.path.join(folder, subset) if subset else folder
        for name in _images_in(where):
            path = os.path.join(where, name)
            caption = _caption(path)
            _verify(path)
            items.append(Item(path, caption, repeats, subset))
            with open(path, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
            digest.update(f"{os.path.join(subset, name)}\0{repeats}\0{caption}\0{content}\n".encode())
    if not items:
        extra = f" (skipped subfolders, not named N_name: {', '.join(skipped)})" if skipped else ""
        raise DataError(f"data folder {folder!r} holds no images ({', '.join(EXTENSIONS)}) with captions"
                        f"{extra}.")
    return FolderData(folder, items, skipped, digest.hexdigest())


def load_image(path, size):
    """uint8 [size, size, 3]: the image at `path`, RGB, centre-cropped to a square, resized (Lanczos)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"image {path!r} cannot be read ({type(e).__name__}: {e}).") from None
    w, h = im.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im, np.uint8)


def load_images(data, size):
    """uint8 [len(data.items), size, size, 3], in the order of `data.items`."""
    return np.stack([load_image(item.path, size) for item in data.items])
