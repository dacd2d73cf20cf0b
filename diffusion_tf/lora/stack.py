"""Merging LoRAs into the networks' weights, and taking them out again exactly.

For every variable a LoRA touches, the original value W0 is kept (a copy, in the variable's dtype)
the first time it is touched, and the merged value is always recomputed from it:

    W = W0 + sum_i scale_i * factor_i * (up_i @ down_i)        (float32, then cast to the variable dtype)

(DoRA updates, PEFT's lora_magnitude_vector, add peft's weight-decomposed change instead; see formats.py)

with the update computed in PyTorch layout and transposed to ours. A compiled function reads the
variables when it runs, so the merged weights cost nothing per step and need no retracing. Removing
the last LoRA of a variable assigns the kept W0 back, so `unload_all()` restores every weight bit
for bit. A file is read once, by `load`; `set_scale` re-merges from the kept low-rank factors.

Every check (file, format, names, shapes, values) runs before the first assignment: on any error
the networks are unchanged.
"""

import dataclasses
import math
import numbers
import os

import keras
import numpy as np

from diffusion_tf.lora.errors import LoraError
from diffusion_tf.lora.formats import describe, parse, read_file
from diffusion_tf.lora.keys import ModuleIndex


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    """A loaded LoRA. `hash`: A1111's short hash (12 hex digits), `sha256` the full one it is cut from."""

    name: str
    path: str
    scale: float
    hash: str
    format: str
    modules: int          # the number of weights it changes
    components: tuple     # the networks it changes, e.g. ("unet", "text_encoder")
    sha256: str
    metadata: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def check_scale(scale):
    """A LoRA scale as a float; LoraError (a ValueError) naming the value unless it is a finite number."""
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise LoraError(f"LoRA scale must be a finite number, got {scale!r}.")
    return float(scale)


def _delta_shape(update):
    if update.mid is not None:
        return (update.up.shape[0], update.down.shape[1]) + tuple(update.mid.shape[2:])
    return (update.up.shape[0],) + tuple(update.down.shape[1:])


def _fits(delta_shape, torch_shape):
    """The update's [out, in(, kh, kw)] against the weight's: equal, or linear <-> 1x1 convolution."""
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return tuple(delta_shape) == tuple(torch_shape) or squeeze(tuple(delta_shape)) == squeeze(tuple(torch_shape))


def torch_delta(update):
    """factor * up @ down (or the CP/Tucker rebuild with lora_mid), float32, PyTorch layout."""
    up = update.up.reshape(update.up.shape[0], -1)
    down = update.down.reshape(update.down.shape[0], -1)
    if update.mid is not None:
        delta = np.einsum("nmkl,in,mj->ijkl", update.mid, up, down, optimize=True)
    else:
        delta = (up @ down).reshape(_delta_shape(update))
    return np.float32(update.factor) * delta


def _our_layout_delta(update, scale):
    """scale * factor * up @ down straight in our layout ([..., in, out]: Dense [in, out], Conv2D
    [kh, kw, in, out]), as down^T @ up^T: no transpose of the full-size update."""
    up = update.up.reshape(update.up.shape[0], -1) * np.float32(scale * update.factor)  # [out, r]
    down = update.down
    down = np.transpose(down, (2, 3, 1, 0)) if down.ndim == 4 else down.T  # [kh, kw, in, r] or [in, r]
    return down @ up.T


