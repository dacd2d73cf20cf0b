"""Reading a LoRA file and recognising its format; the result is a list of low-rank updates.

Files are read by weights_port's readers only: `.safetensors` by its strict header parser (no
code, no pickle), `.pt` / `.ckpt` / `.pth` / `.bin` by its restricted unpickler (a pickle that names
any global outside its allow-list is refused before anything runs).

Formats recognised (by their keys):

kohya / A1111 (`kohya`)
    `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (`lora_te_`, `lora_te1_`,
    `lora_te2_` for the text encoders); <module> is a module path with "." written "_", in
    diffusers names or in the original LDM names (`input_blocks_1_1_...`; kohya sd-scripts writes SDXL
    LoRAs in SGM names, e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`: SDXL's first
    level has no attention, the indices come from the model's own layout). LoCon convolutions
    (down [r, in, kh, kw], up [out, r, 1, 1]) and LyCORIS' CP/Tucker `lora_mid` [r, r, kh, kw].
    Update = alpha / rank * up @ down (alpha defaults to the rank).
diffusers / PEFT (`peft`)
    `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`, or no
    prefix), optional `<module>.alpha`; alpha and rank may also come from the safetensors
    metadata `lora_adapter_metadata` (the LoraConfig diffusers' save_lora_weights writes, keys
    `unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`, `unet.rank_pattern`, `unet.use_rslora`).
    Update = alpha / rank * B @ A (alpha / sqrt(rank) with use_rslora; alpha defaults to the rank).
old diffusers attention processors (`diffusers-attn-procs`)
    `unet.<block>.attn1.processor.to_q_lora.down.weight` / `.up.weight` (to_k_lora, to_v_lora,
    to_out_lora -> to_out.0), with or without the `unet.` prefix; also `<module>.lora.down.weight`
    and the text encoder's `self_attn.to_q_lora` / `mlp.fc1.lora_linear_layer`. Alpha = rank.

DoRA in PEFT's layout (`<module>.lora_magnitude_vector`, diffusers/peft `use_dora`) is applied as peft
does: W = W0 + (c - 1) * W0 + c * s * dW with c = magnitude / ||W0 + s * dW|| per output channel (the
norm over the inputs and kernel), s = scale * alpha / rank.

Refused with an error that names the algorithm: LoHa (`hada_w1_a`...), LoKr (`lokr_w1`...), IA3
(`on_input`), LyCORIS full-weight differences (`diff`), DoRA in kohya/LyCORIS layout (`dora_scale`:
diffusers drops those keys, so there is no reference to match), PEFT's `lora_B` biases and embedding
LoRAs; a full model checkpoint given as a LoRA.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
from collections import defaultdict

import numpy as np

from diffusion_tf.lora.errors import LoraError
from diffusion_tf.lora.hashes import SHORT

EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_MAX_LISTED = 10


@dataclasses.dataclass
class Update:
    """One low-rank update of one module, as the file has it (torch layouts, float32)."""

    component: str     # "unet", "text_encoder", "text_encoder_2"
    naming: str        # "underscored" (kohya) or "dotted" (diffusers module path)
    module: str        # the module's name in that naming
    down: np.ndarray   # [r, in] or [r, in, kh, kw] (lora_down / lora_A)
    up: np.ndarray     # [out, r] or [out, r, 1, 1] (lora_up / lora_B)
    mid: object        # None, or the CP/Tucker core [r, r, kh, kw] (lora_mid)
    factor: float      # alpha / rank (or alpha / sqrt(rank)): the update at scale 1 is factor * up @ down
    keys: tuple        # the file keys it consumed
    magnitude: object = None  # DoRA (PEFT lora_magnitude_vector): the per-output-channel magnitude [out]

    @property
    def rank(self):
        return int(self.down.shape[0])


@dataclasses.dataclass
class LoraFile:
    path: str
    format: str
    updates: list
    metadata: dict     # the safetensors header's __metadata__ (str -> str), {} otherwise
    sha256: str        # A1111's hash input (see hashes.py), 64 hex digits

    @property
    def hash(self):
        return self.sha256[:SHORT]


def _listed(keys):
    keys = sorted(keys)
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + more


# ----------------------------------------------------------------------------- reading
def read_file(path):
    """(tensors {key: array}, metadata {str: str}, sha256) of a LoRA file; LoraError if it cannot be read."""
    from weights_port.ckpt_reader import read_ckpt
    from weights_port.errors import CheckpointError
    from weights_port.safetensors_reader import read_safetensors_with_digest

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise LoraError(f"LoRA file {path!r} {what}.")
    if ext not in EXTENSIONS:
        raise LoraError(f"LoRA file {path!r}: unsupported extension {ext or '(none)'!r}; expected one of "
                        f"{', '.join(EXTENSIONS)}.")
    try:
        if ext == ".safetensors":
            return read_safetensors_with_digest(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return read_ckpt(path), {}, digest.hexdigest()
    except CheckpointError as e:
        raise LoraError(f"cannot read LoRA file: {e}") from None
    except OSError as e:
        raise LoraError(f"cannot read LoRA file {path!r}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- checks
def _check_values(path, tensors):
    for key, value in tensors.items():
        if value.dtype == bool or value.dtype.kind not in "fiu":
            raise LoraError(f"LoRA file {path!r}: {key!r} has dtype {value.dtype}, expected floating point values.")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise LoraError(f"LoRA file {path!r}: {key!r} contains NaN or Inf values.")


_FULL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                  "model_ema.")
_LORA_MARKERS = ("lora", "hada_", "lokr_", "alpha", "dora_scale", "on_input", ".diff")
_ALGORITHMS = [  # (suffix test, name)
    (lambda s: s.startswith("hada_"), "LoHa (LyCORIS hadamard product, hada_w1_a/hada_w1_b/...)"),
    (lambda s: s.startswith("lokr_"), "LoKr (LyCORIS Kronecker product, lokr_w1/lokr_w2/...)"),
    (lambda s: s in ("on_input",), "IA3 ((IA)^3 scaling vectors, weight/on_input)"),
    (lambda s: s in ("diff", "diff_b"), "a LyCORIS full-weight difference (diff/diff_b)"),
    (lambda s: s == "dora_scale",
     "DoRA in kohya/LyCORIS layout (dora_scale; diffusers ignores these keys, PEFT's lora_magnitude_vector "
     "layout is supported)"),
    (lambda s: s.startswith(("lora_embedding_A", "lora_embedding_B")), "a PEFT embedding LoRA (lora_embedding_A/B)"),
    (lambda s: s.startswith(("lora_B.bias", "lora_up.bias")), "a LoRA with biases on lora_B (PEFT lora_bias)"),
]


def _unsupported(path, tensors):
    """Refuse algorithms other than plain LoRA / LoCon (naming them), and full checkpoints."""
    for key in sorted(tensors):
        segments = key.split(".")
        for i in range(1, len(segments)):
            tail = ".".join(segments[i:])
            for test, name in _ALGORITHMS:
                if test(segments[i]) or test(tail):
                    raise LoraError(f"LoRA file {path!r} is {name} (e.g. key {key!r}); this loader supports "
                                    "LoRA and LoCon (kohya, diffusers/PEFT) only.")
    if any(k.startswith(_FULL_PREFIXES) for k in tensors) or (
        tensors and not any(m in k for k in tensors for m in _LORA_MARKERS)
    ):
        example = next((k for k in sorted(tensors) if k.startswith(_FULL_PREFIXES)), sorted(tensors)[0])
        raise LoraError(f"{path!r} looks like a full model checkpoint (keys like {example!r}, no LoRA "
                        "lora_down/lora_up or lora_A/lora_B keys), not a LoRA; convert a checkpoint with "
                        "`python -m weights_port` and use it as the model.")


def _scalar(path, key, value):
    value = np.asarray(value)
    if value.size != 1:
        raise LoraError(f"LoRA file {path!r}: {key!r} has shape {value.shape}, expected one number (the alpha).")
    return float(value.reshape(()))


def _factors(path, down_key, up_key, down, up, mid=None, mid_key=None):
    """Check the factor shapes: down [r, in(, kh, kw)], up [out, r(, 1, 1)], mid [r, r, kh, kw]."""
    def fail(msg):
        raise LoraError(f"LoRA file {path!r}: {msg}")

    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        fail(f"{down_key!r} {down.shape} and {up_key!r} {up.shape} must be 2-d (linear) or 4-d (convolution).")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        fail(f"{up_key!r} has shape {up.shape}; the up factor of a convolution must be 1x1.")
    rank = down.shape[0]
    if up.shape[1] != rank or rank == 0:
        fail(f"{down_key!r} {down.shape} and {up_key!r} {up.shape} disagree on the rank "
             f"({rank} vs {up.shape[1]}).")
    if mid is not None:
        if down.ndim != 4 or down.shape[2:] != (1, 1) or mid.ndim != 4 or mid.shape[:2] != (up.shape[1], rank):
            fail(f"{mid_key!r} {mid.shape} with {down_key!r} {down.shape} and {up_key!r} {up.shape} is not a "
                 "CP/Tucker decomposition (mid [r, r, kh, kw], down [r, in, 1, 1], up [out, r, 1, 1]).")
    return rank


# ----------------------------------------------------------------------------- kohya
def _kohya(path, tensors):
    groups = defaultdict(dict)
    for key in tensors:
        name, _, suffix = key.partition(".")
        groups[name][suffix] = key
    updates, unknown = [], []
    for name, parts in groups.items():
        prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
        known = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
        unknown += [k for s, k in parts.items() if s not in known]
        if prefix is None:
            unknown += [k for s, k in parts.items() if s in known]
            continue
        if not {"lora_down.weight", "lora_up.weight"} <= set(parts):
            have = [k for s, k in parts.items() if s in known]
            if have:
                missing = "lora_up.weight" if "lora_down.weight" in parts else "lora_down.weight"
                raise LoraError(f"LoRA file {path!r}: {have[0]!r} has no {name + '.' + missing!r}.")
            continue
        down = tensors[parts["lora_down.weight"]].astype(np.float32)
        up = tensors[parts["lora_up.weight"]].astype(np.float32)
        mid = tensors[parts["lora_mid.weight"]].astype(np.float32) if "lora_mid.weight" in parts else None
        rank = _factors(path, parts["lora_down.weight"], parts["lora_up.weight"], down, up, mid,
                        parts.get("lora_mid.weight"))
        alpha = _scalar(path, parts["alpha"], tensors[parts["alpha"]]) if "alpha" in parts else float(rank)
        updates.append(Update(KOHYA_PREFIXES[prefix], "underscored", name[len(prefix):], down, up, mid,
                              alpha / rank, tuple(k for s, k in parts.items() if s in known)))
    return updates, unknown


# ----------------------------------------------------------------------------- PEFT / diffusers
_PATTERN_SPECIALS = set("*+?()[]{}|\\$")


def _pattern_lookup(patterns, module, what, path):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module it is a dotted suffix of
    ("^" anchors it at the start). Regular-expression keys beyond that are refused."""
    for key, value in patterns.items():
        plain = key[1:] if key.startswith("^") else key
        if set(plain) & _PATTERN_SPECIALS:
            raise LoraError(f"LoRA file {path!r}: {what} key {key!r} is a regular expression; only module "
                            "names are supported.")
        if module == plain or (not key.startswith("^") and module.endswith("." + plain)):
            return value
    return None


