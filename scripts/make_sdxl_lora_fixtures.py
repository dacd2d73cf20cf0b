"""Write the LoRA and textual-inversion fixtures of the tiny SDXL model and diffusers' outputs with
them (needs torch, diffusers, transformers, peft).

    pip install torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 peft
    python scripts/make_sdxl_lora_fixtures.py
    python scripts/make_sdxl_lora_fixtures.py --case kohya out.npz   # one LoRA case on the committed files (live test)

The diffusers pipelines are built as scripts/make_sdxl_fixtures.py builds them (its `build` and
`tokenizers`: the deterministic random weights of tests/support/random_weights.py), and checked
against tests/fixtures/tiny-sdxl/reference.npz before anything is written.

Files written to tests/fixtures/lora-sdxl/ (every factor is drawn from a NumPy generator seeded by
its key, as scripts/make_lora_fixtures.py):

    kohya_sdxl.safetensors     kohya keys with diffusers module names: lora_unet_<down_blocks_1_...>
                               to_q/to_k/to_v/to_out_0 of attn1 and attn2 of every transformer block
                               (down_blocks.1: depth 2, down_blocks.2: depth 3, mid_block: depth 3,
                               up_blocks.0: 3, up_blocks.1: 2), proj_in/proj_out and ff of
                               down_blocks.2 and the mid block; lora_te1_ and lora_te2_
                               text_model_encoder_layers_<i>_self_attn_q/k/v/out_proj and mlp_fc1/fc2 of
                               every layer, lora_te2_text_projection. Rank 4, alphas 2 (UNet), 3 (te1),
                               1 (te2)
    kohya_sdxl_sgm.safetensors kohya keys in Stability's SGM/LDM names, as kohya sd-scripts writes SDXL
                               LoRAs (tiny-sdxl's first level has no attention, as SDXL's: its
                               transformers are input_blocks_4/5 and 7/8, middle_block_1, output_blocks
                               0-2 and 3-5): the kohya file's attention modules plus resnets (in_layers_2,
                               emb_layers_1, out_layers_3, skip_connection: LoCon, 3x3 at rank 2 alpha 1),
                               a downsampler (input_blocks_3_0_op), an upsampler (output_blocks_2_2_conv),
                               conv_in (input_blocks_0_0) and conv_out (out_2). diffusers' own SGM mapping
                               (lora_state_dict(..., unet_config=...)) must load it, and give exactly the
                               outputs of the same factors under diffusers names (checked here)
    peft_sdxl.safetensors      written by StableDiffusionXLPipeline.save_lora_weights from peft adapters on
                               unet, text_encoder and text_encoder_2 (unet.*, text_encoder.*,
                               text_encoder_2.* lora_A/lora_B) with its lora_adapter_metadata (unet r 4,
                               lora_alpha 8, a rank_pattern and an alpha_pattern; te1 alpha 2, te2 alpha 6)
    ti_one.safetensors         SDXL textual inversion {"clip_l": [1, 32], "clip_g": [1, 48]} (token <xl-one>)
    ti_three.safetensors       {"clip_l": [3, 32], "clip_g": [3, 48]} (token xlthree: diffusers expands it)
    ti_clip_g.safetensors      {"clip_g": [2, 48]}: a clip_g-only file (token <xl-g>), for the refiner

and reference.npz with diffusers' outputs. LoRA (`<case>` in CASES; `pipe.load_lora_weights(file,
adapter_name=case)`, then `pipe.set_adapters([case], adapter_weights=[s])`: one weight for the UNet and
both text encoders, what our `load_lora(path, scale)` / `set_lora_scale` mean):

    <case>_embeds_<s>, <case>_pooled_<s>   encode_prompt(PROMPTS) prompt_embeds / pooled_prompt_embeds, s in SCALES
    <case>_unet_<s>      the UNet on tiny-sdxl's unet_latents / unet_timesteps with its no-LoRA embeds, pooled
                         and unet_time_ids as added conditions (NHWC)
    <case>_gen_image, <case>_gen_float   4-step Euler, guidance 5, NEGATIVE, 64x64, tiny-sdxl's
                         gen_neg_latents, at GEN_SCALE[case]

Textual inversion (loaded as diffusers' SDXL docs do: clip_l with text_encoder/tokenizer, clip_g with
text_encoder_2/tokenizer_2, each `pipe.load_textual_inversion(tensor, token=...)`):

    ti_ids_1, ti_ids_2       TI_PROMPTS by tokenizer / tokenizer_2 after maybe_convert_prompt
    ti_embeds, ti_pooled     encode_prompt(TI_PROMPTS)
    ti_gen_image, ti_gen_float   4-step Euler, guidance 5, NEGATIVE, TI_GEN_PROMPT, gen_neg_latents
    ti_refiner_ids_2, ti_refiner_embeds, ti_refiner_pooled   tiny-sdxl-refiner (tokenizer_2 and
                             text_encoder_2 only) with ti_three's clip_g and ti_clip_g, REFINER_PROMPTS

reference.json records the scale check: diffusers' `cross_attention_kwargs={"scale": s}` (UNet) with
`lora_scale=s` in encode_prompt (what the pipeline passes on) gives, after set_adapters(1.0), the same
as set_adapters(s) (max differences recorded), so either is the reference of our scale.
"""

