"""GenerationRequest: the one place the rules of a generation live, and its PNG parameters
both ways. Fast tier: no TensorFlow is imported."""

import re
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
        clip_skip=1,
    ).validate()
    image = np.zeros((72, 128, 3), np.uint8)
    params = rules.png_parameters(request, request.seed, image, "dpm++2m-karras", "linear", request.model,
                                  loras=[("style", "0123456789ab")], embeddings=[("tok", "ba9876543210")])
    text = format_parameters(params)
    assert ("Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3.5, " in text and ", Clip skip: 2, " in text
            and 'Lora hashes: "style: 0123456789ab", TI hashes: "tok: ba9876543210"' in text)
    fields = rules.fields_from_png(parse_parameters(text))
    assert fields == {
        "prompt": request.prompt, "negative_prompt": "blurry", "num_steps": 7, "guidance_scale": 3.5,
        "seed": 2**32 - 1, "width": 128, "height": 72, "scheduler": "dpm++2m-karras", "model": "runs/my model",
        "attention": "linear", "temperature": 0.5, "strength": 1.0, "outpaint": request.outpaint, "clip_skip": 1,
    }
    rebuilt = GenerationRequest(**{k: v for k, v in fields.items()}, init_image="in.png").validate()
    assert rebuilt.outpaint == request.outpaint and rebuilt.seed == request.seed


def test_png_values_are_checked_by_the_same_rules():
    with pytest.raises(RequestError, match="seed"):
        rules.fields_from_png({"prompt": "p", "seed": 2**32})
    with pytest.raises(ValueError, match="attention"):
        rules.fields_from_png({"prompt": "p", "attention": "quadratic"})
    assert rules.fields_from_png({"prompt": "p", "model_hash": "abc", "version": "1"}) == {"prompt": "p"}



# ---------------------------------------------------------------- A1111's names
from diffusion_tf import a1111  # noqa: E402

WRITTEN = {  # ours -> (Sampler, Schedule type) as A1111 writes them
    "ddim": ("DDIM", None), "ddpm": ("DDPM", None), "pndm": ("PLMS", None), "plms": ("PLMS", None),
    "euler": ("Euler", None), "euler_a": ("Euler a", None), "euler-ancestral": ("Euler a", None),
    "heun": ("Heun", None), "lms": ("LMS", None), "dpm++2m": ("DPM++ 2M", None),
    "euler-karras": ("Euler", "Karras"), "heun-karras": ("Heun", "Karras"), "lms-karras": ("LMS", "Karras"),
    "dpm++2m-karras": ("DPM++ 2M", "Karras"), "lcm": ("LCM", None), "tcd": ("TCD", None),
}


def test_every_scheduler_has_its_a1111_name_both_ways():
    from diffusion_tf.schedulers.names import NAMES, resolve

    assert set(WRITTEN) == set(NAMES)
    for name, written in WRITTEN.items():
        assert a1111.sampler_to_a1111(name) == written
        back = a1111.sampler_from_a1111(*written)
        assert resolve(back) == resolve(name)  # the same algorithm and sigmas (plms -> pndm)
        request = GenerationRequest("p", scheduler=name).validate()
        params = parse_parameters(format_parameters(rules.png_parameters(
            request, 1, np.zeros((8, 8, 3), np.uint8), name, None, None)))
        assert (params["sampler"], params.get("schedule_type")) == written
        assert resolve(rules.fields_from_png(params)["scheduler"]) == resolve(name)


@pytest.mark.parametrize("sampler,schedule,ours", [
    ("DPM++ 2M Karras", None, "dpm++2m-karras"),  # the older forms
    ("DPM++ 2M Karras", "Karras", "dpm++2m-karras"),
    ("DPM++ 2M Karras", "Automatic", "dpm++2m-karras"),
    ("LMS Karras", None, "lms-karras"),
    ("DPM++ 2M", "Automatic", "dpm++2m"),  # Automatic (or none): the sampler's default
    ("dpm++ 2m", "karras", "dpm++2m-karras"),  # A1111 matches its labels in any case
    ("Euler a", "Automatic", "euler_a"),
    ("k_dpmpp_2m_ka", None, "dpm++2m-karras"),  # A1111's aliases
    ("k_euler_a", None, "euler_a"),
    ("ddim", None, "ddim"),  # our own (PNGs written before the A1111 names)
    ("dpm++2m-karras", None, "dpm++2m-karras"),
    ("euler_a", None, "euler_a"),
    ("plms", None, "pndm"),
])
def test_sampler_names_read(sampler, schedule, ours):
    assert a1111.sampler_from_a1111(sampler, schedule) == ours
    params = {"prompt": "p", "sampler": sampler}
    if schedule is not None:
        params["schedule_type"] = schedule
    assert rules.fields_from_png(params)["scheduler"] == ours


