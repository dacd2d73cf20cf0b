"""png_info: the web-UI `parameters` text (format/parse round trip) and atomic PNG writes."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_tf import png_info
from diffusion_tf.png_info import format_parameters, parse_parameters, read_parameters, save_png

BASE = {
    "steps": 20, "sampler": "ddim", "guidance": 7.5, "seed": 1234,
    "width": 512, "height": 768, "model": "sd-v1-5", "attention": "standard",
}


def image(seed=0, h=16, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_format_is_the_web_ui_convention():
    text = format_parameters(dict(BASE, prompt="an astronaut riding a horse", negative_prompt="blurry"))
    assert text == (
        "an astronaut riding a horse\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model: sd-v1-5, "
        "Attention: standard"
    )
    no_negative = format_parameters(dict(BASE, prompt="a cat"))
    assert no_negative.split("\n")[0] == "a cat" and "Negative prompt" not in no_negative
    assert no_negative.count("\n") == 1


PROMPTS = [
    ("an astronaut riding a horse", None),
    ("an astronaut riding a horse", "blurry, low quality"),
    ("a, b, c: d; e: f", "x: y, z"),
    ("first line\nsecond, line: with colon\n\nafter an empty line", "neg line 1\nneg: line 2,"),
    ('quotes "inside" and \\ backslashes', '"quoted"'),
    ("trailing newline\n", None),
    ("", None),
    ("unicode: café, 日本語 🚀", "ünïcödé"),
    ("Steps: 5, Sampler: fake, Seed: 1", "Seed: 99"),  # text that looks like parameters
]


@pytest.mark.parametrize("prompt,negative", PROMPTS)
def test_round_trip(prompt, negative):
    params = dict(BASE, prompt=prompt)
    if negative is not None:
        params["negative_prompt"] = negative
    text = format_parameters(params)
    assert text.split("\n")[-1].startswith("Steps: 20, ")
    assert parse_parameters(text) == params


def test_round_trip_of_awkward_values_and_extra_keys():
    params = dict(
        BASE, prompt="p", model='C:\\models\\sd 1.5, "fp16": v2', sampler=" spaced ",
        guidance=0.1 + 0.2, seed=2**32 - 1, temperature=0.5, extra_field="a: b, c", empty="",
    )
    parsed = parse_parameters(format_parameters(params))
    assert parsed == params
    assert isinstance(parsed["steps"], int) and isinstance(parsed["seed"], int)
    assert isinstance(parsed["guidance"], float)


def test_numpy_values_are_written_as_plain_numbers():
    params = dict(BASE, prompt="p", steps=np.int64(20), seed=np.uint32(7), guidance=np.float32(7.5))
    text = format_parameters(params)
    assert "Steps: 20, " in text and "Seed: 7, " in text and "CFG scale: 7.5, " in text
    assert parse_parameters(text) == dict(BASE, prompt="p", seed=7)


def test_none_and_empty_negative_prompt_are_left_out():
    for negative in (None, ""):
        parsed = parse_parameters(format_parameters(dict(BASE, prompt="p", negative_prompt=negative)))
        assert "negative_prompt" not in parsed


def test_parse_foreign_infotext():
    text = (
        "masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 640x512, "
        'Model hash: abc123, Model: anything-v3, Lora hashes: "a: 1, b: 2", Version: v1.7.0'
    )
    assert parse_parameters(text) == {
        "prompt": "masterpiece, 1girl", "negative_prompt": "lowres, bad anatomy",
        "steps": 28, "sampler": "DPM++ 2M Karras", "guidance": 7.0, "seed": 42,
        "width": 640, "height": 512, "model_hash": "abc123", "model": "anything-v3",
        "lora_hashes": "a: 1, b: 2", "version": "v1.7.0",
    }


def test_parse_text_without_parameter_line_is_all_prompt():
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt"}
    assert parse_parameters("line one\nline two") == {"prompt": "line one\nline two"}
    assert parse_parameters("a photo: a cat") == {"prompt": "a photo: a cat"}


def test_format_rejects_bad_input():
    with pytest.raises(ValueError):
        format_parameters("not a dict")
    with pytest.raises(ValueError):
        format_parameters({"prompt": "p", "width": 64})
    with pytest.raises(ValueError):
        format_parameters({"prompt": "p", "bad:label": 1})
    with pytest.raises(ValueError):
        parse_parameters(None)


# ---------------------------------------------------------------- files
def test_save_and_read_back(tmp_path):
    params = dict(BASE, prompt="a cat, sitting: here\nline 2", negative_prompt="日本語", width=24, height=16)
    path = tmp_path / "img.png"
    assert save_png(str(path), image(1), params) == str(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(im), image(1))
        assert im.text["parameters"] == format_parameters(params)
    assert read_parameters(path) == params
    assert temp_files(tmp_path) == []


def test_save_is_deterministic_and_overwrites(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    save_png(a, image(2), dict(BASE, prompt="x"))
    save_png(b, image(3), dict(BASE, prompt="y"))
    save_png(b, image(2), dict(BASE, prompt="x"))  # replaces b
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


def test_save_without_parameters_and_read_none(tmp_path):
    path = tmp_path / "plain.png"
    save_png(path, image(4), None)
    assert read_parameters(path) is None


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_existing_file_and_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "good.png"
    save_png(path, image(5), dict(BASE, prompt="good"))
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")  # something reached the temporary file
        raise error

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(type(error)):
        save_png(path, image(6), dict(BASE, prompt="bad"))
    assert path.read_bytes() == before
    assert read_parameters(path)["prompt"] == "good"
    assert os.listdir(tmp_path) == ["good.png"]

    with pytest.raises(type(error)):  # a new file: nothing at all is left
        save_png(tmp_path / "new.png", image(6), dict(BASE, prompt="bad"))
    assert os.listdir(tmp_path) == ["good.png"]


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), "float32"), np.zeros((8, 8), "uint8"), np.zeros((8, 8, 4), "uint8"),
            np.zeros((1, 8, 8, 3), "uint8")],
)
def test_save_rejects_non_rgb_uint8(tmp_path, bad):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "x.png", bad, None)
    assert os.listdir(tmp_path) == []


def test_import_does_not_import_tensorflow():
    code = "import sys, diffusion_tf.png_info; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(png_info.__file__)))
    assert out.stdout.strip() == "False"


def test_a1111_labels_and_their_order():
    params = {"prompt": "p <lora:s:0.5>", "steps": 20, "sampler": "DPM++ 2M", "schedule_type": "Karras",
              "guidance": 7.0, "seed": 1, "width": 64, "height": 64, "model": "m", "clip_skip": 2,
              "lora_hashes": "s: 0123456789ab", "ti_hashes": "tok: ba9876543210", "version": "v1"}
    text = format_parameters(params)
    assert text == ('p <lora:s:0.5>\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, '
                    'Size: 64x64, Model: m, Clip skip: 2, Lora hashes: "s: 0123456789ab", '
                    'TI hashes: "tok: ba9876543210", Version: v1')
    parsed = parse_parameters(text)
    assert parsed == params and isinstance(parsed["clip_skip"], int)