import json
import os
import re
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import torch  # noqa: E402

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402

import make_sdxl_fixtures as msf  # noqa: E402
from make_lora_fixtures import _config_dict, factor  # noqa: E402
from make_parity_fixtures import nchw, nhwc  # noqa: E402
from tiny_specs import SDXL_SPECS  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "lora-sdxl")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl")
FILES = {"kohya": "kohya_sdxl.safetensors", "sgm": "kohya_sdxl_sgm.safetensors", "peft": "peft_sdxl.safetensors"}
CASES = ("kohya", "sgm", "peft")
SCALES = (1.0, 0.5)
GEN_SCALE = {"kohya": 1.0, "sgm": 0.5, "peft": 1.0}
PROMPTS = msf.PROMPTS
NEGATIVE = msf.NEGATIVE
STEPS, GUIDANCE, SIZE = 4, 5.0, 64
KOHYA_ALPHAS = {"unet": 2.0, "unet_3x3": 1.0, "text_encoder": 3.0, "text_encoder_2": 1.0}

TI_FILES = {  # name -> (file, token, vectors, keys)
    "one": ("ti_one.safetensors", "<xl-one>", 1, ("clip_l", "clip_g")),
    "three": ("ti_three.safetensors", "xlthree", 3, ("clip_l", "clip_g")),
    "g": ("ti_clip_g.safetensors", "<xl-g>", 2, ("clip_g",)),
}
TI_WIDTHS = {"clip_l": 32, "clip_g": 48}
TI_PROMPTS = ["a photo of <xl-one>, wow!!", "xlthree on the moon 🐱", "<xl-one> and xlthree!"]
TI_GEN_PROMPT = "<xl-one> xlthree astronaut"
REFINER_PROMPTS = ["xlthree on the moon 🐱", "a <xl-g> photo, xlthree!"]


def tiny_reference():
    with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


def build_pipeline(name, tmp):
    """diffusers' SDXL pipeline of `name` (the refiner: the img2img pipeline, text_encoder_2 only) with
    the tiny fixture's random weights, as scripts/make_sdxl_fixtures.py builds it."""
    spec = SDXL_SPECS[name]
    parts = msf.build(spec)
    toks = msf.tokenizers(tmp, spec)
    flags = spec["pipeline"]
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                  tokenizer=toks["tokenizer"], tokenizer_2=toks["tokenizer_2"], unet=parts["unet"],
                  scheduler=parts["scheduler"], force_zeros_for_empty_prompt=flags["force_zeros_for_empty_prompt"],
                  add_watermarker=False)
    if flags.get("requires_aesthetics_score"):
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**common, requires_aesthetics_score=True)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompts, **kw):
    e, _, p, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False, **kw)
    return e.numpy(), p.numpy()


def unet_out(pipe, ref):
    return nhwc(pipe.unet(nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(),
                          torch.from_numpy(ref["embeds"]),
                          added_cond_kwargs={"text_embeds": torch.from_numpy(ref["pooled"]),
                                             "time_ids": torch.from_numpy(ref["unet_time_ids"])}).sample)


def generate(pipe, ref, prompt, **kw):
    images = pipe(prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=SIZE, width=SIZE, latents=nchw(ref["gen_neg_latents"]), output_type="np", **kw).images
    return images.astype("float32"), (images * 255).round().astype("uint8")


