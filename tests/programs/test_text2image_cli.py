"""The text2image.py command line: help, argument errors, a real run on the tiny model."""

import contextlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from support import tiny_models

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import text2image  # noqa: E402  (the CLI module at the repository root)

PROG = "text2image.py"
OPTIONS = [
    "--prompt", "--negative-prompt", "--steps", "--guidance", "--seed", "--batch-size", "--height",
    "--width", "--model", "--attention", "--scheduler", "--jit-compile", "--no-jit-compile",
    "--output", "--temperature", "--help", "--lora", "--lora-dir", "--embedding", "--embedding-dir",
    "--clip-skip", "--prompt-syntax", "--long-prompts",
]
RUN_ARGS = ["--steps", "3", "--height", "64", "--width", "64", "--seed", "5", "--batch-size", "2",
            "--output", "tmp/out.png"]
PROMPT, NEGATIVE = "a cat, sitting: on a mat", "blurry, low quality"


def run_cli(argv):
    """(exit code, stdout, stderr) of main(argv), SystemExit included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = text2image.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith(f"{PROG}: error:")]


# The module fixtures (the real runs) are built once: every test of this file runs on one worker.
pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    """The session's converted tiny-sd1 model folder (tests/conftest.py)."""
    return tiny_folder


# ---------------------------------------------------------------- help
def test_help_lists_every_option_schedulers_and_examples(capsys):
    from diffusion_tf.presets import list_presets
    from diffusion_tf.schedulers import SCHEDULERS

    with pytest.raises(SystemExit) as e:
        text2image.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    parser = text2image.build_parser()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in out
        assert action.help, f"{action.option_strings} has no help text"
    for option in OPTIONS:
        assert option in out
    assert sorted(parser.scheduler_names) == sorted(SCHEDULERS)
    for name in list(SCHEDULERS) + list_presets():
        assert name in out
    assert 'python text2image.py --prompt "an astronaut riding a horse"' in out
    assert "python -m weights_port v1-5-pruned-emaonly.safetensors sd15 --config sd-v1-5" in out
    assert "--model sd15" in out


def test_help_and_argument_errors_do_not_import_tensorflow():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import text2image\n"
        "for argv in (['--help'], ['--prompt', 'x', '--height', '500'], ['--prompt', 'x', '--scheduler', 'ddim', '--steps', '0'],\n"
        "             ['--prompt', 'x', '--lora', 'missing.safetensors:0.5'], ['--prompt', 'x', '--clip-skip', '-1'],\n"
        "             ['--prompt', 'x <lora:missing:1>', '--lora-dir', '.']):\n"
        "    try:\n"
        "        text2image.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == (0 if argv == ['--help'] else 2), (argv, e.code)\n"
        "    else:\n"
        "        raise AssertionError(argv)\n"
        "print('TF', 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "TF False False" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert wall < 5, f"--help and argument errors took {wall:.1f} s"


