"""One generation request: its fields, their rules (checked here and nowhere else) and its
PNG parameters, both ways.

`GenerationRequest` is what the CLI, the web UI, `--from-png` and `Text2Image.generate`
share. Every rule lives in `RULES`; `parse(field, text)` turns a command-line or PNG string
into a value under the same rule. A broken rule is a `RequestError` (a ValueError) that
names the field as the caller spells it (`num_steps=0`, or `--steps 0` on the command line)
and says what is allowed.

This module imports neither TensorFlow nor Keras: the CLI checks its arguments before
TensorFlow is imported.
"""

import dataclasses
import math
import numbers
import os
from typing import Any, Optional

import numpy as np

from diffusion_tf import a1111

MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_PIXELS = 2048 * 2048
ATTENTIONS = ("standard", "linear")


class RequestError(ValueError):
    """A field that breaks its rule: `field`, `value` and `allowed` (what the rule admits)."""

    def __init__(self, field, value, allowed, name=None):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{name or field}={value!r}; must be {allowed}.")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _int_rule(minimum, maximum=None):
    allowed = f"an integer between {minimum} and {maximum}" if maximum is not None else f"an integer >= {minimum}"

    def check(value):
        return _is_int(value) and value >= minimum and (maximum is None or value <= maximum)

    return check, allowed, int


def _number_rule(minimum, maximum=None):
    if maximum is None:
        allowed = f"a finite number >= {minimum:g}"
    else:
        allowed = f"a number between {minimum:g} and {maximum:g} (inclusive)"

    def check(value):
        return (_is_number(value) and math.isfinite(float(value)) and value >= minimum
                and (maximum is None or value <= maximum))

    return check, allowed, float


def _open_unit_rule():
    def check(value):
        return _is_number(value) and 0.0 < float(value) < 1.0

    return check, "a number strictly between 0 and 1 (the share of the schedule)", float


MAX_CONDITIONING_SIZE = 16384


def _pair_rule(minimum, what):
    """(height, width)-like pairs of integers in [minimum, MAX_CONDITIONING_SIZE]."""
    allowed = f"a pair of integers ({what}) between {minimum} and {MAX_CONDITIONING_SIZE}"

    def check(value):
        return (isinstance(value, (list, tuple)) and len(value) == 2
                and all(_is_int(v) and minimum <= v <= MAX_CONDITIONING_SIZE for v in value))

    return check, allowed, lambda v: tuple(int(x) for x in v)


def _multiple_of_8(value):
    return _is_int(value) and value > 0 and value % 8 == 0


# field -> (check, what is allowed, how a valid string value converts)
RULES = {
    "num_steps": _int_rule(1, MAX_STEPS),
    "batch_size": _int_rule(1),
    "seed": _int_rule(0, MAX_SEED),
    "guidance_scale": _number_rule(0),
    "temperature": _number_rule(0),
    "strength": _number_rule(0, 1),
    "height": (_multiple_of_8, "a positive multiple of 8", int),
    "width": (_multiple_of_8, "a positive multiple of 8", int),
    "clip_skip": _int_rule(0),
    # SDXL's micro-conditioning (diffusers' names and defaults; None: the output size, (0, 0))
    "original_size": _pair_rule(1, "height, width in pixels"),
    "target_size": _pair_rule(1, "height, width in pixels"),
    "crops_coords_top_left": _pair_rule(0, "top, left in pixels"),
    "negative_original_size": _pair_rule(1, "height, width in pixels"),
    "negative_target_size": _pair_rule(1, "height, width in pixels"),
    "negative_crops_coords_top_left": _pair_rule(0, "top, left in pixels"),
    "aesthetic_score": _number_rule(0, 10),
    "negative_aesthetic_score": _number_rule(0, 10),
    "guidance_rescale": _number_rule(0, 1),
    "denoising_start": _open_unit_rule(),
    "denoising_end": _open_unit_rule(),
}
MICRO_CONDITIONING = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size",
                      "negative_target_size", "negative_crops_coords_top_left", "aesthetic_score",
                      "negative_aesthetic_score")