def check_builder(ref):
    """The pipeline built here reproduces tiny-sdxl's own reference (no LoRA)."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline("tiny-sdxl", tmp)
        e, p = encode(pipe, PROMPTS)
        u = unet_out(pipe, ref)
    for what, a, b in (("embeds", e, ref["embeds"]), ("pooled", p, ref["pooled"]), ("unet", u, ref["unet_out"])):
        assert np.abs(a - b).max() < 1e-5, (what, np.abs(a - b).max())


# ----------------------------------------------------------------------------- LoRA files
_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def unet_modules(unet, sgm=False):
    """{diffusers module path: torch module} a kohya file adapts (the SGM file: more, see the docstring)."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if _ATTN.search(name):
            out[name] = module
        elif name.startswith(("down_blocks.2.", "mid_block.")) and name.endswith(
                ("proj_in", "proj_out", ".ff.net.0.proj", ".ff.net.2")) and ".resnets." not in name:
            out[name] = module
        elif sgm and (name in ("conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv",
                               "up_blocks.0.upsamplers.0.conv")
                      or name.startswith(("down_blocks.0.resnets.1.", "down_blocks.1.resnets.0.",
                                          "mid_block.resnets.1.", "up_blocks.1.resnets.2."))):
            if "norm" not in name:
                out[name] = module
    return out


def te_modules(text_encoder, projection=False):
    """{module path with text_model.: module} of the q/k/v/out_proj and fc1/fc2 linears (and text_projection)."""
    out = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            out[name if name.startswith("text_model.") else "text_model." + name] = module
        elif projection and name == "text_projection":
            out[name] = module
    return out


def _pair(prefix, module, rank, alpha):
    if isinstance(module, torch.nn.Conv2d):
        out_c, in_c, kh, kw = module.weight.shape
        down_shape, up_shape = (rank, in_c, kh, kw), (out_c, rank, 1, 1)
    else:
        out_c, in_c = module.weight.shape
        down_shape, up_shape = (rank, in_c), (out_c, rank)
    return {
        f"{prefix}.lora_down.weight": factor(f"{prefix}.down", down_shape),
        f"{prefix}.lora_up.weight": factor(f"{prefix}.up", up_shape),
        f"{prefix}.alpha": np.array(alpha, dtype=np.float32),
    }


def _unet_pair(name, module):
    conv3 = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
    return _pair("lora_unet_" + name.replace(".", "_"), module, 2 if conv3 else 4,
                 KOHYA_ALPHAS["unet_3x3" if conv3 else "unet"])


def _te_tensors(pipe):
    tensors = {}
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for path, module in te_modules(getattr(pipe, component), projection=component == "text_encoder_2").items():
            tensors.update(_pair(prefix + path.replace(".", "_"), module, 4, KOHYA_ALPHAS[component]))
    return tensors


def kohya_tensors(pipe, sgm_modules=False):
    """kohya keys in diffusers module names (sgm_modules: the SGM file's module set, still diffusers names)."""
    tensors = {}
    for name, module in unet_modules(pipe.unet, sgm=sgm_modules).items():
        tensors.update(_unet_pair(name, module))
    tensors.update(_te_tensors(pipe))
    return tensors


def sgm_name(name, config):
    """Stability's SGM name of a diffusers UNet module of an SDXL UNet (how kohya sd-scripts names SDXL
    LoRA modules: its SDXL UNet is SGM's), written out from the layout rather than from our converter."""
    layers, n_up = config["layers_per_block"], len(config["up_block_types"])
    attn_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    resnet = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}
    if name in fixed:
        return fixed[name]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)$", name)
    if m:
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = 1 + i * (layers + 1)
        if part == "downsamplers":
            return f"input_blocks.{k + layers}.0.op"
        rest = resnet.get(rest, rest) if part == "resnets" else rest
        return f"input_blocks.{k + j}.{0 if part == 'resnets' else 1}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)$", name)
    if m:
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        k = i * (layers + 1)
        assert i < n_up
        if part == "upsamplers":
            return f"output_blocks.{k + layers}.{2 if attn_up[i] else 1}.{rest}"
        rest = resnet.get(rest, rest) if part == "resnets" else rest
        return f"output_blocks.{k + j}.{0 if part == 'resnets' else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    if m:
        part, j, rest = m[1], int(m[2]), m[3]
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{resnet.get(rest, rest)}"
    raise KeyError(name)


def sgm_tensors(pipe):
    """The SGM file: kohya_tensors(sgm_modules=True) with the UNet's modules renamed to SGM names."""
    config = dict(pipe.unet.config)
    tensors = {}
    for key, value in kohya_tensors(pipe, sgm_modules=True).items():
        module, _, suffix = key.partition(".")
        if module.startswith("lora_unet_"):
            name = next(n for n in unet_modules(pipe.unet, sgm=True) if "lora_unet_" + n.replace(".", "_") == module)
            module = "lora_unet_" + sgm_name(name, config).replace(".", "_")
        tensors[f"{module}.{suffix}"] = value
    return tensors


