"""PNG files with their generation parameters, in the popular web-UI ("infotext") convention.

The parameters are one PNG text chunk named `parameters`:

    a photo of an astronaut riding a horse
    Negative prompt: blurry, low quality
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: sd-v1-5, Attention: standard

The prompt takes every line up to the `Negative prompt:` line (or up to the last
line when there is none), the negative prompt every line from there to the last
one, and the last line holds `Label: value` pairs. A value containing a comma, a
colon, a newline or a double quote, or with leading/trailing spaces, is written
as a JSON string (`Model: "C:\\\\models\\\\sd15"`), so every value survives the
round trip. `Size` is width x height.

`format_parameters(dict) -> str` and `parse_parameters(str) -> dict` are each
other's inverse; the dict keys are `prompt`, `negative_prompt` (only when there
is one), `steps`, `sampler`, `schedule_type`, `guidance`, `seed`, `width`, `height`, `model`,
`attention`, `temperature`, `denoising_strength` (editing), `clip_skip`, `lora_hashes`,
`ti_hashes`, and any other label as lower_snake_case (kept as a string). The values are kept as
written (A1111's sampler names, its Clip skip numbering): `diffusion_tf.pipeline.request.fields_from_png`
turns them into a request's fields (`diffusion_tf.a1111`). Known limitation (shared with the web UI): a prompt with a line of its
own starting with "Negative prompt:" is read back as a negative prompt.

This module imports neither TensorFlow nor Keras.
"""

import json
import os
import re
import secrets

import numpy as np

__all__ = ["format_parameters", "parse_parameters", "read_parameters", "save_png", "PARAMETERS_KEY"]

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt: "

# dict key -> label of the last line, in the order they are written.
LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule_type": "Schedule type",
    "guidance": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model": "Model",
    "attention": "Attention",
    "temperature": "Temperature",
    "denoising_strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "lora_hashes": "Lora hashes",
    "ti_hashes": "TI hashes",
}
_KEYS = {label: key for key, label in LABELS.items()}
_INTS = ("steps", "seed", "clip_skip")
_FLOATS = ("guidance", "temperature", "denoising_strength", "aesthetic_score", "negative_aesthetic_score",
           "guidance_rescale", "refiner_switch_at")

# `Label: value` where value is a JSON string or runs up to the next comma.
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_LABEL = re.compile(r"^\w[\w \-/]*$")


def _quote(value):
    text = str(value)
    if text == "" or text != text.strip() or any(c in text for c in ',:\n\r"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text):
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _number(value):
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _label(key):
    if key in LABELS:
        return LABELS[key]
    label = str(key).replace("_", " ").strip()
    label = label[:1].upper() + label[1:]
    if not _LABEL.match(label):
        raise ValueError(f"parameter name {key!r} cannot be written as a label (letters, digits, spaces, _ - /).")
    return label


def _key(label):
    return _KEYS.get(label, label.strip().lower().replace(" ", "_"))


def format_parameters(params):
    """The `parameters` text of a dict (see the module docstring); `None` values are left out."""
    if not isinstance(params, dict):
        raise ValueError(f"parameters must be a dict, got {type(params).__name__}.")
    params = {k: v for k, v in params.items() if v is not None}
    prompt = params.pop("prompt", "")
    negative = params.pop("negative_prompt", "")
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise ValueError("prompt and negative_prompt must be strings.")
    width, height = params.pop("width", None), params.pop("height", None)
    if width is not None or height is not None:
        if width is None or height is None:
            raise ValueError("give both width and height, or neither.")
        params["size"] = f"{int(width)}x{int(height)}"
    ordered = [k for k in LABELS if k in params] + [k for k in params if k not in LABELS]
    fields = [f"{_label(k)}: {_quote(_number(params[k]))}" for k in ordered]
    lines = [prompt]
    if negative:
        lines.append(NEGATIVE_PREFIX + negative)
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _parse_fields(line):
    """[(label, raw value)] of a parameter line, or None when the line is not one."""
    fields, pos = [], 0
    line = line.rstrip("\r")
    while pos < len(line):
        m = _PARAM.match(line, pos)
        if m is None or m.end() == pos:
            return None
        fields.append((m.group(1).strip(), m.group(2)))
        pos = m.end()
    return fields


def parse_parameters(text):
    """The dict of a `parameters` text (the inverse of `format_parameters`).

    Text whose last line is not a list of `Label: value` pairs is all prompt.
    A text written by `format_parameters` always ends with the parameter line.
    Values of known numeric keys that do not parse as numbers are kept as strings.
    """
    if not isinstance(text, str):
        raise ValueError(f"parameters text must be a str, got {type(text).__name__}.")
    lines = text.split("\n")
    fields = _parse_fields(lines[-1])
    # The last line is the parameter line (possibly empty) when there are several
    # lines; a text of one line only when it has at least 3 fields, as the web UI.
    if fields is not None and (len(lines) > 1 or len(fields) >= 3):
        lines = lines[:-1]
    else:
        fields = []
    negative = None
    for i, line in enumerate(lines):
        if line.startswith(NEGATIVE_PREFIX) or line == NEGATIVE_PREFIX.rstrip():
            negative = "\n".join([line[len(NEGATIVE_PREFIX):]] + lines[i + 1:])
            lines = lines[:i]
            break
    out = {"prompt": "\n".join(lines)}
    if negative is not None:
        out["negative_prompt"] = negative
    for label, raw in fields:
        key = _key(label)
        value = _unquote(raw)
        if key == "size":
            m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value)
            if m:
                out["width"], out["height"] = int(m.group(1)), int(m.group(2))
                continue
        elif key in _INTS:
            try:
                value = int(value)
            except ValueError:
                pass
        elif key in _FLOATS:
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def save_png(path, image, parameters=None):
    """Write `image` (uint8 [H, W, 3]) to `path` as PNG, atomically, with a `parameters` chunk.

    The file is written under a temporary name in the same folder and renamed
    into place, so a failed or interrupted write never leaves a partial file and
    never replaces an existing file. `parameters`: a dict (see `format_parameters`),
    a ready text, or None for no chunk.
    """
    from PIL import Image, PngImagePlugin

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}.")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        text = parameters if isinstance(parameters, str) else format_parameters(parameters)
        info.add_text(PARAMETERS_KEY, text)
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            Image.fromarray(image, "RGB").save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def read_parameters(path):
    """The parsed `parameters` chunk of a PNG, or None when it has none."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}).get(PARAMETERS_KEY, im.info.get(PARAMETERS_KEY))
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return parse_parameters(str(text))
