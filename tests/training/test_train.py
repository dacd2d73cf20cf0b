"""diffusion_tf.train on the tiny preset: loss goes down, exact resume, outputs, Text2Image
loads the result, MirroredStrategy on two logical CPUs, bad input.

The train steps run eagerly here (`run_eagerly=True`): tracing a train step costs 20-60 s
on 2 busy CPU cores, far more than a few tiny eager steps. The traced (tf.function) path
runs the same `train_step`; `test_traced_resume_and_mirrored` checks it with `-m slow`.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

# Module-scoped fixtures are built once: under `-n 2` every test of this file goes to one worker.
pytestmark = pytest.mark.xdist_group("train")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(config="tiny", verbose=0, run_eagerly=True, dataset_size=24)
PROMPT = "a red circle on a blue background"


def _arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every stage (VAE and UNet 2 epochs x 2 steps each; the decoder and refinement stages
    the tiny preset's 1 x 2), with the GIFs: (folder, result, log lines)."""
    from diffusion_tf import train as T

    save = str(tmp_path_factory.mktemp("train") / "model")
    lines = []
    result = T.train(
        save=save, stage="all", vae_epochs=2, vae_steps=2, epochs=2, steps=2, gif=True,
        gif_steps=4, eval_every=2, eval_prompts=3, log=lines.append, **FAST,
    )
    return save, result, lines


def test_training_lowers_the_loss(trained):
    _, result, lines = trained
    for stage in ("decoder", "refine"):  # the tiny preset's: 1 epoch x 2 steps
        h = result["histories"][stage]
        assert len(h["loss"]) == 2 and len(h["val_loss"]) == 2 and h["val_loss"][-1] < h["val_loss"][0], stage
    for stage in ("vae", "unet"):
        h = result["histories"][stage]
        assert len(h["loss"]) == 4 and len(h["epoch_loss"]) == 2 and len(h["val_loss"]) == 3
        assert all(np.isfinite(h["loss"]))
        # the loss of a fixed held-out batch (fixed noise and timesteps): before > after
        assert h["val_loss"][-1] < 0.95 * h["val_loss"][0], (stage, h["val_loss"])
    assert any("generate with: python text2image.py --model" in line for line in lines)


def test_eval_every_judges_prompt_adherence(trained):
    save, result, lines = trained
    rows = result["histories"]["unet"]["adherence"]
    assert len(rows) == 1 and rows[0][0] == 2 and len(rows[0]) == 6  # epoch, all + 4 attributes
    assert all(0.0 <= x <= 1.0 for x in rows[0][1:])
    assert rows[0][1] <= min(rows[0][2:])  # "all" cannot beat any single attribute
    assert any(line.startswith("[unet] epoch 2: prompt adherence") and "3 prompts" in line for line in lines)
    with open(os.path.join(save, "config.json")) as f:
        stored = json.load(f)["training"]["adherence"]
    assert [r["epoch"] for r in stored] == [2] and stored[0]["all"] == pytest.approx(rows[0][1])
    assert not os.path.exists(os.path.join(save, ".eval_model"))  # the scratch folder is removed
    arrays = _arrays(os.path.join(save, "checkpoints", "unet.h5"))
    np.testing.assert_allclose(arrays["history/adherence"], np.asarray(rows, np.float32))


def test_outputs_are_valid_images(trained):
    from PIL import Image

    save, result, _ = trained
    with Image.open(os.path.join(save, "loss.png")) as im:
        assert im.format == "PNG" and im.size == (720, 1200)  # one panel per stage (VAE, decoder, UNet, refine)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    with Image.open(os.path.join(save, "forward.gif")) as im:
        assert im.format == "GIF" and im.n_frames == 20
    with Image.open(os.path.join(save, "reverse.gif")) as im:
        assert im.format == "GIF" and im.n_frames == 5  # 4 steps + the final image
    with Image.open(os.path.join(save, "vae_reconstruction.png")) as im:
        assert im.size == (8 * 64 * 2, 2 * 64 * 2)
    assert result["gifs"] == [os.path.join(save, "forward.gif"), os.path.join(save, "reverse.gif")]
    # checkpoints written atomically: no temporary files left behind
    assert sorted(os.listdir(os.path.join(save, "checkpoints"))) == ["decoder.h5", "refine.h5", "unet.h5", "vae.h5"]
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]


