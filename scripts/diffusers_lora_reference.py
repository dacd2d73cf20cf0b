"""diffusers' outputs of the tiny SD 1.x model with one LoRA file loaded by
`StableDiffusionPipeline.load_lora_weights` (needs torch, diffusers, transformers, peft).

    python scripts/diffusers_lora_reference.py LORA.safetensors OUT.npz [--scale S]

OUT.npz holds `unet_out` (the UNet on the tiny fixture's unet_latents / unet_timesteps /
unet_context, NHWC) and `text_embeds` (the text encoder's last hidden state for the fixture's
`ids`), with the LoRA at scale S (default 1). The pipeline is the one of
scripts/make_lora_fixtures.py (`build_pipeline`: the fixture's random weights). Run it in a
process of its own: importing torch after TensorFlow crashes.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_lora_fixtures import build_pipeline, tiny_reference  # noqa: E402
from make_parity_fixtures import nchw, nhwc  # noqa: E402


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lora")
    p.add_argument("out")
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args(argv)
    ref = tiny_reference()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline(tmp)
        pipe.load_lora_weights(args.lora, adapter_name="trained")
        pipe.set_adapters(["trained"], adapter_weights=[args.scale])
        unet = nhwc(pipe.unet(nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(),
                              torch.from_numpy(ref["unet_context"])).sample)
        embeds = pipe.text_encoder(torch.from_numpy(ref["ids"].astype("int64"))).last_hidden_state.numpy()
    np.savez(args.out, unet_out=unet, text_embeds=embeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
