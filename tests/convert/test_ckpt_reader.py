"""weights_port.ckpt_reader: torch zip checkpoints read without torch, and refused when unsafe."""
import os
import pickle

import numpy as np
import pytest

from support.torch_format import (
    COMMAND_PAYLOADS, LIGHTNING_MODEL_CHECKPOINT, Global, Persistent, Raw, Reduce, TorchTensor,
    bfloat16_tensor, command_payload, hostile_big_endian, hostile_command_file,
    hostile_dotdot_entry, hostile_offset_beyond, hostile_short_storage, hostile_two_data_pkl,
    legacy_pickle_file, module_state_dict, pickle_bytes, save_torch_zip, to_bfloat16_bits,
    torch_zip_entries, write_zip,
)
from weights_port.checkpoint import read_checkpoint
from weights_port.ckpt_reader import ALLOWED_GLOBALS, load_ckpt, read_ckpt
from weights_port.errors import CheckpointError


def _expected(v):
    return v.numpy() if isinstance(v, TorchTensor) else v


def _assert_same(got, tensors):
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        want = _expected(v)
        assert got[k].dtype == want.dtype, k
        assert got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)
        assert got[k].flags.c_contiguous and got[k].flags.writeable, k


def _tensors():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    storage = np.arange(24, dtype=np.float32)
    return {
        "f32": f32,
        "f16": f32.astype(np.float16),
        "f64": f32.astype(np.float64)[0],
        "bf16": bfloat16_tensor([[1.0, -2.5], [0.15625, 3.0e38]]),
        "i64": np.arange(-3, 4, dtype=np.int64),
        "i32": np.array([-(2 ** 31), 2 ** 31 - 1], np.int32),
        "i16": np.array([-7, 7], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        # three tensors on one storage: a transposed view and two offset slices
        "transposed": TorchTensor(storage, 0, (4, 3), (1, 4)),
        "slice_a": TorchTensor(storage, 12, (2, 3)),
        "slice_b": TorchTensor(storage, 18, (6,), (1,)),
        "param": TorchTensor(np.ones(3, np.float32), 0, (3,), parameter=True),
    }


@pytest.mark.parametrize("wrap", [True, False])
@pytest.mark.parametrize("archive", ["archive", "v1-5-pruned"])
def test_round_trip(tmp_path, wrap, archive):
    tensors = _tensors()
    path = save_torch_zip(tensors, tmp_path / "m.ckpt", wrap_in_state_dict=wrap, archive_name=archive)
    got = read_ckpt(path)
    _assert_same(got, tensors)
    np.testing.assert_array_equal(got["transposed"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(got["slice_b"], np.arange(18, 24))
    got["slice_a"][:] = -1  # copies: no aliasing between tensors of one storage
    assert got["transposed"].min() == 0


def test_bfloat16_is_widened_to_float32(tmp_path):
    vals = np.array([1.0, -2.5, 0.15625, 1 / 3], np.float32)
    bits = to_bfloat16_bits(vals)
    got = read_ckpt(save_torch_zip({"b": bfloat16_tensor(vals)}, tmp_path / "b.pt"))["b"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(got, vals, rtol=2 ** -8)


def test_deflated_zip_and_module_state_dict(tmp_path):
    # nn.Module.state_dict() pickles an OrderedDict with BUILD {'_metadata': ...}
    tensors = {"0.weight": np.ones((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}
    entries = torch_zip_entries(module_state_dict(tensors), wrap_in_state_dict=False)
    got = read_ckpt(write_zip(tmp_path / "d.bin", entries, compress=True))
    _assert_same(got, tensors)


def test_lightning_wrapper(tmp_path):
    numpy_scalar = Raw(pickle.dumps(np.float64(0.25), protocol=2)[2:-1])  # numpy's own opcodes
    old_numpy_scalar = Reduce(Global("numpy.core.multiarray", "scalar"), (
        Reduce(Global("numpy", "dtype"), ("i8", False, True), state=(3, "<", None, None, None, -1, -1, 0)),
        np.int64(7).tobytes()))
    extra = {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {LIGHTNING_MODEL_CHECKPOINT: {
            "best_model_score": numpy_scalar, "current_score": old_numpy_scalar,
            "best_model_path": "/logs/last.ckpt", "monitor": None}},
        "optimizer_states": [{"state": {0: {"exp_avg": np.ones(4, np.float32)}}}],
        "lr_schedulers": [],
    }
    tensors = {"model.diffusion_model.out.2.bias": np.arange(4, dtype=np.float16),
               "first_stage_model.decoder.conv_out.weight": np.ones((3, 2, 1, 1), np.float32)}
    path = save_torch_zip(tensors, tmp_path / "sd.ckpt", extra=extra)
    _assert_same(read_ckpt(path), tensors)

    tree = load_ckpt(path)
    assert tree["global_step"] == 470000 and tree["epoch"] == 6
    (key, cb), = tree["callbacks"].items()
    assert "ModelCheckpoint" in repr(key)
    assert cb["best_model_score"] == 0.25 and cb["current_score"] == 7
    np.testing.assert_array_equal(tree["optimizer_states"][0]["state"][0]["exp_avg"], np.ones(4))


def test_read_checkpoint_dispatches(tmp_path):
    tensors = {"w": np.ones(2, np.float32)}
    for ext in (".ckpt", ".pt", ".pth", ".bin", ".PTH"):
        _assert_same(read_checkpoint(save_torch_zip(tensors, tmp_path / f"m{ext}")), tensors)
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint extension '\.h5'.*\.safetensors"):
        read_checkpoint(tmp_path / "m.h5")
    with pytest.raises(CheckpointError, match="nope.ckpt.*does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_allow_list_is_small_and_explicit():
    assert "torch._utils._rebuild_tensor_v2" in ALLOWED_GLOBALS
    assert "collections.OrderedDict" in ALLOWED_GLOBALS
    assert not any(k.startswith(("os.", "posix.", "subprocess.", "builtins.e")) for k in ALLOWED_GLOBALS)


# ----------------------------------------------------------------------------- hostile files
@pytest.mark.parametrize("kind", COMMAND_PAYLOADS)
def test_command_payload_is_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = hostile_command_file(tmp_path / "evil.ckpt", kind, marker)
    for reader in (read_ckpt, load_ckpt, read_checkpoint):
        with pytest.raises(CheckpointError, match=rf"evil\.ckpt.*refusing global '{kind}'"):
            reader(path)
    assert not marker.exists()
    # control: the same payload really does run under plain pickle
    pickle.loads(pickle_bytes(command_payload(kind, marker)))
    assert marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_pickle_payload_stack_global(tmp_path, protocol):
    marker = tmp_path / "pwned"
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    entries["archive/data.pkl"] = pickle.dumps({"w": _Evil(marker)}, protocol=protocol)
    with pytest.raises(CheckpointError, match=r"refusing global '(posix|os)\.system'"):
        read_ckpt(write_zip(tmp_path / "evil.pt", entries))
    assert not marker.exists()


@pytest.mark.parametrize("glob", [
    Global("torch.nn.modules.linear", "Linear"),
    Global("torch", "ComplexFloatStorage"),
    Global("numpy.core.multiarray", "_reconstruct"),
    Global("builtins", "getattr"),
    Global("__builtin__", "eval"),
])
def test_other_globals_refused(tmp_path, glob):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)}, extra={"x": Reduce(glob, ())})
    with pytest.raises(CheckpointError, match=rf"refusing global '{glob.module}\.{glob.name}'"):
        read_ckpt(write_zip(tmp_path / "g.pt", entries))


@pytest.mark.parametrize("node, message", [
    (Reduce(Global("numpy", "dtype"), ("O", False, True)), r"numpy.dtype\('O'\) is not allowed"),
    (Reduce(Global("_codecs", "encode"), ("x", "rot13")), "_codecs.encode only allowed"),
    (Reduce(Global("numpy._core.multiarray", "scalar"),
            (Reduce(Global("numpy", "dtype"), ("f8", False, True)), b"\0")), "numpy scalar needs"),
    (Reduce(Global("torch._utils", "_rebuild_parameter"), ("not a tensor", False, None)),
     "parameter rebuild expects a tensor"),
    (Reduce(Global("torch._utils", "_rebuild_tensor_v2"), ("x", 0, (1,), (1,), False, None)),
     "tensor rebuild expects a storage"),
    (Reduce(Global("torch", "FloatStorage"), ()), "constructing torch.FloatStorage"),
])
def test_stand_ins_validate_arguments(tmp_path, node, message):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)}, extra={"x": node})
    with pytest.raises(CheckpointError, match=rf"a\.pt: .*{message}"):
        load_ckpt(write_zip(tmp_path / "a.pt", entries))


def test_short_storage(tmp_path):
    with pytest.raises(CheckpointError, match=r"storage '0'.*'archive/data/0' has 8 bytes.*needs 24"):
        read_ckpt(hostile_short_storage(tmp_path / "s.ckpt"))


def test_offset_beyond_storage(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(offset 3.*addresses element 4.*only 4"):
        read_ckpt(hostile_offset_beyond(tmp_path / "o.ckpt"))


@pytest.mark.parametrize("tensor, message", [
    (TorchTensor(np.arange(4, dtype=np.float32), 0, (2,), (-1,)), r"stride \(-1,\) must be"),
    (TorchTensor(np.arange(4, dtype=np.float32), -1, (2,)), "storage_offset -1 must be"),
    (TorchTensor(np.arange(4, dtype=np.float32), 0, (2, 2), (1,)), "different lengths"),
    (TorchTensor(np.arange(4, dtype=np.float32), 0, (2 ** 40,), (0,)), "far more than its storage"),
])
def test_bad_tensor_geometry(tmp_path, tensor, message):
    with pytest.raises(CheckpointError, match=message):
        read_ckpt(save_torch_zip({"w": tensor}, tmp_path / "t.pt"))


def test_storage_numel_larger_than_entry(tmp_path):
    t = TorchTensor(np.arange(4, dtype=np.float32), 0, (4,), storage_numel=1000)
    with pytest.raises(CheckpointError, match="storage '0'.*16 bytes.*needs 4000"):
        read_ckpt(save_torch_zip({"w": t}, tmp_path / "t.pt"))


def test_missing_storage_entry(tmp_path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    del entries["archive/data/0"]
    with pytest.raises(CheckpointError, match="'archive/data/0' is missing"):
        read_ckpt(write_zip(tmp_path / "m.pt", entries))


def test_two_data_pkl(tmp_path):
    with pytest.raises(CheckpointError, match=r"exactly one '<folder>/data.pkl'.*found 2"):
        read_ckpt(hostile_two_data_pkl(tmp_path / "two.ckpt"))


@pytest.mark.parametrize("name", ["archive/../evil.txt", "/etc/evil", "archive\\evil", "../x"])
def test_unsafe_entry_names(tmp_path, name):
    with pytest.raises(CheckpointError, match="unsafe zip entry name"):
        read_ckpt(hostile_dotdot_entry(tmp_path / "dd.ckpt", name))


def test_entry_outside_folder_and_duplicates(tmp_path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"outside the checkpoint folder 'archive'.*'stray.txt'"):
        read_ckpt(write_zip(tmp_path / "a.pt", {**entries, "stray.txt": b""}))
    pairs = list(entries.items()) + [("archive/data/0", b"\0" * 8)]
    with pytest.warns(UserWarning):
        write_zip(tmp_path / "b.pt", pairs)
    with pytest.raises(CheckpointError, match=r"duplicate zip entries \['archive/data/0'\]"):
        read_ckpt(tmp_path / "b.pt")


def test_big_endian(tmp_path):
    with pytest.raises(CheckpointError, match=r"byteorder.*'big'.*only 'little'"):
        read_ckpt(hostile_big_endian(tmp_path / "be.ckpt"))


def test_legacy_and_non_zip_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"old\.pt.*not a zip-format PyTorch checkpoint.*legacy"
                                              r".*torch\.save.*\.safetensors"):
        read_ckpt(legacy_pickle_file(tmp_path / "old.pt"))
    (tmp_path / "junk.ckpt").write_bytes(b"hello world")
    with pytest.raises(CheckpointError, match="not a zip-format PyTorch checkpoint"):
        read_ckpt(tmp_path / "junk.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(CheckpointError, match="bad zip"):
        read_ckpt(tmp_path / "trunc.ckpt")


def test_top_level_not_a_dict_and_malformed_pickle(tmp_path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    entries["archive/data.pkl"] = pickle_bytes([1, 2])
    with pytest.raises(CheckpointError, match="top-level object of data.pkl is list, expected a dict"):
        read_ckpt(write_zip(tmp_path / "l.pt", entries))
    entries["archive/data.pkl"] = pickle_bytes({"w": 1})[:-3]
    with pytest.raises(CheckpointError, match="malformed archive/data.pkl"):
        read_ckpt(write_zip(tmp_path / "t.pt", entries))
    entries["archive/data.pkl"] = pickle_bytes({"state_dict": 3})
    with pytest.raises(CheckpointError, match="'state_dict' is int"):
        read_ckpt(write_zip(tmp_path / "s.pt", entries))


def test_bad_persistent_ids(tmp_path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    for pid, msg in [(("module", "x"), "unsupported persistent id"),
                     (("storage", "torch.FloatStorage", "0", "cpu", 2), "not a supported storage type"),
                     (("storage", Global("torch", "FloatStorage"), "0", "cpu", -2), "malformed persistent id")]:
        entries["archive/data.pkl"] = pickle_bytes({"w": Persistent(pid)})
        with pytest.raises(CheckpointError, match=msg):
            read_ckpt(write_zip(tmp_path / "p.pt", entries))


# ----------------------------------------------------------------------------- live (torch)
def _torch():
    return pytest.importorskip("torch", reason="torch not installed: live comparison skipped")


def _as_numpy(t):
    t = t.detach()
    return (t.float() if t.dtype == _torch().bfloat16 else t).numpy()


@pytest.mark.live
def test_live_torch_loads_our_files(tmp_path):
    torch = _torch()
    tensors = _tensors()
    for wrap in (False, True):
        path = save_torch_zip(tensors, tmp_path / f"ours{wrap}.pt", wrap_in_state_dict=wrap,
                              extra={"global_step": 12} if wrap else None)
        loaded = torch.load(path, weights_only=True)
        sd = loaded["state_dict"] if wrap else loaded
        assert set(sd) == set(tensors)
        for k, v in tensors.items():
            if k == "bf16":
                assert sd[k].dtype == torch.bfloat16
            np.testing.assert_array_equal(_as_numpy(sd[k]), _expected(v), err_msg=k)
        assert sd["transposed"].stride() == (1, 4)
        assert sd["slice_a"].untyped_storage().data_ptr() == sd["transposed"].untyped_storage().data_ptr()
        if wrap:
            assert loaded["global_step"] == 12


@pytest.mark.live
def test_live_read_torch_save(tmp_path):
    torch = _torch()
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    sd = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double()[1:],
        "t": base.t(), "row": base[2], "col": base[:, 3], "i64": torch.arange(-5, 5),
        "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(3, dtype=torch.uint8),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "b": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 2), "expanded": torch.arange(5).expand(1, -1),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(sd, tmp_path / "sd.pt")
    got = read_ckpt(tmp_path / "sd.pt")
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = _as_numpy(v)
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4),
                                torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    torch.save({"state_dict": model.state_dict(), "global_step": 3, "epoch": 1}, tmp_path / "m.ckpt")
    got = read_ckpt(tmp_path / "m.ckpt")
    ref = model.state_dict()
    assert list(got) == list(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], _as_numpy(v), err_msg=k)

    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        read_ckpt(tmp_path / "legacy.pt")


def test_build_cannot_rewrite_a_validated_tensor(tmp_path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    node = pickle_bytes({"w": Reduce(
        Global("torch._utils", "_rebuild_tensor_v2"),
        (Persistent(("storage", Global("torch", "FloatStorage"), "0", "cpu", 2)), 0, (2,), (1,), False, None),
        state=(None, {"stride": (-1000000,)}))})
    entries["archive/data.pkl"] = node
    with pytest.raises(CheckpointError, match="BUILD on a TensorRef is not allowed"):
        read_ckpt(write_zip(tmp_path / "b.pt", entries))


def test_load_ckpt_handles_shared_and_cyclic_containers(tmp_path):
    cyclic = Raw(b"]q\x00h\x00a")  # EMPTY_LIST, BINPUT 0, BINGET 0, APPEND: a list containing itself
    entries = torch_zip_entries({"w": np.ones(2, np.float32)}, extra={"loop": cyclic})
    tree = load_ckpt(write_zip(tmp_path / "c.pt", entries))
    assert tree["loop"][0] is tree["loop"]
    np.testing.assert_array_equal(tree["state_dict"]["w"], [1, 1])
