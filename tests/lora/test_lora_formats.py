"""LoRA files: formats read and refused, error messages, the hash, and that the networks are unchanged
by any error (every weight compared bit for bit). Networks of the tiny SD 1.x model, no compiled graph."""

import hashlib
import json
import math
import os
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from support import tiny_models
from support.torch_format import COMMAND_PAYLOADS, hostile_command_file, save_torch_zip

from diffusion_tf.lora import LoraError, LoraStack, check_scale, file_hash
from diffusion_tf.lora.stack import torch_delta

pytestmark = pytest.mark.xdist_group("lora")

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "lora")
KOHYA = os.path.join(FIXTURES, "kohya_locon.safetensors")
PEFT = os.path.join(FIXTURES, "peft.safetensors")
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.1.resnets.0.conv1"          # 3x3, 32 -> 64
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv, 32 -> 32


@pytest.fixture(scope="module")
def models(tiny_networks):
    return tiny_networks


@pytest.fixture
def stack(models):
    from diffusion_tf.state_dict import get_state_dict

    before = {(c, k): v for c, m in models.items() for k, v in get_state_dict(m).items()}
    stack = LoraStack(models)
    stack.before = before
    yield stack
    stack.unload_all()
    assert_unchanged(stack)


def assert_unchanged(stack):
    from diffusion_tf.state_dict import get_state_dict

    now = {(c, k): v for c, m in stack.models.items() for k, v in get_state_dict(m).items()}
    changed = [k for k in stack.before if not np.array_equal(stack.before[k], now[k])]
    assert not changed, f"{len(changed)} weights changed, e.g. {changed[:3]}"


def torch_weight(stack, component, path):
    from diffusion_tf.state_dict import get_state_dict

    return get_state_dict(stack.models[component])[path + ".weight"]


def write(tmp_path, tensors, name="lora.safetensors", metadata=None):
    path = str(tmp_path / name)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)
    return path


def kohya_pair(module, down_shape, up_shape, alpha=None, prefix="lora_unet_", seed=0):
    rng = np.random.default_rng(seed)
    name = prefix + module.replace(".", "_")
    out = {f"{name}.lora_down.weight": rng.standard_normal(down_shape).astype("float32") * 0.1,
           f"{name}.lora_up.weight": rng.standard_normal(up_shape).astype("float32") * 0.1}
    if alpha is not None:
        out[f"{name}.alpha"] = np.array(alpha, "float32")
    return out


def refused(stack, path, match, scale=1.0):
    with pytest.raises(LoraError, match=match) as info:
        stack.load(path, scale)
    assert_unchanged(stack)
    assert stack.entries == []
    return str(info.value)


# ----------------------------------------------------------------------------- the merge rule
def test_kohya_linear_merge_rule(stack, tmp_path):
    """W = W0 + scale * alpha / rank * up @ down, in float32, for a linear layer."""
    tensors = kohya_pair(Q, (4, 32), (32, 4), alpha=1.5)
    name = stack.load(write(tmp_path, tensors), 0.6)
    up, down = tensors[f"lora_unet_{Q.replace('.', '_')}.lora_up.weight"], tensors[f"lora_unet_{Q.replace('.', '_')}.lora_down.weight"]
    w0 = stack.before["unet", Q + ".weight"]
    np.testing.assert_allclose(torch_weight(stack, "unet", Q), w0 + 0.6 * 1.5 / 4 * (up @ down), rtol=0, atol=1e-6)
    entry = stack.entries[0]
    assert (entry.name, entry.format, entry.modules, entry.components) == ("lora", "kohya", 1, ("unet",))
    stack.remove(name)
    assert_unchanged(stack)


def test_no_alpha_means_alpha_equals_rank(stack, tmp_path):
    tensors = kohya_pair(Q, (4, 32), (32, 4))
    stack.load(write(tmp_path, tensors))
    up, down = (tensors[f"lora_unet_{Q.replace('.', '_')}.lora_{w}.weight"] for w in ("up", "down"))
    np.testing.assert_allclose(torch_weight(stack, "unet", Q), stack.before["unet", Q + ".weight"] + up @ down,
                               rtol=0, atol=1e-6)