def _adapter_metadata(path, metadata):
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"LoRA file {path!r}: metadata 'lora_adapter_metadata' is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise LoraError(f"LoRA file {path!r}: metadata 'lora_adapter_metadata' must be a JSON object.")
    out = defaultdict(dict)
    for key, value in config.items():
        head, _, rest = key.partition(".")
        if head in COMPONENTS and rest:
            out[head][rest] = value
        else:
            out[""][key] = value
    return out


def _number(path, what, value, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and (value != int(value) or value <= 0)):
        raise LoraError(f"LoRA file {path!r}: metadata {what} = {value!r} is not a "
                        f"{'positive integer' if integer else 'finite number'}.")
    return value


def _peft_factor(path, config, module, rank):
    """alpha / rank for `module` from a component's LoraConfig (None -> alpha = rank)."""
    if not config:
        return 1.0
    r = config.get("r", rank)
    pattern = _pattern_lookup(dict(config.get("rank_pattern") or {}), module, "rank_pattern", path)
    r = _number(path, f"r of {module!r}", pattern if pattern is not None else r, integer=True)
    if int(r) != rank:
        raise LoraError(f"LoRA file {path!r}: the metadata gives {module!r} rank {r}, its lora_A has rank {rank}.")
    alpha = config.get("lora_alpha", r)
    pattern = _pattern_lookup(dict(config.get("alpha_pattern") or {}), module, "alpha_pattern", path)
    alpha = _number(path, f"lora_alpha of {module!r}", pattern if pattern is not None else alpha)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _split_component(key):
    for strip in ("base_model.model.",):
        if key.startswith(strip):
            key = key[len(strip):]
    head, _, rest = key.partition(".")
    if head in COMPONENTS and rest:
        return head, rest, True
    return ("text_encoder" if key.startswith("text_model.") else "unet"), key, False


