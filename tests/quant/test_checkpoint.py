"""save_quantized / load_quantized: bit-exact round trip, atomic writes, refusals, upstream's int8 format."""
import json
import os
import struct

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import longcat.quant as lq
from longcat.quant import checkpoint as ckpt
from longcat.quant.accuracy import sqnr_db

FP8 = torch.float8_e4m3fn


def state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype == FP8 else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype == FP8 else sb[k]), k


@pytest.fixture
def saved(tmp_path, mini_dit):
    lq.quantize(mini_dit, lq.Int8DynamicConfig(adaln="same"), exclude="blocks.1.ffn.*")
    path = str(tmp_path / "ckpt")
    lq.save_quantized(mini_dit, path, max_shard_size="40KB")
    return mini_dit, path


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int8-dynamic", "fp8-dynamic"])
def test_round_trip_bit_exact(tmp_path, MiniDiT_cls, dit_inputs, fmt):
    torch.manual_seed(0)
    model = lq.quantize(MiniDiT_cls(), fmt)
    path = str(tmp_path / fmt)
    index = lq.save_quantized(model, path, max_shard_size=30_000)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert not [f for f in os.listdir(path) if ".tmp-" in f]
    cfg = json.load(open(os.path.join(path, "quantization_config.json")))
    assert cfg["format"] == "longcat-quant" and cfg["format_version"] == 2 and cfg["quant_method"] == fmt
    assert cfg["skip"] == list(lq.DEFAULT_SKIP) and "blocks.0.attn.qkv" in cfg["modules"]
    loaded = lq.load_quantized(path, MiniDiT_cls)
    state_equal(model, loaded)
    assert type(loaded.blocks[0].attn.qkv).__name__ == "QuantizedLinear"
    assert loaded.blocks[0].attn.qkv.dynamic == fmt.endswith("dynamic")
    with torch.no_grad():
        assert torch.equal(model(*dit_inputs), loaded(*dit_inputs))
    # the loaded model can be saved again with the same config
    lq.save_quantized(loaded, str(tmp_path / "again"))
    assert json.load(open(tmp_path / "again" / "quantization_config.json"))["config"] == cfg["config"]


def test_load_builds_on_meta_and_casts(saved, MiniDiT_cls):
    model, path = saved
    built_on = []

    def factory():
        m = MiniDiT_cls()
        built_on.append(m.blocks[0].attn.qkv.weight.device.type)
        return m

    loaded = lq.load_quantized(path, factory, dtype=torch.float16)
    assert built_on == ["meta"], "the factory runs under torch.device('meta'): no float copy is allocated"
    qkv = loaded.blocks[0].attn.qkv
    assert qkv.weight_q.dtype == torch.int8 and qkv.weight_scale.dtype == torch.float32
    assert qkv.bias.dtype == torch.float16 and loaded.final_layer.linear.weight.dtype == torch.float16
    assert type(loaded.blocks[1].ffn.w1) is nn.Linear  # excluded at quantize time, float in the file
    assert not any(t.device.type == "meta" for t in loaded.state_dict().values())
    # a module instance built on meta works too
    with torch.device("meta"):
        inst = MiniDiT_cls()
    state_equal(model, lq.load_quantized(path, inst))


def test_atomic_save_failure_leaves_no_checkpoint(tmp_path, mini_dit, MiniDiT_cls, monkeypatch):
    lq.quantize(mini_dit, "int8")
    path = str(tmp_path / "c")
    calls = []
    real_save = ckpt.save_file

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        lq.save_quantized(mini_dit, path, max_shard_size=20_000)
    assert all(os.path.basename(c).startswith(".") and ".tmp-" in c for c in calls), "shards are written under temporary names"
    assert os.listdir(path) == [], "nothing under final names, and no temporary file left behind"
    with pytest.raises(lq.CheckpointError, match="quantization_config.json not found"):
        lq.load_quantized(path, MiniDiT_cls)


def test_failed_overwrite_keeps_previous_checkpoint(saved, MiniDiT_cls, monkeypatch):
    model, path = saved
    before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}

    def failing_save(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError):
        lq.save_quantized(lq.quantize(MiniDiT_cls(), "fp8"), path)
    assert {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)} == before
    state_equal(model, lq.load_quantized(path, MiniDiT_cls))


def test_overwrite_with_fewer_shards_removes_stale_ones(saved, MiniDiT_cls):
    model, path = saved
    lq.save_quantized(model, path, max_shard_size="1GB")
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) == 1 and shards[0].startswith("longcat-quant-") and shards[0].endswith("-00001-of-00001.safetensors")
    assert sorted(os.listdir(path)) == sorted(shards + ["quantization_config.json"])
    state_equal(model, lq.load_quantized(path, MiniDiT_cls))


