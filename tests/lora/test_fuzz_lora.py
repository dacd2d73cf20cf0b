"""Property-based fuzzing of LoRA loading (as tests/convert/test_fuzz_readers.py fuzzes the readers).

Every generated file, with every generated scale, must give one of two outcomes:

* accepted: `LoraStack.load` returns a name; `unload_all()` then restores every weight bit for bit;
* refused: `LoraError` (a ValueError) whose message names the file or the bad scale, and every weight
  is bit for bit what it was.

Nothing else may escape (KeyError, IndexError, TypeError, numpy errors, a ValueError that is not a
LoraError, ...). Generators: (a) files assembled from the vocabulary of LoRA keys (kohya, PEFT, the old
processor layout, other algorithms' suffixes, full-checkpoint keys, junk) with real and wrong module names,
shapes that fit or do not, dtypes including BOOL and integers, NaN/Inf values, random adapter metadata
JSON; (b) byte-level mutations of a valid LoRA file. Small example counts (derandomized): a few seconds;
`DIFFUSION_TF_FUZZ_EXAMPLES=N`: N cases per test with a random seed.
"""

import collections
import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from diffusion_tf.lora import LoraError, LoraStack

pytestmark = pytest.mark.xdist_group("lora")

_LONG = int(os.environ.get("DIFFUSION_TF_FUZZ_EXAMPLES", "0") or 0)  # N: N cases per test, random seed
_SETTINGS = settings(derandomize=not _LONG, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                            HealthCheck.data_too_large])
_DIR = tempfile.mkdtemp(prefix="diffusion-tf-lora-fuzz-")
_STATS = collections.Counter()  # (test, outcome) -> cases; printed with -s

