"""GenerationRequest: the one place the rules of a generation live, and its PNG parameters
both ways. Fast tier: no TensorFlow is imported."""

import subprocess
import sys

import numpy as np
import pytest

from diffusion_tf.pipeline import request as rules
from diffusion_tf.pipeline.request import GenerationRequest, RequestError
from diffusion_tf.png_info import format_parameters, parse_parameters


def test_request_module_does_not_import_tensorflow():
    code = ("import sys; import diffusion_tf.pipeline.request as r; r.GenerationRequest('x').validate(); "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("field,value,allowed", [
    ("num_steps", 0, "an integer between 1 and 1000"),
    ("num_steps", 1.5, "an integer between 1 and 1000"),
    ("seed", 2**32, "an integer between 0 and 4294967295"),
    ("seed", True, "an integer between 0 and 4294967295"),
    ("batch_size", 0, "an integer >= 1"),
    ("guidance_scale", float("nan"), "a finite number >= 0"),
    ("temperature", -0.5, "a finite number >= 0"),
    ("strength", 1.5, "a number between 0 and 1 (inclusive)"),
    ("height", 500, "a positive multiple of 8"),
])
def test_each_rule_names_the_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(RequestError) as e:
        GenerationRequest("a cat", **{field: value}).validate(names={})
    assert (e.value.field, e.value.allowed) == (field, allowed)
    assert str(e.value) == f"{field}={value!r}; must be {allowed}."


def test_generate_spelling_of_the_guidance_field():
    with pytest.raises(ValueError, match=r"^unconditional_guidance_scale=-1; must be a finite number >= 0\.$"):
        GenerationRequest("a cat", guidance_scale=-1).validate()


def test_the_largest_seed_is_accepted_everywhere():
    assert GenerationRequest("a cat", seed=rules.MAX_SEED).validate().seed == 2**32 - 1
    assert rules.parse("seed", "4294967295") == 2**32 - 1
    with pytest.raises(RequestError):
        rules.parse("seed", "4294967296")


@pytest.mark.parametrize("field,text", [("seed", "1.5"), ("num_steps", "x"), ("guidance_scale", "inf"),
                                        ("height", "-64"), ("strength", "nan")])
def test_parse_refuses_text_that_breaks_the_rule(field, text):
    with pytest.raises(RequestError) as e:
        rules.parse(field, text)
    assert e.value.value == text


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask="m.png"), "mask= needs init_image"),
    (dict(outpaint={"left": 8}), "outpaint= needs init_image"),
    (dict(init_image="i.png", mask="m.png", outpaint={"left": 8}), "cannot be combined"),
    (dict(init_image="i.png", outpaint={"left": 12}), "left=12; must be an integer >= 0 and a multiple of 8"),
    (dict(scheduler="no-such"), "scheduler='no-such'; allowed: ddim"),
    (dict(attention="quadratic"), "attention='quadratic'"),
    (dict(prompt=[]), r"prompt=\[\]"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    (dict(height=8192, width=8192), "exceeds the pixel budget"),
])
def test_combinations_and_names(kwargs, message):
    kwargs = dict({"prompt": "a cat"}, **kwargs)
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**kwargs).validate()


def test_outpaint_text_both_ways():
    margins = rules.parse_outpaint("left=128, top=64")
    assert margins == {"left": 128, "right": 0, "top": 64, "bottom": 0}
    assert rules.format_outpaint(margins) == "left=128,top=64"
    for bad in ("up=8", "left", "left=8,left=16", "left=-8", "left=0"):
        with pytest.raises(ValueError):
            rules.parse_outpaint(bad)


def test_png_parameters_round_trip_to_the_same_request():
    request = GenerationRequest(
        "a red circle, on the left: \"quoted\"", negative_prompt="blurry", num_steps=7, guidance_scale=3.5,
        seed=rules.MAX_SEED, scheduler="dpm++2m-karras", temperature=0.5, init_image="in.png", strength=1.0,
        outpaint={"left": 64, "right": 0, "top": 0, "bottom": 8}, model="runs/my model", attention="linear",
    ).validate()
    image = np.zeros((72, 128, 3), np.uint8)
    params = rules.png_parameters(request, request.seed, image, "dpm++2m-karras", "linear", request.model)
    fields = rules.fields_from_png(parse_parameters(format_parameters(params)))
    assert fields == {
        "prompt": request.prompt, "negative_prompt": "blurry", "num_steps": 7, "guidance_scale": 3.5,
        "seed": 2**32 - 1, "width": 128, "height": 72, "scheduler": "dpm++2m-karras", "model": "runs/my model",
        "attention": "linear", "temperature": 0.5, "strength": 1.0, "outpaint": request.outpaint,
    }
    rebuilt = GenerationRequest(**{k: v for k, v in fields.items()}, init_image="in.png").validate()
    assert rebuilt.outpaint == request.outpaint and rebuilt.seed == request.seed


def test_png_values_are_checked_by_the_same_rules():
    with pytest.raises(RequestError, match="seed"):
        rules.fields_from_png({"prompt": "p", "seed": 2**32})
    with pytest.raises(ValueError, match="attention"):
        rules.fields_from_png({"prompt": "p", "attention": "quadratic"})
    assert rules.fields_from_png({"prompt": "p", "model_hash": "abc", "version": "1"}) == {"prompt": "p"}