OPTIONAL = ("num_steps", "seed", "guidance_scale", "height", "width", "clip_skip", "original_size", "target_size",
            "crops_coords_top_left", "negative_original_size", "negative_target_size",
            "negative_crops_coords_top_left", "denoising_start", "denoising_end")  # None: the default / random


def check(field, value, name=None):
    """`value` if it keeps the rule of `field`, else RequestError (None passes for optional fields)."""
    if value is None and field in OPTIONAL:
        return None
    ok, allowed, convert = RULES[field]
    if not ok(value):
        raise RequestError(field, value, allowed, name)
    return convert(value)


def parse(field, text):
    """A command-line or PNG string -> the field's value under its rule (RequestError otherwise)."""
    ok, allowed, convert = RULES[field]
    try:
        if convert is int:
            value = int(text.strip(), 10)
        elif convert is float:
            value = float(text)
        else:  # a pair: "H,W" or "HxW"
            value = tuple(int(v.strip(), 10) for v in text.replace("x", ",").split(","))
    except (ValueError, AttributeError):
        raise RequestError(field, text, allowed) from None
    if not ok(value):
        raise RequestError(field, text, allowed)
    return value


def check_size(height, width, names=("img_height", "img_width")):
    """Both optional; each a positive multiple of 8, together within the pixel budget."""
    for field, name, value in (("height", names[0], height), ("width", names[1], width)):
        check(field, value, name)
    if height is not None and width is not None and height * width > MAX_PIXELS:
        raise ValueError(
            f"{names[0]} x {names[1]} = {height}x{width} exceeds the pixel budget of "
            f"{MAX_PIXELS} pixels (2048x2048)."
        )


def check_scheduler(name, names=None):
    if names is None:
        from diffusion_tf.schedulers.names import NAMES as names
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"scheduler={name!r}; allowed: {', '.join(names)}.")
    return name


def check_attention(attention):
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}; allowed: {list(ATTENTIONS)} or None.")
    return attention


OUTPAINT_SIDES = ("left", "right", "top", "bottom")


def check_outpaint(outpaint):
    """{side: pixels} -> {left, right, top, bottom: int}; margins >= 0, multiples of 8, not all 0."""
    if not isinstance(outpaint, dict):
        raise ValueError(
            f"outpaint={outpaint!r}; must be a dict of margins in pixels, e.g. "
            "{'left': 128, 'right': 0, 'top': 64, 'bottom': 0}."
        )
    unknown = [k for k in outpaint if k not in OUTPAINT_SIDES]
    if unknown:
        raise ValueError(f"outpaint side(s) {unknown!r} unknown; allowed: {', '.join(OUTPAINT_SIDES)}.")
    out = {}
    for side in OUTPAINT_SIDES:
        value = outpaint.get(side, 0)
        if not _is_int(value) or value < 0 or value % 8:
            raise ValueError(f"outpaint {side}={value!r}; must be an integer >= 0 and a multiple of 8.")
        out[side] = int(value)
    if not any(out.values()):
        raise ValueError(f"outpaint={outpaint!r}; at least one margin must be above 0.")
    return out


def check_combination(init_image, mask, outpaint, names=None):
    """A mask or outpaint needs an image; the two do not combine. `names`: how the caller spells
    the three fields (default `init_image=`, `mask=`, `outpaint=`)."""
    names = names or {}
    image, m, out = (names.get(k, k + "=") for k in ("init_image", "mask", "outpaint"))
    if init_image is None:
        if mask is not None:
            raise ValueError(f"{m} needs {image} (the image to inpaint); none was given.")
        if outpaint is not None:
            raise ValueError(f"{out} needs {image} (the image to extend); none was given.")
    elif outpaint is not None and mask is not None:
        raise ValueError(f"{out} and {m} cannot be combined: outpainting repaints the new area only.")


def prompt_list(prompt, name="prompt"):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name}={prompt!r}; must be a str or a non-empty list of str.")


def negative_list(negative_prompt, count):
    """One negative prompt per prompt ("" when none is given)."""
    if negative_prompt is None:
        return [""] * count
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {count}; "
            "give one negative prompt, or one per prompt."
        )
    return negatives


