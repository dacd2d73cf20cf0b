"""AUTOMATIC1111's names for what a generation used, both ways (pure Python: no TensorFlow).

The PNG parameters (`diffusion_tf.png_info`, `diffusion_tf.pipeline.request`) speak the web UI's
"infotext" dialect, so an image made here pastes into A1111 and one made there regenerates here.

Samplers (`sampler_to_a1111`, `sampler_from_a1111`):

    ours         A1111 "Sampler"    ours              A1111 "Sampler", "Schedule type"
    ddim         DDIM               euler-karras      Euler, Karras
    ddpm         DDPM               heun-karras       Heun, Karras
    pndm (plms)  PLMS               lms-karras        LMS, Karras        (older form: "LMS Karras")
    euler        Euler              dpm++2m-karras    DPM++ 2M, Karras   (older form: "DPM++ 2M Karras")
    euler_a      Euler a
    heun         Heun
    lms          LMS
    dpm++2m      DPM++ 2M
    lcm          LCM
    tcd          TCD                (A1111 has no TCD sampler: our label, read back as written)

Read: A1111's labels in any case, its `k_...` aliases (`k_euler_a`, `k_dpmpp_2m_ka`, ...), the
older "<sampler> Karras" labels, and our own names (PNGs written before these labels: `ddim`,
`dpm++2m-karras`). `Schedule type: Automatic` (or none) is the sampler's default schedule,
`Karras` its Karras sigmas; a sampler or schedule type we lack is a ValueError naming it and
listing what is supported.

Clip skip: A1111 counts from 1 (`Clip skip: 1` = the last layer, 2 = the penultimate), diffusers'
`clip_skip` (ours) from 0, so A1111's N is our N - 1 (`clip_skip_to_a1111`, `clip_skip_from_a1111`).

Hashes (`Lora hashes: "name: 0123456789ab, other: ..."`, `TI hashes: ...`): `format_hashes`,
`parse_hashes`; a LoRA's short hash is `diffusion_tf.lora.file_hash` (A1111's "addnet" hash for
.safetensors), an embedding's `short_sha256` (the file's sha256, 12 hex digits, as A1111).

Extra-network files: `lora_files(folder)` (what `<lora:NAME>` can name), `find_lora` (the file of
one name, as the pipeline looks it up), `split_lora_spec` / `split_embedding_spec` (the CLI's
`PATH[:SCALE]` and `PATH[:TOKEN]`, Windows paths included), `lora_tag(name, scale)`.
"""

import hashlib
import math
import os
import re

from diffusion_tf.schedulers.names import ALIASES, BASE, KARRAS

# our canonical algorithm name -> A1111's sampler label
SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm++2m": "DPM++ 2M",
    "lcm": "LCM",
    "tcd": "TCD",  # A1111 has no TCD sampler: the label is ours, read back as written
}
assert set(SAMPLERS) == set(BASE), "every scheduler needs its A1111 label"

KARRAS_SCHEDULE = "Karras"
DEFAULT_SCHEDULE = "Automatic"
# A1111's sampler aliases (sd_samplers_kdiffusion.py) for the samplers we have.
_K_ALIASES = {
    "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_euler": "euler", "k_lms": "lms",
    "k_heun": "heun", "k_dpmpp_2m": "dpm++2m", "k_lms_ka": "lms-karras", "k_dpmpp_2m_ka": "dpm++2m-karras",
}
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
HASH_LENGTH = 12


def supported_samplers():
    """A1111's labels of the samplers we have, for messages."""
    return (", ".join(SAMPLERS.values()) + f" (Schedule type: {DEFAULT_SCHEDULE}, or {KARRAS_SCHEDULE} for "
            + ", ".join(SAMPLERS[k] for k in KARRAS) + "; also the older forms 'DPM++ 2M Karras', 'LMS Karras')")


def sampler_to_a1111(name):
    """Our scheduler name (any accepted spelling) -> (A1111 sampler label, schedule type or None)."""
    karras = name.endswith("-karras")
    base = name[: -len("-karras")] if karras else name
    base = ALIASES.get(base, base)
    if base not in SAMPLERS or (karras and base not in KARRAS):
        raise ValueError(f"scheduler {name!r} has no A1111 name.")
    return SAMPLERS[base], (KARRAS_SCHEDULE if karras else None)


def _lookup():
    table = {label.lower(): ours for ours, label in SAMPLERS.items()}
    table.update({f"{SAMPLERS[k]} karras".lower(): f"{k}-karras" for k in KARRAS})
    table.update(_K_ALIASES)
    table.update({a: b for a, b in ALIASES.items()})
    table.update({n: n for n in BASE})
    table.update({f"{k}-karras": f"{k}-karras" for k in KARRAS})
    return table


_BY_LABEL = _lookup()


def sampler_from_a1111(sampler, schedule_type=None):
    """A1111's `Sampler` (and `Schedule type`) or one of our names -> our scheduler name.
    ValueError naming what we lack."""
    text = str(sampler).strip()
    ours = _BY_LABEL.get(text.lower()) or _BY_LABEL.get(text)
    if ours is None:
        raise ValueError(f"Sampler {text!r} is not supported; supported: {supported_samplers()}.")
    base = ours[: -len("-karras")] if ours.endswith("-karras") else ours
    karras = ours != base
    if schedule_type is not None and str(schedule_type).strip().lower() not in ("", DEFAULT_SCHEDULE.lower()):
        schedule = str(schedule_type).strip()
        if schedule.lower() != KARRAS_SCHEDULE.lower():
            raise ValueError(f"Schedule type {schedule!r} (Sampler {text!r}) is not supported; supported: "
                             f"{DEFAULT_SCHEDULE}, and {KARRAS_SCHEDULE} for "
                             + ", ".join(SAMPLERS[k] for k in KARRAS) + ".")
        if base not in KARRAS:
            raise ValueError(f"Sampler {text!r} with Schedule type {schedule!r} is not supported: Karras sigmas "
                             "are available for " + ", ".join(SAMPLERS[k] for k in KARRAS) + ".")
        karras = True
    return f"{base}-karras" if karras else base


