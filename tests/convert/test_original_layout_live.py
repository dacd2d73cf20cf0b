"""Live check of our original-layout key tables against diffusers' own single-file converters.

For each tiny model we write the weights in the original LDM / OpenCLIP layout with
our tables (the inverse of what weights_port reads) and let diffusers convert that
back: it must return exactly our diffusers-named weights. Runs when torch and
diffusers are importable.
"""

import json
import os

import numpy as np
import pytest

from support import tiny_models

torch = pytest.importorskip("torch", reason="live layout check needs torch")
single_file_utils = pytest.importorskip(
    "diffusers.loaders.single_file_utils", reason="live layout check needs diffusers"
)
transformers = pytest.importorskip("transformers", reason="live layout check needs transformers")

pytestmark = pytest.mark.live


def _config(name, sub):
    with open(os.path.join(tiny_models.fixture_dir(name), sub, "config.json")) as f:
        return json.load(f)


def _bare(key):
    return key[len("text_model."):] if key.startswith("text_model.") else key


@pytest.mark.parametrize("name", tiny_models.NAMES)
def test_diffusers_reads_our_original_layout_back(name):
    configs, _, ours = tiny_models.weights(name)
    checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tiny_models.original_state_dict(name).items()}

    unet = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, _config(name, "unet"))
    vae = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, _config(name, "vae"))
    if configs["text_encoder"]["hidden_act"] == "gelu":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_config(name, "text_encoder")))
        text = single_file_utils.convert_open_clip_checkpoint(model, checkpoint)
    else:
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)

    for component, theirs in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        mine = ours[component]
        if component == "text_encoder":
            theirs = {_bare(k): v for k, v in theirs.items() if not k.endswith("position_ids")}
            mine = {_bare(k): v for k, v in mine.items()}
            # diffusers keeps OpenCLIP layers past the penultimate; our config drops them.
            theirs = {k: v for k, v in theirs.items() if k in mine or not k.startswith("encoder.layers.")}
        assert sorted(theirs) == sorted(mine), (component, sorted(set(theirs) ^ set(mine))[:10])
        for key, value in mine.items():
            np.testing.assert_array_equal(
                theirs[key].reshape(value.shape).numpy(), value, err_msg=f"{component} {key}"
            )
