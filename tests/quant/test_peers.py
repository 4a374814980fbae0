"""Peers (bitsandbytes, optimum-quanto) behind quantize(..., backend=...): same selection, sane accuracy."""
import builtins

import pytest
import torch
import torch.nn as nn

import longcat.quant as lq
from longcat.quant import peers
from longcat.quant.accuracy import layer_accuracy, sqnr_db


def have(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


needs_bnb = pytest.mark.skipif(not have("bitsandbytes"), reason="bitsandbytes not installed (extra 'peers')")
needs_quanto = pytest.mark.skipif(not have("optimum.quanto"), reason="optimum-quanto not installed (extra 'peers')")


@pytest.mark.parametrize("backend,fmt,floor", [
    pytest.param("bitsandbytes", "int8", 30.0, marks=needs_bnb),
    pytest.param("bitsandbytes", "nf4", 15.0, marks=needs_bnb),
    pytest.param("quanto", "int8", 30.0, marks=needs_quanto),
    pytest.param("quanto", "fp8", 22.0, marks=needs_quanto),
])
def test_peer_on_small_model(mini_dit, dit_inputs, backend, fmt, floor):
    with torch.no_grad():
        ref = mini_dit(*dit_inputs)
        lq.quantize(mini_dit, fmt, backend=backend, exclude="blocks.1.*")
        out = mini_dit(*dit_inputs)
    names = {n: type(m).__name__ for n, m in mini_dit.named_modules()}
    assert names["blocks.0.attn.qkv"] != "Linear"
    assert names["blocks.1.attn.qkv"] == "Linear", "exclude is honoured"
    assert names["final_layer.linear"] == "Linear" and names["t_embedder.mlp.0"] == "Linear", "default skip list"
    assert sqnr_db(ref, out) > floor


@pytest.mark.parametrize("backend,fmt", [
    pytest.param("bitsandbytes", "int8", marks=needs_bnb),
    pytest.param("bitsandbytes", "nf4", marks=needs_bnb),
    pytest.param("quanto", "int8", marks=needs_quanto),
    pytest.param("quanto", "fp8", marks=needs_quanto),
])
def test_peer_layer_accuracy_next_to_longcat(backend, fmt):
    rows = layer_accuracy(384, 256, formats=("int8", "fp8"), tokens=64, peers=[(backend, fmt)])
    ours = {r["format"]: r["out_sqnr_db"] for r in rows if r["backend"] == "longcat"}
    peer = [r for r in rows if r["backend"] == backend][0]
    # Same bit width, same per-channel symmetric idea: within a few dB of ours (nf4 is 4-bit).
    if fmt == "nf4":
        assert 12 < peer["out_sqnr_db"] < ours["int8"]
    else:
        assert peer["out_sqnr_db"] > ours[fmt] - 6, (peer, ours)


def test_peer_errors(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="supports formats"):
        lq.quantize(model, "fp8", backend="bitsandbytes")
    with pytest.raises(ValueError, match="supports formats"):
        lq.quantize(model, "int8-dynamic", backend="quanto")
    real_import = builtins.__import__

    def no_peers(name, *args, **kwargs):
        if name.startswith(("bitsandbytes", "optimum")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    with pytest.raises(ImportError, match=r"longcat-accel\[peers\]"):
        lq.quantize(model, "int8", backend="bitsandbytes")
    with pytest.raises(ImportError, match="optimum-quanto"):
        lq.quantize(model, "int8", backend="quanto")
