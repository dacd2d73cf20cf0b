"""weights_port.safetensors_reader: strict parsing of hand-built .safetensors files."""
import json
import struct

import numpy as np
import pytest

from weights_port.checkpoint import read_checkpoint
from weights_port.errors import CheckpointError
from weights_port.safetensors_reader import read_safetensors, read_safetensors_metadata

_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
       "I8": "i1", "U8": "u1", "BOOL": "?"}


def _write(path, header, data=b"", header_len=None):
    """header: dict (JSON-encoded here), str or bytes (written as is)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def _file(path, tensors, metadata=None, pad=True):
    """Our little writer: tensors = {name: (dtype, shape, raw bytes)}."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header)
    if pad:  # the real writer pads the header with spaces to a multiple of 8
        text += " " * (-len(text) % 8)
    return _write(path, text, data)


def _arrays():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3))
    return {dt: (x * 50).astype(np.dtype(_NP[dt]).newbyteorder("=")) if dt != "BOOL" else x > 0
            for dt in _NP}


def test_round_trip_every_dtype(tmp_path):
    arrays = _arrays()
    bf16_bits = np.array([[0x3F80, 0xC020, 0x0000], [0x7F7F, 0x3E20, 0x8000]], np.uint16)
    tensors = {dt: (dt, a.shape, a.astype(_NP[dt]).tobytes()) for dt, a in arrays.items()}
    tensors["BF16"] = ("BF16", (2, 3), bf16_bits.astype("<u2").tobytes())
    tensors["scalar"] = ("F32", (), np.float32(4.5).tobytes())
    tensors["empty"] = ("F16", (0, 4), b"")
    path = _file(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})

    got = read_safetensors(path)
    assert list(got) == list(tensors)
    for dt, a in arrays.items():
        assert got[dt].dtype == a.dtype and got[dt].shape == a.shape, dt
        np.testing.assert_array_equal(got[dt], a, err_msg=dt)
    assert got["BF16"].dtype == np.float32
    np.testing.assert_array_equal(got["BF16"], (bf16_bits.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(got["BF16"][0], [1.0, -2.5, 0.0])
    assert got["scalar"].shape == () and got["scalar"] == 4.5
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == np.float16
    assert all(v.flags.writeable and v.flags.c_contiguous for v in got.values())

    path.unlink()  # arrays are copies, independent of the file
    assert got["F32"].sum() == arrays["F32"].sum()


def test_metadata_only(tmp_path):
    path = _file(tmp_path / "m.safetensors", {"w": ("F16", (3, 4), b"\0" * 24), "b": ("BF16", (4,), b"\0" * 8)},
                 metadata={"format": "pt"})
    meta = read_safetensors_metadata(path)
    assert meta == {"w": {"dtype": "F16", "shape": (3, 4), "data_offsets": (0, 24)},
                    "b": {"dtype": "BF16", "shape": (4,), "data_offsets": (24, 32)}}


def test_read_checkpoint_dispatches(tmp_path):
    path = _file(tmp_path / "m.SafeTensors", {"w": ("F32", (2,), np.ones(2, "<f4").tobytes())})
    np.testing.assert_array_equal(read_checkpoint(path)["w"], [1, 1])


def test_empty_file_with_no_tensors(tmp_path):
    assert read_safetensors(_write(tmp_path / "e.safetensors", "{}")) == {}


def _entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


@pytest.mark.parametrize("header, data, message", [
    # sizes and offsets
    ({"a": _entry(offs=(0, 8)), "b": _entry(offs=(4, 12))}, b"\0" * 12, r"tensor 'b' \(bytes 4..12\) overlaps 'a'"),
    ({"a": _entry(offs=(0, 8)), "b": _entry(offs=(12, 20))}, b"\0" * 20, "'b'.*leaves a gap after 'a'"),
    ({"a": _entry(offs=(4, 12))}, b"\0" * 12, "'a'.*leaves a gap after the start of the buffer"),
    ({"a": _entry(shape=(3,), offs=(0, 8))}, b"\0" * 8, r"'a'.*span 8 bytes but F32 \[3\] needs 12"),
    ({"a": _entry()}, b"\0" * 8 + b"garbage", "ends at byte 8.*buffer is 15 bytes.*trailing garbage"),
    ({"a": _entry()}, b"\0" * 4, "buffer is 4 bytes.*file truncated"),
    ({"a": _entry(offs=(8, 0))}, b"", r"data_offsets \[8, 0\] must be"),
    ({"a": _entry(offs=(0, 8.0))}, b"\0" * 8, "data_offsets .* must be"),
    # entry structure
    ({"a": _entry(dtype="F8_E4M3")}, b"\0" * 8, "tensor 'a': unsupported dtype 'F8_E4M3'"),
    ({"a": _entry(dtype="C64")}, b"\0" * 8, "tensor 'a': unsupported dtype 'C64'"),
    ({"a": _entry(shape=(-2,))}, b"\0" * 8, r"tensor 'a': shape \[-2\]"),
    ({"a": _entry(shape=(True,))}, b"\0" * 8, r"tensor 'a': shape \[true\]|shape \[True\]"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'a': entry must be an object with exactly"),
    ({"a": [1, 2]}, b"", "tensor 'a': entry must be"),
    ({"__metadata__": {"k": 1}}, b"", "'__metadata__' must be an object of str -> str"),
    # header as a whole
    ("[1, 2]", b"", "header must be a JSON object, got list"),
    ("{not json", b"", "header is not valid UTF-8 JSON"),
    ('{"a": 1} trailing', b"", "header is not valid UTF-8 JSON"),
    (b"\xff\xfe{}", b"", "header is not valid UTF-8 JSON"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, "duplicate name 'a'"),
])
def test_malformed(tmp_path, header, data, message):
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{message}"):
        read_safetensors(path)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_metadata(path)


def test_huge_header_length_refused_before_reading(tmp_path):
    path = _write(tmp_path / "h.safetensors", b"{}", header_len=200 * 1024 * 1024)
    with pytest.raises(CheckpointError, match="header length 209715200 exceeds the 104857600-byte limit"):
        read_safetensors(path)
    path = _write(tmp_path / "p.safetensors", b"{}", header_len=1000)
    with pytest.raises(CheckpointError, match="header length 1000 runs past the end of the file"):
        read_safetensors(path)
    (tmp_path / "s.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors(tmp_path / "s.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="x.safetensors.*does not exist"):
        read_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors: cannot read"):
        read_safetensors(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- live (safetensors)
@pytest.mark.live
def test_live_safetensors_numpy(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors not installed")
    arrays = {k: np.ascontiguousarray(v) for k, v in _arrays().items()}
    arrays["empty"] = np.zeros((0, 2), np.float32)
    st_numpy.save_file(arrays, tmp_path / "n.safetensors", metadata={"a": "b"})
    got = read_safetensors(tmp_path / "n.safetensors")
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    ref = st_numpy.load_file(tmp_path / "n.safetensors")
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.live
def test_live_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    st_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    tensors = {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "i64": torch.arange(4),
               "b": x > 0, "t": x.t().contiguous()}
    st_torch.save_file(tensors, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        want = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    meta = read_safetensors_metadata(tmp_path / "t.safetensors")
    assert meta["bf16"]["dtype"] == "BF16" and meta["t"]["shape"] == (5, 3)