# ---------------------------------------------------------------- clip skip
def clip_skip_to_a1111(clip_skip):
    """Our (diffusers') clip_skip -> A1111's `Clip skip` value, None when no layer is skipped."""
    return int(clip_skip) + 1 if clip_skip else None


def clip_skip_from_a1111(value):
    """A1111's `Clip skip` (an int or its text) -> our clip_skip (None for 1: no layer skipped).
    ValueError unless it is an integer >= 1."""
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip(), 10)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"Clip skip: {value!r}; must be an integer >= 1 (A1111's numbering: 1 = the last "
                         "layer, 2 = the penultimate).")
    return n - 1 or None


# ---------------------------------------------------------------- hashes
def format_hashes(pairs):
    """[(name, hash)] -> A1111's `name: hash, name2: hash2` (None when empty); a name listed twice once."""
    seen, parts = set(), []
    for name, value in pairs:
        if name not in seen:
            seen.add(name)
            parts.append(f"{name}: {value}")
    return ", ".join(parts) or None


def parse_hashes(text):
    """A1111's `name: hash, name2: hash2` -> {name: hash} (pieces without a colon are skipped)."""
    out = {}
    for part in str(text or "").split(","):
        name, colon, value = part.rpartition(":")
        if colon and name.strip() and value.strip():
            out.setdefault(name.strip(), value.strip())
    return out


def short_sha256(path):
    """The first 12 hex digits of a file's sha256 (A1111's short hash of an embedding)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:HASH_LENGTH]


def lora_hashes(entries, names):
    """[(name, short hash)] of the loaded LoRAs (entries with `.name`, `.path`, `.hash`, e.g.
    `Text2Image.loras`) that the names (of `<lora:NAME>` tags) refer to: the entry of that name,
    else the one whose file stem is the name (case-insensitive last, as the lookup of `find_lora`)."""
    out = []
    for name in names:
        stems = [(e, os.path.splitext(os.path.basename(e.path))[0]) for e in entries]
        match = (next((e for e, stem in stems if stem == name), None)
                 or next((e for e in entries if e.name == name), None)
                 or next((e for e, stem in stems if stem.lower() == name.lower()), None))
        if match is not None:
            out.append((name, match.hash))
    return out


def embedding_hashes(embeddings, texts):
    """[(token, short sha256)] of the added textual-inversion tokens ({token: (path, ...)}, e.g.
    `Text2Image.conditioning.embeddings`) that occur as words in any of `texts`."""
    text = " ".join(t for t in texts if t).lower()
    out = []
    for token, value in embeddings.items():
        path = value[0] if isinstance(value, (tuple, list)) else value
        if re.search(r"(?<![\w])" + re.escape(token.lower()) + r"(?![\w])", text) and os.path.isfile(path):
            out.append((token, short_sha256(path)))
    return out


# ---------------------------------------------------------------- extra-network files and specs
def lora_files(folder):
    """{stem: path} of the LoRA files in `folder` (sorted by name; {} when it is not a folder)."""
    if not folder or not os.path.isdir(folder):
        return {}
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in LORA_EXTENSIONS and stem and os.path.isfile(os.path.join(folder, f)):
            out.setdefault(stem, os.path.join(folder, f))
    return out


def find_lora(folder, name):
    """The file `<lora:name>` names in `folder` (its stem; case-sensitive first, then not), or None."""
    files = lora_files(folder)
    if name in files:
        return files[name]
    return next((p for stem, p in files.items() if stem.lower() == name.lower()), None)


def format_scale(scale):
    text = repr(float(scale))
    return text[:-2] if text.endswith(".0") else text


def lora_tag(name, scale):
    """`<lora:name:scale>` as A1111 writes it (`<lora:style:0.7>`, `<lora:style:1>`)."""
    return f"<lora:{name}:{format_scale(scale)}>"


def split_lora_spec(text):
    """`PATH[:SCALE]` -> (path, scale or None). Only a trailing `:number` is a scale (so
    `C:\\loras\\x.safetensors` is a path); an existing file of the whole name is a path. ValueError
    when the number is not finite (`x.safetensors:nan`)."""
    text = str(text)
    head, colon, tail = text.rpartition(":")
    if not colon or not head or os.path.isfile(text):
        return text, None
    try:
        scale = float(tail)
    except ValueError:
        return text, None
    if not math.isfinite(scale):
        raise ValueError(f"scale {tail!r} is not a finite number")
    return head, scale


def split_embedding_spec(text):
    """`PATH[:TOKEN]` -> (path, token or None). The text after the last colon is a token when it
    holds no path separator and what is before it is more than a drive letter (`C:\\x.pt` is a
    path); an existing file of the whole name is a path."""
    text = str(text)
    head, colon, tail = text.rpartition(":")
    if (not colon or not head or os.path.isfile(text) or "/" in tail or "\\" in tail
            or re.fullmatch(r"[A-Za-z]", head)):
        return text, None
    return head, tail
