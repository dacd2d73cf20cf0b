"""LoRA parity with diffusers + peft on the tiny SD 1.x model (fixtures: scripts/make_lora_fixtures.py).

Through `Text2Image.load_lora` / `set_lora_scale` / `unload_loras`, every case of the reference must give:
text embeddings and the UNet output within 1e-4 (relative to the output's scale where it is larger than
1) and the 10-step DDIM image within 2/255 of diffusers'; `unload_loras()` gives back the no-LoRA image
and every weight bit for bit; `set_lora_scale` re-merges without the file; the compiled generation sees
the merged weights without retracing. The live test reruns one reference case in-process.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from support import tiny_models

pytestmark = pytest.mark.xdist_group("lora")

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures", "lora")
TOL = 1e-4


def _meta():
    with open(os.path.join(FIXTURES, "reference.json")) as f:
        return json.load(f)


META = _meta()
CASES = META["cases"]


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def baseline(pipe, tiny):
    """Every weight and the generated image before any LoRA."""
    return {"weights": _weights(pipe), "image": _generate(pipe, tiny)}


@pytest.fixture
def clean(pipe, baseline):
    pipe.unload_loras()
    yield pipe
    pipe.unload_loras()


def _weights(pipe):
    from diffusion_tf.state_dict import get_state_dict

    return {(c, k): v for c in ("unet", "text_encoder") for k, v in get_state_dict(getattr(pipe, c)).items()}


def _assert_weights_equal(pipe, weights):
    now = _weights(pipe)
    assert now.keys() == weights.keys()
    changed = [k for k in weights if not np.array_equal(now[k], weights[k])]
    assert not changed, f"{len(changed)} weights differ, e.g. {changed[:3]}"


def _generate(pipe, tiny):
    meta = tiny["meta"]
    return pipe.generate(meta["gen_prompt"], negative_prompt=meta["negative"], num_steps=meta["gen_steps"],
                         unconditional_guidance_scale=meta["guidance"], latents=tiny["gen_latents"])


def _unet(pipe, tiny):
    return pipe.unet(tiny["unet_latents"], tiny["unet_timesteps"], tiny["unet_context"])


def _rel_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max()) / max(1.0, float(np.abs(expected).max()))


def _load_case(pipe, case, folder=FIXTURES):
    return [pipe.load_lora(os.path.join(folder, file), scale) for file, scale in CASES[case]["loras"]]


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_diffusers(clean, ref, tiny, case):
    pipe = clean
    _load_case(pipe, case)
    records = CASES[case]["records"]
    unet = _unet(pipe, tiny)
    err = _rel_error(unet, ref[f"{case}_unet_out"])
    assert err <= TOL, f"{case}: UNet differs from diffusers by {err:.2e}"
    # the LoRA changes the output far more than the tolerance
    assert _rel_error(unet, tiny["unet_out"]) > 100 * TOL
    if "text_embeds" in records:
        err = _rel_error(pipe.text_encoder(tiny["ids"]), ref[f"{case}_text_embeds"])
        assert err <= TOL, f"{case}: text encoder differs from diffusers by {err:.2e}"


@pytest.mark.parametrize("case", [c for c in CASES if "gen" in CASES[c]["records"]])
def test_generation_matches_diffusers_and_unload_is_exact(clean, ref, tiny, baseline, case):
    pipe = clean
    traces = pipe.tracing_count
    names = _load_case(pipe, case)
    image = _generate(pipe, tiny)
    assert pipe.tracing_count == traces, "loading a LoRA retraced the compiled generation"
    diff = int(np.abs(image.astype(int) - ref[f"{case}_gen_image"].astype(int)).max())
    assert diff <= 2, f"{case}: generation differs from diffusers by {diff}/255"
    assert int(np.abs(image.astype(int) - baseline["image"].astype(int)).max()) > 10
    assert [e.name for e in pipe.loras] == names
    pipe.unload_loras()
    assert pipe.loras == []
    _assert_weights_equal(pipe, baseline["weights"])
    np.testing.assert_array_equal(_generate(pipe, tiny), baseline["image"])


def test_set_scale_does_not_read_the_file(clean, ref, tiny, tmp_path):
    pipe = clean
    path = tmp_path / "style.safetensors"
    shutil.copy(os.path.join(FIXTURES, META["files"]["kohya"]), path)
    name = pipe.load_lora(path, 0.2)
    assert name == "style"
    path.unlink()  # from here on the file does not exist
    pipe.set_lora_scale(name, 0.7)
    assert pipe.loras[0].scale == 0.7
    err = _rel_error(_unet(pipe, tiny),
                     ref["kohya_unet_out"])
    assert err <= TOL
    assert _rel_error(pipe.text_encoder(tiny["ids"]), ref["kohya_text_embeds"]) <= TOL


def test_stack_order_scales_and_remove(clean, ref, tiny, baseline):
    """Loading in either order gives the same merge; removing one leaves the other exactly as alone."""
    pipe = clean
    files = META["files"]
    peft = pipe.load_lora(os.path.join(FIXTURES, files["peft"]), 0.8)
    kohya = pipe.load_lora(os.path.join(FIXTURES, files["kohya"]), 0.1)
    pipe.set_lora_scale(kohya, 0.5)
    out = _unet(pipe, tiny)
    assert _rel_error(out, ref["both_unet_out"]) <= TOL
    pipe.lora_stack.remove(peft)
    pipe.set_lora_scale(kohya, 0.7)
    alone = _weights(pipe)
    pipe.unload_loras()
    pipe.load_lora(os.path.join(FIXTURES, files["kohya"]), 0.7)
    _assert_weights_equal(pipe, alone)
    pipe.set_lora_scale(pipe.loras[0].name, 0.0)  # scale 0 is the original weights exactly
    _assert_weights_equal(pipe, baseline["weights"])


def test_same_file_twice_gets_unique_names(clean):
    pipe = clean
    path = os.path.join(FIXTURES, META["files"]["peft"])
    assert [pipe.load_lora(path, 0.5) for _ in range(3)] == ["peft", "peft-2", "peft-3"]
    entry = pipe.loras[0]
    assert entry.format == "peft" and entry.components == ("unet", "text_encoder")
    assert len(entry.hash) == 12 and entry.sha256.startswith(entry.hash)


def test_unprefixed_attn_procs_layout_is_the_same_lora(clean, tmp_path):
    """The old processor layout without its `unet.` prefix merges to the same weights."""
    from safetensors.numpy import load_file, save_file

    pipe = clean
    src = os.path.join(FIXTURES, META["files"]["attn_procs"])
    pipe.load_lora(src)
    merged = _weights(pipe)
    pipe.unload_loras()
    bare = tmp_path / "bare.safetensors"
    save_file({k[len("unet."):]: v for k, v in load_file(src).items()}, str(bare))
    pipe.load_lora(bare)
    assert pipe.loras[0].format == "diffusers-attn-procs"
    _assert_weights_equal(pipe, merged)


def test_torch_zip_file_is_the_same_lora(clean, tmp_path):
    """A `.pt` copy (read by the restricted unpickler) merges exactly as the .safetensors."""
    from safetensors.numpy import load_file

    from support.torch_format import save_torch_zip

    pipe = clean
    src = os.path.join(FIXTURES, META["files"]["kohya"])
    pipe.load_lora(src, 0.7)
    merged = _weights(pipe)
    pipe.unload_loras()
    pt = save_torch_zip(load_file(src), str(tmp_path / "kohya.pt"), wrap_in_state_dict=False)
    pipe.load_lora(pt, 0.7)
    _assert_weights_equal(pipe, merged)


# ----------------------------------------------------------------------------- live
def _have(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.live
@pytest.mark.heavy  # a minute in a fresh process (torch + diffusers); CI's second step
@pytest.mark.skipif(not all(_have(m) for m in ("torch", "diffusers", "transformers", "peft")),
                    reason="the live LoRA check needs torch, diffusers, transformers and peft")
def test_live_diffusers_both_case(clean, tiny, tmp_path):
    """diffusers + peft, run now on the committed files, agree with us (the `both` case: two stacked LoRAs,
    UNet, text encoder and generation). In a fresh process: importing diffusers after TensorFlow crashes."""
    script = os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts", "make_lora_fixtures.py")
    out = tmp_path / "live.npz"
    proc = subprocess.run([sys.executable, script, "--case", "both", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        live = {k: f[k] for k in f.files}
    pipe = clean
    _load_case(pipe, "both")
    assert _rel_error(_unet(pipe, tiny),
                      live["unet_out"]) <= TOL
    assert _rel_error(pipe.text_encoder(tiny["ids"]), live["text_embeds"]) <= TOL
    diff = int(np.abs(_generate(pipe, tiny).astype(int) - live["gen_image"].astype(int)).max())
    assert diff <= 2


@pytest.mark.heavy  # compiles the tiny pipeline with XLA (about a minute here)
def test_xla_generation_sees_the_merged_weights(ref, tiny):
    """An XLA-compiled generation reads the variables when it runs: after load_lora it gives diffusers'
    image with no new compilation, after unload_loras the first image again."""
    from diffusion_tf import Text2Image

    pipe = Text2Image(model=tiny_models.converted_folder("tiny-sd1"), img_height=64, img_width=64, jit_compile=True)
    first = _generate(pipe, tiny)
    traces = pipe.tracing_count
    _load_case(pipe, "kohya")
    image = _generate(pipe, tiny)
    assert pipe.tracing_count == traces
    assert int(np.abs(image.astype(int) - ref["kohya_gen_image"].astype(int)).max()) <= 2
    pipe.unload_loras()
    np.testing.assert_array_equal(_generate(pipe, tiny), first)
