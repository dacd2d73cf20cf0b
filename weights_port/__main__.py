"""python -m weights_port SRC DST [--config FOLDER_OR_PRESET] [--prediction-type ...] [--dtype ...]
python -m weights_port --vae SRC DST [--dtype ...]     (a stand-alone VAE: TAESD or AutoencoderKL)"""

import argparse
import os
import sys

from weights_port.errors import CheckpointError


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m weights_port",
        description=(
            "Convert a Stable Diffusion 1.x/2.x or SDXL (base, refiner, inpainting) checkpoint into a "
            "diffusion_tf model folder "
            "that Text2Image(model=DST) and text2image.py --model DST load. Nothing from the "
            "checkpoint is executed: .ckpt pickles are read by a restricted unpickler."
        ),
    )
    p.add_argument("src", help="a diffusers folder (model_index.json, unet/, vae/, text_encoder/, "
                   "tokenizer/, scheduler/; SDXL: text_encoder_2/, tokenizer_2/) or an original single file "
                   "(.safetensors or .ckpt: the LDM layout of SD 1.x/2.x, Stability's SGM layout of SDXL)")
    p.add_argument("dst", help="the model folder to write (must not exist unless --overwrite)")
    p.add_argument("--config", help="architecture: a diffusers-style folder or a preset name "
                   "(sd-v1-5, sd-v2-1-base, sd-v2-1); default: read from SRC or inferred from key shapes")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the scheduler's prediction type (SD 2.1 768 is v_prediction)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype of the written weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--vae", action="store_true",
                   help="SRC is a stand-alone VAE and DST a VAE folder (Text2Image(vae=DST), text2image.py --vae DST): "
                   "TAESD/TAESDXL (a diffusers AutoencoderTiny folder or file, or madebyollin's taesd_encoder/"
                   "taesd_decoder .safetensors or .pth) or an AutoencoderKL (a diffusers folder such as "
                   "sdxl-vae-fp16-fix, or one file in the original or diffusers layout)")
    return p


def config_argument(value):
    """(config, config_name) for convert_checkpoint from --config: a folder as given, a preset
    name as its configs (the converter itself takes no preset names), nothing as None.
    ValueError naming an unknown preset and listing the valid ones."""
    if not value:
        return None, None
    if os.path.isdir(value):
        return value, None
    from diffusion_tf.presets import registry

    return registry.get_preset(value)["configs"], value


def main(argv=None):
    args = build_parser().parse_args(argv)
    from weights_port.convert import convert_checkpoint

    try:
        if args.vae:
            if args.config or args.prediction_type:
                raise ValueError("--config and --prediction-type describe a whole model; a --vae conversion reads "
                                 "the VAE's architecture from SRC itself.")
            from weights_port.vae import convert_vae

            convert_vae(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
            return 0
        config, config_name = config_argument(args.config)
        convert_checkpoint(
            args.src, args.dst, config=config, config_name=config_name, prediction_type=args.prediction_type,
            dtype=args.dtype, overwrite=args.overwrite,
        )
    except (CheckpointError, ValueError) as e:
        print(f"weights_port: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weights_port: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
