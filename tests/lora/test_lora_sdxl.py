"""LoRA on SDXL: parity with diffusers + peft on the tiny SDXL model (fixtures: scripts/make_sdxl_lora_fixtures.py).

Three files, each loaded by diffusers' `StableDiffusionXLPipeline.load_lora_weights` and by our
`Text2Image.load_lora(path, scale)`:
  kohya   lora_unet_ (diffusers module names), lora_te1_, lora_te2_, alphas != rank: attention
          projections of every transformer block (levels of depth 2 and 3, the mid block), proj_in/out
          and ff; the text encoders' q/k/v/out_proj and fc1/fc2 (and text_encoder_2's text_projection);
  sgm     kohya with Stability's SGM/LDM UNet names as kohya sd-scripts writes SDXL LoRAs
          (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q ...; the first level has no
          attention, so the transformers are input_blocks 4/5 and 7/8) plus resnets (LoCon 3x3),
          a downsampler, an upsampler, conv_in and conv_out; diffusers' own SGM mapping loads it (the
          script checks it puts every factor where the diffusers-named copy goes);
  peft    what `StableDiffusionXLPipeline.save_lora_weights` writes from peft adapters (unet.,
          text_encoder., text_encoder_2. lora_A/lora_B, lora_adapter_metadata with patterns).
Our scale is diffusers' `set_adapters([name], adapter_weights=[scale])`: one weight for the UNet and
both text encoders (the script checks that `cross_attention_kwargs={"scale": s}` with encode_prompt's
`lora_scale=s` is the same thing). At scales 1.0 and 0.5: `encode_text` (context, pooled) and the UNet
with added conditions within 1e-4 (relative to the output's scale where larger than 1); one 4-step
Euler generation (guidance 5, given latents, 64x64) per file within 2/255; our merged module count is
diffusers' count of peft layers. `unload_loras` gives back every weight bit for bit. An SD 1.x LoRA on
the SDXL model, and these SDXL LoRAs on the SD 1.x model, are LoraErrors that change nothing.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support import tiny_models
from support.parity import assert_close

pytestmark = pytest.mark.xdist_group("sdxl")  # the session's tiny SDXL pipelines (tests/conftest.py)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures", "lora-sdxl")
SD1_FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures", "lora")
TOL = 1e-4
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

with open(os.path.join(FIXTURES, "reference.json")) as _f:
    META = json.load(_f)
CASES = list(META["cases"])
FORMATS = {"kohya": "kohya", "sgm": "kohya-ldm", "peft": "peft"}


def _path(case):
    return os.path.join(FIXTURES, META["cases"][case]["file"])


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.reference("tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_pipes):
    """Our own pipeline on the session's converted tiny-sdxl folder (LoRAs change its weights)."""
    from diffusion_tf import Text2Image

    pipe = Text2Image(model=tiny_sdxl_pipes[("tiny-sdxl", "diffusers")].model_path, img_height=64, img_width=64,
                      prompt_syntax="plain")
    yield pipe
    pipe.unload_loras()


def _weights(pipe):
    from diffusion_tf.state_dict import get_state_dict

    return {(c, k): v for c in COMPONENTS for k, v in get_state_dict(getattr(pipe, c)).items()}


def _assert_weights_equal(pipe, weights):
    now = _weights(pipe)
    assert now.keys() == weights.keys()
    changed = [k for k in weights if not np.array_equal(now[k], weights[k])]
    assert not changed, f"{len(changed)} weights differ, e.g. {changed[:3]}"


def _generate(pipe, tiny):
    return pipe.generate(META["prompts"][0], negative_prompt=META["negative"], num_steps=META["steps"],
                         unconditional_guidance_scale=META["guidance"], scheduler="euler",
                         latents=tiny["gen_neg_latents"], height=META["size"], width=META["size"])


def _unet(pipe, tiny):
    return pipe.predict_noise(tiny["unet_latents"], tiny["unet_timesteps"], tiny["embeds"],
                              added_cond={"text_embeds": tiny["pooled"], "time_ids": tiny["unet_time_ids"]})


@pytest.fixture(scope="module")
def baseline(pipe, tiny):
    """Every weight and the generated image before any LoRA."""
    return {"weights": _weights(pipe), "image": _generate(pipe, tiny)}


@pytest.fixture
def clean(pipe, baseline):
    pipe.unload_loras()
    yield pipe
    pipe.unload_loras()


def _rel(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max()) / max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("case", CASES)
def test_text_conditioning_and_unet_match_diffusers(clean, ref, tiny, case, scale):
    pipe = clean
    if scale == 1.0:
        name = pipe.load_lora(_path(case), scale)
    else:  # loaded at another scale, then re-merged from the kept factors
        name = pipe.load_lora(_path(case), 0.2)
        pipe.set_lora_scale(name, scale)
    entry = pipe.loras[0]
    assert entry.format == FORMATS[case] and entry.components == COMPONENTS
    assert entry.modules == sum(META["loaded_modules"][case].values())  # every module diffusers adapted
    context, pooled = pipe.encode_text(META["prompts"])
    assert_close(context, ref[f"{case}_embeds_{scale}"], f"{case} prompt_embeds at {scale}")
    assert_close(pooled, ref[f"{case}_pooled_{scale}"], f"{case} pooled_prompt_embeds at {scale}")
    unet = _unet(pipe, tiny)
    assert_close(unet, ref[f"{case}_unet_{scale}"], f"{case} UNet at {scale}")
    # the LoRA moves every output far more than the tolerance (both encoders and the UNet)
    assert _rel(unet, tiny["unet_out"]) > 100 * TOL
    assert _rel(pooled, tiny["pooled"]) > 100 * TOL
    d = pipe.text_encoder.hidden_size
    for part in (slice(None, d), slice(d, None)):
        assert _rel(np.asarray(context)[..., part], tiny["embeds"][..., part]) > 100 * TOL