def _shard_of(path, name):
    return os.path.join(path, json.load(open(os.path.join(path, "quantization_config.json")))["weight_map"][name])


def _rewrite_tensor(path, name, new):
    shard = _shard_of(path, name)
    tensors = load_file(shard)
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    save_file(tensors, shard, metadata={"format": "pt"})


def test_refuses_truncated_shard(saved, MiniDiT_cls):
    _, path = saved
    shard = _shard_of(path, "blocks.0.attn.qkv.weight_q")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(lq.CheckpointError, match="truncated"):
        lq.load_quantized(path, MiniDiT_cls)


def test_refuses_corrupted_header(saved, MiniDiT_cls):
    _, path = saved
    shard = _shard_of(path, "blocks.0.attn.qkv.weight_q")
    data = bytearray(open(shard, "rb").read())
    data[10:20] = b"\xff" * 10
    open(shard, "wb").write(bytes(data))
    with pytest.raises(lq.CheckpointError, match="corrupted header"):
        lq.load_quantized(path, MiniDiT_cls)
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(lq.CheckpointError, match="corrupted or truncated header"):
        lq.load_quantized(path, MiniDiT_cls)


def test_refuses_missing_shard(saved, MiniDiT_cls):
    _, path = saved
    shard = _shard_of(path, "blocks.1.attn.proj.weight_q")
    os.remove(shard)
    with pytest.raises(lq.CheckpointError, match=f"missing shard '{os.path.basename(shard)}'"):
        lq.load_quantized(path, MiniDiT_cls)


def test_refuses_wrong_dtype(saved, MiniDiT_cls):
    model, path = saved
    _rewrite_tensor(path, "blocks.0.attn.qkv.weight_q", model.blocks[0].attn.qkv.weight_q.float())
    with pytest.raises(lq.CheckpointError, match=r"'blocks.0.attn.qkv.weight_q': checkpoint dtype torch.float32 where torch.int8 is required"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)


def test_refuses_wrong_scale_dtype(saved, MiniDiT_cls):
    model, path = saved
    _rewrite_tensor(path, "blocks.0.attn.proj.weight_scale", model.blocks[0].attn.proj.weight_scale.bfloat16())
    with pytest.raises(lq.CheckpointError, match="weight_scale': checkpoint dtype torch.bfloat16 where torch.float32"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)


def test_refuses_wrong_shape(saved, MiniDiT_cls):
    model, path = saved
    _rewrite_tensor(path, "blocks.0.ffn.w2.weight_q", model.blocks[0].ffn.w2.weight_q[:, :-1].contiguous())
    with pytest.raises(lq.CheckpointError, match=r"'blocks.0.ffn.w2.weight_q': checkpoint shape \[64, 175\] does not match the model's \[64, 176\]"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)


def test_refuses_model_mismatch(saved, MiniDiT_cls):
    _, path = saved
    with pytest.raises(lq.CheckpointError, match="shape"):
        lq.load_quantized(path, lambda: MiniDiT_cls(hidden=32))
    with pytest.raises(lq.CheckpointError, match="no such module"):
        lq.load_quantized(path, lambda: MiniDiT_cls(depth=1))
    with pytest.raises(TypeError, match="must return an nn.Module"):
        lq.load_quantized(path, lambda: 3)