def write_peft(tmp):
    """peft adapters on a fresh pipeline, filled with deterministic values, saved by diffusers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = build_pipeline("tiny-sdxl", tmp)
    configs = {
        "unet": LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"],
            rank_pattern={"down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_k": 2},
            alpha_pattern={"conv1": 3},
        ),
        "text_encoder": LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    }
    layers = {}
    for component, config in configs.items():
        model = getattr(pipe, component)
        model.add_adapter(config, adapter_name="fixture")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.from_numpy(factor(f"{component}.{name}", tuple(param.shape))))
        layers[component] = get_peft_model_state_dict(model, adapter_name="fixture")
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=_config_dict(configs["unet"]),
        text_encoder_lora_adapter_metadata=_config_dict(configs["text_encoder"]),
        text_encoder_2_lora_adapter_metadata=_config_dict(configs["text_encoder_2"]),
        weight_name=FILES["peft"], safe_serialization=True,
    )
    return os.path.join(tmp, FILES["peft"])


def ti_vectors(name, key, n):
    return np.random.default_rng([11, list(TI_FILES).index(name), TI_WIDTHS[key]]).standard_normal(
        (n, TI_WIDTHS[key])).astype("float32")


def write_files(out=OUT):
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline("tiny-sdxl", tmp)
        for kind, tensors in (("kohya", kohya_tensors(pipe)), ("sgm", sgm_tensors(pipe))):
            # one metadata entry: safetensors writes several in no fixed order (the file's bytes would vary)
            save_file(tensors, os.path.join(out, FILES[kind]), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        with open(write_peft(tmp), "rb") as src, open(os.path.join(out, FILES["peft"]), "wb") as dst:
            dst.write(src.read())
    for name, (file, _, n, keys) in TI_FILES.items():
        save_file({k: ti_vectors(name, k, n) for k in keys}, os.path.join(out, file))


# ----------------------------------------------------------------------------- the LoRA reference
def load_into(pipe, kind, folder=OUT):
    pipe.load_lora_weights(os.path.join(folder, FILES[kind]), adapter_name=kind)


def reference_case(kind, folder=OUT, ref=None):
    """diffusers' outputs for one LoRA file: {"embeds_<s>", "pooled_<s>", "unet_<s>", "gen_image", "gen_float"}."""
    ref = ref or tiny_reference()
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline("tiny-sdxl", tmp)
        load_into(pipe, kind, folder)
        for s in SCALES:
            pipe.set_adapters([kind], adapter_weights=[s])
            out[f"embeds_{s}"], out[f"pooled_{s}"] = encode(pipe, PROMPTS)
            out[f"unet_{s}"] = unet_out(pipe, ref)
        pipe.set_adapters([kind], adapter_weights=[GEN_SCALE[kind]])
        out["gen_float"], out["gen_image"] = generate(pipe, ref, PROMPTS[0])
    return out


def check_loaded(kind, folder=OUT):
    """Every module of the file became a peft layer in diffusers (nothing dropped): {component: count}."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline("tiny-sdxl", tmp)
        load_into(pipe, kind, folder)
        counts = {c: sum(1 for n, _ in getattr(pipe, c).named_modules() if n.endswith(".lora_A"))
                  for c in ("unet", "text_encoder", "text_encoder_2")}
    return counts


def check_sgm_names(ref):
    """diffusers' SGM mapping puts the SGM file's factors where the same factors under diffusers names go:
    the two give the same UNet output and embeddings (and the mapping drops no key)."""
    from safetensors.torch import load_file

    results = []
    for tensors in ("sgm", "diffusers-named"):
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            pipe = build_pipeline("tiny-sdxl", tmp)
            if tensors == "sgm":
                path = os.path.join(OUT, FILES["sgm"])
                state_dict, alphas = pipe.lora_state_dict(path, unet_config=pipe.unet.config)
                n_file = len([k for k in load_file(path) if k.endswith("lora_down.weight")])
                n_mapped = len([k for k in state_dict if ".down." in k or "lora_A" in k])
                assert n_file == n_mapped, (n_file, n_mapped)
                pipe.load_lora_weights(path, adapter_name="x")
            else:
                sd = {k: torch.from_numpy(v) for k, v in kohya_tensors(pipe, sgm_modules=True).items()}
                pipe.load_lora_weights(sd, adapter_name="x")
            results.append((unet_out(pipe, ref), *encode(pipe, PROMPTS)))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*results))
    assert diff < 1e-6, diff
    return diff


def check_scale_semantics(ref, kind="peft", s=0.5):
    """set_adapters(s) vs set_adapters(1) + cross_attention_kwargs={"scale": s} (generation) and
    encode_prompt(lora_scale=s): the max differences."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline("tiny-sdxl", tmp)
        load_into(pipe, kind)
        pipe.set_adapters([kind], adapter_weights=[s])
        e_a, p_a = encode(pipe, PROMPTS)
        g_a, _ = generate(pipe, ref, PROMPTS[0])
        pipe.set_adapters([kind], adapter_weights=[1.0])
        e_b, p_b = encode(pipe, PROMPTS, lora_scale=s)
        g_b, _ = generate(pipe, ref, PROMPTS[0], cross_attention_kwargs={"scale": s})
    out = {"case": kind, "scale": s, "embeds": float(np.abs(e_a - e_b).max()),
           "pooled": float(np.abs(p_a - p_b).max()), "gen_float": float(np.abs(g_a - g_b).max())}
    assert max(out["embeds"], out["pooled"]) < 1e-5 and out["gen_float"] < 1e-4, out
    return out


