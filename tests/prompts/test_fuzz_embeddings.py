"""Fuzzing the textual-inversion reader (`diffusion_tf.prompts.textual_inversion.read_embedding`), as
tests/convert/test_fuzz_readers.py fuzzes the checkpoint readers: every file gives either an
embedding (float32 [n, D], finite) or an EmbeddingError (a ValueError) naming the file; nothing
else escapes and nothing in a file runs."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import save_file

from diffusion_tf.prompts.textual_inversion import EmbeddingError, read_embedding
from support.torch_format import save_torch_zip

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "prompts")
SEEDS = {name: open(os.path.join(FIXTURES, name), "rb").read() for name in ("mystyle.pt", "learned_embeds.safetensors")}
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check(path):
    try:
        token, vectors = read_embedding(str(path))
    except EmbeddingError as e:
        assert os.path.basename(str(path)) in str(e)
        return "refused"
    assert token is None or isinstance(token, str)
    assert vectors and all(v.dtype == np.float32 and v.ndim == 2 and v.shape[0] >= 1 and np.isfinite(v).all()
                           for v in vectors.values())
    return "accepted"


@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)), edits=st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
    min_size=1, max_size=4))
def test_byte_mutations_of_real_embeddings(tmp_path_factory, name, edits):
    data = bytearray(SEEDS[name])
    for where, byte, op in edits:
        i = min(int(where * len(data)), len(data) - 1)
        if op == "set":
            data[i] = byte
        elif op == "insert":
            data.insert(i, byte)
        elif len(data) > 1:
            del data[i]
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(bytes(data))
    _check(path)


_ARRAYS = st.builds(
    lambda shape, kind, fill: np.full(shape, fill, dtype=kind),
    st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
    st.sampled_from(["float32", "float16", "int64", "uint8"]),
    st.sampled_from([0.0, 1.5, np.nan, np.inf, -2.0]),
)
_KEYS = st.sampled_from(["emb_params", "clip_l", "clip_g", "<tok>", "string_to_param", "name", "x"])


@FUZZ
@given(tensors=st.dictionaries(_KEYS, _ARRAYS, min_size=1, max_size=3), torch_zip=st.booleans())
def test_structured_files_from_the_embedding_key_vocabulary(tmp_path_factory, tensors, torch_zip):
    folder = tmp_path_factory.mktemp("fuzz")
    if torch_zip:
        path = save_torch_zip(tensors, str(folder / "e.pt"), wrap_in_state_dict=False)
    else:
        path = folder / "e.safetensors"
        save_file(tensors, str(path))
    _check(path)


@pytest.mark.parametrize("contents", [b"", b"\x00" * 7, b"not a zip", b"PK\x03\x04garbage"])
def test_tiny_and_garbage_files_are_refused(tmp_path, contents):
    for ext in (".pt", ".safetensors", ".bin"):
        path = tmp_path / f"e{ext}"
        path.write_bytes(contents)
        assert _check(path) == "refused"