# What `Text2Image.generate` calls each field (its public argument names).
GENERATE_NAMES = {"guidance_scale": "unconditional_guidance_scale"}


@dataclasses.dataclass
class GenerationRequest:
    """Everything one generation needs besides the model. None means: the model's default
    (`num_steps`, `guidance_scale`, `scheduler`, size) or a random seed."""

    prompt: Any
    negative_prompt: Any = None
    num_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    batch_size: int = 1
    height: Optional[int] = None
    width: Optional[int] = None
    scheduler: Optional[str] = None
    temperature: float = 1.0
    init_image: Any = None
    strength: float = 0.8
    mask: Any = None
    outpaint: Optional[dict] = None
    paste_back: bool = True
    latents: Any = None
    clip_skip: Optional[int] = None  # diffusers' clip_skip (1 = A1111's "Clip skip: 2"); None: the pipeline's
    # SDXL (diffusers' StableDiffusionXL*Pipeline arguments and defaults)
    original_size: Any = None
    target_size: Any = None
    crops_coords_top_left: Any = None
    negative_original_size: Any = None
    negative_target_size: Any = None
    negative_crops_coords_top_left: Any = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    guidance_rescale: float = 0.0
    denoising_start: Optional[float] = None
    denoising_end: Optional[float] = None
    # Not the pipeline's: how the pipeline was built, recorded in the PNG parameters.
    model: Optional[str] = None
    attention: Optional[str] = None

    def validate(self, names=GENERATE_NAMES):
        """Checks every field (RequestError / ValueError naming it as `names` spells it);
        returns self with numbers normalised (int / float)."""
        self.prompts()
        negative_list(self.negative_prompt, len(self.prompts()))
        for field in RULES:
            if field not in ("height", "width"):
                setattr(self, field, check(field, getattr(self, field), names.get(field)))
        check_size(self.height, self.width, (names.get("height", "height"), names.get("width", "width")))
        if self.scheduler is not None:
            check_scheduler(self.scheduler)
        check_attention(self.attention)
        if self.model is not None and (not isinstance(self.model, (str, os.PathLike)) or not os.fspath(self.model)):
            raise ValueError(f"model={self.model!r}; must be a model folder, a preset name or None (the default).")
        check_combination(self.init_image, self.mask, self.outpaint, names)
        if self.outpaint is not None:
            self.outpaint = check_outpaint(self.outpaint)
        if self.denoising_start is not None and self.denoising_end is not None and \
                self.denoising_start >= self.denoising_end:
            raise ValueError(f"denoising_start={self.denoising_start!r} >= denoising_end={self.denoising_end!r}; "
                             "the start must come before the end.")
        return self

    def prompts(self):
        return prompt_list(self.prompt)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- PNG parameters
# The PNG parameters' keys (diffusion_tf.png_info) that hold request fields. `sampler` (with
# `schedule_type`) and `clip_skip` are written in A1111's terms (diffusion_tf.a1111).
PNG_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "num_steps", "guidance": "guidance_scale",
    "seed": "seed", "width": "width", "height": "height", "sampler": "scheduler", "model": "model",
    "attention": "attention", "temperature": "temperature", "denoising_strength": "strength",
    "outpaint": "outpaint", "clip_skip": "clip_skip",
    # SDXL (recorded when not the default; pairs as "H,W"): micro-conditioning, guidance rescale, and the
    # base's share of an ensemble of experts with A1111's label ("Refiner switch at"; the refiner's name
    # is "Refiner", read by the callers that load it).
    **{f: f for f in MICRO_CONDITIONING}, "guidance_rescale": "guidance_rescale",
    "refiner_switch_at": "denoising_end",
}


def _format_pair(value):
    return None if value is None else f"{int(value[0])},{int(value[1])}"


def format_outpaint(margins):
    return ",".join(f"{k}={v}" for k, v in margins.items() if v) if margins else None