_OLD = re.compile(r"^(?P<module>.+?)(?P<proc>\.processor)?\.(?P<kind>to_q_lora|to_k_lora|to_v_lora|to_out_lora|"
                  r"lora_linear_layer|lora)\.(?P<which>down|up)\.weight$")
_OLD_ATTN = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"), "to_v_lora": ("to_v", "v_proj"),
             "to_out_lora": ("to_out.0", "out_proj")}


def _old_module(module, kind):
    if kind in _OLD_ATTN:
        unet_name, te_name = _OLD_ATTN[kind]
        return f"{module}.{te_name if module.endswith('self_attn') else unet_name}"
    return module


def _diffusers(path, tensors, metadata):
    """PEFT (lora_A/lora_B) and the old attention-processor layout; (format, updates, unknown keys)."""
    configs = _adapter_metadata(path, metadata)
    pairs = defaultdict(dict)  # (component, module) -> {"down"/"up"/"alpha": key}
    unknown, formats = [], set()
    for key in tensors:
        component, rest, prefixed = _split_component(key)
        m = re.match(r"^(.+)\.lora_([AB])\.weight$", rest)
        if m:
            pairs[component, m.group(1)]["down" if m.group(2) == "A" else "up"] = key
            formats.add("peft")
            continue
        m = _OLD.match(rest)
        if m:
            module = _old_module(m.group("module"), m.group("kind"))
            pairs[component, module][m.group("which")] = key
            formats.add("diffusers-attn-procs")
            continue
        if rest.endswith(".alpha"):
            pairs[component, rest[: -len(".alpha")]]["alpha"] = key
            continue
        if rest.endswith(".lora_magnitude_vector"):
            pairs[component, rest[: -len(".lora_magnitude_vector")]]["magnitude"] = key
            formats.add("peft")
            continue
        unknown.append(key)
    updates = []
    for (component, module), parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            have = parts.get("down") or parts.get("up")
            if have is None:
                unknown += [parts[k] for k in ("alpha", "magnitude") if k in parts]
                continue
            raise LoraError(f"LoRA file {path!r}: {have!r} has no matching "
                            f"{'up (lora_B)' if 'down' in parts else 'down (lora_A)'} weight.")
        down = tensors[parts["down"]].astype(np.float32)
        up = tensors[parts["up"]].astype(np.float32)
        rank = _factors(path, parts["down"], parts["up"], down, up)
        if "alpha" in parts:
            factor = _scalar(path, parts["alpha"], tensors[parts["alpha"]]) / rank
        else:
            factor = _peft_factor(path, configs.get(component) or configs.get("") or {}, module, rank)
        magnitude = None
        if "magnitude" in parts:
            magnitude = tensors[parts["magnitude"]].astype(np.float32).reshape(-1)
            if magnitude.size != up.shape[0]:
                raise LoraError(f"LoRA file {path!r}: {parts['magnitude']!r} has {magnitude.size} values, its "
                                f"lora_B {up.shape[0]} outputs (DoRA needs one magnitude per output).")
        updates.append(Update(component, "dotted", module, down, up, None, factor, tuple(parts.values()), magnitude))
    fmt = "peft" if formats == {"peft"} else "diffusers-attn-procs" if formats else "unknown"
    if len(formats) > 1:
        fmt = "peft+diffusers-attn-procs"
    return fmt, updates, unknown


