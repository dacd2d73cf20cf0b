"""Write the LoRA fixtures of the tiny SD 1.x model and diffusers' outputs with them (needs torch,
diffusers, transformers, peft).

    pip install torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 peft
    python scripts/make_lora_fixtures.py
    python scripts/make_lora_fixtures.py --case both out.npz   # one case on the committed files (live test)

Files written to tests/fixtures/lora/ (small, deterministic: every factor is drawn from a NumPy
generator seeded by its key):

    kohya_locon.safetensors   kohya/A1111 keys (lora_unet_..., lora_te_...): every attention and
                              feed-forward linear, proj_in/proj_out (1x1 convolutions), 3x3 resnet convs,
                              a 1x1 conv_shortcut, a time_emb_proj, a downsampler, an upsampler, conv_in,
                              conv_out, and the text encoder's q/k/v/out_proj and mlp fc1/fc2; ranks 4
                              (linear, 1x1) and 2 (3x3), alphas != rank and per module: 2 (UNet linear),
                              3 (1x1 convolutions), 1 (3x3), 3 (text encoder)
    peft.safetensors          written by diffusers' StableDiffusionPipeline.save_lora_weights from peft
                              adapters (unet.*.lora_A/lora_B, text_encoder.*), with the
                              lora_adapter_metadata it writes (r 4, lora_alpha 8, a rank_pattern and an
                              alpha_pattern)
    attn_procs.safetensors    the old attention-processor layout (unet.*.processor.to_q_lora.down.weight)
    peft_dora.safetensors     the same with use_dora (lora_magnitude_vector) in the UNet: DoRA on linears,
                              1x1 and 3x3 convolutions (its text encoder part is plain LoRA)
    kohya_ldm.safetensors     kohya keys in the original LDM names (lora_unet_input_blocks_1_1_...,
                              ..._in_layers_2, middle_block_..., output_blocks_...), the same factors

and reference.npz with diffusers' outputs (StableDiffusionPipeline.load_lora_weights(file,
adapter_name=...) + set_adapters) for each case of CASES:

    <case>_text_embeds   text encoder last hidden state for the tiny fixture's `ids`
    <case>_unet_out      UNet output on the tiny fixture's unet_latents / unet_timesteps / unet_context (NHWC)
    <case>_gen_image, <case>_gen_float    10-step DDIM, guidance 7.5, negative prompt, the fixture's gen_latents

(the no-LoRA outputs are the tiny fixture's own reference.npz, tests/fixtures/tiny-sd1). The LDM-named
file is loaded as diffusers' SDXL loader does it (`lora_state_dict(..., unet_config=unet.config)`,
which maps the LDM blocks); diffusers' SD loader does not map them for SD 1.x.
"""

import json
import os
import sys
import tempfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import torch  # noqa: E402

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402

from make_parity_fixtures import clip_keys, load_random, nchw, nhwc, tokenizer_folder  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-sd1")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
FILES = {"kohya": "kohya_locon.safetensors", "peft": "peft.safetensors", "attn_procs": "attn_procs.safetensors",
         "ldm": "kohya_ldm.safetensors", "dora": "peft_dora.safetensors"}
#: case -> ([(file, scale)], what is recorded)
CASES = {
    "kohya": ([("kohya", 0.7)], ("text_embeds", "unet_out", "gen")),
    "peft": ([("peft", 1.0)], ("text_embeds", "unet_out", "gen")),
    "both": ([("kohya", 0.5), ("peft", 0.8)], ("text_embeds", "unet_out", "gen")),
    "attn_procs": ([("attn_procs", 1.0)], ("unet_out",)),
    "ldm": ([("ldm", 0.7)], ("unet_out",)),
    "dora": ([("dora", 0.8)], ("text_embeds", "unet_out")),
    "dora_kohya": ([("dora", 0.6), ("kohya", 0.5)], ("text_embeds", "unet_out")),
}
KOHYA_ALPHAS = {"linear": 2.0, "1x1": 3.0, "3x3": 1.0, "text": 3.0}  # rank 4, 4, 2, 4