def test_cp_decomposition_lora_mid(stack, tmp_path):
    """LyCORIS' CP/Tucker LoCon: delta[i, j, k, l] = sum mid[n, m, k, l] up[i, n] down[m, j] (A1111's rebuild)."""
    rng = np.random.default_rng(3)
    name = "lora_unet_" + CONV.replace(".", "_")
    down, mid, up = (rng.standard_normal(s).astype("float32") * 0.1 for s in ((2, 32, 1, 1), (2, 2, 3, 3), (64, 2, 1, 1)))
    path = write(tmp_path, {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                            f"{name}.lora_up.weight": up, f"{name}.alpha": np.array(1.0, "float32")})
    stack.load(path, 0.8)
    delta = np.einsum("nmkl,in,mj->ijkl", mid, up[:, :, 0, 0], down[:, :, 0, 0])
    np.testing.assert_allclose(torch_weight(stack, "unet", CONV), stack.before["unet", CONV + ".weight"] + 0.8 * 0.5 * delta,
                               rtol=0, atol=1e-6)


def test_linear_factors_on_a_1x1_convolution(stack, tmp_path):
    """proj_in is a 1x1 convolution here (SD 1.x); a LoRA trained on a linear proj_in applies the same."""
    linear = kohya_pair(PROJ_IN, (4, 32), (32, 4), alpha=2)
    stack.load(write(tmp_path, linear, "linear.safetensors"))
    merged = torch_weight(stack, "unet", PROJ_IN)
    stack.unload_all()
    conv = {k: v.reshape(v.shape + (1, 1)) if v.ndim == 2 else v for k, v in linear.items()}
    stack.load(write(tmp_path, conv, "conv.safetensors"))
    np.testing.assert_array_equal(torch_weight(stack, "unet", PROJ_IN), merged)


def test_ldm_names_and_text_encoder_without_text_model_prefix(stack, tmp_path):
    """`lora_unet_input_blocks_1_1_..._attn1_to_q` is down_blocks.0.attentions.0...to_q; the text encoder's
    `encoder.layers.0...` (transformers 5 module names) is text_model.encoder.layers.0..."""
    ldm = kohya_pair("input_blocks.1.1.transformer_blocks.0.attn1.to_q", (4, 32), (32, 4), alpha=2)
    ldm.update(kohya_pair("input_blocks.4.0.in_layers.2", (2, 32, 3, 3), (64, 2, 1, 1), alpha=1, seed=1))
    stack.load(write(tmp_path, ldm, "ldm.safetensors"))
    assert stack.entries[0].format == "kohya-ldm"
    merged = {p: torch_weight(stack, "unet", p) for p in (Q, CONV)}
    stack.unload_all()
    same = dict(kohya_pair(Q, (4, 32), (32, 4), alpha=2))
    same.update(kohya_pair(CONV, (2, 32, 3, 3), (64, 2, 1, 1), alpha=1, seed=1))
    stack.load(write(tmp_path, same, "diffusers_names.safetensors"))
    for p, value in merged.items():
        np.testing.assert_array_equal(torch_weight(stack, "unet", p), value)
    stack.unload_all()
    rng = np.random.default_rng(0)
    te = "text_model.encoder.layers.1.self_attn.q_proj"
    a, b = rng.standard_normal((4, 32)).astype("float32"), rng.standard_normal((32, 4)).astype("float32")
    stack.load(write(tmp_path, {"text_encoder.encoder.layers.1.self_attn.q_proj.lora_A.weight": a,
                                "text_encoder.encoder.layers.1.self_attn.q_proj.lora_B.weight": b}, "te.safetensors"))
    np.testing.assert_allclose(torch_weight(stack, "text_encoder", te), stack.before["text_encoder", te + ".weight"] + b @ a,
                               rtol=0, atol=1e-5)