# ----------------------------------------------------------------------------- entry point
def parse(path, tensors, metadata=None):
    """(format, [Update]) for the tensors of a LoRA file; LoraError for anything not a LoRA we apply.

    Every key must be used: keys that match no pattern are listed (up to 10)."""
    metadata = metadata or {}
    if not tensors:
        raise LoraError(f"LoRA file {path!r} has no tensors.")
    _check_values(path, tensors)
    _unsupported(path, tensors)
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        updates, unknown = _kohya(path, tensors)
        ldm = any(u.component == "unet" and u.module.startswith(("input_blocks_", "middle_block_", "output_blocks_"))
                  for u in updates)
        fmt = "kohya-ldm" if ldm else "kohya"
    else:
        fmt, updates, unknown = _diffusers(path, tensors, metadata)
    if unknown:
        raise LoraError(f"LoRA file {path!r} ({fmt} format): {len(unknown)} keys match no LoRA pattern: "
                        f"{_listed(unknown)}.")
    if not updates:
        raise LoraError(f"LoRA file {path!r} has no LoRA weights (keys like {_listed(list(tensors)[:3])}).")
    return fmt, updates


def describe(updates):
    """What model a LoRA looks like it is for, from its keys and shapes (for error messages)."""
    clues = []
    if any(u.component == "text_encoder_2" for u in updates):
        clues.append("it has keys for a second text encoder (lora_te2_ / text_encoder_2)")
    widths = sorted({int(u.down.shape[1]) for u in updates
                     if u.component == "unet" and "attn2" in u.module and ("to_k" in u.module or "to.k" in u.module)})
    te = sorted({int(u.down.shape[1]) for u in updates if u.component == "text_encoder"
                 and ("q_proj" in u.module or "to_q" in u.module)})
    if widths:
        clues.append(f"cross-attention width {'/'.join(map(str, widths))}")
    if te:
        clues.append(f"text encoder width {'/'.join(map(str, te))}")
    guess = None
    if 2048 in widths or any(u.component == "text_encoder_2" for u in updates):
        guess = "SDXL"
    elif 1024 in widths or 1024 in te:
        guess = "SD 2.x"
    elif 768 in widths or 768 in te:
        guess = "SD 1.x"
    if not clues:
        return "a LoRA"
    return f"a LoRA for {guess} ({', '.join(clues)})" if guess else f"a LoRA with {', '.join(clues)}"