def factor(key, shape, gain=0.5):
    """Deterministic N(0, gain^2 / fan_in) values for a LoRA factor."""
    rng = np.random.default_rng([7, zlib.crc32(key.encode())])
    fan_in = int(np.prod(shape[1:]))
    return (gain * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def tiny_reference():
    with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with open(os.path.join(FIXTURE, "reference.json")) as f:
        ref["meta"] = json.load(f)
    return ref


def build_pipeline(tmp):
    """The tiny SD 1.x pipeline with the fixture's random weights (as make_parity_fixtures.py builds it)."""
    unet = diffusers.UNet2DConditionModel.from_config(
        diffusers.UNet2DConditionModel.load_config(os.path.join(FIXTURE, "unet"))).eval()
    vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(os.path.join(FIXTURE, "vae"))).eval()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig.from_json_file(os.path.join(FIXTURE, "text_encoder", "config.json"))).eval()
    scheduler = diffusers.DDIMScheduler.from_config(
        diffusers.DDIMScheduler.load_config(os.path.join(FIXTURE, "scheduler")))
    load_random(unet)
    load_random(vae)
    load_random(text_encoder, clip_keys(text_encoder))
    with open(os.path.join(FIXTURE, "tokenizer", "special_tokens_map.json")) as f:
        pad = json.load(f)["pad_token"]
    folder = os.path.join(tmp, "tokenizer")
    os.makedirs(folder, exist_ok=True)
    tokenizer_folder(folder, pad)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the files