def test_saved_folder_loads_in_text2image_and_generates(trained):
    from diffusion_tf import Text2Image
    from diffusion_tf import train as T

    save, _, _ = trained
    with open(os.path.join(save, "config.json")) as f:
        config = json.load(f)
    assert config["unet"]["attention"] == "linear" and config["weights_dtype"] == "float16"
    assert config["scheduler"]["beta_schedule"] == "linear" and config["scheduler"]["num_train_timesteps"] == 1000
    with h5py.File(os.path.join(save, "unet.weights.h5")) as f:
        assert {f[k].dtype for k in f} == {np.dtype("float16")}
    pipe = Text2Image(model=save, attention="linear")
    assert (pipe.img_height, pipe.img_width) == (64, 64)
    assert pipe.vae.scaling_factor == config["vae"]["scaling_factor"] != 1.0
    image = pipe.generate(PROMPT, num_steps=4, unconditional_guidance_scale=5.0, seed=0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
    # the reverse-process GIF's own loop makes the same image as Text2Image.generate
    frames, final = T.reverse_process_frames(pipe, PROMPT, 4, 0, 5.0)
    assert len(frames) == 5
    assert np.abs(final.astype(int) - image[0].astype(int)).max() <= 2


@pytest.mark.heavy  # trains again: run by CI after the default suite (-m 'integration or heavy')
def test_resume_gives_identical_weights(trained, tmp_path):
    """UNet stage: 1 epoch, then --resume to 2 epochs == the uninterrupted 2 epochs, bit for bit
    (weights, EMA weights, optimizer variables, loss history, the written model)."""
    from diffusion_tf import train as T

    full, _, _ = trained
    save = str(tmp_path / "resumed")
    os.makedirs(os.path.join(save, "checkpoints"))
    for name in ("vae.h5", "decoder.h5"):
        shutil.copy(os.path.join(full, "checkpoints", name), os.path.join(save, "checkpoints", name))
    T.train(save=save, stage="unet", epochs=1, steps=2, log=lambda *_: None, **FAST)
    assert T.read_checkpoint_meta(T.checkpoint_path(save, "unet"))["epoch"] == 1
    T.train(save=save, stage="unet", epochs=2, resume=True, eval_every=2, eval_prompts=3, log=lambda *_: None, **FAST)
    a = _arrays(T.checkpoint_path(full, "unet"))
    b = _arrays(T.checkpoint_path(save, "unet"))
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer/") for k in a) and any(k.startswith("ema/") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta = T.read_checkpoint_meta(T.checkpoint_path(save, "unet"))
    assert meta["epoch"] == 2 and meta["step"] == 4 and meta["rng"]["next_step"] == 4
    for name in ("unet", "text_encoder", "vae"):
        wa, wb = _arrays(os.path.join(full, f"{name}.weights.h5")), _arrays(os.path.join(save, f"{name}.weights.h5"))
        assert wa.keys() == wb.keys()
        for key in wa:
            if name == "vae" and key.startswith(("decoder", "post_quant_conv")):
                continue  # `full` ran the refinement stage after its UNet; this run did not
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{name}: {key}")
    # the refinement changed the decoder (and only the decoder: the encoder is equal above)
    wa, wb = _arrays(os.path.join(full, "vae.weights.h5")), _arrays(os.path.join(save, "vae.weights.h5"))
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa if k.startswith("decoder"))


