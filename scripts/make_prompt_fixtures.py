"""Write the textual-inversion and prompt fixtures of the tiny SD 1.x model and diffusers' outputs with
them (needs torch, diffusers, transformers, peft).

    pip install torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 peft
    python scripts/make_prompt_fixtures.py

Files written to tests/fixtures/prompts/:

    mystyle.pt                 an A1111 embedding (torch.save of {"string_to_token", "string_to_param":
                               {"*": Parameter [2, 32]}, "name": "MyStyle", "step", "sd_checkpoint", ...}):
                               two vectors, a mixed-case name
    learned_embeds.safetensors a diffusers embedding {"<cat-toy>": [32]}: one vector
    reference.npz              diffusers' results:
        ti_ids, ti_text_embeds     TI_PROMPTS after `load_textual_inversion` of both files (ids of
                                   `maybe_convert_prompt` + the tokenizer; text encoder last hidden state)
        ti_gen_image, ti_gen_float 10-step DDIM, guidance 7.5, negative prompt, the tiny fixture's gen_latents
        clip1_embeds               `encode_prompt(PROMPTS, clip_skip=1)`
        long_embeds                `encode_prompt(LONG_PROMPT)` (diffusers truncates to 77 tokens)
        plain_ids, plain_embeds    SYNTAX_PROMPTS as plain text (diffusers has no prompt syntax)
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import tempfile  # noqa: E402

import torch  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from make_lora_fixtures import build_pipeline, tiny_reference  # noqa: E402
from make_parity_fixtures import nchw  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "prompts")
TI_PROMPTS = ["a photo of MyStyle, wow!!", "<cat-toy> on the moon 🐱", "mystyle and <cat-toy>!"]
TI_GEN_PROMPT = "MyStyle <cat-toy> astronaut"
NEGATIVE = "blurry, low quality"
PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on a blue background"]
LONG_PROMPT = ", ".join(["a very detailed photo of a cat"] * 12)  # about 90 tokens
SYNTAX_PROMPTS = ["a (red:1.5) [car] BREAK here", "\\(escaped\\) ((twice))"]
STEPS, GUIDANCE, SIZE = 10, 7.5, 64


def vectors(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def write_files():
    os.makedirs(OUT, exist_ok=True)
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(vectors((2, 32), 1)))},
        "name": "MyStyle",
        "step": 500,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny-sd1",
    }
    torch.save(a1111, os.path.join(OUT, "mystyle.pt"))
    from safetensors.torch import save_file

    save_file({"<cat-toy>": torch.from_numpy(vectors((32,), 2))}, os.path.join(OUT, "learned_embeds.safetensors"))


def clip_skip_embeds(pipe, prompts, clip_skip):
    """diffusers' encode_prompt with clip_skip: hidden_states[-(clip_skip + 1)] through the final
    layer norm. Spelled out: diffusers 0.42.1 reaches the norm as `text_encoder.text_model`, a
    level transformers 5 no longer has (AttributeError)."""
    ids = ids_of(pipe, prompts)
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    return norm(hidden).numpy()


def ids_of(pipe, prompts):
    prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    return pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def main():
    write_files()
    tiny = tiny_reference()
    ref = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline(tmp)
        encode = lambda p, **kw: pipe.encode_prompt(p, "cpu", 1, False, **kw)[0].numpy()  # noqa: E731
        ref["clip1_embeds"] = clip_skip_embeds(pipe, PROMPTS, 1)
        ref["long_embeds"] = encode([LONG_PROMPT])
        plain = ids_of(pipe, SYNTAX_PROMPTS)
        ref["plain_ids"] = plain.numpy().astype("int32")
        ref["plain_embeds"] = pipe.text_encoder(plain)[0].numpy()

        pipe.load_textual_inversion(os.path.join(OUT, "mystyle.pt"))
        pipe.load_textual_inversion(os.path.join(OUT, "learned_embeds.safetensors"))
        ids = ids_of(pipe, TI_PROMPTS)
        ref["ti_ids"] = ids.numpy().astype("int32")
        ref["ti_text_embeds"] = pipe.text_encoder(ids)[0].numpy()
        out = pipe(TI_GEN_PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=SIZE, width=SIZE, latents=nchw(tiny["gen_latents"]), output_type="np").images
        ref["ti_gen_float"] = out.astype("float32")
        ref["ti_gen_image"] = (out * 255).round().astype("uint8")
    meta = {"ti_prompts": TI_PROMPTS, "ti_gen_prompt": TI_GEN_PROMPT, "negative": NEGATIVE, "prompts": PROMPTS,
            "long_prompt": LONG_PROMPT, "syntax_prompts": SYNTAX_PROMPTS, "steps": STEPS, "guidance": GUIDANCE,
            "size": SIZE, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **ref)
    print({k: v.shape for k, v in ref.items()})
    print("ti ids", ref["ti_ids"][:, :12])


if __name__ == "__main__":
    main()