def _unet_modules(unet):
    """{diffusers module path: torch module} of the modules the kohya file adapts."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if ("transformer_blocks" in name or name.endswith(("proj_in", "proj_out"))
                or name in ("conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.1.upsamplers.0.conv")
                or name.startswith(("down_blocks.1.resnets.0.", "up_blocks.0.resnets.1."))):
            if "norm" not in name:
                out[name] = module
    return out


def _te_modules(text_encoder):
    return {name: m for name, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name)}


def _kohya_pair(prefix, module, rank, alpha):
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


def kohya_tensors(pipe):
    tensors = {}
    for name, module in _unet_modules(pipe.unet).items():
        kind = "linear" if isinstance(module, torch.nn.Linear) else "1x1" if module.kernel_size == (1, 1) else "3x3"
        tensors.update(_kohya_pair("lora_unet_" + name.replace(".", "_"), module, 2 if kind == "3x3" else 4,
                                   KOHYA_ALPHAS[kind]))
    for name, module in _te_modules(pipe.text_encoder).items():
        path = name if name.startswith("text_model.") else "text_model." + name
        tensors.update(_kohya_pair("lora_te_" + path.replace(".", "_"), module, 4, KOHYA_ALPHAS["text"]))
    return tensors


def ldm_tensors(pipe):
    """The kohya file's factors for a part of the UNet (what diffusers' LDM-block mapping handles),
    under the original LDM names."""
    from weights_port.unet_keys import PREFIX, original_key

    config = dict(pipe.unet.config)
    kohya = kohya_tensors(pipe)
    tensors = {}
    for name in _unet_modules(pipe.unet):
        if name in ("conv_in", "conv_out") or "upsamplers" in name or name.startswith("up_blocks.0.resnets"):
            continue  # diffusers' LDM mapping for SD 1.x gets these wrong or refuses them
        ldm = original_key(name + ".weight", config)[len(PREFIX):-len(".weight")]
        src, dst = "lora_unet_" + name.replace(".", "_"), "lora_unet_" + ldm.replace(".", "_")
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            tensors[dst + suffix] = kohya[src + suffix]
    return tensors


def attn_procs_tensors(pipe):
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith((".attn1", ".attn2")) and name.startswith(("down_blocks.0.", "mid_block.", "up_blocks.2.")):
            for ours, theirs in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                                 ("to_out.0", "to_out_lora")):
                linear = module.get_submodule(ours)
                out_c, in_c = linear.weight.shape
                base = f"unet.{name}.processor.{theirs}"
                tensors[base + ".down.weight"] = factor(base + ".down", (4, in_c))
                tensors[base + ".up.weight"] = factor(base + ".up", (out_c, 4))
    return tensors


def _config_dict(config):
    """LoraConfig.to_dict() with its sets as sorted lists (a set's order varies between runs)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def write_peft(tmp, dora=False):
    """peft adapters on a fresh pipeline, filled with deterministic values, saved by diffusers (DoRA:
    use_dora, magnitudes = the base weight's per-output norms times 1 + N(0, 0.1^2))."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = build_pipeline(tmp)
    if dora:
        unet_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, use_dora=True,
                                 target_modules=["to_q", "to_v", "proj_in", "conv1", "ff.net.2"])
        # The text encoder's part is plain LoRA: with transformers 5, diffusers 0.42 does not load a text
        # encoder's lora_magnitude_vector (its load report lists them as unexpected), so there is no reference.
        te_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "fc1"])
    else:
        unet_config = LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"],
            rank_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2},
            alpha_pattern={"conv1": 3},
        )
        te_config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    pipe.unet.add_adapter(unet_config, adapter_name="fixture")
    pipe.text_encoder.add_adapter(te_config, adapter_name="fixture")
    layers = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    base = model.get_submodule(name.split(".lora_magnitude_vector")[0]).base_layer.weight
                    norm = base.flatten(1).norm(dim=1).reshape(param.shape)
                    rng = np.random.default_rng([8, zlib.crc32(name.encode())])
                    noise = torch.from_numpy((1 + 0.1 * rng.standard_normal(tuple(param.shape))).astype("float32"))
                    param.copy_(norm * noise)
                elif ".lora_" in name:
                    param.copy_(torch.from_numpy(factor(f"{component}.{name}", tuple(param.shape))))
        layers[component] = get_peft_model_state_dict(model, adapter_name="fixture")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=_config_dict(unet_config), text_encoder_lora_adapter_metadata=_config_dict(te_config),
        weight_name=FILES["dora" if dora else "peft"], safe_serialization=True,
    )
    return os.path.join(tmp, FILES["dora" if dora else "peft"])


def write_files(out=OUT):
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(tmp)
        for kind, tensors in (("kohya", kohya_tensors(pipe)), ("ldm", ldm_tensors(pipe)),
                              ("attn_procs", attn_procs_tensors(pipe))):
            save_file(tensors, os.path.join(out, FILES[kind]), metadata={"ss_network_module": "networks.lora"}
                      if kind != "attn_procs" else None)
        for kind in ("peft", "dora"):
            with open(write_peft(tmp, dora=kind == "dora"), "rb") as src, open(os.path.join(out, FILES[kind]), "wb") as dst:
                dst.write(src.read())


# ----------------------------------------------------------------------------- the reference
def load_into(pipe, kind, folder=OUT):
    path = os.path.join(folder, FILES[kind])
    if kind == "ldm":  # diffusers' SD 1.x loader does not map LDM blocks; its SDXL loader does, so:
        state_dict, alphas = pipe.lora_state_dict(path, unet_config=pipe.unet.config)
        pipe.load_lora_into_unet(state_dict, alphas, pipe.unet, adapter_name=kind, _pipeline=pipe)
    else:
        pipe.load_lora_weights(path, adapter_name=kind)


def reference_case(case, folder=OUT, ref=None):
    """diffusers' outputs for one case of CASES: {"text_embeds", "unet_out", "gen_image", "gen_float"}."""
    ref = ref or tiny_reference()
    loras, what = CASES[case]
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline(tmp)
        for kind, _ in loras:
            load_into(pipe, kind, folder)
        names, weights = [k for k, _ in loras], [s for _, s in loras]
        if case == "ldm":
            pipe.unet.set_adapters(names, weights)
        else:
            pipe.set_adapters(names, adapter_weights=weights)
        if "text_embeds" in what:
            out["text_embeds"] = pipe.text_encoder(torch.from_numpy(ref["ids"].astype("int64"))).last_hidden_state.numpy()
        if "unet_out" in what:
            out["unet_out"] = nhwc(pipe.unet(nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(),
                                             torch.from_numpy(ref["unet_context"])).sample)
        if "gen" in what:
            meta = ref["meta"]
            images = pipe(meta["gen_prompt"], negative_prompt=meta["negative"], num_inference_steps=meta["gen_steps"],
                          guidance_scale=meta["guidance"], height=meta["size"], width=meta["size"],
                          latents=nchw(ref["gen_latents"]), output_type="np").images
            out["gen_float"] = images.astype("float32")
            out["gen_image"] = (images * 255).round().astype("uint8")
    return out


def check_builder(ref):
    """The pipeline built here reproduces the tiny fixture's own reference (no LoRA)."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline(tmp)
        unet = nhwc(pipe.unet(nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(),
                              torch.from_numpy(ref["unet_context"])).sample)
        embeds = pipe.text_encoder(torch.from_numpy(ref["ids"].astype("int64"))).last_hidden_state.numpy()
    assert np.abs(unet - ref["unet_out"]).max() < 1e-5, np.abs(unet - ref["unet_out"]).max()
    assert np.abs(embeds - ref["text_embeds"]).max() < 1e-5


def main():
    ref = tiny_reference()
    check_builder(ref)
    write_files()
    arrays = {}
    for case in CASES:
        for key, value in reference_case(case, ref=ref).items():
            arrays[f"{case}_{key}"] = value
        changed = {k: float(np.abs(arrays[f"{case}_{k}"] - ref[k]).max()) for k in ("text_embeds", "unet_out")
                   if f"{case}_{k}" in arrays}
        print(case, "max change from no LoRA:", changed)
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
    meta = {"cases": {c: {"loras": [[FILES[k], s] for k, s in loras], "records": list(what)}
                      for c, (loras, what) in CASES.items()},
            "files": FILES, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":  # one case of the committed files, to an npz
        np.savez(sys.argv[3], **reference_case(sys.argv[2]))
    else:
        main()