def test_peft_alpha_keys_metadata_patterns_and_rslora(stack, tmp_path):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((4, 32)).astype("float32") * 0.1, rng.standard_normal((32, 4)).astype("float32") * 0.1
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors = {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b,
               f"unet.{k}.lora_A.weight": a, f"unet.{k}.lora_B.weight": b}
    w0 = {p: stack.before["unet", p + ".weight"] for p in (Q, k)}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 2}, "unet.use_rslora": True}
    stack.load(write(tmp_path, tensors, "rs.safetensors", {"lora_adapter_metadata": json.dumps(meta)}))
    np.testing.assert_allclose(torch_weight(stack, "unet", Q), w0[Q] + 8 / math.sqrt(4) * (b @ a), atol=1e-6, rtol=0)
    np.testing.assert_allclose(torch_weight(stack, "unet", k), w0[k] + 2 / math.sqrt(4) * (b @ a), atol=1e-6, rtol=0)
    stack.unload_all()
    stack.load(write(tmp_path, {**tensors, f"unet.{Q}.alpha": np.array(1.0, "float32")}, "alpha.safetensors"))
    np.testing.assert_allclose(torch_weight(stack, "unet", Q), w0[Q] + 0.25 * (b @ a), atol=1e-6, rtol=0)
    np.testing.assert_allclose(torch_weight(stack, "unet", k), w0[k] + b @ a, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def fp16_parts():
    from diffusion_tf.components import load_folder

    return load_folder(tiny_models.converted_folder("tiny-sd1"), dtype="float16")


def test_float16_networks(tmp_path, fp16_parts):
    """Merged in float32 from the kept originals, cast to the variables' dtype; unloading is exact."""
    from diffusion_tf.state_dict import get_state_dict

    parts = fp16_parts
    before = get_state_dict(parts["unet"])
    stack = LoraStack({"unet": parts["unet"]})
    tensors = kohya_pair(Q, (4, 32), (32, 4), alpha=2)
    stack.load(write(tmp_path, tensors), 0.5)
    up, down = (tensors[f"lora_unet_{Q.replace('.', '_')}.lora_{w}.weight"] for w in ("up", "down"))
    expected = (before[Q + ".weight"].astype("float32") + 0.25 * (up @ down)).astype("float16")
    np.testing.assert_array_equal(get_state_dict(parts["unet"])[Q + ".weight"], expected)
    stack.unload_all()
    after = get_state_dict(parts["unet"])
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- names, scales, hash
def test_names(stack, tmp_path):
    path = write(tmp_path, kohya_pair(Q, (4, 32), (32, 4)), "style.safetensors")
    assert stack.load(path) == "style" and stack.load(path) == "style-2"
    assert stack.load(path, name="mine") == "mine"
    for bad, match in (("mine", "already loaded"), ("", "non-empty string"), (3, "non-empty string")):
        with pytest.raises(LoraError, match=match):
            stack.load(path, name=bad)
    with pytest.raises(LoraError, match=r"no LoRA named 'nope' is loaded \(loaded: 'style', 'style-2', 'mine'\)"):
        stack.set_scale("nope", 1.0)
    with pytest.raises(LoraError, match="no LoRA named"):
        stack.remove("nope")
    assert [e.name for e in stack.entries] == ["style", "style-2", "mine"]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), True, False, "1.0", None, [1.0],
                                   np.float32("nan")])
def test_bad_scales(stack, tmp_path, scale):
    path = write(tmp_path, kohya_pair(Q, (4, 32), (32, 4)))
    message = refused(stack, path, r"LoRA scale must be a finite number, got ", scale=scale)
    assert repr(scale) in message
    name = stack.load(path, 0.5)
    merged = torch_weight(stack, "unet", Q)
    with pytest.raises(ValueError, match=re.escape(repr(scale))):
        stack.set_scale(name, scale)
    np.testing.assert_array_equal(torch_weight(stack, "unet", Q), merged)
    assert stack.entries[0].scale == 0.5


def test_check_scale_accepts_numbers():
    assert check_scale(1) == 1.0 and check_scale(np.float32(0.5)) == 0.5 and check_scale(-2.0) == -2.0


