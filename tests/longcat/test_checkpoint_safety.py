"""save_pretrained / from_pretrained under faults and hostile folders: an interrupted save leaves
the old checkpoint or the new one, never a mixture; shards may not leave the folder; bit flips are
caught by the recorded CRC-32; bad device, dtype and index arguments get clear errors."""
import json
import os

import pytest
import torch

import longcat.checkpoint as model_ckpt
import longcat.quant.checkpoint as quant_ckpt
from longcat import LongCatVideoTransformer3DModel, get_preset
from longcat.checkpoint import CheckpointError

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD_SIZE = "3MB"  # the tiny preset (10.4 MB) in 4 shards


def _model(seed, **config):
    torch.manual_seed(seed)
    return LongCatVideoTransformer3DModel(**{**get_preset("tiny"), **config}).eval()


@pytest.fixture(scope="module")
def old_new():
    # Same shapes, other weights and another (shape-neutral) config value: a mixture would load.
    return _model(1), _model(2, text_tokens_zero_pad=True)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_is(loaded, model):
    assert loaded.config == model.config
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}


def _shards(folder):
    return sorted(set(json.load(open(os.path.join(folder, INDEX)))["weight_map"].values()))


class Crash(BaseException):
    """An injected fault; with ``crash=True`` no cleanup runs either, as when the process dies."""


def _inject(monkeypatch, where, crash):
    calls = {"shard": 0}
    real_save, real_json = quant_ckpt.save_file, model_ckpt.write_json_atomic
    if crash:  # a dying process removes nothing
        monkeypatch.setattr(quant_ckpt, "remove_quietly", lambda path: None)

    def save_file(tensors, filename, metadata=None):
        calls["shard"] += 1
        if where == ("shard", calls["shard"]):
            real_save(dict(list(tensors.items())[:1]), filename, metadata=metadata)  # a partial write
            raise Crash(f"fault at shard {calls['shard']}")
        real_save(tensors, filename, metadata=metadata)

    def write_json_atomic(obj, path):
        name = os.path.basename(path)
        if where == ("json", name):
            if crash:  # died after writing the temporary file, before the rename
                with open(quant_ckpt.temporary_name(path), "w") as f:
                    json.dump(obj, f)
            raise Crash(f"fault writing {name}")
        real_json(obj, path)

    monkeypatch.setattr(quant_ckpt, "save_file", save_file)
    # the index commit runs in quant.checkpoint.commit_manifest, config.json in the model module
    monkeypatch.setattr(quant_ckpt, "write_json_atomic", write_json_atomic)
    monkeypatch.setattr(model_ckpt, "write_json_atomic", write_json_atomic)


FAULTS = [("shard", k) for k in (1, 2, 3, 4)] + [("json", INDEX)]


@pytest.mark.parametrize("crash", [False, True], ids=["exception", "crash"])
@pytest.mark.parametrize("where", FAULTS, ids=[f"{a}-{b}" for a, b in FAULTS])
def test_interrupted_overwrite_leaves_the_old_checkpoint(old_new, tmp_path, monkeypatch, where, crash):
    old, new = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    assert len(_shards(tmp_path)) == 4
    before = _files(tmp_path)
    _inject(monkeypatch, where, crash)
    with pytest.raises(Crash):
        new.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    monkeypatch.undo()
    if not crash:
        assert _files(tmp_path) == before, "a failed save removes everything it wrote"
    _assert_is(LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path)), old)
    # the next save succeeds and removes what the interrupted one left behind
    new.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    _assert_is(LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path)), new)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", INDEX] + _shards(tmp_path)) or crash


@pytest.mark.parametrize("crash", [False, True], ids=["exception", "crash"])
def test_interrupted_after_the_commit_leaves_the_new_checkpoint(old_new, tmp_path, monkeypatch, crash):
    old, new = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    _inject(monkeypatch, ("json", "config.json"), crash)
    with pytest.raises(Crash):
        new.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"\['text_tokens_zero_pad'\]"):
        loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    _assert_is(loaded, new)


def test_overwrite_removes_the_previous_files(old_new, tmp_path):
    old, new = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    old_shards = _shards(tmp_path)
    new.save_pretrained(tmp_path)  # one shard now
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", INDEX] + _shards(tmp_path))
    assert not set(old_shards) & set(os.listdir(tmp_path))
    _assert_is(LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path)), new)
    # over a single-file checkpoint of the earlier layout
    folder = tmp_path / "single"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(_state(old), str(folder / "diffusion_pytorch_model.safetensors"))
    json.dump(dict(old.config, patch_size=list(old.config["patch_size"])), open(folder / "config.json", "w"))
    new.save_pretrained(folder)
    assert "diffusion_pytorch_model.safetensors" not in os.listdir(folder)
    _assert_is(LongCatVideoTransformer3DModel.from_pretrained(str(folder)), new)