@pytest.mark.parametrize("sampler,schedule,named", [
    ("DPM++ SDE", None, "Sampler 'DPM++ SDE' is not supported; supported: DDIM, DDPM, PLMS, Euler, Euler a"),
    ("UniPC", "Karras", "Sampler 'UniPC' is not supported"),
    ("Euler", "Exponential", "Schedule type 'Exponential' (Sampler 'Euler') is not supported"),
    ("DDIM", "Karras", "Sampler 'DDIM' with Schedule type 'Karras' is not supported"),
    ("Euler a Karras", None, "Sampler 'Euler a Karras' is not supported"),
])
def test_a_sampler_we_lack_is_named(sampler, schedule, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        rules.fields_from_png({"prompt": "p", "sampler": sampler, "schedule_type": schedule})
    # a field the caller sets itself is not read
    assert "scheduler" not in rules.fields_from_png({"prompt": "p", "sampler": sampler}, ignore=("scheduler",))


def test_clip_skip_is_a1111s_numbering():
    def written(clip_skip):
        request = GenerationRequest("p", clip_skip=clip_skip).validate()
        return rules.png_parameters(request, 1, np.zeros((8, 8, 3), np.uint8), "ddim", None, None)["clip_skip"]

    assert [written(c) for c in (None, 0, 1, 2, 11)] == [None, None, 2, 3, 12]
    assert rules.fields_from_png({"prompt": "p", "clip_skip": 2})["clip_skip"] == 1
    assert rules.fields_from_png(parse_parameters("p\nSteps: 5, Clip skip: 3, Seed: 1"))["clip_skip"] == 2
    assert "clip_skip" not in rules.fields_from_png({"prompt": "p", "clip_skip": 1})  # the last layer: none
    for bad in (0, -1, "x", "1.5"):
        with pytest.raises(ValueError, match="Clip skip"):
            rules.fields_from_png({"prompt": "p", "clip_skip": bad})
    with pytest.raises(RequestError, match=r"clip_skip=-1; must be an integer >= 0"):
        GenerationRequest("p", clip_skip=-1).validate()


def test_the_new_user_png_reads_as_a_request():
    """The issue's PNG: A1111's sampler in its old and new form together, Clip skip, keys we ignore."""
    text = ("a red circle\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
            "Size: 64x64, Model hash: 0123abcd, Model: shapes, Clip skip: 2, Version: v1.10.1")
    assert rules.fields_from_png(parse_parameters(text)) == {
        "prompt": "a red circle", "num_steps": 20, "scheduler": "dpm++2m-karras", "guidance_scale": 7.0,
        "seed": 1234, "width": 64, "height": 64, "model": "shapes", "clip_skip": 1,
    }


def test_hashes_both_ways():
    assert a1111.format_hashes([("a", "0123456789ab"), ("b c", "ba9876543210"), ("a", "x")]) == \
        "a: 0123456789ab, b c: ba9876543210"
    assert a1111.format_hashes([]) is None
    assert a1111.parse_hashes("a: 0123456789ab, b c: ba9876543210") == {"a": "0123456789ab", "b c": "ba9876543210"}
    assert a1111.parse_hashes(None) == {}
    text = format_parameters({"prompt": "p", "lora_hashes": a1111.format_hashes([("a", "1"), ("b", "2")])})
    assert text.endswith('Lora hashes: "a: 1, b: 2"')  # quoted as A1111 quotes it
    assert parse_parameters(text)["lora_hashes"] == "a: 1, b: 2"


def test_lora_hashes_find_the_entry_of_each_tag():
    from types import SimpleNamespace as E

    entries = [E(name="style", path="/l/style.safetensors", hash="1" * 12),
               E(name="Ink-2", path="/x/Ink.safetensors", hash="2" * 12)]
    assert a1111.lora_hashes(entries, ["style", "Ink", "ink", "gone"]) == [
        ("style", "1" * 12), ("Ink", "2" * 12), ("ink", "2" * 12)]


def test_embedding_hashes_of_the_words_used(tmp_path):
    import hashlib

    path = tmp_path / "tok.pt"
    path.write_bytes(b"vectors")
    short = hashlib.sha256(b"vectors").hexdigest()[:12]
    assert a1111.short_sha256(path) == short
    embeddings = {"tok": (str(path), ["tok", "tok_1"]), "other": (str(path), ["other"])}
    assert a1111.embedding_hashes(embeddings, ["a (Tok:1.2) cat", None]) == [("tok", short)]
    assert a1111.embedding_hashes(embeddings, ["a token cat"]) == []


@pytest.mark.parametrize("spec,parsed", [
    ("style.safetensors", ("style.safetensors", None)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("style.safetensors:-1", ("style.safetensors", -1.0)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", None)),
    ("C:\\loras\\style.safetensors:0.5", ("C:\\loras\\style.safetensors", 0.5)),
    ("a:b/style.safetensors", ("a:b/style.safetensors", None)),
])
def test_lora_spec(spec, parsed):
    assert a1111.split_lora_spec(spec) == parsed


def test_lora_spec_refuses_a_scale_that_is_not_finite(tmp_path):
    for spec in ("x.safetensors:nan", "x.safetensors:inf", "x.safetensors:-inf"):
        with pytest.raises(ValueError, match="not a finite number"):
            a1111.split_lora_spec(spec)
    odd = tmp_path / "odd:0.5"
    odd.write_bytes(b"x")
    assert a1111.split_lora_spec(str(odd)) == (str(odd), None)  # an existing file is a path


@pytest.mark.parametrize("spec,parsed", [
    ("emb.pt", ("emb.pt", None)),
    ("emb.pt:tok", ("emb.pt", "tok")),
    ("C:\\emb\\x.pt", ("C:\\emb\\x.pt", None)),
    ("C:\\emb\\x.pt:tok", ("C:\\emb\\x.pt", "tok")),
    ("C:x.pt", ("C:x.pt", None)),
    ("a:b/x.pt", ("a:b/x.pt", None)),
])
def test_embedding_spec(spec, parsed):
    assert a1111.split_embedding_spec(spec) == parsed


def test_lora_files_and_tags(tmp_path):
    for name in ("Style.safetensors", "ink.pt", "notes.txt", "old.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.safetensors").mkdir()
    assert list(a1111.lora_files(tmp_path)) == ["Style", "ink", "old"]
    assert a1111.find_lora(tmp_path, "style") == str(tmp_path / "Style.safetensors")  # case-insensitive last
    assert a1111.find_lora(tmp_path, "notes") is None and a1111.lora_files(tmp_path / "none") == {}
    assert [a1111.lora_tag("s", v) for v in (1, 0.5, -0.25, 1e-7)] == [
        "<lora:s:1>", "<lora:s:0.5>", "<lora:s:-0.25>", "<lora:s:1e-07>"]


def test_a1111_module_does_not_import_tensorflow():
    code = "import sys, diffusion_tf.a1111; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# SDXL's micro-conditioning, guidance rescale and the hand-off bounds (diffusers' names).
PAIR_SIZE = "a pair of integers (height, width in pixels) between 1 and 16384"
PAIR_CROP = "a pair of integers (top, left in pixels) between 0 and 16384"
UNIT = "a number strictly between 0 and 1 (the share of the schedule)"


@pytest.mark.parametrize("field,value,allowed", [
    ("original_size", (0, 1024), PAIR_SIZE),
    ("original_size", (1024,), PAIR_SIZE),
    ("target_size", (1024, 16385), PAIR_SIZE),
    ("target_size", (512.5, 512), PAIR_SIZE),
    ("negative_original_size", "1024x1024", PAIR_SIZE),
    ("negative_target_size", (-8, 8), PAIR_SIZE),
    ("crops_coords_top_left", (-1, 0), PAIR_CROP),
    ("negative_crops_coords_top_left", (0, 16385), PAIR_CROP),
    ("aesthetic_score", 10.5, "a number between 0 and 10 (inclusive)"),
    ("negative_aesthetic_score", float("nan"), "a number between 0 and 10 (inclusive)"),
    ("guidance_rescale", 1.2, "a number between 0 and 1 (inclusive)"),
    ("denoising_end", 1.0, UNIT),
    ("denoising_end", 0, UNIT),
    ("denoising_start", -0.2, UNIT),
    ("denoising_start", True, UNIT),
])
def test_sdxl_rules_name_the_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(RequestError) as e:
        GenerationRequest("a cat", **{field: value}).validate(names={})
    assert (e.value.field, e.value.allowed) == (field, allowed)
    assert str(e.value) == f"{field}={value!r}; must be {allowed}."


def test_sdxl_values_in_range_are_kept():
    r = GenerationRequest("a cat", original_size=[1024, 768], crops_coords_top_left=(0, 0), target_size=(16384, 1),
                          aesthetic_score=0, guidance_rescale=1, denoising_start=0.8).validate(names={})
    assert (r.original_size, r.crops_coords_top_left, r.target_size) == ((1024, 768), (0, 0), (16384, 1))
    assert (r.aesthetic_score, r.guidance_rescale, r.denoising_start) == (0, 1, 0.8)


@pytest.mark.parametrize("text,value", [("1024,768", (1024, 768)), ("1024x768", (1024, 768)), (" 8 , 16 ", (8, 16))])
def test_pairs_parse_from_text(text, value):
    assert rules.parse("original_size", text) == value


def test_denoising_start_must_come_before_the_end():
    with pytest.raises(ValueError, match=r"denoising_start=0.8 >= denoising_end=0.5"):
        GenerationRequest("a cat", denoising_start=0.8, denoising_end=0.5).validate(names={})