def test_file_hash_is_a1111s(tmp_path):
    data = open(KOHYA, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert file_hash(KOHYA) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    # the metadata is not hashed
    other = write(tmp_path, load_file(KOHYA), "other.safetensors", {"ss_output_name": "something else"})
    assert file_hash(other) == file_hash(KOHYA)
    pt = save_torch_zip({"lora_unet_x.lora_down.weight": np.ones((1, 2), "float32")}, str(tmp_path / "x.pt"),
                        wrap_in_state_dict=False)
    assert file_hash(pt) == hashlib.sha256(open(pt, "rb").read()).hexdigest()[:12]
    with pytest.raises(ValueError, match="does not exist"):
        file_hash(str(tmp_path / "missing.safetensors"))


def test_entry_hash_matches_file_hash(stack):
    stack.load(PEFT)
    assert stack.entries[0].hash == file_hash(PEFT)


# ----------------------------------------------------------------------------- refused files
def test_missing_file_and_extension(stack, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    message = refused(stack, missing, "does not exist")
    assert missing in message
    refused(stack, str(tmp_path), "is not a file")
    text = tmp_path / "lora.txt"
    text.write_text("x")
    refused(stack, str(text), r"unsupported extension '\.txt'")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    refused(stack, str(bad), "cannot read LoRA file")
    refused(stack, write(tmp_path, {}, "empty.safetensors"), "has no tensors")


@pytest.mark.parametrize("kind", COMMAND_PAYLOADS)
def test_hostile_pickle_is_refused_and_never_runs(stack, tmp_path, kind):
    marker = tmp_path / "pwned"
    path = hostile_command_file(tmp_path / "evil.pt", kind, marker)
    refused(stack, str(path), rf"evil\.pt.*refusing global '{kind}'")
    assert not marker.exists()


def test_unmatched_keys_are_listed(stack, tmp_path):
    tensors = load_file(KOHYA)
    for i in range(12):
        tensors.update(kohya_pair(f"down_blocks.0.nothing_{i:02d}", (4, 32), (32, 4)))
    message = refused(stack, write(tmp_path, tensors), r"12 of its \d+ modules match nothing in the model")
    assert "lora_unet_down_blocks_0_nothing_00.lora_down.weight" in message and "and 14 more" in message


def test_unknown_suffix(stack, tmp_path):
    tensors = {**kohya_pair(Q, (4, 32), (32, 4)), "lora_unet_x.something": np.ones(2, "float32")}
    refused(stack, write(tmp_path, tensors), r"1 keys match no LoRA pattern: 'lora_unet_x.something'")


@pytest.mark.parametrize("module, down, up, looks", [
    (K2, (4, 768), (32, 4), r"SD 1\.x \(cross-attention width 768\)"),
    (K2, (4, 1024), (32, 4), r"SD 2\.x \(cross-attention width 1024\)"),
    (K2, (4, 2048), (32, 4), r"SDXL \(cross-attention width 2048\)"),
    ("text_model.encoder.layers.0.self_attn.q_proj", (4, 768), (768, 4), r"SD 1\.x \(text encoder width 768\)"),
])
def test_another_architecture_by_shape(stack, tmp_path, module, down, up, looks):
    prefix = "lora_te_" if module.startswith("text_model") else "lora_unet_"
    message = refused(stack, write(tmp_path, kohya_pair(module, down, up, prefix=prefix)),
                      rf"does not fit .* the LoRA's update has shape .*{looks}")
    assert "the model has UNet cross-attention width 32" in message


def test_sdxl_second_text_encoder(stack, tmp_path):
    tensors = {**kohya_pair(Q, (4, 32), (32, 4)),
               **kohya_pair("text_model.encoder.layers.0.self_attn.q_proj", (4, 1280), (1280, 4), prefix="lora_te2_")}
    refused(stack, write(tmp_path, tensors), r"no text_encoder_2 in this model.*looks like a LoRA for SDXL "
                                             r"\(it has keys for a second text encoder")


def test_full_checkpoints_are_refused(stack, tmp_path):
    single = tiny_models.write_single_file("tiny-sd1", str(tmp_path / "model.safetensors"))
    refused(stack, single, r"looks like a full model checkpoint \(keys like 'cond_stage_model\.|model\.diffusion_model")
    unet = {"down_blocks.0.resnets.0.conv1.weight": np.ones((32, 32, 3, 3), "float32"),
            "down_blocks.0.resnets.0.conv1.bias": np.ones(32, "float32")}
    refused(stack, write(tmp_path, unet, "unet.safetensors"), "looks like a full model checkpoint")


@pytest.mark.parametrize("suffixes, algorithm", [
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "LoHa"),
    (("lokr_w1", "lokr_w2", "alpha"), "LoKr"),
    (("weight", "on_input"), "IA3"),
    (("diff", "diff_b"), "full-weight difference"),
    (("lora_down.weight", "lora_up.weight", "dora_scale", "alpha"), "DoRA"),
])
def test_other_algorithms_are_named(stack, tmp_path, suffixes, algorithm):
    name = "lora_unet_" + Q.replace(".", "_")
    tensors = {f"{name}.{s}": np.ones((4, 4) if s != "alpha" else (), "float32") for s in suffixes}
    refused(stack, write(tmp_path, tensors), rf"is .*{algorithm}.*supports LoRA and LoCon")


def test_peft_bias_embedding_are_named(stack, tmp_path):
    base = {f"unet.{Q}.lora_A.weight": np.ones((4, 32), "float32"), f"unet.{Q}.lora_B.weight": np.ones((32, 4), "float32")}
    for extra, algorithm in ((f"unet.{Q}.lora_B.bias", "biases on lora_B"),
                             ("text_encoder.text_model.embeddings.token_embedding.lora_embedding_A", "embedding LoRA")):
        refused(stack, write(tmp_path, {**base, extra: np.ones(32, "float32")}), rf"is .*{algorithm}")


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({next(iter(t)): np.full_like(t[next(iter(t))], np.nan)}), "contains NaN or Inf"),
    (lambda t: t.update({next(k for k in t if k.endswith("lora_up.weight")): np.full((32, 4), np.inf, "float32")}),
     "contains NaN or Inf"),
    (lambda t: t.pop(next(k for k in t if k.endswith("lora_up.weight"))), r"has no '.*lora_up\.weight'"),
    (lambda t: t.update({next(k for k in t if k.endswith("lora_up.weight")): np.ones((32, 3), "float32")}),
     "disagree on the rank"),
    (lambda t: t.update({next(k for k in t if k.endswith("alpha")): np.ones(3, "float32")}), "expected one number"),
    (lambda t: t.update({next(k for k in t if k.endswith("alpha")): np.array(True)}), "expected floating point"),
])
def test_bad_values(stack, tmp_path, change, match):
    tensors = kohya_pair(Q, (4, 32), (32, 4), alpha=1)
    change(tensors)
    refused(stack, write(tmp_path, tensors), match)


