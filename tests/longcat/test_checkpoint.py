"""from_pretrained / save_pretrained: round trips, sharding, dtype, and refusals."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat import LongCatVideoTransformer3DModel, get_preset
from longcat.checkpoint import CheckpointError, parse_size

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _shards(folder):
    return sorted(set(json.load(open(os.path.join(folder, INDEX)))["weight_map"].values()))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    return LongCatVideoTransformer3DModel.from_preset("tiny").eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", ["1GB", "400KB"])
def test_round_trip(tiny, tmp_path, shard):
    tiny.save_pretrained(tmp_path, max_shard_size=shard)
    files = os.listdir(tmp_path)
    assert (len(_shards(tmp_path)) > 1) == (shard == "400KB")
    assert sorted(files) == sorted(["config.json", INDEX] + _shards(tmp_path))
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    _same_weights(tiny, loaded)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded.config == tiny.config


def test_load_with_dtype_and_upstream_style_config(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.update({"_diffusers_version": "0.35.0", "enable_flashattn3": True, "cp_split_hw": [1, 1]})
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight.float(), tiny.blocks[0].attn.qkv.weight, rtol=1e-3, atol=1e-3)


def test_loaded_model_reproduces_outputs(tiny, tmp_path, gen):
    tiny.save_pretrained(tmp_path, max_shard_size="300KB")
    loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    x = torch.randn(1, 16, 2, 4, 4, generator=gen)
    y = torch.randn(1, 1, 3, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([500.0]), y), tiny(x, torch.tensor([500.0]), y))


def test_folder_without_config(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no config.json"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))


def test_missing_unexpected_misshaped(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    path = tmp_path / _shards(tmp_path)[0]
    sd = load_file(str(path))
    sd.pop("blocks.1.ffn.w2.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(5)
    save_file(sd, str(path))
    index = json.load(open(tmp_path / INDEX))
    index["weight_map"].pop("blocks.1.ffn.w2.weight")
    index["weight_map"]["blocks.0.extra.weight"] = path.name
    json.dump(index, open(tmp_path / INDEX, "w"))
    with pytest.raises(CheckpointError, match="were saved"):  # the recorded size and CRC-32 catch it first
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), verify=False)
    msg = str(err.value)
    assert "missing tensors: blocks.1.ffn.w2.weight" in msg
    assert "unexpected tensors: blocks.0.extra.weight" in msg
    assert "blocks.0.attn.qkv.bias: checkpoint shape (5,)" in msg


def test_truncated_and_missing_shard(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size="400KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    victim = tmp_path / shards[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"bytes where \d+ were saved \(truncated"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"truncated or corrupted"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), verify=False)
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"missing shard"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))


def test_config_mismatch_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks.2"):
        LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path), config=dict(get_preset("tiny"), depth=3))


def test_edited_config_json_gives_way_to_the_saved_config(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["depth"] = 3
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.warns(UserWarning, match=r"differs from the config saved with the weights .*\['depth'\]"):
        loaded = LongCatVideoTransformer3DModel.from_pretrained(str(tmp_path))
    _same_weights(tiny, loaded)


def test_single_file_needs_config(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    f = str(tmp_path / _shards(tmp_path)[0])
    with pytest.raises(CheckpointError, match=r"needs config="):
        LongCatVideoTransformer3DModel.from_pretrained(f)
    with pytest.warns(UserWarning, match="unverified"):
        loaded = LongCatVideoTransformer3DModel.from_pretrained(f, config=get_preset("tiny"))
    _same_weights(tiny, loaded)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("64KiB") == 64 * 1024
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match=r"max_shard_size must be a positive"):
        parse_size("lots")
    with pytest.raises(ValueError, match=r"max_shard_size must be a positive"):
        parse_size(0)
