"""The shape the built-in model lacks ("cross", `shapes.EXTRA_SHAPES`): opt-in everywhere, so the
three-shape dataset, parser and judge are unchanged; its geometry; the judge reads it (with the
extra shapes in its vocabulary) and still reads the old shapes as before; the data-folder writer;
`python -m diffusion_tf.eval --concept / --extended-judge / --prompts / --lora`."""

import hashlib
import json
import os

import numpy as np
import pytest

from diffusion_tf import eval as ev
from diffusion_tf import shapes
from diffusion_tf.pipeline import text_to_image
from diffusion_tf.shapes import dataset as D
from diffusion_tf.shapes import judge as J

# make_dataset(300, 5) and sample_prompts(200, 0), hashed with the code from before "cross" existed
THREE_SHAPE_DIGEST = "310b90f6068a8477ee9fb2c971317c35fff3a1e535caef5fc85667354aafae25"


def test_the_three_shape_grammar_is_unchanged():
    images, captions = D.make_dataset(300, 5)
    h = hashlib.sha256(images.tobytes())
    h.update("\n".join(captions).encode())
    h.update("\n".join(D.sample_prompts(200, 0)).encode())
    assert h.hexdigest() == THREE_SHAPE_DIGEST
    assert D.SHAPES == ("circle", "square", "triangle") and D.ALL_SHAPES == D.SHAPES + ("cross",)
    with pytest.raises(ValueError, match="shapes: circle, square, triangle"):
        D.parse_caption("a red cross")
    assert D.parse_caption("a red cross on the left", D.ALL_SHAPES) == {
        "color": "red", "shape": "cross", "position": "left", "background": None}
    image = D.make_dataset(1, 0)[0][0]
    assert "corner_fill" not in J.analyse(image) and "corner_fill" in J.analyse(image, D.ALL_SHAPES)
    for bad in ((), ("cross", "cross"), ("hexagon",), "oval"):
        with pytest.raises(ValueError, match="shapes="):
            D.check_shapes(bad)


def test_cross_geometry():
    for size in (18, 24, 30):
        mask = D.shape_mask("cross", size, 32, 32)
        ys, xs = np.nonzero(mask)
        assert xs.max() - xs.min() + 1 == size == ys.max() - ys.min() + 1
        assert mask.sum() == size * size * 5 // 9  # the square less its four corner ninths
        assert np.array_equal(mask, mask[::-1]) and np.array_equal(mask, mask.T)  # symmetric
        x0, y0, n = xs.min(), ys.min(), size // 3
        assert not mask[y0:y0 + n, x0:x0 + n].any() and mask[y0:y0 + n, x0 + n:x0 + 2 * n].all()
    specs = D.random_specs(300, 2, shapes=("cross",))
    assert {s.shape for s in specs} == {"cross"}
    for s in specs:  # inside the image, named positions in their third
        x0, y0, x1, y1 = s.extent
        assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
        if s.position == "left":
            assert s.cx < D.THIRD_LOW
    assert {s.shape for s in D.random_specs(300, 2, shapes=D.ALL_SHAPES)} == set(D.ALL_SHAPES)


