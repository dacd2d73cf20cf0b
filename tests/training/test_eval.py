"""The shapes analyser (`diffusion_tf.shapes.judge`): it must judge the real images right,
resist mild noise, reject wrong images; and the command line of `diffusion_tf.eval`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_tf.pipeline import text_to_image
from diffusion_tf import eval as ev
from diffusion_tf import shapes
from diffusion_tf.shapes import PALETTE, Spec, make_dataset, parse_caption, render
from diffusion_tf.shapes import judge as J

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(500, 123, return_specs=True)


@pytest.fixture(scope="module")
def verdicts(dataset):
    images, captions, _ = dataset
    return [J.judge(img, cap) for img, cap in zip(images, captions)]


def _scores(images, captions):
    return J.score([J.judge(img, cap) for img, cap in zip(images, captions)])


def test_the_analyser_judges_every_dataset_image_right(dataset, verdicts):
    specs = dataset[2]
    scores = J.score(verdicts)
    assert {k: scores[k] for k in J.ATTRIBUTES + ("all",)} == dict.fromkeys(J.ATTRIBUTES + ("all",), 1.0)
    assert scores["named"]["position"]["n"] > 150 and scores["named"]["background"]["n"] > 150
    # and it reads the facts, not only what the prompt asks
    for v, spec in zip(verdicts, specs):
        a = v["analysis"]
        assert (a["color"], a["shape"], a["background"]) == (spec.color, spec.shape, spec.background)
        assert abs(a["centroid"][0] - spec.cx) <= 1 and abs(a["centroid"][1] - spec.cy) <= 1


def test_robust_to_mild_noise(dataset):
    images, captions, _ = dataset
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(images + rng.normal(0, 8, images.shape)), 0, 255).astype(np.uint8)
    scores = _scores(noisy, captions)
    assert scores["all"] >= 0.98, scores


def test_fill_ratio_thresholds_separate_the_shapes(dataset, verdicts):
    fills = {}
    for v, spec in zip(verdicts, dataset[2]):
        fills.setdefault(spec.shape, []).append(v["analysis"]["fill_ratio"])
    assert max(fills["triangle"]) < J.TRIANGLE_MAX_FILL < min(fills["circle"])
    assert max(fills["circle"]) < J.SQUARE_MIN_FILL <= min(fills["square"])
    assert abs(np.median(fills["circle"]) - np.pi / 4) < 0.05


def test_rejects_wrong_images():
    red_circle = render(Spec("red", "circle", "left", "white", True, 24, 16, 32))
    v = J.judge(red_circle, "a blue square")
    assert not v["color"] and not v["shape"] and v["position"] and v["background"] and not v["all"]
    v = J.judge(red_circle, "a red circle on the right on a black background")
    assert v["color"] and v["shape"] and not v["position"] and not v["background"] and not v["all"]
    v = J.judge(red_circle, "a red circle on the left on a white background")
    assert v["all"] and v["expected"] == parse_caption("a red circle on the left on a white background")
    for other in ("a red triangle", "a red square", "an orange circle", "a red circle on the top"):
        assert not J.judge(red_circle, other)["all"], other


def test_corner_positions_are_judged_per_axis():
    corner = render(Spec("green", "square", None, "black", False, 20, 12, 12))
    a = J.analyse(corner)
    assert a["positions"] == ["top", "left"] and a["position"] == "top left"
    assert (a["x_third"], a["y_third"]) == ("left", "top")
    assert J.judge(corner, "a green square on the left")["position"]
    assert J.judge(corner, "a green square on the top")["position"]
    assert not J.judge(corner, "a green square on the right")["position"]
    assert not J.judge(corner, "a green square on the bottom")["position"]
    middle = J.analyse(render(Spec("green", "square", None, "black", False, 20, 32, 32)))
    assert middle["positions"] == [] and middle["position"] == "center"
    assert (middle["x_third"], middle["y_third"]) == ("center", "middle")


def test_blank_image_has_no_shape():
    blank = np.zeros((64, 64, 3), np.uint8)
    blank[...] = PALETTE["blue"]
    a = J.analyse(blank)
    assert a["background"] == "blue" and a["color"] is None and a["shape"] is None and a["blob_pixels"] == 0
    v = J.judge(blank, "a red circle on the left on a blue background")
    assert v["background"] and not v["color"] and not v["shape"] and not v["position"] and not v["all"]


def test_largest_blob_wins_over_specks():
    image = render(Spec("yellow", "triangle", None, "purple", False, 26, 40, 40))
    image[2:5, 2:5] = PALETTE["yellow"]  # a 3x3 speck
    image[8, 50] = PALETTE["red"]
    a = J.analyse(image)
    assert a["shape"] == "triangle" and a["color"] == "yellow"


def test_eval_keeps_the_judge_names():
    for name in ("nearest_color", "largest_component", "majority3x3", "analyse", "judge", "score", "format_table",
                 "ATTRIBUTES", "FOREGROUND_DISTANCE", "TRIANGLE_MAX_FILL", "SQUARE_MIN_FILL"):
        assert getattr(ev, name) is getattr(J, name), name
    assert ev.components is J.connected_components


def test_components():
    mask = np.zeros((7, 9), bool)
    mask[1:6, 1] = mask[5, 1:6] = mask[1:6, 5] = True  # a U: needs propagation both ways
    mask[0, 8] = mask[1, 8] = True
    mask[3, 3] = True
    labels = J.connected_components(mask)
    assert (labels == -1).sum() == (~mask).sum()
    assert len(np.unique(labels[mask])) == 3
    assert labels[1, 1] == labels[1, 5] == labels[5, 3]
    assert J.largest_component(mask).sum() == 13
    assert not J.largest_component(np.zeros((4, 4), bool)).any()
    spiral = np.ones((15, 15), bool)
    spiral[1:14:2, 1:14] = False
    spiral[1:14:4, 13] = True
    spiral[3:14:4, 1] = True
    assert len(np.unique(J.connected_components(spiral)[spiral])) == 1  # a long winding path


def test_bad_images():
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32)):
        with pytest.raises(ValueError, match="image"):
            J.analyse(bad)
    with pytest.raises(ValueError, match="grammar"):
        J.judge(np.zeros((64, 64, 3), np.uint8), "a cat")


def test_cli_dataset_self_check_writes_report_and_grid(tmp_path):
    out, grid = tmp_path / "sub" / "report.json", tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_tf.eval", "--dataset", "--n", "50", "--seed", "3",
         "--out", str(out), "--grid", str(grid)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for key in J.ATTRIBUTES + ("all",):
        assert any(line.startswith(key) and "100.0%" in line for line in proc.stdout.splitlines()), proc.stdout
    report = json.loads(out.read_text())
    assert report["source"] == "dataset" and report["n"] == 50 and len(report["items"]) == 50
    assert all(report["scores"][k] == 1.0 for k in J.ATTRIBUTES + ("all",))
    assert report["items"][0]["prompt"] == make_dataset(1, 3)[1][0]
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.width > 10 * 128 and im.height > 5 * 128


def test_cli_with_a_model(monkeypatch, tmp_path, capsys):
    """The model path, with a stand-in for Text2Image that draws the prompt (or gets it wrong)."""
    calls = []

    class FakeText2Image:
        def __init__(self, model="default", img_height=None, img_width=None, **kwargs):
            assert (img_height, img_width) == (64, 64)
            calls.append(("init", model))

        def generate(self, prompt, num_steps=50, seed=None, batch_size=1, **kwargs):
            calls.append(("generate", len(prompt), num_steps, seed))
            out = []
            for k, p in enumerate(prompt):
                want = parse_caption(p)
                rng = np.random.default_rng(seed + k)
                bg = want["background"] or next(c for c in PALETTE if c != want["color"])
                x = {"left": 14, "right": 50}.get(want["position"], 32)
                y = {"top": 20, "bottom": 44}.get(want["position"], 32)
                shape = want["shape"] if rng.random() < 0.5 else "square"  # half wrong circles/triangles
                out.append(render(Spec(want["color"], shape, None, bg, False, 24, x, y)))
            return np.stack(out)

    monkeypatch.setattr(text_to_image, "Text2Image", FakeText2Image)
    out = tmp_path / "r.json"
    assert ev.main(["--model", "some/folder", "--n", "23", "--steps", "7", "--batch", "10",
                    "--seed", "4", "--out", str(out)]) == 0
    assert calls[0] == ("init", "some/folder")
    assert calls[1:] == [("generate", 10, 7, 4), ("generate", 10, 7, 14), ("generate", 10, 7, 24)]  # padded
    report = json.loads(out.read_text())
    assert report["source"] == "model" and report["model"] == "some/folder" and report["steps"] == 7
    assert [item["prompt"] for item in report["items"]] == shapes.sample_prompts(23, 4)
    s = report["scores"]
    assert s["color"] == s["position"] == s["background"] == 1.0
    assert 0.3 < s["shape"] < 1.0 and s["all"] == s["shape"]
    table = capsys.readouterr().out
    assert "shape" in table and f"{100 * s['shape']:.1f}%" in table


def test_cli_argument_errors(capsys):
    for argv in (["--n", "0"], ["--n", "x"], ["--seed", "-1"], ["--steps", "0"], ["--dataset", "--model", "m"]):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_bad_model_arguments_exit_2(monkeypatch, capsys):
    """A ValueError of the pipeline (unknown scheduler, bad model folder) is one line, exit 2."""

    class RefusingText2Image:
        def __init__(self, scheduler=None, **kwargs):
            raise ValueError(f"scheduler={scheduler!r}; allowed: ddim, euler.")

    monkeypatch.setattr(text_to_image, "Text2Image", RefusingText2Image)
    with pytest.raises(SystemExit) as e:
        ev.main(["--n", "1", "--scheduler", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "scheduler='bogus'; allowed: ddim, euler." in err and "Traceback" not in err


def test_cli_vae_roundtrip(monkeypatch, tmp_path, capsys):
    """--vae-roundtrip judges the dataset after encode -> decode: a lossless stand-in keeps
    every image right, a blurring one loses shapes; the report says what was judged."""
    class Identity:
        def encode(self, x):
            return x

        def decode(self, z):
            return z

    class Blur(Identity):
        def decode(self, z):  # a 9x9 box blur (edge pixels repeated)
            z = np.pad(np.asarray(z), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
            c = np.cumsum(np.cumsum(np.pad(z, ((0, 0), (1, 0), (1, 0), (0, 0))), 1), 2)
            return (c[:, 9:, 9:] - c[:, :-9, 9:] - c[:, 9:, :-9] + c[:, :-9, :-9]) / 81.0

    out = tmp_path / "r.json"
    for vae, perfect in ((Identity(), True), (Blur(), False)):
        monkeypatch.setattr("diffusion_tf.training.vae.load_vae_from", lambda source, vae=vae: vae)
        assert ev.main(["--vae-roundtrip", "some/run", "--n", "40", "--seed", "2", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["source"] == "vae_roundtrip" and report["model"] == "some/run"
        assert [item["prompt"] for item in report["items"]] == make_dataset(40, 2)[1]
        if perfect:
            assert report["scores"]["all"] == 1.0
        else:
            assert report["scores"]["shape"] < 0.9 and report["scores"]["background"] == 1.0
    assert "through the VAE of some/run" in capsys.readouterr().out


def test_vae_roundtrip_loads_a_model_folder_and_refuses_other_paths(tmp_path, capsys):
    from support import tiny_models

    from diffusion_tf.training.vae import load_vae_from, vae_roundtrip

    vae = load_vae_from(tiny_models.converted_folder("tiny-sd1"))
    images = make_dataset(3, 0)[0]
    rec = vae_roundtrip(vae, images, batch=2)
    assert rec.shape == images.shape and rec.dtype == np.uint8
    with pytest.raises(SystemExit) as e:
        ev.main(["--vae-roundtrip", str(tmp_path)])
    assert e.value.code == 2
    assert "is not a model folder" in capsys.readouterr().err


def test_altered_caption_changes_exactly_one_attribute():
    from diffusion_tf.shapes.dataset import parse_caption, random_specs

    for spec in random_specs(40, 3, p_position=1.0, p_background=1.0):
        true = parse_caption(shapes.caption(spec))
        for attribute in J.ATTRIBUTES:
            changed = parse_caption(ev.altered_caption(spec, attribute))
            assert [k for k in J.ATTRIBUTES if changed[k] != true[k]] == [attribute]
            assert changed["color"] != changed["background"]
        assert parse_caption(ev.altered_caption(spec, "position"))["position"] == OPPOSITE[spec.position]
    with pytest.raises(ValueError, match="size"):
        ev.altered_caption(spec, "size")


@pytest.mark.heavy  # the UNet's loss at every probed timestep: with the heavy checks (CI's second step)
def test_caption_sensitivity_is_zero_for_a_model_deaf_to_the_caption(monkeypatch):
    """A random tiny model's output depends on its caption; with the text encoder's output
    replaced by one fixed context, every gap is exactly zero."""
    from keras import ops
    from support import tiny_models

    from diffusion_tf import Text2Image

    pipe = Text2Image(model=tiny_models.converted_folder("tiny-sd1"))
    result = ev.caption_sensitivity(pipe, n=6, seed=1, timesteps=(100, 900))
    assert list(result["loss"]) == [100, 900] and all(v > 0 for v in result["loss"].values())
    assert any(abs(result[a][t]) > 1e-4 for a in J.ATTRIBUTES for t in (100, 900)), result
    table = ev.format_sensitivity(result)
    assert "position" in table and "t=900" in table

    fixed = pipe.encode_text(["a red circle"])
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: ops.repeat(fixed, len(prompts), axis=0))
    deaf = ev.caption_sensitivity(pipe, n=6, seed=1, timesteps=(100, 900))
    assert all(deaf[a][t] == 0.0 for a in J.ATTRIBUTES for t in (100, 900)), deaf
    with pytest.raises(ValueError, match="outside"):
        ev.caption_sensitivity(pipe, n=2, timesteps=(1000,))


def test_cli_sensitivity_needs_a_model(capsys):
    for argv in (["--sensitivity", "--dataset"], ["--sensitivity", "--vae-roundtrip", "x"]):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2
    assert "--sensitivity" in capsys.readouterr().err