def test_one_bad_module_among_many_changes_nothing(stack, tmp_path):
    """The kohya fixture (about 200 modules) plus one that does not fit: nothing is merged."""
    tensors = load_file(KOHYA)
    tensors.update(kohya_pair(K2, (4, 768), (32, 4)))
    refused(stack, write(tmp_path, tensors), r"does not fit")


def test_same_module_twice(stack, tmp_path):
    tensors = {**kohya_pair(Q, (4, 32), (32, 4)),
               **kohya_pair("input_blocks.1.1.transformer_blocks.0.attn1.to_q", (4, 32), (32, 4))}
    refused(stack, write(tmp_path, tensors), "both update unet")


@pytest.mark.parametrize("meta, match", [
    ({"unet.r": 8}, r"metadata gives .* rank 8, its lora_A has rank 4"),
    ({"unet.r": 4, "unet.alpha_pattern": {"to_.*": 2}}, "is a regular expression"),
    ({"unet.r": 4, "unet.lora_alpha": "eight"}, "is not a finite number"),
])
def test_bad_peft_metadata(stack, tmp_path, meta, match):
    tensors = {f"unet.{Q}.lora_A.weight": np.ones((4, 32), "float32"), f"unet.{Q}.lora_B.weight": np.ones((32, 4), "float32")}
    refused(stack, write(tmp_path, tensors, metadata={"lora_adapter_metadata": json.dumps(meta)}), match)
    refused(stack, write(tmp_path, tensors, "j.safetensors", metadata={"lora_adapter_metadata": "{not json"}),
            "not valid JSON")