@pytest.mark.parametrize("case", CASES)
def test_generation_matches_diffusers_and_unload_is_exact(clean, ref, tiny, baseline, case):
    pipe = clean
    traces = pipe.tracing_count
    pipe.load_lora(_path(case), META["cases"][case]["gen_scale"])
    image = _generate(pipe, tiny)
    assert pipe.tracing_count == traces, "loading a LoRA retraced the compiled generation"
    diff = int(np.abs(image.astype(int) - ref[f"{case}_gen_image"].astype(int)).max())
    assert diff <= 2, f"{case}: generation differs from diffusers by {diff}/255"
    assert int(np.abs(image.astype(int) - baseline["image"].astype(int)).max()) > 10
    pipe.unload_loras()
    assert pipe.loras == []
    _assert_weights_equal(pipe, baseline["weights"])
    np.testing.assert_array_equal(_generate(pipe, tiny), baseline["image"])


@pytest.mark.parametrize("file", ["kohya_locon.safetensors", "peft.safetensors", "kohya_ldm.safetensors"])
def test_an_sd1_lora_on_sdxl_is_an_error_and_changes_nothing(clean, file):
    from diffusion_tf.lora import LoraError

    pipe = clean
    pipe.load_lora(_path("kohya"), 0.5)  # a loaded SDXL LoRA stays exactly as it was
    before = _weights(pipe)
    with pytest.raises(LoraError) as info:
        pipe.load_lora(os.path.join(SD1_FIXTURES, file))
    message = str(info.value)
    assert "match nothing in the model" in message or "does not fit" in message, message
    assert "the model has UNet cross-attention width 80, text_encoder width 32, text_encoder_2 width 48 " \
           "(an SDXL model)" in message, message
    assert [e.name for e in pipe.loras] == ["kohya_sdxl"]
    _assert_weights_equal(pipe, before)


@pytest.fixture(scope="module")
def sd1_pipe():
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_models.converted_folder("tiny-sd1"), img_height=64, img_width=64)


@pytest.mark.parametrize("case", CASES)
def test_an_sdxl_lora_on_sd1_says_sdxl_and_changes_nothing(sd1_pipe, case):
    from diffusion_tf.lora import LoraError
    from diffusion_tf.state_dict import get_state_dict

    sd1 = sd1_pipe
    before = {c: get_state_dict(getattr(sd1, c)) for c in ("unet", "text_encoder")}
    with pytest.raises(LoraError, match=r"looks like a LoRA for SDXL \(it has keys for a second text encoder") as info:
        sd1.load_lora(_path(case))
    assert "no text_encoder_2 in this model" in str(info.value)
    assert "no second text encoder (an SD 1.x/2.x model)" in str(info.value)
    assert sd1.loras == []
    for c, weights in before.items():
        now = get_state_dict(getattr(sd1, c))
        assert all(np.array_equal(now[k], v) for k, v in weights.items()), c


def test_stacked_sdxl_loras_unload_exactly(clean, baseline):
    """Two SDXL LoRAs on the same modules, one removed: the other is exactly as alone; all out: the model."""
    pipe = clean
    pipe.load_lora(_path("kohya"), 0.7)
    alone = _weights(pipe)
    peft = pipe.load_lora(_path("peft"), 0.4)
    assert _weights(pipe).keys() == alone.keys()
    pipe.lora_stack.remove(peft)
    _assert_weights_equal(pipe, alone)
    pipe.load_lora(_path("sgm"), 1.0)
    pipe.unload_loras()
    _assert_weights_equal(pipe, baseline["weights"])


# ----------------------------------------------------------------------------- live
def _have(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.live
@pytest.mark.heavy  # a minute in a fresh process (torch + diffusers); CI's second step
@pytest.mark.skipif(not all(_have(m) for m in ("torch", "diffusers", "transformers", "peft")),
                    reason="the live LoRA check needs torch, diffusers, transformers and peft")
@pytest.mark.parametrize("case", ["sgm"])
def test_live_diffusers_case(clean, tiny, tmp_path, case):
    """diffusers + peft, run now on the committed file, agree with us. In a fresh process: importing
    diffusers after TensorFlow crashes."""
    script = os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts", "make_sdxl_lora_fixtures.py")
    out = tmp_path / "live.npz"
    proc = subprocess.run([sys.executable, script, "--case", case, str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        live = {k: f[k] for k in f.files}
    pipe = clean
    name = pipe.load_lora(_path(case), 1.0)
    context, pooled = pipe.encode_text(META["prompts"])
    assert_close(context, live["embeds_1.0"], "live prompt_embeds")
    assert_close(pooled, live["pooled_1.0"], "live pooled")
    assert_close(_unet(pipe, tiny), live["unet_1.0"], "live UNet")
    pipe.set_lora_scale(name, META["cases"][case]["gen_scale"])
    diff = int(np.abs(_generate(pipe, tiny).astype(int) - live["gen_image"].astype(int)).max())
    assert diff <= 2
