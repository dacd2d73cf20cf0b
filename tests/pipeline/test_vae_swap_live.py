"""Live: scripts/make_vae_fixtures.py run now (torch + diffusers, in a fresh process: importing
torch after TensorFlow crashes) agrees with the committed fixtures and with us: every TAESD's
decode/encode, the AutoencoderKL read by `from_single_file`, and the tiny-sd1 pipeline with each
VAE swapped in. Runs when torch, diffusers and transformers are importable."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from support import tiny_models, vae_files
from support.parity import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _have(module):
    return importlib.util.find_spec(module) is not None


pytestmark = [
    pytest.mark.live,
    pytest.mark.heavy,  # reruns the fixture script (about 25 s): with CI's heavy run
    pytest.mark.xdist_group("tiny-sd1"),
    pytest.mark.skipif(not all(_have(m) for m in ("torch", "diffusers", "transformers")),
                       reason="the live VAE check needs torch, diffusers and transformers"),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-live") / "live.npz"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_vae_fixtures.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_the_committed_fixtures_are_what_diffusers_gives_now(live):
    committed = vae_files.reference()
    assert sorted(live) == sorted(k for k in committed if k != "meta")
    for key, value in live.items():
        if value.dtype == np.uint8:
            assert np.abs(value.astype(int) - committed[key].astype(int)).max() <= 1, key
        else:
            np.testing.assert_allclose(value, committed[key], atol=1e-5, err_msg=key)


def test_our_vaes_against_live_diffusers(live):
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import set_state_dict, state_dict_shapes

    for name in vae_files.TAESD_NAMES:
        model = build_model("vae", vae_files.config(name))
        set_state_dict(model, vae_files.weights(state_dict_shapes(model)))
        assert_close(model.decode(live[f"{name}_latents"]), live[f"{name}_decoded"], f"live {name} decode")
        assert_close(model.encode(live[f"{name}_images"]), live[f"{name}_encoded"], f"live {name} encode")


def test_pipeline_with_swapped_vaes_against_live_diffusers(live, tiny_folder, tmp_path):
    from diffusion_tf import Text2Image
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import state_dict_shapes

    meta = vae_files.reference()["meta"]
    config = vae_files.config("tiny-taesd")
    taesd = vae_files.write_diffusers_folder(config, vae_files.weights(state_dict_shapes(build_model("vae", config))),
                                             str(tmp_path / "taesd"))
    configs, _, _ = tiny_models.weights("tiny-sd1")
    kl_state = vae_files.weights(state_dict_shapes(build_model("vae", configs["vae"])), vae_files.KL_SEED)
    kl_file = vae_files.write_original_vae(kl_state, configs["vae"], str(tmp_path / "vae.safetensors"))
    latents = tiny_models.reference("tiny-sd1")["gen_latents"]
    pipe = Text2Image(model=tiny_folder, img_height=64, img_width=64, vae=taesd)
    for source, case in ((taesd, "taesd"), (kl_file, "kl")):
        pipe.load_vae(source)
        image = pipe.generate(meta["prompt"], negative_prompt=meta["negative"], num_steps=meta["steps"],
                              unconditional_guidance_scale=meta["guidance"], latents=latents)
        assert np.abs(image.astype(int) - live[f"{case}_gen_image"].astype(int)).max() <= 2, case
    assert_close(pipe.vae.decode(live["kl_latents"]), live["kl_decoded"], "live from_single_file decode")
