"""LCM-LoRA on the tiny SD 1.x model, against diffusers (fixtures: scripts/make_lcm_fixtures.py).

tests/fixtures/lora/lcm_lora.safetensors is LCM-LoRA-shaped: UNet only, PEFT keys
(`unet.<module>.lora_A.weight` / `lora_B.weight`, float16, no metadata) on the modules LCM-LoRA
adapts (attention, proj_in/out, feed-forward, resnet convs and time projections, the down/upsampler
convs). Through `Text2Image.load_lora` and the `lcm` / `tcd` schedulers it must give diffusers'
StableDiffusionPipeline + `load_lora_weights` + LCMScheduler / TCDScheduler images within 2/255 at
4 steps (guidance 1 without an unconditional pass; guidance 2 with a negative prompt), the fresh
noise of each step being our pipeline's draws for the seed. The same factors in the kohya layout
and in diffusers' older `lora.down` / `lora.up` layout (the forms LCM-LoRA files are also found in)
merge to the same weights bit for bit.
"""

import json
import os

import numpy as np
import pytest


pytestmark = pytest.mark.xdist_group("lcm-lora")

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "lora")
TOL = 1e-4

with open(os.path.join(FIXTURES, "lcm_reference.json")) as _f:
    META = json.load(_f)
LORA = os.path.join(FIXTURES, META["file"])


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "lcm_reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def clean(pipe):
    pipe.unload_loras()
    yield pipe
    pipe.unload_loras()


def _unet_weights(pipe):
    from diffusion_tf.state_dict import get_state_dict

    return get_state_dict(pipe.unet)


def _rel_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max()) / max(1.0, float(np.abs(expected).max()))


def test_lcm_lora_is_a_unet_only_peft_file(clean, ref, tiny):
    pipe = clean
    before = _unet_weights(pipe)
    name = pipe.load_lora(LORA)
    entry = pipe.loras[0]
    assert name == "lcm_lora" and entry.format == "peft" and entry.components == ("unet",)
    out = pipe.unet(tiny["unet_latents"], tiny["unet_timesteps"], tiny["unet_context"])
    err = _rel_error(out, ref["unet_out"])
    assert err <= TOL, f"UNet with the LCM-LoRA differs from diffusers by {err:.2e}"
    assert _rel_error(out, tiny["unet_out"]) > 100 * TOL  # the LoRA changes the output
    pipe.unload_loras()
    after = _unet_weights(pipe)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case", [c if c == "lora_lcm4" else pytest.param(c, marks=pytest.mark.heavy)
                                  for c in sorted(META["cases"])])  # the variants: with CI's heavy run
def test_generation_matches_diffusers(clean, ref, tiny, case):
    import tensorflow as tf

    from diffusion_tf.pipeline import sampling

    pipe = clean
    c = META["cases"][case]
    scheduler = {"LCMScheduler": "lcm", "TCDScheduler": "tcd"}[c["scheduler"]]
    sched = pipe.get_scheduler(scheduler)
    if scheduler == "tcd":
        assert sched.gamma == c["eta"]  # diffusers' step eta is our gamma (its default 0.3)
    sched.set_timesteps(c["steps"])
    plan = sampling.Plan(sched, seed=tf.constant(c["seed"], "int64"))
    for i, expected in enumerate(ref[f"{case}_noise"]):  # the draws the fixture gave diffusers
        np.testing.assert_array_equal(np.asarray(sampling.step_noise(plan, tf.zeros(expected.shape), i)), expected)
    pipe.load_lora(LORA)
    image = pipe.generate(META["prompt"], negative_prompt=c["negative"], num_steps=c["steps"],
                          unconditional_guidance_scale=c["guidance"], seed=c["seed"], latents=ref[f"{case}_latents"],
                          scheduler=scheduler)
    diff = int(np.abs(image.astype(int) - ref[f"{case}_image"].astype(int)).max())
    assert diff <= 2, f"{case}: generation differs from diffusers by {diff}/255"
    pipe.unload_loras()
    without = pipe.generate(META["prompt"], negative_prompt=c["negative"], num_steps=c["steps"],
                            unconditional_guidance_scale=c["guidance"], seed=c["seed"],
                            latents=ref[f"{case}_latents"], scheduler=scheduler)
    assert int(np.abs(without.astype(int) - image.astype(int)).max()) > 10  # the LoRA matters


def _module(key):
    """`unet.<module>.lora_A.weight` -> <module>."""
    return key[len("unet."):].rsplit(".lora_", 1)[0]


def other_layouts(tmp_path):
    """The fixture's factors as a kohya file (lora_unet_<module with _>, alpha = rank) and in diffusers'
    older `unet.<module>.lora.down.weight` layout."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(LORA)
    kohya, old = {}, {}
    for key, value in tensors.items():
        module, kind = _module(key), "down" if ".lora_A." in key else "up"
        prefix = "lora_unet_" + module.replace(".", "_")
        kohya[f"{prefix}.lora_{kind}.weight"] = value
        if kind == "down":
            kohya[f"{prefix}.alpha"] = np.array(value.shape[0], np.float16)
        old[f"unet.{module}.lora.{kind}.weight"] = value
    paths = {"kohya": str(tmp_path / "lcm_kohya.safetensors"), "old": str(tmp_path / "lcm_old.safetensors")}
    save_file(kohya, paths["kohya"])
    save_file(old, paths["old"])
    return paths


def test_the_same_factors_in_other_layouts_merge_identically(clean, tmp_path):
    pipe = clean
    pipe.load_lora(LORA)
    merged = _unet_weights(pipe)
    pipe.unload_loras()
    original = _unet_weights(pipe)
    changed = [k for k in merged if not np.array_equal(merged[k], original[k])]
    assert len(changed) >= 150  # every adapted module (197 in the file: q/k/v/out, convs, ...)
    for layout, path in other_layouts(tmp_path).items():
        pipe.load_lora(path)
        assert pipe.loras[0].format == {"kohya": "kohya", "old": "diffusers-attn-procs"}[layout]
        now = _unet_weights(pipe)
        differ = [k for k in merged if not np.array_equal(now[k], merged[k])]
        assert not differ, f"{layout}: {len(differ)} weights differ from the PEFT file's merge, e.g. {differ[:3]}"
        pipe.unload_loras()