def test_non_finite_merge_in_float16_is_refused(tmp_path, fp16_parts):
    from diffusion_tf.state_dict import get_state_dict

    parts = fp16_parts
    before = get_state_dict(parts["unet"])
    stack = LoraStack({"unet": parts["unet"]})
    good = {**kohya_pair(CONV, (2, 32, 3, 3), (64, 2, 1, 1), alpha=1), **kohya_pair(Q, (4, 32), (32, 4), seed=1)}
    path = write(tmp_path, good)
    name = stack.load(path, 1.0)
    merged = get_state_dict(parts["unet"])
    with pytest.raises(LoraError, match="non-finite values"):
        stack.set_scale(name, 1e9)  # overflows float16: the merge is refused and the earlier one stays
    after = get_state_dict(parts["unet"])
    assert all(np.array_equal(merged[k], after[k]) for k in merged)
    stack.unload_all()
    after = get_state_dict(parts["unet"])
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_failure_while_assigning_rolls_back(stack, tmp_path, monkeypatch):
    """An exception in the middle of the assignments restores what was assigned already."""
    import diffusion_tf.lora.stack as stack_module

    first = stack.load(write(tmp_path, kohya_pair(CONV, (2, 32, 3, 3), (64, 2, 1, 1), alpha=1), "a.safetensors"))
    merged = torch_weight(stack, "unet", CONV)
    calls = []
    real = stack_module._our_layout_delta

    def failing(update, scale):
        calls.append(update)
        if len(calls) == 40:
            raise RuntimeError("boom")
        return real(update, scale)

    monkeypatch.setattr(stack_module, "_our_layout_delta", failing)
    with pytest.raises(RuntimeError, match="boom"):
        stack.load(KOHYA, 0.7)
    assert len(calls) >= 40
    monkeypatch.setattr(stack_module, "_our_layout_delta", real)
    assert [e.name for e in stack.entries] == [first]
    np.testing.assert_array_equal(torch_weight(stack, "unet", CONV), merged)
    stack.remove(first)
    assert_unchanged(stack)


def test_torch_delta_layouts():
    from diffusion_tf.lora.formats import Update

    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((3, 5, 3, 3)).astype("float32"), rng.standard_normal((7, 3, 1, 1)).astype("float32")
    delta = torch_delta(Update("unet", "dotted", "x", down, up, None, 0.5, ()))
    np.testing.assert_allclose(delta, 0.5 * np.einsum("or,rikl->oikl", up[:, :, 0, 0], down), atol=1e-6)



def test_peft_dora_rule(stack, tmp_path):
    """PEFT DoRA: W = W0 + (c - 1) W0 + c s dW, c = m / ||W0 + s dW|| per output (peft's norm), here for a
    3x3 convolution (the norm over inputs and kernel); a magnitude of the wrong size is refused."""
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((2, 32, 3, 3)).astype("float32") * 0.1, rng.standard_normal((64, 2, 1, 1)).astype("float32") * 0.1
    m = rng.uniform(0.5, 2, (1, 64, 1, 1)).astype("float32")
    tensors = {f"unet.{CONV}.lora_A.weight": a, f"unet.{CONV}.lora_B.weight": b, f"unet.{CONV}.lora_magnitude_vector": m}
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "unet.use_dora": True}
    stack.load(write(tmp_path, tensors, metadata={"lora_adapter_metadata": json.dumps(meta)}), 0.5)
    w0 = stack.before["unet", CONV + ".weight"]
    dw = 0.5 * 2 * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    v = w0 + dw
    expected = m.reshape(64, 1, 1, 1) / np.sqrt((v.astype("float64") ** 2).sum(axis=(1, 2, 3), keepdims=True)) * v
    np.testing.assert_allclose(torch_weight(stack, "unet", CONV), expected, rtol=0, atol=2e-6)
    stack.unload_all()
    tensors[f"unet.{CONV}.lora_magnitude_vector"] = m[:, :32]
    refused(stack, write(tmp_path, tensors, "bad.safetensors"), "DoRA needs one magnitude per output")