def parse_outpaint(text):
    """`left=128,top=64` (any subset of the sides) -> {side: pixels}; ValueError on bad syntax."""
    out = {}
    for part in str(text).split(","):
        side, eq, value = part.strip().partition("=")
        side = side.strip().lower()
        if not eq or side not in OUTPAINT_SIDES or side in out:
            raise ValueError(
                f"outpaint {text!r}: {part.strip()!r} is not valid; expected SIDE=PIXELS pairs separated by "
                "commas, sides left/right/top/bottom, pixels multiples of 8 >= 0"
            )
        try:
            px = int(value.strip(), 10)
        except ValueError:
            px = -1
        if px < 0 or px % 8:
            raise ValueError(f"outpaint {text!r}: {side}={value.strip()} must be a multiple of 8 >= 0")
        out[side] = px
    return check_outpaint(out)


def png_parameters(request, seed, image, scheduler, attention, model, loras=(), embeddings=(), refiner=None):
    """The PNG parameters (a dict for `png_info.save_png`) of one image of a request:
    `seed` its own seed, `scheduler`/`attention`/`model` the names actually used. The prompt is
    recorded as the request holds it (`<lora:NAME:SCALE>` tags included); `loras` and `embeddings`:
    [(name, short hash)] of the LoRAs and textual-inversion tokens used (`Lora hashes`, `TI hashes`).
    The sampler and clip skip are written with A1111's names (`Sampler: DPM++ 2M, Schedule type:
    Karras`, `Clip skip: 2` for clip_skip=1). `refiner`: the name of the SDXL refiner that finished
    the image (with `Refiner switch at`, the request's denoising_end)."""
    edited = request.init_image is not None
    defaults = {f.name: f.default for f in dataclasses.fields(request)}
    sdxl = {f: (_format_pair(getattr(request, f)) if "size" in f or "coords" in f else getattr(request, f))
            for f in MICRO_CONDITIONING + ("guidance_rescale",) if getattr(request, f) != defaults[f]}
    sampler, schedule = a1111.sampler_to_a1111(scheduler) if scheduler is not None else (None, None)
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "steps": request.num_steps,
        "sampler": sampler,
        "schedule_type": schedule,
        "guidance": request.guidance_scale,
        "seed": int(seed),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "model": model,
        "attention": attention,
        "temperature": request.temperature if request.temperature != 1.0 else None,
        "denoising_strength": (1.0 if request.outpaint else request.strength) if edited else None,
        "clip_skip": a1111.clip_skip_to_a1111(request.clip_skip),
        "lora_hashes": a1111.format_hashes(loras),
        "ti_hashes": a1111.format_hashes(embeddings),
        "mask": "yes" if request.mask is not None else None,
        "outpaint": format_outpaint(request.outpaint),
        **sdxl,
        "refiner": refiner,
        "refiner_switch_at": request.denoising_end,
    }


def fields_from_png(params, ignore=()):
    """{request field: value} of parsed PNG parameters (`png_info.read_parameters`), each
    checked by its rule (a bad value is a ValueError naming the PNG label); unknown keys (`Model
    hash`, `Version`, ...) are left out, and so are the fields in `ignore` (those the caller sets
    itself: their PNG values are not even checked). The sampler may be A1111's (`DPM++ 2M` with
    `Schedule type: Karras`, or `DPM++ 2M Karras`) or ours (`dpm++2m-karras`); a sampler we lack
    is a ValueError naming it. `Clip skip` is A1111's (2 -> clip_skip=1; 1 -> none, left out).
    `mask: yes` and `denoising_strength` say the image was an edit: the caller must give the
    input image (and mask)."""
    out = {}
    for key, field in PNG_FIELDS.items():
        value = params.get(key)
        if value is None or field in ignore:
            continue
        if field == "scheduler":
            value = a1111.sampler_from_a1111(value, params.get("schedule_type"))
        elif field == "clip_skip":
            value = a1111.clip_skip_from_a1111(value)
            if value is None:
                continue
        elif field in RULES:
            value = parse(field, str(value)) if isinstance(value, str) else check(field, value, key)
        elif field == "outpaint":
            value = parse_outpaint(value)
        elif field == "attention":
            check_attention(value)
        out[field] = value
    return out
