"""save_quantized / load_quantized under faults and hostile folders: an interrupted save leaves the
old checkpoint, never a mixture and never nothing; files of other formats are never removed or
overwritten; shards may not leave the folder; bit flips are caught by the recorded CRC-32;
checkpoints of format version 1 still load, unverified, with one warning."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file as st_save_file

import longcat.quant as lq
from longcat.quant import checkpoint as ckpt

CONFIG = "quantization_config.json"
SHARD_SIZE = "40KB"


def state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert x.dtype == y.dtype and torch.equal(x, y), k


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _shards(folder):
    return sorted(set(json.load(open(os.path.join(folder, CONFIG)))["weight_map"].values()))


@pytest.fixture
def old_new(MiniDiT_cls):
    torch.manual_seed(5)
    old = lq.quantize(MiniDiT_cls(), "int8")
    torch.manual_seed(6)
    new = lq.quantize(MiniDiT_cls(), "fp8")
    return old, new


class Crash(BaseException):
    """An injected fault; with ``crash=True`` no cleanup runs either, as when the process dies."""


def _inject(monkeypatch, where, crash):
    calls = {"shard": 0}
    real_save, real_json = ckpt.save_file, ckpt.write_json_atomic
    if crash:
        monkeypatch.setattr(ckpt, "remove_quietly", lambda path: None)

    def save_file(tensors, filename, metadata=None):
        calls["shard"] += 1
        if where == ("shard", calls["shard"]):
            real_save(dict(list(tensors.items())[:1]), filename, metadata=metadata)
            raise Crash(f"fault at shard {calls['shard']}")
        real_save(tensors, filename, metadata=metadata)

    def write_json_atomic(obj, path):
        if where == ("commit", None):
            if crash:
                with open(ckpt.temporary_name(path), "w") as f:
                    json.dump(obj, f)
            raise Crash("fault at the commit")
        real_json(obj, path)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt, "write_json_atomic", write_json_atomic)


FAULTS = [("shard", 1), ("shard", 2), ("shard", "last"), ("commit", None)]


@pytest.mark.parametrize("crash", [False, True], ids=["exception", "crash"])
@pytest.mark.parametrize("where", FAULTS, ids=["shard-1", "shard-2", "shard-last", "commit"])
def test_interrupted_overwrite_leaves_the_old_checkpoint(tmp_path, MiniDiT_cls, old_new, monkeypatch, where, crash):
    old, new = old_new
    path = str(tmp_path / "q")
    lq.save_quantized(old, path, max_shard_size=SHARD_SIZE)
    n = len(_shards(path))
    assert n >= 3
    if where[1] == "last":
        where = ("shard", n)
    before = _files(path)
    _inject(monkeypatch, where, crash)
    with pytest.raises(Crash):
        lq.save_quantized(new, path, max_shard_size=SHARD_SIZE)
    monkeypatch.undo()
    if not crash:
        assert _files(path) == before, "a failed save removes everything it wrote"
    state_equal(old, lq.load_quantized(path, MiniDiT_cls))
    lq.save_quantized(new, path, max_shard_size=SHARD_SIZE)
    state_equal(new, lq.load_quantized(path, MiniDiT_cls))
    if not crash:
        assert sorted(os.listdir(path)) == sorted(_shards(path) + [CONFIG])
    else:  # only the dying save's temporary files remain (hidden, never read)
        assert all(f.startswith(".") for f in set(os.listdir(path)) - set(_shards(path) + [CONFIG]))


def _other_model(folder):
    """A folder holding another model in the common Hugging Face layout."""
    os.makedirs(folder)
    for i in (1, 2):
        st_save_file({f"w{i}": torch.randn(4, 4)}, os.path.join(folder, f"model-0000{i}-of-00002.safetensors"))
    json.dump({"metadata": {"total_size": 128}, "weight_map": {"w1": "model-00001-of-00002.safetensors",
                                                               "w2": "model-00002-of-00002.safetensors"}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    json.dump({"model_type": "other"}, open(os.path.join(folder, "config.json"), "w"))


def test_saving_beside_another_model_touches_none_of_its_files(tmp_path, MiniDiT_cls, old_new):
    old, new = old_new
    folder = str(tmp_path / "shared")
    _other_model(folder)
    theirs = _files(folder)
    lq.save_quantized(old, folder, max_shard_size=SHARD_SIZE)
    lq.save_quantized(new, folder)  # an overwrite with fewer shards
    after = _files(folder)
    assert {f: after[f] for f in theirs} == theirs
    assert set(after) == set(theirs) | set(_shards(folder)) | {CONFIG}
    state_equal(new, lq.load_quantized(folder, MiniDiT_cls))


@pytest.mark.parametrize("foreign", [
    {"quantization_method": "int8_per_channel_symmetric"},  # upstream's int8 checkpoint
    {"quant_method": "gptq", "bits": 4},  # another tool's
])
def test_refuses_a_folder_whose_quantization_config_is_not_ours(tmp_path, old_new, foreign):
    old, _ = old_new
    folder = str(tmp_path / "other")
    _other_model(folder)
    json.dump(foreign, open(os.path.join(folder, CONFIG), "w"))
    before = _files(folder)
    with pytest.raises(lq.CheckpointError, match="save_quantized did not write"):
        lq.save_quantized(old, folder)
    assert _files(folder) == before


def _as_version_1(path):
    """Rewrite a checkpoint in format version 1's layout (model-0000k-of-0000n shards, an index)."""
    cfg = json.load(open(os.path.join(path, CONFIG)))
    shards = _shards(path)
    rename = {s: f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards, 1)}
    for old_name, new_name in rename.items():
        os.rename(os.path.join(path, old_name), os.path.join(path, new_name))
    index = {"metadata": {"total_size": cfg.pop("total_size"), "format": "longcat-quant"},
             "weight_map": {k: rename[v] for k, v in cfg.pop("weight_map").items()}}
    cfg.pop("shards")
    cfg["format_version"] = 1
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(os.path.join(path, CONFIG), "w"))