MODULES = [  # (module path, torch weight shape) of the tiny model, and a few that are not there
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (32, 32)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", (32, 32)),
    ("down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1)),
    ("down_blocks.1.resnets.0.conv1", (64, 32, 3, 3)),
    ("down_blocks.1.resnets.0.conv_shortcut", (64, 32, 1, 1)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_v", (32, 32)),
    ("text_model.encoder.layers.0.self_attn.q_proj", (32, 32)),
    ("text_model.encoder.layers.2.mlp.fc1", (64, 32)),
    ("down_blocks.9.attentions.0.proj_in", (32, 32)),
    ("model.diffusion_model.input_blocks.0.0", (32, 4, 3, 3)),
    ("", (4, 4)),
]
KOHYA_SUFFIXES = ["lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "dora_scale", "hada_w1_a",
                  "lokr_w1", "on_input", "diff", "weight", "bias", "lora_up.bias", "x"]
PEFT_SUFFIXES = ["lora_A.weight", "lora_B.weight", "alpha", "lora_magnitude_vector", "lora_B.bias",
                 "processor.to_q_lora.down.weight", "processor.to_q_lora.up.weight", "lora.down.weight",
                 "lora.up.weight", "lora_linear_layer.up.weight", "weight"]
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I32": "<i4", "U8": "u1", "BOOL": "u1", "F64": "<f8"}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz_lora: " + ", ".join(f"{t} {o}: {n}" for (t, o), n in sorted(_STATS.items())))


@pytest.fixture(scope="module")
def stack(tiny_networks):
    stack = LoraStack(tiny_networks)
    stack.variables = [v for m in stack.models.values() for v in m.weights]
    stack.before = [np.array(v.numpy(), copy=True) for v in stack.variables]
    return stack


def _unchanged(stack):
    for var, before in zip(stack.variables, stack.before):
        assert np.array_equal(var.numpy(), before), f"{var.path} changed"


def _run(stack, path, scale):
    try:
        stack.load(path, scale)
        outcome = "accepted"
    except LoraError as e:
        text = str(e)
        assert os.path.basename(path) in text or "scale" in text, text
        assert len(text) < 20000
        outcome = "refused"
    stack.unload_all()
    assert stack.entries == []
    _unchanged(stack)
    return outcome


def _safetensors_bytes(entries, metadata=None):
    header, chunks, offset = {}, [], 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _write(name, data):
    path = os.path.join(_DIR, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _tensor(draw, shape):
    dtype = draw(st.sampled_from(["F32"] * 20 + list(DTYPES)))
    n = int(np.prod(shape)) if shape else 1
    kind = draw(st.sampled_from(["normal"] * 24 + ["nan", "inf", "zero", "huge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    values = {"normal": rng.standard_normal(n) * 0.1, "nan": np.full(n, np.nan), "inf": np.full(n, -np.inf),
              "zero": np.zeros(n), "huge": np.full(n, 3e38)}[kind]
    if dtype == "BF16":
        data = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    elif dtype in ("I32", "U8", "BOOL"):
        data = np.nan_to_num(values * 10).clip(0, 1 if dtype == "BOOL" else 100).astype(DTYPES[dtype]).tobytes()
    else:
        with np.errstate(over="ignore"):
            data = values.astype(DTYPES[dtype]).tobytes()
    return dtype, data


@st.composite
def lora_files(draw):
    entries, names = [], set()
    style = draw(st.sampled_from(["kohya", "peft", "mixed"]))
    for module, shape in draw(st.lists(st.sampled_from(MODULES[:9]), max_size=4, unique=True)):  # valid modules
        te = module.startswith("text_model")
        kernel = tuple(shape[2:])
        rank = draw(st.sampled_from([1, 2, 4]))
        down, up = (rank, shape[1]) + kernel, (shape[0], rank) + ((1, 1) if kernel else ())
        if style != "peft":
            base = ("lora_te_" if te else "lora_unet_") + module.replace(".", "_")
            pair = [(f"{base}.lora_down.weight", down), (f"{base}.lora_up.weight", up)]
            if draw(st.booleans()):
                pair.append((f"{base}.alpha", ()))
        else:
            if module.startswith("input_blocks"):
                continue
            base = ("text_encoder." if te else "unet.") + module
            pair = [(f"{base}.lora_A.weight", down), (f"{base}.lora_B.weight", up)]
        for name, tshape in pair:
            names.add(name)
            entries.append((name,) + _as_entry(draw, tshape))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):  # random entries
        module, shape = draw(st.sampled_from(MODULES))
        out, inn = shape[0], shape[1]
        kernel = tuple(shape[2:])
        kohya = style == "kohya" or (style == "mixed" and draw(st.booleans()))
        if kohya:
            prefix = draw(st.sampled_from(["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", ""]))
            base = prefix + module.replace(".", "_")
            suffix = draw(st.sampled_from(KOHYA_SUFFIXES))
        else:
            prefix = draw(st.sampled_from(["unet.", "text_encoder.", "text_encoder_2.", "base_model.model.", ""]))
            base = prefix + module
            suffix = draw(st.sampled_from(PEFT_SUFFIXES))
        rank = draw(st.sampled_from([1, 2, 4]))
        fits = draw(st.booleans())
        if suffix in ("lora_down.weight", "lora_A.weight") or suffix.endswith("down.weight"):
            tshape = (rank, inn) + kernel if fits else (rank, draw(st.sampled_from([0, 3, 768])))
        elif suffix in ("lora_up.weight", "lora_B.weight") or suffix.endswith("up.weight"):
            tshape = (out, rank) + ((1, 1) if kernel else ()) if fits else (draw(st.sampled_from([1, 32, 5])), 4, 2)
        elif suffix == "alpha":
            tshape = () if fits else (draw(st.integers(0, 3)),)
        elif suffix == "lora_mid.weight":
            tshape = (rank, rank) + (kernel or (3, 3))
        else:
            tshape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        name = f"{base}.{suffix}"
        if name in names:
            continue
        names.add(name)
        # the pair of a down factor is usually there too
        entries.append((name,) + _as_entry(draw, tshape))
        if fits and draw(st.booleans()):
            partner = {"lora_down.weight": "lora_up.weight", "lora_A.weight": "lora_B.weight",
                       "processor.to_q_lora.down.weight": "processor.to_q_lora.up.weight",
                       "lora.down.weight": "lora.up.weight"}.get(suffix)
            if partner and f"{base}.{partner}" not in names:
                pshape = (out, rank) + ((1, 1) if kernel else ())
                names.add(f"{base}.{partner}")
                entries.append((f"{base}.{partner}",) + _as_entry(draw, pshape))
    metadata = None
    if draw(st.integers(0, 3)) == 0:
        config = draw(st.dictionaries(
            st.sampled_from(["unet.r", "unet.lora_alpha", "unet.use_rslora", "unet.alpha_pattern", "unet.rank_pattern",
                             "text_encoder.r", "r", "lora_alpha", "junk"]),
            st.one_of(st.integers(-2, 8), st.floats(allow_nan=True), st.booleans(), st.text(max_size=4),
                      st.dictionaries(st.sampled_from(["conv1", "^to_q", "to_.*", "(a+)+$"]), st.integers(0, 8),
                                      max_size=2)),
            max_size=4))
        raw = json.dumps(config) if draw(st.booleans()) else draw(st.text(max_size=10))
        metadata = {"lora_adapter_metadata": raw}
    return entries, metadata


def _as_entry(draw, shape):
    dtype, data = _tensor(draw, shape)
    return dtype, shape, data


SCALES = st.one_of(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3), st.sampled_from([0.0, 1.0, float("nan"), float("inf"), True, "1", None, 1e30]))


@settings(_SETTINGS, max_examples=_LONG or 70)
@given(lora_files(), SCALES)
def test_fuzz_structured(stack, case, scale):
    entries, metadata = case
    path = _write("structured.safetensors", _safetensors_bytes(entries, metadata))
    _STATS["structured", _run(stack, path, scale)] += 1


def _valid_file():
    rng = np.random.default_rng(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    c = "lora_unet_down_blocks_1_resnets_0_conv1"
    tensors = [(f"{q}.lora_down.weight", (4, 32)), (f"{q}.lora_up.weight", (32, 4)), (f"{q}.alpha", ()),
               (f"{c}.lora_down.weight", (2, 32, 3, 3)), (f"{c}.lora_up.weight", (64, 2, 1, 1))]
    entries = [(n, "F32", s, (rng.standard_normal(s) * 0.1).astype("<f4").tobytes()) for n, s in tensors]
    return _safetensors_bytes(entries, {"ss_network_dim": "4"})


_VALID = _valid_file()


@settings(_SETTINGS, max_examples=_LONG or 30)
@given(st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.floats(0, 1),
                          st.integers(0, 255), st.binary(max_size=8)), min_size=1, max_size=3),
       st.sampled_from(["header", "buffer", "anywhere"]))
def test_fuzz_bytes(stack, mutations, region):
    buf = bytearray(_VALID)
    (n,) = struct.unpack("<Q", _VALID[:8])
    lo, hi = {"header": (0, 8 + n), "buffer": (8 + n, len(_VALID)), "anywhere": (0, len(_VALID))}[region]
    for kind, where, value, blob in mutations:
        pos = min(lo + int(where * (hi - lo - 1)), max(len(buf) - 1, 0))
        if kind == "flip" and buf:
            buf[pos] ^= value or 1
        elif kind == "set":
            buf[pos:pos + 1] = bytes([value])
        elif kind == "insert":
            buf[pos:pos] = blob
        elif kind == "delete":
            del buf[pos:pos + 1 + value % 16]
        else:
            del buf[pos:]
    path = _write("mutated.safetensors", bytes(buf))
    _STATS["bytes", _run(stack, path, 0.5)] += 1


def test_the_valid_file_is_accepted(stack):
    assert _run(stack, _write("valid.safetensors", _VALID), 1.0) == "accepted"