# ----------------------------------------------------------------------------- the TI reference
def load_ti(pipe, name, folder=OUT):
    from safetensors.torch import load_file

    file, token, _, keys = TI_FILES[name]
    state_dict = load_file(os.path.join(folder, file))
    if "clip_l" in keys and pipe.text_encoder is not None:
        pipe.load_textual_inversion(state_dict["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def ids_of(pipe, tokenizer, prompts):
    prompts = [pipe.maybe_convert_prompt(p, tokenizer) for p in prompts]
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="np").input_ids.astype("int32")


def ti_reference(ref):
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline("tiny-sdxl", tmp)
        for name in ("one", "three"):
            load_ti(pipe, name)
        out["ti_ids_1"] = ids_of(pipe, pipe.tokenizer, TI_PROMPTS)
        out["ti_ids_2"] = ids_of(pipe, pipe.tokenizer_2, TI_PROMPTS)
        out["ti_embeds"], out["ti_pooled"] = encode(pipe, TI_PROMPTS)
        out["ti_gen_float"], out["ti_gen_image"] = generate(pipe, ref, TI_GEN_PROMPT)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        refiner = build_pipeline("tiny-sdxl-refiner", tmp)
        for name in ("three", "g"):
            load_ti(refiner, name)
        out["ti_refiner_ids_2"] = ids_of(refiner, refiner.tokenizer_2, REFINER_PROMPTS)
        out["ti_refiner_embeds"], out["ti_refiner_pooled"] = encode(refiner, REFINER_PROMPTS)
    return out


def main():
    ref = tiny_reference()
    check_builder(ref)
    write_files()
    meta = {"cases": {c: {"file": FILES[c], "scales": list(SCALES), "gen_scale": GEN_SCALE[c]} for c in CASES},
            "files": FILES, "prompts": PROMPTS, "negative": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE,
            "size": SIZE, "scheduler": "euler", "gen_latents": "tiny-sdxl reference.npz gen_neg_latents",
            "ti_files": {k: {"file": f, "token": t, "vectors": n, "keys": list(keys)}
                         for k, (f, t, n, keys) in TI_FILES.items()},
            "ti_prompts": TI_PROMPTS, "ti_gen_prompt": TI_GEN_PROMPT, "refiner_prompts": REFINER_PROMPTS,
            "loaded_modules": {}, "changed": {}}
    arrays = {}
    for case in CASES:
        for key, value in reference_case(case, ref=ref).items():
            arrays[f"{case}_{key}"] = value
        meta["loaded_modules"][case] = check_loaded(case)
        meta["changed"][case] = {
            "unet_1.0": float(np.abs(arrays[f"{case}_unet_1.0"] - ref["unet_out"]).max()),
            "embeds_1.0": float(np.abs(arrays[f"{case}_embeds_1.0"] - ref["embeds"]).max()),
            "pooled_1.0": float(np.abs(arrays[f"{case}_pooled_1.0"] - ref["pooled"]).max()),
        }
        print(case, "loaded modules:", meta["loaded_modules"][case], "max change from no LoRA:", meta["changed"][case])
    meta["sgm_vs_diffusers_names_max_diff"] = check_sgm_names(ref)
    meta["scale_semantics"] = check_scale_semantics(ref)
    arrays.update(ti_reference(ref))
    meta.update(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                peft=peft.__version__)
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    print("sgm vs diffusers names:", meta["sgm_vs_diffusers_names_max_diff"], "scale:", meta["scale_semantics"])
    print({k: v.shape for k, v in arrays.items()})
    print("ti ids_1", arrays["ti_ids_1"][:, :10], "\nti ids_2", arrays["ti_ids_2"][:, :10])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":  # one LoRA case of the committed files, to an npz
        np.savez(sys.argv[3], **reference_case(sys.argv[2]))
    else:
        main()