# ------------------------------------------------------------------------------ paths out of the folder

def _point_index_at(folder, target):
    index = json.load(open(folder / INDEX))
    name = "blocks.0.attn.qkv.weight"
    index["weight_map"][name] = target
    json.dump(index, open(folder / INDEX, "w"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shards_may_not_leave_the_folder(old_new, tmp_path, kind):
    old, _ = old_new
    ckpt = tmp_path / "ckpt"
    old.save_pretrained(ckpt)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((ckpt / _shards(ckpt)[0]).read_bytes())
    if kind == "dotdot":
        _point_index_at(ckpt, "../outside.safetensors")
        match = r"leaves the checkpoint folder \('\.\.'\)"
    elif kind == "absolute":
        _point_index_at(ckpt, str(outside))
        match = "is an absolute path"
    else:
        shard = ckpt / _shards(ckpt)[0]
        shard.unlink()
        shard.symlink_to(outside)
        match = "symbolic link to .*outside the checkpoint folder"
    with pytest.raises(CheckpointError, match=match):
        LongCatVideoTransformer3DModel.from_pretrained(str(ckpt), verify=False)


def test_symlink_inside_the_folder_is_allowed(old_new, tmp_path):
    old, _ = old_new
    old.save_pretrained(tmp_path)
    shard = tmp_path / _shards(tmp_path)[0]
    (tmp_path / "blobs").mkdir()
    target = tmp_path / "blobs" / "weights"
    shard.rename(target)
    shard.symlink_to(target)
    _assert_is(LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path)), old)


# ---------------------------------------------------------------------------------------- checksums

def _flip_a_data_bit(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x10  # in the tensor data, not the header
    path.write_bytes(bytes(data))


def test_bit_flip_is_caught_and_verify_false_skips_the_check(old_new, tmp_path):
    old, _ = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    victim = tmp_path / _shards(tmp_path)[2]
    _flip_a_data_bit(victim)
    with pytest.raises(CheckpointError, match=rf"shard '{victim.name}' .* is corrupted: CRC-32 [0-9a-f]{{8}}, [0-9a-f]{{8}} recorded"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), verify=False)
    differ = [k for k, v in old.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])]
    assert len(differ) == 1, "the trusted fast load reads the flipped bit as it is"


def test_checkpoint_without_checksums_loads_unverified_with_one_warning(old_new, tmp_path, recwarn):
    old, _ = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    index = json.load(open(tmp_path / INDEX))
    index["metadata"] = {"total_size": index["metadata"]["total_size"]}  # as upstream / earlier saves wrote it
    json.dump(index, open(tmp_path / INDEX, "w"))
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    _assert_is(loaded, old)
    messages = [str(w.message) for w in recwarn.list if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "unverified" in messages[0], messages
    recwarn.clear()
    LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), verify=False)
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------ device, dtype, index

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_so(old_new, tmp_path):
    old, _ = old_new
    old.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available") as err:
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), device="cuda")
    assert "corrupted" not in str(err.value) and "truncated" not in str(err.value)


@pytest.mark.gpu
def test_load_straight_to_cuda_in_bf16(old_new, tmp_path):
    old, _ = old_new
    old.save_pretrained(tmp_path, max_shard_size=SHARD_SIZE)
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), dtype="bfloat16", device="cuda")
    got = loaded.state_dict()
    for k, v in old.state_dict().items():
        assert got[k].device.type == "cuda", k
        assert torch.equal(got[k].cpu(), v.to(torch.bfloat16) if v.is_floating_point() else v), k
    with pytest.raises(ValueError, match="CUDA device"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), device=f"cuda:{torch.cuda.device_count()}")


def test_string_dtypes(old_new, tmp_path):
    old, _ = old_new
    old.save_pretrained(tmp_path)
    for name in ("float16", "fp16", "torch.float16"):
        loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), dtype=name)
        assert all(p.dtype == torch.float16 for p in loaded.parameters())
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), "bfloat16")
    assert loaded.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    for bad in ("cuda", "int8", torch.int8, 3):
        with pytest.raises(TypeError, match="dtype must be"):
            LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), dtype=bad)
    with pytest.raises(ValueError, match="device must be"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), device="bfloat16")


@pytest.mark.parametrize("weight_map,match", [
    ([["a", "b.safetensors"]], "'weight_map' must be a JSON object .* got a list"),
    ({"blocks.0.attn.qkv.weight": 3}, "'weight_map' must be a JSON object"),
])
def test_malformed_index_is_refused(old_new, tmp_path, weight_map, match):
    old, _ = old_new
    old.save_pretrained(tmp_path)
    index = json.load(open(tmp_path / INDEX))
    index["weight_map"] = weight_map
    json.dump(index, open(tmp_path / INDEX, "w"))
    with pytest.raises(CheckpointError, match=match):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    (tmp_path / INDEX).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