# ---------------------------------------------------------------- bad arguments
BAD = [
    (["--height", "500"], "--height 500"),
    (["--width", "0"], "--width 0"),
    (["--height", "-64"], "--height -64"),
    (["--width", "abc"], "--width abc"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-1"], "--steps -1"),
    (["--steps", "1001"], "--steps 1001"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--guidance", "-1"], "--guidance -1"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", "1.5"], "--seed 1.5"),
    (["--seed", str(2**32)], f"--seed {2**32}"),
    (["--output", "x.jpg"], "--output x.jpg"),
    (["--output", "out/.png"], "--output out/.png"),
    (["--scheduler", "no-such-sampler"], "--scheduler no-such-sampler"),
    (["--attention", "quadratic"], "quadratic"),
    (["--clip-skip", "-1"], "--clip-skip -1"),
    (["--clip-skip", "1.5"], "--clip-skip 1.5"),
    (["--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors:0.5: no such file (missing.safetensors)"),
    (["--lora", "C:\\loras\\x.safetensors"], "--lora C:\\loras\\x.safetensors: no such file"),  # not a scale
    (["--lora", "x.safetensors:nan"], "--lora x.safetensors:nan: scale 'nan' is not a finite number"),
    (["--lora", "x.safetensors:inf"], "'inf' is not a finite number"),
    (["--lora-dir", "/nonexistent-loras"], "--lora-dir /nonexistent-loras: no such folder"),
    (["--embedding", "missing.pt:tok"], "--embedding missing.pt:tok: no such file"),
    (["--embedding-dir", "/nonexistent-emb"], "--embedding-dir /nonexistent-emb: no such folder"),
    (["--prompt-syntax", "fancy"], "fancy"),
    (["--long-prompts", "wrap"], "wrap"),
    (["--prompt", "a <lora:x:1:2>"], "<lora:x:1:2>"),
    (["--prompt", "a <lora:x:abc>"], "'abc' is not a finite number"),
    (["--prompt", "a <lora:missing:1>", "--lora-dir", "."], "<lora:missing> in the prompt: no LoRA file named 'missing'"),
    (["--negative-prompt", "<hypernet:h:1>"], "--negative-prompt: prompt tag '<hypernet:h:1>'"),
    (["--preview", "0"], "--preview: '0' is not an integer >= 1"),
    (["--preview", "-3"], "--preview: '-3' is not an integer >= 1"),
    (["--preview", "2.5"], "--preview: '2.5' is not an integer >= 1"),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_line_and_exit_2(args, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A missing model too: the plain values must be rejected before any model is looked at.
    code, out, err = run_cli(["--prompt", "x", "--model", "/nonexistent-model"] + args)
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err  # exactly one line
    assert err.startswith(f"{PROG}: error: ") and named in err
    assert "nonexistent-model" not in err
    assert out == "" and os.listdir(tmp_path) == []


def test_missing_prompt_is_an_error():
    code, _, err = run_cli([])
    assert code == 2 and "--prompt" in err and "Traceback" not in err


def test_unknown_model_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = text2image.main(["--prompt", "x", "--model", "/nonexistent", "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "/nonexistent" in lines[0], captured.err
    assert captured.err.rstrip().splitlines()[-1] == lines[0]
    assert captured.out == "" and os.listdir(tmp_path) == []


def test_truncated_weights_file_is_reported_as_corrupt(tiny_model, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken-model"
    shutil.copytree(tiny_model, bad)
    weights = bad / "unet.weights.h5"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    monkeypatch.chdir(tmp_path)
    code = text2image.main(["--prompt", "x", "--model", str(bad), "--steps", "1", "--height", "64"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert "corrupt" in lines[0] and "unet.weights.h5" in lines[0]
    assert not (tmp_path / "output.png").exists()


def test_unreadable_model_file_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "no-merges"
    shutil.copytree(tiny_model, bad)
    os.remove(bad / "tokenizer" / "merges.txt")
    monkeypatch.chdir(tmp_path)
    code = text2image.main(["--prompt", "x", "--model", str(bad), "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "merges.txt" in lines[0], captured.err


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def real_run(tiny_model, tmp_path_factory):
    """The same command run twice in one folder: the results of both runs."""
    folder = tmp_path_factory.mktemp("cli-run")
    argv = ["--model", tiny_model, "--prompt", PROMPT, "--negative-prompt", NEGATIVE] + RUN_ARGS
    from diffusion_tf.pipeline import text_to_image

    real = text_to_image.Text2Image
    made = []

    class Recording(real):  # the real class; remembers its instances and their arguments
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, args, kwargs))

    cwd = os.getcwd()
    os.chdir(folder)
    text_to_image.Text2Image = Recording
    try:
        runs = []
        for _ in range(2):
            code, out, err = run_cli(argv)
            files = {name: (folder / "tmp" / name).read_bytes() for name in sorted(os.listdir(folder / "tmp"))}
            runs.append({"code": code, "out": out, "err": err, "files": files})
    finally:
        text_to_image.Text2Image = real
        os.chdir(cwd)
    return {"folder": folder, "runs": runs, "made": made}


def test_real_run_writes_numbered_pngs(real_run):
    folder = real_run["folder"]
    first = real_run["runs"][0]
    assert first["code"] == 0, first["err"]
    assert sorted(first["files"]) == ["out_1.png", "out_2.png"]  # no temporary files left
    assert first["out"].split() == [os.path.join("tmp", "out_1.png"), os.path.join("tmp", "out_2.png")]
    for name in first["files"]:
        with Image.open(folder / "tmp" / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)


def test_preview_writes_a_sheet_of_the_batch_next_to_the_output(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--model", tiny_model, "--prompt", PROMPT, "--preview", "1"] + RUN_ARGS)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "tmp")) == ["out_1.png", "out_2.png", "out_preview.png"]  # no temporaries
    with Image.open(tmp_path / "tmp" / "out_preview.png") as im:
        assert im.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # both images on one contact sheet
    assert out.split() == [os.path.join("tmp", "out_1.png"), os.path.join("tmp", "out_2.png")]


def test_real_run_parameters_chunk(real_run, tiny_model):
    from diffusion_tf.png_info import read_parameters

    folder = real_run["folder"]
    for name, seed in (("out_1.png", 5), ("out_2.png", 6)):
        assert read_parameters(folder / "tmp" / name) == {
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "sampler": "DDIM",  # A1111's name
            "guidance": 7.5, "seed": seed, "width": 64, "height": 64,
            "model": tiny_model, "attention": "standard",  # the model as the user named it
        }


def test_real_run_reports_model_seed_and_progress(real_run, tiny_model):
    err = real_run["runs"][0]["err"]
    assert "Traceback" not in err and "error" not in err
    model_lines = [line for line in err.splitlines() if line.startswith("model ")]
    assert len(model_lines) == 1
    assert tiny_model in model_lines[0] and "seed 5" in model_lines[0]
    for step in (1, 2, 3):
        assert f"step {step}/3 [" in err
    assert "s/it" in err


def test_real_run_is_repeatable(real_run):
    first, second = real_run["runs"]
    assert second["code"] == 0
    assert first["files"] == second["files"]  # byte-identical PNGs
    assert first["files"]["out_1.png"] != first["files"]["out_2.png"]  # seeds 5 and 6 differ


def test_files_equal_text2image_generate(real_run, tiny_model):
    files = [np.asarray(Image.open(real_run["folder"] / "tmp" / n)) for n in ("out_1.png", "out_2.png")]
    # One Text2Image per run, built from the command line's values. The second run's
    # (a fresh instance) is reused here to spare this module another ~5 s model build.
    made = real_run["made"]
    assert len(made) == 2 and made[0][0] is not made[1][0]
    t2i, args, kwargs = made[1]
    assert args == ()
    assert kwargs == dict(model=tiny_model, img_height=64, img_width=64, jit_compile=False,
                          attention=None, scheduler=None, lora_dir=None, embedding_dir=None,
                          prompt_syntax="a1111", long_prompts="chunks")
    # The plain library call (the fused loop, no callback), as a user writes it.
    images = t2i.generate(PROMPT, negative_prompt=NEGATIVE, num_steps=3, unconditional_guidance_scale=7.5,
                          batch_size=2, seed=5)
    assert t2i.last_seeds == [5, 6]
    np.testing.assert_array_equal(images, np.stack(files))


# ---------------------------------------------------------------- interrupts and write errors
class FakeText2Image:
    """Stands in for Text2Image where only the CLI's own handling is tested."""

    fail_at_step = None

    calls = []

    def __init__(self, model, img_height=None, img_width=None, **kwargs):
        FakeText2Image.calls.append(("init", dict(model=model, img_height=img_height, img_width=img_width, **kwargs)))
        self.model_path = model
        self.config = {"source": "fake"}
        self.img_height, self.img_width = img_height or 16, img_width or 16
        self.scheduler = type("S", (), {"name": "ddim"})()
        self.defaults = {"num_steps": 50, "guidance": 7.5, "scheduler": "ddim"}
        self.attention = "standard"
        self.last_seeds = None
        self.loras = []
        self.text_encoder = types.SimpleNamespace(num_hidden_layers=3)
        self.text_layers = 3
        self.conditioning = types.SimpleNamespace(embeddings={})

    def load_lora(self, path, scale=1.0):
        FakeText2Image.calls.append(("load_lora", dict(path=path, scale=scale)))
        name = os.path.splitext(os.path.basename(path))[0]
        self.loras.append(types.SimpleNamespace(name=name, path=os.path.abspath(path), scale=scale, hash="0123456789ab"))
        return name

    def load_textual_inversion(self, path, token=None):
        FakeText2Image.calls.append(("load_textual_inversion", dict(path=path, token=token)))
        token = token or os.path.splitext(os.path.basename(path))[0]
        self.conditioning.embeddings[token] = (path, [token])
        return [token]

    def generate(self, prompt, batch_size=1, seed=0, num_steps=1, callback=None, **kwargs):
        FakeText2Image.calls.append(("generate", dict(prompt=prompt, batch_size=batch_size, seed=seed,
                                                      num_steps=num_steps, **kwargs)))
        self.last_seeds = [seed + i for i in range(batch_size)]
        for i in range(num_steps):
            if i == self.fail_at_step:
                raise KeyboardInterrupt
            callback(i, num_steps, 999 - i)
        return np.zeros((batch_size, self.img_height, self.img_width, 3), "uint8")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    from diffusion_tf.pipeline import text_to_image

    monkeypatch.setattr(text_to_image, "Text2Image", FakeText2Image)
    monkeypatch.setattr(FakeText2Image, "fail_at_step", None)
    monkeypatch.setattr(FakeText2Image, "calls", [])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_interrupt_during_generation_exits_130_without_files(fake, monkeypatch):
    monkeypatch.setattr(FakeText2Image, "fail_at_step", 2)
    code, out, err = run_cli(["--prompt", "x", "--model", "m", "--steps", "5", "--output", "o/out.png"])
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
    assert "step 2/5" in err and out == ""
    assert os.listdir(fake / "o") == []


def test_interrupt_while_writing_leaves_only_complete_files(fake, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = run_cli(["--prompt", "x", "--model", "m", "--steps", "1", "--batch-size", "3", "--seed", "1"])
    assert code == 130 and "Traceback" not in err
    assert os.listdir(fake) == ["output_1.png"]
    assert "output_1.png" in err
    with Image.open(fake / "output_1.png") as im:
        assert im.size == (16, 16)


def test_write_error_is_one_line_exit_1(fake, monkeypatch):
    def save(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    code, out, err = run_cli(["--prompt", "x", "--model", "m", "--steps", "1"])
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"{PROG}: error: cannot write output.png: No space left on device"]
    assert os.listdir(fake) == []


def test_random_seed_is_reported_and_saved(fake):
    from diffusion_tf.png_info import read_parameters

    code, out, err = run_cli(["--prompt", "x", "--model", "m", "--steps", "1", "--temperature", "0.5"])
    assert code == 0 and out.split() == ["output.png"]
    params = read_parameters(fake / "output.png")
    assert 0 <= params["seed"] < 2**32 and f"seed {params['seed']}" in err
    assert params["temperature"] == 0.5 and params["model"] == "m"


def test_output_paths_and_progress_bar():
    assert text2image.output_paths("a/b.png", 1) == ["a/b.png"]
    assert text2image.output_paths("a/b.png", 3) == ["a/b_1.png", "a/b_2.png", "a/b_3.png"]
    stream = io.StringIO()
    bar = text2image.ProgressBar(stream, width=10)
    for i in range(4):
        bar(i, 4, 999)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 1/4 [=>        ] ") and lines[0].endswith(" s/it")
    assert lines[-1].startswith("step 4/4 [==========] ")


# ---------------------------------------------------------------- --from-png and --grid
def test_from_png_regenerates_with_the_stored_parameters(fake):
    from diffusion_tf.png_info import save_png

    params = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 7, "sampler": "euler",
              "guidance": 3.5, "seed": 42, "width": 24, "height": 16, "model": "m", "attention": "linear"}
    save_png(fake / "src.png", np.zeros((16, 24, 3), np.uint8), params)
    code, out, err = run_cli(["--from-png", "src.png", "--output", "again.png"])
    assert code == 0, err
    assert "parameters from src.png:" in err and "--seed 42" in err and "--prompt 'a red circle'" in err
    (_, init), (_, gen) = FakeText2Image.calls
    assert "Sampler: euler," in (fake / "src.png").read_bytes().decode("latin-1")  # our old lower-case name
    assert init["model"] == "m" and (init["img_width"], init["img_height"]) == (24, 16)
    assert init["attention"] == "linear" and init["scheduler"] == "euler"
    assert gen["prompt"] == "a red circle" and gen["negative_prompt"] == "blue"
    assert gen["seed"] == 42 and gen["num_steps"] == 7 and gen["unconditional_guidance_scale"] == 3.5


def test_from_png_command_line_overrides(fake):
    from diffusion_tf.png_info import save_png

    save_png(fake / "src.png", np.zeros((8, 8, 3), np.uint8), {"prompt": "p", "seed": 1, "steps": 3, "model": "m"})
    code, _, err = run_cli(["--from-png", "src.png", "--seed", "9", "--prompt", "q"])
    assert code == 0, err
    gen = FakeText2Image.calls[-1][1]
    assert gen["seed"] == 9 and gen["prompt"] == "q" and gen["num_steps"] == 3


@pytest.mark.parametrize("case", ["no parameters", "missing", "not a png", "img2img"])
def test_from_png_bad_input_exits_2(fake, case):
    from diffusion_tf.png_info import save_png

    if case == "no parameters":
        save_png(fake / "src.png", np.zeros((8, 8, 3), np.uint8), None)
        expected = "holds no generation parameters"
    elif case == "not a png":
        (fake / "src.png").write_bytes(b"not an image at all")
        expected = "not a readable PNG"
    elif case == "img2img":
        save_png(fake / "src.png", np.zeros((8, 8, 3), np.uint8), {"prompt": "p", "denoising_strength": 0.5})
        expected = "--init-image"
    else:
        expected = "no such file"
    code, out, err = run_cli(["--from-png", "src.png"])
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(error_lines(err)) == 1 and expected in err and "src.png" in err, err
    assert FakeText2Image.calls == []


def test_prompt_required_without_from_png(fake):
    code, _, err = run_cli(["--model", "m"])
    assert code == 2 and "--prompt is required" in err


def test_grid_writes_a_contact_sheet(fake):
    code, out, err = run_cli(["--prompt", "x", "--model", "m", "--steps", "1", "--batch-size", "3",
                              "--height", "16", "--width", "24", "--grid", "--output", "g.png"])
    assert code == 0, err
    assert out.split() == ["g_1.png", "g_2.png", "g_3.png", "g_grid.png"]
    with Image.open(fake / "g_grid.png") as im:
        # 3 images -> 2 columns x 2 rows, 2-pixel gaps
        assert im.size == (2 * 24 + 3 * 2, 2 * 16 + 3 * 2)
        sheet = np.asarray(im)
    assert (sheet[2:18, 2:26] == 0).all() and (sheet[0] == 255).all()
    assert (sheet[20:36, 28:52] == 255).all()  # the empty fourth cell


# ---------------------------------------------------------------- A1111's parameters
A1111_PNG = ("a red circle on a blue background\n"
             "Steps: 20, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64, "
             "Model hash: 0123abcd, Model: shapes, Clip skip: 2, Version: v1.10.1")


@pytest.mark.skipif(not __import__("diffusion_tf.presets", fromlist=["x"]).builtin_available(),
                    reason="needs the built-in shapes model")
def test_from_png_of_an_a1111_png_regenerates(tmp_path, monkeypatch):
    """A PNG as AUTOMATIC1111 writes it (its sampler names, Clip skip, keys we do not know):
    --from-png regenerates it on the built-in model (--steps 2 overrides the PNG's 20)."""
    from diffusion_tf.png_info import read_parameters, save_png

    monkeypatch.chdir(tmp_path)
    save_png("a1111.png", np.zeros((64, 64, 3), np.uint8), A1111_PNG)
    code, out, err = run_cli(["--from-png", "a1111.png", "--steps", "2", "--output", "again.png"])
    assert code == 0, err
    assert "--scheduler 'dpm++2m-karras'" in err and "--clip-skip 1" in err and "--steps" not in err.split("\n")[0]
    assert "dpm++2m-karras" in next(line for line in err.splitlines() if line.startswith("model shapes"))
    assert read_parameters("again.png") == {
        "prompt": "a red circle on a blue background", "steps": 2, "sampler": "DPM++ 2M", "schedule_type": "Karras",
        "guidance": 7.0, "seed": 1234, "width": 64, "height": 64, "model": "shapes", "attention": "linear",
        "clip_skip": 2,
    }
    with Image.open("again.png") as im:
        assert im.size == (64, 64) and np.asarray(im).std() > 0


@pytest.mark.parametrize("sampler,schedule,named,supported", [
    ("DPM++ SDE Karras", "Karras", "'DPM++ SDE Karras'", "DDIM, DDPM, PLMS, Euler, Euler a, Heun, LMS, DPM++ 2M"),
    ("UniPC", "Automatic", "'UniPC'", "DDIM, DDPM, PLMS, Euler, Euler a, Heun, LMS, DPM++ 2M"),
    ("Euler", "Exponential", "'Exponential'", "Karras for Euler, Heun, LMS, DPM++ 2M"),
    ("DDIM", "Karras", "'DDIM'", "Karras sigmas are available for Euler, Heun, LMS, DPM++ 2M"),
])
def test_from_png_with_a_sampler_we_lack_names_it(fake, sampler, schedule, named, supported):
    from diffusion_tf.png_info import save_png

    text = A1111_PNG.replace("DPM++ 2M Karras", sampler).replace("Schedule type: Karras", f"Schedule type: {schedule}")
    save_png(fake / "src.png", np.zeros((8, 8, 3), np.uint8), text)
    code, out, err = run_cli(["--from-png", "src.png"])
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"{PROG}: error: --from-png src.png: ")
    assert named in line and supported in line, line
    assert FakeText2Image.calls == []
    code, _, err = run_cli(["--from-png", "src.png", "--scheduler", "euler"])  # overridden: not read at all
    assert code == 0, err
    assert FakeText2Image.calls[0][1]["scheduler"] == "euler"


def test_clip_skip_from_the_command_line_and_png(fake):
    from diffusion_tf.png_info import read_parameters, save_png

    save_png(fake / "src.png", np.zeros((8, 8, 3), np.uint8), A1111_PNG.replace("Model: shapes", "Model: m"))
    code, _, err = run_cli(["--from-png", "src.png", "--steps", "1", "--output", "a.png"])
    assert code == 0, err
    gen = FakeText2Image.calls[-1][1]
    assert gen["clip_skip"] == 1 and gen["unconditional_guidance_scale"] == 7.0  # A1111's 2 = diffusers' 1
    assert read_parameters(fake / "a.png")["clip_skip"] == 2
    assert FakeText2Image.calls[0][1]["scheduler"] == "dpm++2m-karras"
    code, _, err = run_cli(["--from-png", "src.png", "--steps", "1", "--clip-skip", "0", "--output", "b.png"])
    assert code == 0 and FakeText2Image.calls[-1][1]["clip_skip"] == 0
    assert "clip_skip" not in read_parameters(fake / "b.png")
    save_png(fake / "one.png", np.zeros((8, 8, 3), np.uint8), A1111_PNG.replace("Clip skip: 2", "Clip skip: 1"))
    code, _, err = run_cli(["--from-png", "one.png", "--steps", "1", "--model", "m", "--output", "c.png"])
    assert code == 0 and FakeText2Image.calls[-1][1]["clip_skip"] is None  # A1111's 1: no layer skipped
    calls = len(FakeText2Image.calls)
    code, out, err = run_cli(["--prompt", "x", "--model", "m", "--clip-skip", "3", "--output", "d.png"])
    assert code == 2 and "--clip-skip 3: must be 0 to 2" in err and "A1111's Clip skip 2" in err
    assert [c[0] for c in FakeText2Image.calls[calls:]] == ["init"] and not (fake / "d.png").exists()


def test_lora_files_are_loaded_and_recorded_as_tags(fake):
    """--lora PATH[:SCALE] -> load_lora; the PNG's prompt gains <lora:STEM:SCALE> and Lora hashes;
    --from-png with the file given again uses the tag's scale (the tag itself is not sent to the
    pipeline, which would look for it in the LoRA folder); a tag the --lora files do not serve is."""
    from diffusion_tf.png_info import read_parameters

    for name in ("a.safetensors", "loras/b.safetensors"):
        os.makedirs(os.path.dirname(fake / name), exist_ok=True)
        (fake / name).write_bytes(b"x")
    code, _, err = run_cli(["--prompt", "p", "--model", "m", "--steps", "1", "--lora", "a.safetensors:0.5",
                            "--lora", "loras/b.safetensors", "--output", "one.png"])
    assert code == 0, err
    assert [(k, v) for k, v in FakeText2Image.calls if k == "load_lora"] == [
        ("load_lora", {"path": "a.safetensors", "scale": 0.5}),
        ("load_lora", {"path": "loras/b.safetensors", "scale": 1.0})]
    assert FakeText2Image.calls[-1][1]["prompt"] == "p"
    params = read_parameters(fake / "one.png")
    assert params["prompt"] == "p <lora:a:0.5> <lora:b:1>"
    assert params["lora_hashes"] == "a: 0123456789ab, b: 0123456789ab"
    assert 'Lora hashes: "a: 0123456789ab, b: 0123456789ab"' in Image.open(fake / "one.png").text["parameters"]

    FakeText2Image.calls.clear()
    code, _, err = run_cli(["--from-png", "one.png", "--lora", "a.safetensors", "--lora-dir", "loras",
                            "--output", "two.png"])
    assert code == 0, err
    init = FakeText2Image.calls[0][1]
    assert init["lora_dir"] == "loras" and init["prompt_syntax"] == "a1111" and init["long_prompts"] == "chunks"
    assert FakeText2Image.calls[1] == ("load_lora", {"path": "a.safetensors", "scale": 0.5})  # the tag's scale
    assert FakeText2Image.calls[-1][1]["prompt"] == "p  <lora:b:1>"  # b: the pipeline finds it in --lora-dir
    assert read_parameters(fake / "two.png")["prompt"] == "p <lora:a:0.5> <lora:b:1>"

    code, _, err = run_cli(["--prompt", "p", "--model", "m", "--lora", "a.safetensors", "--lora", "./a.safetensors:2"])
    assert code == 2 and "--lora ./a.safetensors:2: the LoRA 'a' is already given (a.safetensors)" in err
    code, _, err = run_cli(["--prompt", "p", "--model", "m", "--lora", "notes.txt"])
    assert code == 2 and "--lora notes.txt: no such file" in err
    (fake / "notes.txt").write_text("x")
    code, _, err = run_cli(["--prompt", "p", "--model", "m", "--lora", "notes.txt:0.5"])
    assert code == 2 and "--lora notes.txt:0.5: not a LoRA file" in err


def test_embeddings_are_loaded_and_recorded(fake):
    from diffusion_tf.a1111 import short_sha256
    from diffusion_tf.png_info import read_parameters

    (fake / "e.safetensors").write_bytes(b"embedding bytes")
    code, _, err = run_cli(["--prompt", "a tok circle", "--model", "m", "--steps", "1", "--embedding",
                            "e.safetensors:tok", "--output", "o.png"])
    assert code == 0, err
    assert ("load_textual_inversion", {"path": "e.safetensors", "token": "tok"}) in FakeText2Image.calls
    assert read_parameters(fake / "o.png")["ti_hashes"] == f"tok: {short_sha256(fake / 'e.safetensors')}"
    code, _, err = run_cli(["--prompt", "a circle", "--model", "m", "--steps", "1", "--embedding",
                            "e.safetensors:tok", "--output", "unused.png"])
    assert code == 0 and "ti_hashes" not in read_parameters(fake / "unused.png")  # loaded, not used


def test_a_pipeline_error_is_exit_2_and_writes_nothing(fake, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ValueError("<lora:gone>: no LoRA file named 'gone' in '/x'")

    monkeypatch.setattr(FakeText2Image, "generate", refuse)
    code, out, err = run_cli(["--prompt", "p", "--model", "m", "--output", "o.png"])
    assert code == 2 and out == ""
    assert error_lines(err) == [f"{PROG}: error: <lora:gone>: no LoRA file named 'gone' in '/x'"]
    assert os.listdir(fake) == []


# ---------------------------------------------------------------- LoRA and embeddings, for real
needs_shapes = pytest.mark.skipif(not __import__("diffusion_tf.presets", fromlist=["x"]).builtin_available(),
                                  reason="needs the built-in shapes model")
LORA_PROMPT = "a red circle on a blue background mytok"


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """Real runs on the built-in model: without and with a LoRA file, and --from-png of the result
    rewritten as A1111 writes it (its sampler name, unknown keys) but naming another hash for the
    LoRA, which is found in --lora-dir."""
    from support import shapes_lora

    from diffusion_tf.png_info import read_parameters, save_png

    folder = tmp_path_factory.mktemp("lora-runs")
    lora = shapes_lora.write_lora(str(folder / "loras" / "style.safetensors"))
    shapes_lora.write_embedding(str(folder / "emb" / "mytok.safetensors"))
    common = ["--steps", "2", "--seed", "1"]
    cwd = os.getcwd()
    os.chdir(folder)
    runs = {}
    try:
        runs["plain"] = run_cli(["--model", "shapes", "--prompt", LORA_PROMPT, "--embedding", "emb/mytok.safetensors",
                                 "--output", "plain.png"] + common)
        runs["lora"] = run_cli(["--model", "shapes", "--prompt", LORA_PROMPT, "--embedding-dir", "emb",
                                "--lora", f"{lora}:0.8", "--output", "lora.png"] + common)
        params = read_parameters("lora.png")
        text = (f"{params['prompt']}\nSteps: 2, Sampler: DDIM, CFG scale: 4, Seed: 1, Size: 64x64, Model hash: abc, "
                f'Model: shapes, Lora hashes: "style: 000000000000", TI hashes: "{params["ti_hashes"]}", '
                "Version: v1.10.1")
        save_png("a1111.png", np.zeros((64, 64, 3), np.uint8), text)
        runs["a1111"] = run_cli(["--from-png", "a1111.png", "--lora-dir", "loras", "--embedding-dir", "emb",
                                 "--output", "a1111_again.png"])
    finally:
        os.chdir(cwd)
    images = {k: np.asarray(Image.open(folder / f"{n}.png")) for k, n in
              (("plain", "plain"), ("lora", "lora"), ("a1111", "a1111_again"))
              if (folder / f"{n}.png").exists()}
    return {"folder": folder, "lora": lora, "runs": runs, "images": images}


@needs_shapes
def test_a_lora_file_changes_the_image_and_is_recorded(lora_runs):
    from diffusion_tf.a1111 import short_sha256
    from diffusion_tf.lora import file_hash
    from diffusion_tf.png_info import read_parameters

    runs, images, folder = lora_runs["runs"], lora_runs["images"], lora_runs["folder"]
    for key in ("plain", "lora"):
        assert runs[key][0] == 0, runs[key][2]
    assert not np.array_equal(images["plain"], images["lora"])
    params = read_parameters(folder / "lora.png")
    assert params["prompt"] == LORA_PROMPT + " <lora:style:0.8>"
    assert params["lora_hashes"] == f"style: {file_hash(lora_runs['lora'])}"
    ti = f"mytok: {short_sha256(folder / 'emb' / 'mytok.safetensors')}"
    assert params["ti_hashes"] == ti  # from --embedding-dir: the prompt's word
    assert read_parameters(folder / "plain.png")["ti_hashes"] == ti  # from --embedding
    assert "lora_hashes" not in read_parameters(folder / "plain.png")


@needs_shapes
def test_from_png_with_the_lora_in_the_lora_dir_regenerates_and_warns_on_another_hash(lora_runs):
    from diffusion_tf.lora import file_hash
    from diffusion_tf.png_info import read_parameters

    code, out, err = lora_runs["runs"]["a1111"]
    assert code == 0, err
    again, first = (read_parameters(lora_runs["folder"] / n) for n in ("a1111_again.png", "lora.png"))
    assert again == first  # the same parameters, the file's own hash
    warnings = [line for line in err.splitlines() if line.startswith(f"{PROG}: warning:")]
    assert len(warnings) == 1, err
    assert "LoRA style" in warnings[0] and "000000000000" in warnings[0] and file_hash(lora_runs["lora"]) in warnings[0]
    np.testing.assert_array_equal(lora_runs["images"]["a1111"], lora_runs["images"]["lora"])  # still generated


@needs_shapes
def test_a_broken_lora_in_the_folder_is_exit_2_without_files(tmp_path, monkeypatch):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--model", "shapes", "--prompt", "a red circle <lora:broken:1>", "--lora-dir", "loras",
                              "--steps", "1", "--output", "out/o.png"])
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = error_lines(err)
    assert "broken.safetensors" in line, err
    assert os.listdir(tmp_path / "out") == []