def test_version_1_checkpoint_loads_unverified_with_one_warning(tmp_path, MiniDiT_cls, old_new, recwarn):
    old, new = old_new
    path = str(tmp_path / "v1")
    lq.save_quantized(old, path, max_shard_size=SHARD_SIZE)
    _as_version_1(path)
    state_equal(old, lq.load_quantized(path, MiniDiT_cls))
    user = [str(w.message) for w in recwarn.list if issubclass(w.category, UserWarning)]
    assert len(user) == 1 and "unverified" in user[0], user
    # saving over it replaces exactly the version-1 files
    lq.save_quantized(new, path)
    assert sorted(os.listdir(path)) == sorted(_shards(path) + [CONFIG])
    state_equal(new, lq.load_quantized(path, MiniDiT_cls))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shards_may_not_leave_the_folder(tmp_path, MiniDiT_cls, old_new, kind):
    old, _ = old_new
    path = str(tmp_path / "q")
    lq.save_quantized(old, path, max_shard_size=SHARD_SIZE)
    victim = _shards(path)[0]
    outside = str(tmp_path / "outside.safetensors")
    with open(outside, "wb") as f:
        f.write(open(os.path.join(path, victim), "rb").read())
    cfg = json.load(open(os.path.join(path, CONFIG)))
    if kind == "symlink":
        os.remove(os.path.join(path, victim))
        os.symlink(outside, os.path.join(path, victim))
        match = "symbolic link to .*outside the checkpoint folder"
    else:
        target = "../outside.safetensors" if kind == "dotdot" else outside
        cfg["weight_map"] = {k: (target if v == victim else v) for k, v in cfg["weight_map"].items()}
        cfg["shards"][target] = cfg["shards"].pop(victim)
        json.dump(cfg, open(os.path.join(path, CONFIG), "w"))
        match = r"leaves the checkpoint folder \('\.\.'\)" if kind == "dotdot" else "is an absolute path"
    with pytest.raises(lq.CheckpointError, match=match):
        lq.load_quantized(path, MiniDiT_cls)


def test_bit_flip_is_caught_and_verify_false_skips_the_check(tmp_path, MiniDiT_cls, old_new):
    old, _ = old_new
    path = str(tmp_path / "q")
    lq.save_quantized(old, path, max_shard_size=SHARD_SIZE)
    victim = os.path.join(path, _shards(path)[1])
    data = bytearray(open(victim, "rb").read())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x04
    open(victim, "wb").write(bytes(data))
    with pytest.raises(lq.CheckpointError, match=r"is corrupted: CRC-32 [0-9a-f]{8}, [0-9a-f]{8} recorded at save"):
        lq.load_quantized(path, MiniDiT_cls)
    loaded = lq.load_quantized(path, MiniDiT_cls, verify=False)
    differ = [k for k, v in old.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])]
    assert len(differ) == 1