def test_refuses_missing_tensor(saved, MiniDiT_cls):
    _, path = saved
    _rewrite_tensor(path, "blocks.1.attn.qkv.weight_scale", None)
    with pytest.raises(lq.CheckpointError, match="listed in the index"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)
    index_path = os.path.join(path, "quantization_config.json")
    index = json.load(open(index_path))
    del index["weight_map"]["blocks.1.attn.qkv.weight_scale"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(lq.CheckpointError, match=r"lacks 1 tensors the model needs, e.g. \['blocks.1.attn.qkv.weight_scale'\]"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)


def test_refuses_unexpected_tensor_unless_not_strict(saved, MiniDiT_cls):
    model, path = saved
    _rewrite_tensor(path, "blocks.0.attn.qkv.weight_q", model.blocks[0].attn.qkv.weight_q)
    shard = _shard_of(path, "blocks.0.attn.qkv.weight_q")
    tensors = load_file(shard)
    tensors["extra.tensor"] = torch.zeros(3)
    save_file(tensors, shard)
    index_path = os.path.join(path, "quantization_config.json")
    index = json.load(open(index_path))
    index["weight_map"]["extra.tensor"] = os.path.basename(shard)
    json.dump(index, open(index_path, "w"))
    with pytest.raises(lq.CheckpointError, match="does not have"):
        lq.load_quantized(path, MiniDiT_cls, verify=False)
    state_equal(model, lq.load_quantized(path, MiniDiT_cls, strict=False, verify=False))


@pytest.mark.parametrize("change,match", [
    ({"format_version": 3}, "format version 3 of longcat-quant is not supported"),
    ({"weight_map": ["a", "b"]}, "'weight_map' must be a non-empty JSON object .* got a list"),
    ({"shards": None}, "no 'shards' mapping"),
    ({"format": "gguf"}, "unrecognised quantization_config.json"),
    ({"modules": {"blocks.0.attn.qkv": {"weight": "int4", "activation": None}}}, "invalid per-layer"),
])
def test_refuses_bad_config(saved, MiniDiT_cls, change, match):
    _, path = saved
    cfg_path = os.path.join(path, "quantization_config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(change)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(lq.CheckpointError, match=match):
        lq.load_quantized(path, MiniDiT_cls)


def test_refuses_meta_and_bad_arguments(tmp_path, MiniDiT_cls, saved):
    with torch.device("meta"):
        meta_model = lq.quantize(MiniDiT_cls(), "int8")
    with pytest.raises(ValueError, match="meta device"):
        lq.save_quantized(meta_model, str(tmp_path / "m"))
    with pytest.raises(ValueError, match="max_shard_size"):
        lq.save_quantized(lq.quantize(MiniDiT_cls(), "int8"), str(tmp_path / "m"), max_shard_size="lots")
    with pytest.raises(lq.CheckpointError, match="folder not found"):
        lq.load_quantized(str(tmp_path / "nope"), MiniDiT_cls)
    with pytest.raises(TypeError, match="dtype must be"):
        lq.load_quantized(saved[1], MiniDiT_cls, dtype=torch.int8)


def write_upstream_int8(model: nn.Module, folder: str, n_shards: int = 2):
    """Lay out a checkpoint as upstream's quantize_model + save_quantized_state_dict do: every Linear
    except final_layer.linear as weight_int8 / weight_scale / bf16 bias buffers."""
    os.makedirs(folder)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "final_layer.linear":
            w = m.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            state[f"{name}.weight_int8"] = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
            state[f"{name}.weight_scale"] = scale
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().to(torch.bfloat16)
    quantized = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "final_layer.linear"}
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in quantized:
            state[k] = v
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"quantized_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}, os.path.join(folder, name))
        weight_map.update({k: name for k in keys[i * per:(i + 1) * per]})
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map},
              open(os.path.join(folder, "quantized_model.safetensors.index.json"), "w"))
    json.dump({"quantization_method": "int8_per_channel_symmetric", "skip_patterns": ["final_layer.linear"],
               "description": "Weight-only INT8 quantization with per-channel symmetric scaling"},
              open(os.path.join(folder, "quantization_config.json"), "w"))
    return state


def test_loads_upstream_int8_format(tmp_path, mini_dit, MiniDiT_cls, dit_inputs):
    folder = str(tmp_path / "base_model_int8")
    state = write_upstream_int8(mini_dit, folder)
    loaded = lq.load_quantized(folder, MiniDiT_cls, dtype=torch.float32)
    qkv = loaded.blocks[0].attn.qkv
    assert type(qkv).__name__ == "QuantizedLinear" and not qkv.dynamic
    assert torch.equal(qkv.weight_q, state["blocks.0.attn.qkv.weight_int8"])
    assert torch.equal(qkv.weight_scale, state["blocks.0.attn.qkv.weight_scale"])
    # upstream quantizes the embedders' and adaLN Linears too; only final_layer.linear stays float
    assert type(loaded.t_embedder.mlp[0]).__name__ == "QuantizedLinear"
    assert type(loaded.final_layer.linear) is nn.Linear
    with torch.no_grad():
        ref = mini_dit(*dit_inputs)
        out = loaded(*dit_inputs)
    assert sqnr_db(ref, out) > 25
    # a plain load_state_dict of upstream's names works as well (weight_int8 -> weight_q)
    q = lq.QuantizedLinear(64, 192, bias=True)
    q.load_state_dict({"weight_int8": state["blocks.0.attn.qkv.weight_int8"], "weight_scale": state["blocks.0.attn.qkv.weight_scale"],
                       "bias": state["blocks.0.attn.qkv.bias"]})
    assert torch.equal(q.weight_q, qkv.weight_q)


def test_upstream_format_refuses_truncated_shard(tmp_path, mini_dit, MiniDiT_cls):
    folder = str(tmp_path / "up")
    write_upstream_int8(mini_dit, folder)
    shard = os.path.join(folder, "quantized_model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(lq.CheckpointError, match="truncated"):
        lq.load_quantized(folder, MiniDiT_cls)
