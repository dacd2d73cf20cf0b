"""`python -m diffusion_tf.train --stage lora` on the tiny SD 1.x model: the kohya file it writes
loads in `Text2Image.load_lora` and changes the output; merged, it equals the training-time
(unmerged) output; resume continues exactly; bad data and bad options are usage errors naming
the path; diffusers' `load_lora_weights` of the same file gives the same UNet (live).

The train steps run eagerly (`run_eagerly=True`), as in test_train.py: a few tiny steps cost
less than tracing one.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support import tiny_models

pytestmark = pytest.mark.xdist_group("lora-training")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(stage="lora", verbose=0, run_eagerly=True, batch_size=4, lr=2e-2, warmup=0)


def _write_data(folder, n=4, seed=0):
    """n 64x64 crosses in folder/2_cross (repeated twice) and one circle in folder itself."""
    from PIL import Image

    from diffusion_tf.shapes import dataset as shapes

    os.makedirs(os.path.join(folder, "2_cross"), exist_ok=True)
    images, captions = shapes.make_dataset(n, seed, shapes=("cross",))
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(os.path.join(folder, "2_cross", f"{i}.png"))
        with open(os.path.join(folder, "2_cross", f"{i}.txt"), "w") as f:
            f.write(caption + "\n")
    image, caption = shapes.make_dataset(1, seed + 1)
    Image.fromarray(image[0]).save(os.path.join(folder, "one.jpg"), quality=95)
    with open(os.path.join(folder, "one.txt"), "w") as f:
        f.write(caption[0])
    return folder


@pytest.fixture(scope="module")
def base():
    return tiny_models.converted_folder("tiny-sd1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(str(tmp_path_factory.mktemp("lora_data") / "data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base, data):
    """2 epochs x 2 steps with the feed-forward, resnet-convolution and text-encoder targets too:
    (result, log lines)."""
    from diffusion_tf import train as T

    lines = []
    save = str(tmp_path_factory.mktemp("lora_run") / "lora_cross")
    result = T.train(base=base, data=data, save=save, epochs=2, steps=2, lora_ff=True, lora_conv=True,
                     lora_text_encoder=True, rank=4, alpha=2.0, log=lines.append, **FAST)
    return result, lines


@pytest.fixture(scope="module")
def pipe(base):
    from diffusion_tf import Text2Image

    pipe = Text2Image(model=base, img_height=64, img_width=64)
    yield pipe
    pipe.unload_loras()


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.reference("tiny-sd1")


@pytest.fixture(scope="module")
def fresh(base):
    """The base UNet and text encoder, to attach factors to (each test detaches them)."""
    from diffusion_tf.components import load_folder

    parts = load_folder(base)
    return {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}


def _unet(pipe_or_unet, tiny):
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return np.asarray(unet(tiny["unet_latents"], tiny["unet_timesteps"], tiny["unet_context"]))


def _read(path):
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_writes_a_kohya_file_that_load_lora_loads_and_that_changes_the_output(trained, pipe, tiny):
    from diffusion_tf.lora import full_file_hash

    result, lines = trained
    path = result["lora"]
    save = result["save"]
    assert path == os.path.join(save, "lora_cross.safetensors")
    assert sorted(os.listdir(save)) == ["checkpoints", "lora_cross.safetensors", "loss.png"]
    assert os.listdir(os.path.join(save, "checkpoints")) == ["lora.h5"]
    tensors, meta = _read(path)
    names = {k.split(".")[0] for k in tensors}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in names)
    for name in names:
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == up.shape[1] == 4 and alpha.shape == () and alpha == 2.0
        assert down.dtype == up.dtype == np.float32
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj" in names
    conv = "lora_unet_up_blocks_1_resnets_0_conv2"
    assert tensors[conv + ".lora_down.weight"].shape[1:] == (tensors[conv + ".lora_down.weight"].shape[1], 3, 3)
    assert tensors[conv + ".lora_up.weight"].shape[2:] == (1, 1)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model"] == os.path.basename(result["options"].base)
    assert json.loads(meta["ss_dataset_dirs"]) == {".": {"n_repeats": 1, "img_count": 1},
                                                   "2_cross": {"n_repeats": 2, "img_count": 4}}
    assert meta["ss_num_train_images"] == "9" and meta["ss_steps"] == "4"
    assert json.loads(meta["diffusion_tf_options"])["rank"] == 4
    assert meta["sshs_model_hash"] == full_file_hash(path)  # A1111's hash of the tensor data
    assert any(line.startswith("[lora] wrote ") for line in lines)
    pipe.unload_loras()
    before, text_before = _unet(pipe, tiny), np.asarray(pipe.text_encoder(tiny["ids"]))
    name = pipe.load_lora(path)
    try:
        entry = pipe.loras[0]
        assert entry.format == "kohya" and entry.components == ("unet", "text_encoder")
        assert entry.modules == len(names)
        after = _unet(pipe, tiny)
        assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()
        assert np.abs(np.asarray(pipe.text_encoder(tiny["ids"])) - text_before).max() > 1e-4
        pipe.set_lora_scale(name, 0.0)  # scale 0: the base weights exactly
        np.testing.assert_array_equal(_unet(pipe, tiny), before)
        np.testing.assert_array_equal(np.asarray(pipe.text_encoder(tiny["ids"])), text_before)
    finally:
        pipe.unload_loras()


def test_the_merged_lora_is_the_training_time_output(trained, pipe, tiny, fresh):
    """The file (EMA factors) merged by `load_lora` gives what the training-time network gives
    unmerged: y = W x + b + alpha / r * up(down(x)) on the same base weights."""
    from diffusion_tf.training.checkpoint import assign_state, read_checkpoint_arrays
    from diffusion_tf.training.lora import LoraAttachment, LoraNetwork, lora_targets

    result, _ = trained
    tensors, _ = _read(result["lora"])
    parts = models = fresh
    network = LoraNetwork(lora_targets(models, ff=True, conv=True, text_encoder=True), 4, 2.0)
    ema = read_checkpoint_arrays(os.path.join(result["save"], "checkpoints", "lora.h5"), "ema/lora")
    assign_state(network, ema, "ema")
    file_view = network.tensors()
    assert file_view.keys() == tensors.keys()
    for key in tensors:  # the file is the EMA factors, exactly (float32)
        np.testing.assert_array_equal(tensors[key], file_view[key])
    plain = _unet(parts["unet"], tiny)
    attachment = LoraAttachment(network, models)
    try:
        unmerged = _unet(parts["unet"], tiny)
        unmerged_text = np.asarray(parts["text_encoder"](tiny["ids"]))
    finally:
        attachment.detach()
    np.testing.assert_array_equal(_unet(parts["unet"], tiny), plain)  # detach restores the layers
    pipe.unload_loras()
    pipe.load_lora(result["lora"])
    try:
        merged = _unet(pipe, tiny)
        merged_text = np.asarray(pipe.text_encoder(tiny["ids"]))
    finally:
        pipe.unload_loras()
    scale = np.abs(unmerged).max()
    assert np.abs(merged - unmerged).max() <= 1e-5 * max(1.0, scale)
    assert np.abs(merged_text - unmerged_text).max() <= 1e-5 * max(1.0, np.abs(unmerged_text).max())
    assert np.abs(unmerged - plain).max() > 1e-2 * scale


def test_loss_history_and_plot(trained):
    from PIL import Image

    result, lines = trained
    h = result["histories"]["lora"]
    assert len(h["loss"]) == 4 and len(h["epoch_loss"]) == 2 and len(h["val_loss"]) == 3
    assert all(np.isfinite(h["loss"])) and h["seconds"] > 0
    with Image.open(os.path.join(result["save"], "loss.png")) as im:
        assert im.format == "PNG" and im.size == (720, 300)
    assert any("[lora] training epochs 1..2 x 2 steps, batch 4" in line for line in lines)


@pytest.mark.heavy  # 10-20 s: with CI's heavy run, out of the default suite's time
def test_resume_continues_exactly(tmp_path, trained, base, data):
    """1 epoch, then --resume to 2: the same file as the fixture's 2 epochs at once; a resumed
    run keeps its settings and its data; a finished one is "done"."""
    import shutil

    from diffusion_tf import train as T

    result, _ = trained
    options = {k: getattr(result["options"], k)
               for k in ("rank", "alpha", "lora_ff", "lora_conv", "lora_text_encoder", "steps")}
    copy = str(tmp_path / "data")
    shutil.copytree(data, copy)
    split = str(tmp_path / "lora_cross")
    T.train(base=base, data=copy, save=split, epochs=1, log=lambda *_: None, **options, **FAST)
    with pytest.raises(ValueError, match="already holds a LoRA training checkpoint"):
        T.plan(T.TrainOptions(stage="lora", base=base, data=copy, save=split))
    with pytest.raises(ValueError, match="rank=8 differs"):
        T.plan(T.TrainOptions(stage="lora", save=split, resume=True, rank=8))
    # --resume needs neither --base nor --data: the checkpoint has them
    resolved, actions = T.plan(T.TrainOptions(stage="lora", save=split, resume=True, epochs=2))
    assert actions == {"lora": "resume"} and resolved.base == base and resolved.steps == 2 and resolved.rank == 4
    resumed = T.train(T.TrainOptions(save=split, resume=True, epochs=2, **{**FAST, "verbose": 0}), log=lambda *_: None)
    a, meta_a = _read(result["lora"])
    b, meta_b = _read(resumed["lora"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["sshs_model_hash"] == meta_b["sshs_model_hash"]
    assert resumed["histories"]["lora"]["loss"] == result["histories"]["lora"]["loss"]
    assert T.plan(T.TrainOptions(stage="lora", save=split, resume=True))[1] == {"lora": "done"}
    with open(os.path.join(copy, "one.txt"), "w") as f:
        f.write("a red square")
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        T.plan(T.TrainOptions(stage="lora", save=split, resume=True, epochs=3))
    with pytest.raises(ValueError, match="holds no LoRA training checkpoint"):
        T.plan(T.TrainOptions(stage="lora", base=base, data=data, save=str(tmp_path / "none"), resume=True))


@pytest.mark.heavy  # trains again: run by CI after the default suite (-m 'integration or heavy')
def test_resume_of_a_finished_run_writes_the_same_file(tmp_path, trained):
    import shutil

    from diffusion_tf import train as T

    result, _ = trained
    save = str(tmp_path / "lora_cross")
    shutil.copytree(result["save"], save)
    os.remove(os.path.join(save, "lora_cross.safetensors"))
    lines = []
    again = T.train(save=save, stage="lora", resume=True, log=lines.append, verbose=0)
    assert any("already trained for 2 epochs" in line for line in lines)
    assert _read(again["lora"])[0].keys() == _read(result["lora"])[0].keys()
    assert _read(again["lora"])[1]["sshs_model_hash"] == _read(result["lora"])[1]["sshs_model_hash"]


def _bad_folders(root):
    """{kind: (folder, the path the error must name)}."""
    out = {}
    empty = os.path.join(root, "empty")
    os.makedirs(os.path.join(empty, "notes"))
    out["empty"] = (empty, empty)
    uncaptioned = _write_data(os.path.join(root, "uncaptioned"), n=2)
    os.remove(os.path.join(uncaptioned, "2_cross", "1.txt"))
    out["no caption"] = (uncaptioned, os.path.join(uncaptioned, "2_cross", "1.png"))
    broken = _write_data(os.path.join(root, "broken"), n=2)
    with open(os.path.join(broken, "2_cross", "0.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    out["unreadable"] = (broken, os.path.join(broken, "2_cross", "0.png"))
    blank = _write_data(os.path.join(root, "blank"), n=1)
    open(os.path.join(blank, "one.txt"), "w").close()
    out["empty caption"] = (blank, os.path.join(blank, "one.txt"))
    out["missing"] = (os.path.join(root, "nowhere"), os.path.join(root, "nowhere"))
    return out


def test_bad_data_is_a_value_error_and_exit_2_naming_the_path(tmp_path, base, capsys):
    from diffusion_tf import train as T
    from diffusion_tf.training.imagefolder import DataError

    for kind, (folder, named) in _bad_folders(str(tmp_path)).items():
        with pytest.raises(DataError) as info:
            T.plan(T.TrainOptions(stage="lora", base=base, data=folder, save=str(tmp_path / "run")))
        assert isinstance(info.value, ValueError) and repr(named) in str(info.value), (kind, str(info.value))
        with pytest.raises(SystemExit) as exit_info:
            T.main(["--stage", "lora", "--base", base, "--data", folder, "--save", str(tmp_path / "run")])
        assert exit_info.value.code == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and repr(named) in err, (kind, err)
    assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_bad_options_are_usage_errors(tmp_path, base, data, capsys):
    from diffusion_tf import train as T

    cases = [
        (dict(stage="unet", rank=4), "--rank: only with --stage lora"),
        (dict(stage="lora", data=data), "needs --base"),
        (dict(stage="lora", base=base), "needs --data"),
        (dict(stage="lora", base=base, data=data, prediction="epsilon"), "--prediction is the base model's"),
        (dict(stage="lora", base=base, data=data, rank=0), "rank=0"),
        (dict(stage="lora", base=base, data=data, alpha=-1.0), "alpha=-1.0"),
        (dict(stage="lora", base=str(tmp_path / "no_model"), data=data), "no_model"),
        (dict(stage="lora", base=data, data=data), "not a diffusion_tf model folder"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            T.plan(T.TrainOptions(save=str(tmp_path / "run"), **kwargs))
    with pytest.raises(SystemExit) as info:
        T.main(["--stage", "lora", "--data", data, "--save", str(tmp_path / "run")])
    assert info.value.code == 2 and "needs --base" in capsys.readouterr().err


def test_scan_folder_repeats_subsets_and_resizing(tmp_path, data):
    from PIL import Image

    from diffusion_tf.training.imagefolder import load_image, scan_folder

    os.makedirs(os.path.join(data, "notes"), exist_ok=True)  # not N_name: skipped
    scanned = scan_folder(data)
    assert [os.path.relpath(i.path, data) for i in scanned.items] == [
        "one.jpg", *(os.path.join("2_cross", f"{k}.png") for k in range(4))]
    assert [i.repeats for i in scanned.items] == [1, 2, 2, 2, 2]
    assert scanned.rows.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4] and scanned.skipped == ["notes"]
    assert scanned.items[1].caption.endswith("cross") or " cross " in scanned.items[1].caption
    assert scan_folder(data).digest == scanned.digest
    wide = np.zeros((40, 80, 4), np.uint8)
    wide[:, 20:60] = (255, 0, 0, 255)  # the centre square, red; the sides are cropped off
    Image.fromarray(wide, "RGBA").save(tmp_path / "wide.png")
    image = load_image(str(tmp_path / "wide.png"), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - [255, 0, 0]).max() <= 2


def test_targets_and_file_of_every_kind_merge_as_attached(tmp_path, pipe, tiny, fresh):
    """Random factors on every target kind (attention, feed-forward, 3x3 convolutions, text encoder), written as the
    stage writes them: `load_lora` merges them into what the attached factors compute (float16 file: the
    rounding of the factors only)."""
    from diffusion_tf.training.lora import LoraAttachment, LoraNetwork, lora_targets, write_lora_file

    parts = models = fresh
    plain = lora_targets(models)
    everything = lora_targets(models, ff=True, conv=True, text_encoder=True)
    assert {t[2].rsplit(".", 1)[-1] for t in plain} == {"to_q", "to_k", "to_v", "0"} and {t[5] for t in plain} == {1}
    assert {t[1] for t in everything} == {"unet", "text_encoder"} and len(everything) > len(plain)
    convs = [t for t in everything if t[5] == 3]
    assert convs and all(t[2].endswith(("conv1", "conv2")) and ".resnets." in t[2] for t in convs)
    network = LoraNetwork(everything, 3, 1.5, seed=5)
    rng = np.random.default_rng(0)
    for var in network.trainable_variables:
        var.assign(rng.normal(0, 0.05, tuple(var.shape)).astype("float32"))
    attachment = LoraAttachment(network, models)
    with pytest.raises(ValueError, match="already has a LoRA attached"):
        LoraAttachment(network, models)
    try:
        unmerged, text = _unet(parts["unet"], tiny), np.asarray(parts["text_encoder"](tiny["ids"]))
    finally:
        attachment.detach()
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-3)):
        path = str(tmp_path / f"random_{dtype}.safetensors")
        write_lora_file(path, network.tensors(), {"ss_network_dim": 3}, dtype=dtype)
        pipe.unload_loras()
        pipe.load_lora(path)
        try:
            assert np.abs(_unet(pipe, tiny) - unmerged).max() <= tol * max(1.0, np.abs(unmerged).max()), dtype
            assert np.abs(np.asarray(pipe.text_encoder(tiny["ids"])) - text).max() <= tol * max(1.0, np.abs(text).max())
        finally:
            pipe.unload_loras()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- live
def _have(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.live
@pytest.mark.skipif(not all(_have(m) for m in ("torch", "diffusers", "transformers", "peft")),
                    reason="the live LoRA check needs torch, diffusers, transformers and peft")
def test_live_diffusers_loads_the_trained_file_to_the_same_unet(trained, pipe, tiny, tmp_path):
    """diffusers' `StableDiffusionPipeline.load_lora_weights` of the trained file (UNet attention,
    feed-forward and resnet convolutions, text encoder) gives our `load_lora`'s UNet and text encoder within 1e-4. In a fresh
    process: importing torch after TensorFlow crashes."""
    result, _ = trained
    out = tmp_path / "diffusers.npz"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "diffusers_lora_reference.py"),
                           result["lora"], str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        live = {k: f[k] for k in f.files}
    pipe.unload_loras()
    pipe.load_lora(result["lora"])
    try:
        ours, text = _unet(pipe, tiny), np.asarray(pipe.text_encoder(tiny["ids"]))
    finally:
        pipe.unload_loras()
    assert np.abs(ours - live["unet_out"]).max() <= 1e-4 * max(1.0, np.abs(live["unet_out"]).max())
    assert np.abs(text - live["text_embeds"]).max() <= 1e-4 * max(1.0, np.abs(live["text_embeds"]).max())
    assert np.abs(live["unet_out"] - tiny["unet_out"]).max() > 1e-2  # the LoRA changed diffusers' UNet too