def test_the_extended_judge_reads_crosses_and_the_old_shapes_as_before():
    images, captions, specs = D.make_dataset(600, 123, return_specs=True, shapes=D.ALL_SHAPES)
    verdicts = [J.judge(im, c, shapes=D.ALL_SHAPES) for im, c in zip(images, captions)]
    assert J.score(verdicts)["all"] == 1.0
    corners = {s: [v["analysis"]["corner_fill"] for v, sp in zip(verdicts, specs) if sp.shape == s]
               for s in D.ALL_SHAPES}
    assert max(corners["cross"]) == 0.0 and min(min(corners[s]) for s in D.SHAPES) >= J.CROSS_MAX_CORNER + 0.07
    # the old shapes, mildly noisy: the extended reading is the three-shape reading
    old, old_captions = D.make_dataset(300, 7)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(old + rng.normal(0, 12, old.shape)), 0, 255).astype(np.uint8)
    for image, caption in zip(noisy, old_captions):
        assert J.analyse(image, D.ALL_SHAPES)["shape"] == J.analyse(image)["shape"]
    # blurred crosses (a 3x3 box blur, softer than the VAE's corners) are still crosses
    crosses = images[[i for i, s in enumerate(specs) if s.shape == "cross"]].astype(float)
    pad = np.pad(crosses, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(pad[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    readings = [J.analyse(np.rint(b).astype(np.uint8), D.ALL_SHAPES)["shape"] for b in blurred]
    assert readings.count("cross") == len(readings)


def test_concept_prompts():
    prompts = D.sample_prompts(100, 3, shapes=("cross",))
    assert all(D.parse_caption(p, D.ALL_SHAPES)["shape"] == "cross" for p in prompts)
    assert prompts != D.sample_prompts(100, 4, shapes=("cross",))


def test_folder_writer_and_the_lora_data_reader(tmp_path, capsys):
    from diffusion_tf.shapes.folder import main, write_folder
    from diffusion_tf.training.imagefolder import scan_folder

    out = tmp_path / "data"
    assert write_folder(str(out), n=5, seed=3, repeats=2, base_images=3) == {"2_cross": 5, "1_shapes": 3}
    scanned = scan_folder(str(out))
    assert [i.subset for i in scanned.items] == ["1_shapes"] * 3 + ["2_cross"] * 5
    assert len(scanned.rows) == 3 + 10
    images, captions = D.make_dataset(5, 3, shapes=("cross",))
    assert [i.caption for i in scanned.items[3:]] == captions
    from PIL import Image

    with Image.open(out / "2_cross" / "00000.png") as im:
        assert np.array_equal(np.asarray(im), images[0])
    with pytest.raises(ValueError, match="not empty"):
        write_folder(str(out), n=1)
    with pytest.raises(SystemExit) as info:
        main([str(out)])
    assert info.value.code == 2 and "not empty" in capsys.readouterr().err


def test_eval_dataset_self_check_with_the_concept(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert ev.main(["--dataset", "--concept", "cross", "--n", "40", "--seed", "2", "--out", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["scores"]["all"] == 1.0 and r["concept"] == "cross" and r["vocabulary"] == list(D.ALL_SHAPES)
    assert all(item["expected"]["shape"] == "cross" for item in r["items"])
    assert "judged with the shapes circle, square, triangle, cross" in capsys.readouterr().out


class _Painter:
    """A stand-in for Text2Image that draws what the prompt asks (crosses as squares when it
    does not `know` them, as a model without the word would), recording its keyword arguments."""

    calls = []
    knows_cross = False

    def __init__(self, model=None, img_height=None, img_width=None, **kwargs):
        _Painter.calls.append(dict(kwargs, model=model))
        self.knows = _Painter.knows_cross or bool(kwargs.get("loras"))

    def generate(self, prompt, seed=None, batch_size=1, **kwargs):
        out = []
        for p in prompt:
            want = D.parse_caption(p, D.ALL_SHAPES)
            shape = want["shape"] if (want["shape"] != "cross" or self.knows) else "square"
            bg = want["background"] or next(c for c in D.PALETTE if c != want["color"])
            x = {"left": 14, "right": 50}.get(want["position"], 32)
            y = {"top": 20, "bottom": 44}.get(want["position"], 32)
            out.append(D.render(D.Spec(want["color"], shape, None, bg, False, 24, x, y)))
        return np.stack(out)


def test_eval_concept_and_lora(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(text_to_image, "Text2Image", _Painter)
    _Painter.calls = []
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    assert ev.main(["--concept", "cross", "--n", "12", "--out", str(before)]) == 0
    assert ev.main(["--concept", "cross", "--n", "12", "--lora", "x/cross.safetensors:0.75", "--lora", "y.safetensors",
                    "--out", str(after)]) == 0
    assert "loras" not in _Painter.calls[0] and _Painter.calls[1]["loras"] == [("x/cross.safetensors", 0.75),
                                                                               ("y.safetensors", 1.0)]
    b, a = json.loads(before.read_text()), json.loads(after.read_text())
    assert b["scores"]["shape"] == 0.0 and a["scores"]["all"] == 1.0
    assert a["loras"] == [["x/cross.safetensors", 0.75], ["y.safetensors", 1.0]]
    assert [i["prompt"] for i in a["items"]] == D.sample_prompts(12, 0, shapes=("cross",))
    assert "with LoRA x/cross.safetensors:0.75, y.safetensors:1" in capsys.readouterr().out


def test_eval_prompts_file_and_argument_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(text_to_image, "Text2Image", _Painter)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue cross on the left\n")
    out = tmp_path / "r.json"
    assert ev.main(["--prompts", str(prompts), "--extended-judge", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 2 and [i["prompt"] for i in r["items"]] == ["a red circle", "a blue cross on the left"]
    assert [i["shape"] for i in r["items"]] == [True, False]  # the painter does not know crosses
    capsys.readouterr()
    for argv, message in [
        (["--prompts", str(prompts)], "--extended-judge accepts the extra shapes"),
        (["--prompts", str(tmp_path / "none.txt")], "none.txt"),
        (["--dataset", "--lora", "a.safetensors"], "--lora changes a model"),
        (["--prompts", str(prompts), "--concept", "cross"], "not with --concept"),
        (["--concept", "circle"], "invalid choice"),
        (["--lora", "a.safetensors:inf"], "finite"),
    ]:
        with pytest.raises(SystemExit) as info:
            ev.main(argv)
        assert info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_lora_argument():
    assert ev.lora_argument("a.safetensors") == ("a.safetensors", 1.0)
    assert ev.lora_argument("runs/x.safetensors:0.5") == ("runs/x.safetensors", 0.5)
    assert ev.lora_argument("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert ev.lora_argument("C:\\loras\\x.safetensors:-1") == ("C:\\loras\\x.safetensors", -1.0)
    assert ev.lora_argument(":2") == (":2", 1.0)


def test_shapes_package_exports_the_extra_shapes():
    assert shapes.EXTRA_SHAPES == ("cross",) and shapes.ALL_SHAPES == D.ALL_SHAPES
    assert shapes.check_shapes is D.check_shapes


def test_folder_writer_base_images_from_a_model(monkeypatch, tmp_path):
    """--base-from MODEL: the old-grammar images are the model's pictures of their captions."""
    from diffusion_tf.shapes import generate
    from diffusion_tf.shapes.folder import write_folder
    from diffusion_tf.training.imagefolder import scan_folder

    calls = []

    def fake(prompts, model=None, seed=0, **kwargs):
        calls.append((list(prompts), model, seed))
        return np.stack([D.render(D.Spec("red", "circle", None, "blue", False, 20, 32, 32)) for _ in prompts])

    monkeypatch.setattr(generate, "generate_images", fake)
    assert write_folder(str(tmp_path / "d"), n=2, seed=4, base_images=3, base_from="shapes", log=None) == {
        "1_cross": 2, "1_shapes": 3}
    assert calls == [(D.sample_prompts(3, 5), "shapes", 5)]
    scanned = scan_folder(str(tmp_path / "d"))
    assert [i.caption for i in scanned.items if i.subset == "1_shapes"] == D.sample_prompts(3, 5)