def _dora_delta(w0, delta, magnitude):
    """peft's DoRA as a change of W0 (torch layout): (c - 1) * W0 + c * delta, c = magnitude / ||W0 + delta||
    per output channel (the norm over every other axis, taken from the base weight)."""
    axes = tuple(range(1, w0.ndim))
    norm = np.sqrt(np.sum(np.square(w0 + delta, dtype=np.float64), axis=axes, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (magnitude.reshape((-1,) + (1,) * (w0.ndim - 1)) / norm).astype(np.float32)
    return (c - 1) * w0 + c * delta


@dataclasses.dataclass
class _Target:
    component: str
    path: str          # module path (our variable key without ".weight")
    update: object     # formats.Update


class LoraStack:
    """LoRAs merged into a set of networks: {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
    optionally "text_encoder_2": ...}."""

    def __init__(self, models):
        self.models = {k: v for k, v in dict(models).items() if v is not None}
        self._indices = {}
        self._loaded = {}      # name -> (LoraEntry, [_Target]); load order
        self._originals = {}   # (component, path) -> W0 (numpy, variable dtype, our layout)

    # ------------------------------------------------------------------ public API
    @property
    def entries(self):
        """[LoraEntry] in load order."""
        return [entry for entry, _ in self._loaded.values()]

    def __len__(self):
        return len(self._loaded)

    def __contains__(self, name):
        return name in self._loaded

    def load(self, path, scale=1.0, name=None):
        """Merge the LoRA file at `path` with `scale`; returns its name (default: the file stem,
        made unique: stem, stem-2, ...). LoraError (a ValueError) if anything does not fit."""
        scale = check_scale(scale)
        path = os.fspath(path)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise LoraError(f"LoRA name must be a non-empty string, got {name!r}.")
            if name in self._loaded:
                raise LoraError(f"a LoRA named {name!r} is already loaded ({self._loaded[name][0].path!r}).")
        tensors, metadata, sha256 = read_file(path)
        fmt, updates = parse(path, tensors, metadata)
        del tensors
        targets = self._resolve(path, fmt, updates)
        if name is None:
            stem = os.path.splitext(os.path.basename(path))[0] or "lora"
            name, i = stem, 1
            while name in self._loaded:
                i += 1
                name = f"{stem}-{i}"
        entry = LoraEntry(
            name=name, path=os.path.abspath(path), scale=scale, hash=sha256[:12], format=fmt,
            modules=len(targets), components=tuple(c for c in self.models if any(t.component == c for t in targets)),
            sha256=sha256, metadata=metadata,
        )
        self._apply(name, (entry, {(t.component, t.path): t for t in targets}))
        return name

    def set_scale(self, name, scale):
        """Re-merge LoRA `name` with a new scale (from its kept factors; the file is not read)."""
        scale = check_scale(scale)
        entry, targets = self._get(name)
        self._apply(name, (dataclasses.replace(entry, scale=scale), targets))

    def remove(self, name):
        """Take LoRA `name` out; the others stay merged."""
        self._get(name)
        self._apply(name, None)

    def unload_all(self):
        """Take every LoRA out: every weight is bit-identical to its value before the first load."""
        for (component, path), original in self._originals.items():
            self._variable(component, path).assign(original)
        self._originals.clear()
        self._loaded.clear()

    # ------------------------------------------------------------------ internals
    def _get(self, name):
        if name not in self._loaded:
            loaded = ", ".join(repr(n) for n in self._loaded) or "none"
            raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {loaded}).")
        return self._loaded[name]

    def _index(self, component):
        if component not in self._indices:
            self._indices[component] = ModuleIndex(component, self.models[component])
        return self._indices[component]

    def _variable(self, component, path):
        return self._index(component).variables[path][1]

    def _model_description(self):
        parts = []
        unet = self.models.get("unet")
        if unet is not None and getattr(unet, "cross_attention_dim", None):
            parts.append(f"UNet cross-attention width {unet.cross_attention_dim}")
        for component in ("text_encoder", "text_encoder_2"):
            if component in self.models:
                index = self._index(component)
                q = next((p for p in index.variables if p.endswith("self_attn.q_proj")), None)
                if q is not None:
                    parts.append(f"{component} width {index.torch_shape(q)[1]}")
        if "text_encoder_2" not in self.models:
            parts.append("no second text encoder")
        if unet is not None and getattr(unet, "needs_added_cond", False):  # SDXL's added conditions
            family = "an SDXL model" if "text_encoder" in self.models else \
                "an SDXL refiner: the second text encoder only"
        elif unet is not None and "text_encoder_2" not in self.models:
            family = "an SD 1.x/2.x model"
        else:
            family = None
        return ", ".join(parts) + (f" ({family})" if family else "")

    def _resolve(self, path, fmt, updates):
        """[_Target] for every update, or LoraError listing what matches nothing / does not fit."""
        unmatched, wrong, targets, seen = [], [], [], {}
        for update in updates:
            if update.component not in self.models:
                unmatched.append(update)
                continue
            index = self._index(update.component)
            module = index.resolve(update.naming, update.module)
            if module is None:
                unmatched.append(update)
                continue
            want = index.torch_shape(module)
            have = _delta_shape(update)
            if not _fits(have, want):
                wrong.append((update, module, have, want))
                continue
            if (update.component, module) in seen:
                raise LoraError(f"LoRA file {path!r}: {update.keys[0]!r} and {seen[update.component, module]!r} "
                                f"both update {update.component} {module!r}.")
            seen[update.component, module] = update.keys[0]
            targets.append(_Target(update.component, module, update))
        looks = f"the file looks like {describe(updates)}; the model has {self._model_description()}"
        if unmatched:
            keys = sorted(k for u in unmatched for k in u.keys if not k.endswith("alpha"))
            shown = ", ".join(repr(k) for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
            missing = sorted({u.component for u in unmatched} - set(self.models))
            extra = f" (no {', '.join(missing)} in this model)" if missing else ""
            raise LoraError(f"LoRA file {path!r} ({fmt} format): {len(unmatched)} of its {len(updates)} modules "
                            f"match nothing in the model{extra}: {shown}; {looks}.")
        if wrong:
            update, module, have, want = wrong[0]
            raise LoraError(f"LoRA file {path!r}: {update.keys[0]!r} does not fit {update.component} {module!r}: "
                            f"the LoRA's update has shape {tuple(have)}, the weight {tuple(want)} "
                            f"({len(wrong)} such modules); {looks}.")
        return targets

    def _merged(self, component, path, loaded):
        """The value of (component, path) with the LoRAs of `loaded` merged; the original if none."""
        original = self._originals[component, path]
        index = self._index(component)
        _, var, perm = index.variables[path]
        inverse = tuple(np.argsort(perm))
        torch_shape = index.torch_shape(path)
        total, used = None, False
        for entry, targets in loaded.values():
            target = targets.get((component, path))
            if target is not None:
                if total is None:
                    total = original.astype(np.float32)
                update = target.update
                if update.magnitude is None and update.mid is None and perm in ((1, 0), (3, 2, 0, 1)):
                    total += _our_layout_delta(update, entry.scale).reshape(total.shape)
                else:
                    delta = np.float32(entry.scale) * torch_delta(update).reshape(torch_shape)
                    if update.magnitude is not None:
                        delta = _dora_delta(np.transpose(original.astype(np.float32), perm), delta, update.magnitude)
                    total += np.transpose(delta, inverse)
                used = True
        if not used:
            return original, False
        with np.errstate(over="ignore", invalid="ignore"):
            value = total.astype(original.dtype, copy=False)
        if not np.all(np.isfinite(value)):
            raise LoraError(f"merging gives non-finite values in {component} {path!r} (in {original.dtype}); "
                            "the LoRA's scale is too large.")
        return value, True

    def _apply(self, name, new):
        """Set LoRA `name` to `new` ((entry, targets), or None to remove it) and re-merge what changes."""
        old = self._loaded.get(name)
        touched = {key for item in (old, new) if item for key in item[1]}
        loaded = dict(self._loaded)
        if new is None:
            loaded.pop(name, None)
        else:
            loaded[name] = new
        added = [key for key in touched if key not in self._originals]
        for component, path in added:
            var = self._variable(component, path)
            self._originals[component, path] = np.array(keras.ops.convert_to_numpy(var), copy=True)
        done = []
        try:
            for component, path in sorted(touched):
                value, used = self._merged(component, path, loaded)
                self._variable(component, path).assign(value)
                done.append((component, path))
        except BaseException:
            for component, path in done:  # back to the state before this call
                value, _ = self._merged(component, path, self._loaded)
                self._variable(component, path).assign(value)
            for key in added:
                del self._originals[key]
            raise
        self._loaded = loaded
        for component, path in touched:
            if not any((component, path) in targets for _, targets in loaded.values()):
                del self._originals[component, path]