@pytest.mark.heavy  # trains again: run by CI after the default suite (-m 'integration or heavy')
def test_refine_stage_resumes_exactly_and_needs_a_trained_unet(trained, tmp_path):
    """--stage refine on a finished UNet: 1 epoch then --resume to 2 == 2 epochs at once (the
    image-to-image latents are drawn again, identically); the UNet is not touched."""
    from diffusion_tf import train as T

    full, _, _ = trained
    runs = {}
    # The first epoch of the split run is the `trained` run's own refinement stage (the tiny
    # preset's 1 epoch, from these very checkpoints): it is copied, not trained again.
    for name, ckpts in (("whole", ("vae.h5", "decoder.h5", "unet.h5")),
                        ("split", ("vae.h5", "decoder.h5", "unet.h5", "refine.h5"))):
        save = str(tmp_path / name)
        os.makedirs(os.path.join(save, "checkpoints"))
        for ckpt in ckpts:
            shutil.copy(os.path.join(full, "checkpoints", ckpt), os.path.join(save, "checkpoints", ckpt))
        runs[name] = save
    lines = []
    T.train(save=runs["whole"], stage="refine", epochs=2, log=lines.append, **FAST)
    assert any(line.startswith("[refine] 32 images through image-to-image") for line in lines), lines
    assert T.read_checkpoint_meta(T.checkpoint_path(runs["split"], "refine"))["epoch"] == 1
    T.train(save=runs["split"], stage="refine", epochs=2, resume=True, log=lambda *_: None, **FAST)
    a, b = (_arrays(T.checkpoint_path(runs[n], "refine")) for n in ("whole", "split"))
    assert a.keys() == b.keys() and any(k.startswith("ema/decoder") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert T.read_checkpoint_meta(T.checkpoint_path(runs["split"], "refine"))["epoch"] == 2
    wf = _arrays(os.path.join(full, "unet.weights.h5"))
    for name in ("whole", "split"):  # the UNet is only read: its written weights are the same
        wu = _arrays(os.path.join(runs[name], "unet.weights.h5"))
        for key in wf:
            np.testing.assert_array_equal(wf[key], wu[key], err_msg=f"{name}: unet {key}")
    # the stage's data are the UNet's samples: without a trained UNet it refuses to start
    with pytest.raises(ValueError, match="--stage refine needs a trained UNet"):
        T.plan(T.TrainOptions(save=str(tmp_path / "empty"), stage="refine", **FAST))
    # training the decoder again makes the refinement stale: it is removed, with a log line
    lines = []
    T.train(save=runs["split"], stage="decoder", overwrite=True, log=lines.append, **FAST)
    assert not os.path.exists(T.checkpoint_path(runs["split"], "refine"))
    assert any(line.startswith("removed ") and "previous decoder" in line for line in lines), lines


def test_batches_depend_only_on_the_step():
    from diffusion_tf.train import batch_indices

    whole = batch_indices(10, 4, 3, 0, 9)
    np.testing.assert_array_equal(whole, np.concatenate([batch_indices(10, 4, 3, 0, 4), batch_indices(10, 4, 3, 4, 9)]))
    flat = whole.ravel()
    for p in range(3):  # every pass over the data is a permutation
        assert sorted(flat[p * 10:(p + 1) * 10]) == list(range(10))
    assert not np.array_equal(batch_indices(10, 4, 4, 0, 9), whole)


def test_position_phase_batches_come_from_its_rows_then_the_usual_stream():
    from diffusion_tf.train import batch_indices, phased_batch_indices

    rows = np.array([1, 4, 6, 9])
    whole = phased_batch_indices(10, 3, 5, 0, 8, 3, rows)
    assert whole.shape == (8, 3)
    assert set(whole[:3].ravel()) <= set(rows) and set(whole[:3].ravel()) == set(rows)
    # after the phase: the usual stream, numbered from the phase's end (whole passes over the data)
    np.testing.assert_array_equal(whole[3:], batch_indices(10, 3, 5, 0, 5))
    np.testing.assert_array_equal(phased_batch_indices(10, 3, 5, 2, 8, 0, ()), batch_indices(10, 3, 5, 2, 8))
    for cut in (1, 3, 6):  # a resumed run gets the same batches
        np.testing.assert_array_equal(
            whole, np.concatenate([phased_batch_indices(10, 3, 5, 0, cut, 3, rows),
                                   phased_batch_indices(10, 3, 5, cut, 8, 3, rows)]))


def test_high_noise_steps_draw_high_timesteps_and_keep_the_captions():
    import tensorflow as tf

    from diffusion_tf.components import build_model
    from diffusion_tf.schedulers.scheduler import Scheduler
    from diffusion_tf.train import PRESETS, DiffusionTrainer

    cfg = PRESETS["tiny"]
    sched = Scheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    models = (build_model("unet", cfg["unet"]), build_model("text_encoder", cfg["text_encoder"]), sched,
              np.zeros(77, np.int32))
    trainer = DiffusionTrainer(*models, cfg_drop=1.0, high_noise_steps=5, high_noise_t_min=800)
    for step in (0, 4):
        t, drop = (np.asarray(x) for x in trainer.timesteps_and_drops(256, tf.constant(step, "int64")))
        assert t.min() >= 800 and t.max() <= 999 and not drop.any(), step
    t, drop = (np.asarray(x) for x in trainer.timesteps_and_drops(256, tf.constant(5, "int64")))
    assert t.min() < 800 and drop.all()  # the usual draws from step 5 on
    plain = DiffusionTrainer(*models, cfg_drop=1.0)
    np.testing.assert_array_equal(np.asarray(plain.timesteps_and_drops(256, tf.constant(5, "int64"))[0]), t)
    with pytest.raises(ValueError, match="high_noise_t_min=1000"):
        DiffusionTrainer(*models, high_noise_steps=5, high_noise_t_min=1000)


def test_position_phase_rows_name_a_position_and_a_background():
    from diffusion_tf import train as T

    options, actions = T.plan(T.TrainOptions(save="unused", config="tiny", dataset_size=200, position_steps=4))
    run = T.TrainingRun(options, actions, log=lambda *_: None)
    rows = run.position_rows()
    _, captions, _ = run.dataset()
    named = [i for i, c in enumerate(captions) if " on the " in c and c.endswith(" background")]
    assert list(rows) == named and 20 < len(rows) < 100, len(rows)
    assert options.position_t_min == 800 and T.TrainOptions(config="small").resolved().position_steps > 0


@pytest.mark.heavy  # trains again
def test_training_with_a_position_phase(trained, tmp_path):
    from diffusion_tf import train as T

    full, _, _ = trained
    lines = []
    save = str(tmp_path / "position")
    r = T.train(save=save, stage="unet", vae=full, epochs=1, steps=3, position_steps=2, position_t_min=900,
                log=lines.append, **FAST)
    assert any("position phase: steps 1..2" in line and "t in [900, 1000)" in line for line in lines), lines
    assert all(np.isfinite(r["histories"]["unet"]["loss"]))
    meta = T.read_checkpoint_meta(T.checkpoint_path(save, "unet"))
    assert meta["options"]["position_steps"] == 2 and meta["options"]["position_t_min"] == 900


def test_small_preset_fits_the_size_budget():
    from diffusion_tf.components import build_model
    from diffusion_tf.train import PRESETS

    preset = PRESETS["small"]
    params = sum(
        int(np.prod(v.shape)) for name in ("vae", "text_encoder", "unet")
        for v in build_model(name, preset[name]).weights
    )
    assert params * 2 <= 16_000_000, params  # float16 bytes
    assert preset["unet"]["attention"] == "linear" and preset["text_encoder"]["vocab_size"] == 49408
    assert preset["unet"]["sample_size"] * 2 ** (len(preset["vae"]["block_out_channels"]) - 1) == 64


MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from diffusion_tf import train as T
    save, vae = sys.argv[1], sys.argv[2]
    r = T.train(save=save, stage="unet", vae=vae, config="tiny", epochs=1, steps=1, batch_size=4,
                dataset_size=8, verbose=0, log=lambda *_: None, run_eagerly=sys.argv[3] == "eager")
    meta = T.read_checkpoint_meta(T.checkpoint_path(save, "unet"))
    h = r["histories"]["unet"]
    print(json.dumps({"replicas": meta["replicas"], "loss": h["loss"], "val": h["val_loss"]}))
    """
)


@pytest.mark.heavy  # trains again: run by CI after the default suite (-m 'integration or heavy')
def test_mirrored_strategy_on_two_logical_cpus(trained, tmp_path):
    full, _, _ = trained
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path / "mirrored"), full, "eager"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert len(out["loss"]) == 1 and all(np.isfinite(out["loss"])) and len(out["val"]) == 2
    assert out["val"][1] != out["val"][0]  # the step changed the weights
    assert os.path.isfile(tmp_path / "mirrored" / "unet.weights.h5")


@pytest.mark.slow
def test_traced_resume_and_mirrored(trained, tmp_path, request):
    """The tf.function path (the default): exact resume, and MirroredStrategy on two CPUs.
    About 3-4 minutes on 2 CPU cores: runs with `pytest -m slow`."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("traced training takes minutes; run with -m slow")
    from diffusion_tf import train as T

    full, _, _ = trained
    q = dict(FAST, run_eagerly=False, log=lambda *_: None)
    runs = {}
    for name in ("whole", "split"):
        save = str(tmp_path / name)
        os.makedirs(os.path.join(save, "checkpoints"))
        shutil.copy(os.path.join(full, "checkpoints", "vae.h5"), os.path.join(save, "checkpoints", "vae.h5"))
        runs[name] = save
    T.train(save=runs["whole"], stage="unet", epochs=2, steps=2, **q)
    T.train(save=runs["split"], stage="unet", epochs=1, steps=2, **q)
    T.train(save=runs["split"], stage="unet", epochs=2, resume=True, **q)
    a, b = (_arrays(T.checkpoint_path(runs[n], "unet")) for n in ("whole", "split"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path / "mirrored"), full, "traced"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["val"][1] < out["val"][0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="quadratic"), "schedule='quadratic'"),
        (dict(T=1), "T=1"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(vae_batch_size=-2), "vae_batch_size=-2"),
        (dict(epochs=0), "epochs=0"),
        (dict(steps=0), "steps=0"),
        (dict(lr=0.0), "lr=0.0"),
        (dict(prediction="sample"), "prediction='sample'"),
        (dict(stage="text"), "stage='text'"),
        (dict(config="huge"), "config='huge'"),
        (dict(ema_decay=1.0), "ema_decay=1.0"),
        (dict(eval_every=-1), "eval_every=-1"),
        (dict(eval_prompts=0), "eval_prompts=0"),
        (dict(position_steps=-1), "position_steps=-1"),
        (dict(position_t_min=1000), "position_t_min=1000"),
        (dict(T=100, position_t_min=100), "position_t_min=100"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match, tmp_path):
    from diffusion_tf import train as T

    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        T.train(save=str(tmp_path / "x"), **dict(FAST, **kwargs))
    assert not os.path.exists(tmp_path / "x")  # nothing written


def test_folder_state_errors(trained, tmp_path):
    from diffusion_tf import train as T

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no training checkpoint"):
        T.train(save=str(empty), resume=True, **FAST)
    with pytest.raises(ValueError, match="holds no training checkpoint"):
        T.train(save=str(tmp_path / "missing"), resume=True, **FAST)
    full, _, _ = trained
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        T.plan(T.TrainOptions(save=full, **FAST))
    with pytest.raises(ValueError, match="lr=0.5 differs from the checkpoint"):
        T.plan(T.TrainOptions(save=full, resume=True, lr=0.5, **FAST))
    with pytest.raises(ValueError, match="needs a trained VAE"):
        T.plan(T.TrainOptions(save=str(empty), stage="unet", **FAST))
    # a resumed run that is complete has nothing to train
    options, actions = T.plan(T.TrainOptions(save=full, resume=True, **FAST))
    assert actions == {"vae": "done", "decoder": "done", "unet": "done", "refine": "done"} and options.epochs == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--schedule", "quadratic"], "schedule='quadratic'"),
        (["--T", "1"], "T=1"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--epochs", "0"], "epochs=0"),
        (["--epochs", "two"], "invalid int value"),
        (["--stage", "text"], "invalid choice"),
        (["--position-t-min", "1000"], "position_t_min=1000"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, match, capsys, tmp_path):
    from diffusion_tf.train import main

    with pytest.raises(SystemExit) as e:
        main(argv + ["--config", "tiny", "--save", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


def test_cli_resume_without_checkpoint_exits_2(capsys, tmp_path):
    from diffusion_tf.train import main

    with pytest.raises(SystemExit) as e:
        main(["--resume", "--save", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds no training checkpoint" in err and len(err.strip().splitlines()) == 1
