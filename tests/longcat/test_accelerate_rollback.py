"""accelerate() checks every argument before changing the model, and a failure while patching
rolls it back: after a failed call the model is exactly as before (state dict, module classes and
objects, forward output)."""
import pytest
import torch

import longcat
from longcat import LongCatVideoTransformer3DModel, accelerate, restore
from longcat.accelerate import acceleration_report
from dit_cases import random_inputs
from upstream_like import UpstreamLikeDiT


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(11)
    return LongCatVideoTransformer3DModel.from_preset("tiny").state_dict()


def _model(weights, upstream=False):
    m = (UpstreamLikeDiT() if upstream else LongCatVideoTransformer3DModel.from_preset("tiny")).eval()
    m.load_state_dict(weights)
    return m if upstream else m.set_ops(longcat.REFERENCE_OPS)


def _fingerprint(model, inputs):
    # An upstream-structured model only runs once accelerated (its attention is a stub).
    runs = isinstance(model, LongCatVideoTransformer3DModel) or acceleration_report(model) is not None
    with torch.no_grad():
        out = model(*inputs) if runs else None
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules()],
        "tensors": [(name, id(t), t.data_ptr()) for name, t in list(model.named_parameters()) + list(model.named_buffers())],
        "forwards": [vars(b).get("forward") for b in model.blocks],
        "hooks": [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in model.blocks],
        "bsa": [(b.attn.enable_bsa, b.attn.bsa_params) for b in model.blocks],
        "ops": getattr(model, "ops", None),
        "report": acceleration_report(model),
        "out": out,
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for key in ("modules", "tensors", "forwards", "hooks", "bsa", "ops", "report"):
        assert before[key] == after[key], key
    assert (before["out"] is None) == (after["out"] is None)
    if before["out"] is not None:
        assert torch.equal(before["out"], after["out"])


@pytest.mark.parametrize("compile_arg,match", [
    ({"mode": "no-such-mode"}, "no-such-mode"),
    ({"backend": "no-such-backend"}, "no-such-backend"),
    ({"no_such_keyword": 1}, "no_such_keyword"),
])
def test_bad_compile_options_are_refused_before_any_change(weights, gen, compile_arg, match):
    model = _model(weights)
    inputs = random_inputs(gen, 1, 1, 2, 2, 3)
    before = _fingerprint(model, inputs)
    with pytest.raises(ValueError, match=match):
        accelerate(model, quantize="int8", offload="blocks", compile=compile_arg)
    _assert_same(before, _fingerprint(model, inputs))
    with pytest.raises(TypeError, match="compile must be"):
        accelerate(model, quantize="int8", compile="max-autotune")
    _assert_same(before, _fingerprint(model, inputs))


@pytest.mark.parametrize("upstream", [False, True])
@pytest.mark.parametrize("fail_at", ["quantize", "offload", "compile"])
def test_failure_while_patching_rolls_back(weights, gen, monkeypatch, upstream, fail_at):
    model = _model(weights, upstream)
    inputs = random_inputs(gen, 1, 1, 2, 2, 3)
    before = _fingerprint(model, inputs)
    failure = RuntimeError(f"injected failure at {fail_at}")
    if fail_at == "quantize":
        import longcat.quant

        real = longcat.quant.quantize

        def quantize_then_fail(m, cfg, **kw):
            real(m, cfg, **kw)
            raise failure

        monkeypatch.setattr(longcat.quant, "quantize", quantize_then_fail)
    elif fail_at == "offload":
        import longcat.offload

        real_init = longcat.offload.BlockOffloader.__init__

        def offload_then_fail(self, blocks, **kw):
            real_init(self, blocks, **kw)
            raise failure

        monkeypatch.setattr(longcat.offload.BlockOffloader, "__init__", offload_then_fail)
    else:
        real_compile = torch.compile
        calls = []

        def compile_fails_on_block(fn, **kw):
            calls.append(fn)
            if len(calls) > 2:  # the stand-in check and the first block pass, the second block fails
                raise failure
            return real_compile(fn, **kw)

        monkeypatch.setattr(torch, "compile", compile_fails_on_block)
    with pytest.raises(RuntimeError, match="injected failure"):
        accelerate(model, bsa=True, quantize="int8", offload="blocks", compile={"backend": "eager"})
    monkeypatch.undo()
    _assert_same(before, _fingerprint(model, inputs))
    # the model still accelerates and restores normally afterwards
    accelerate(model, attention="sdpa", quantize="int8")
    assert acceleration_report(model).quantized_linears > 0
    restore(model)


@pytest.mark.slow  # two quantized forwards in the Triton interpreter (~25 s on two cores)
def test_failed_call_on_an_accelerated_model_keeps_its_acceleration(weights, gen, monkeypatch):
    model = _model(weights)
    inputs = random_inputs(gen, 1, 1, 2, 2, 3)
    accelerate(model, attention="sdpa", quantize="fp8", offload="blocks", bsa=False)
    before = _fingerprint(model, inputs)
    import longcat.offload

    def refuse(self, blocks, **kw):
        raise RuntimeError("injected failure at offload")

    monkeypatch.setattr(longcat.offload.BlockOffloader, "__init__", refuse)
    with pytest.raises(RuntimeError, match="injected failure"):
        accelerate(model, attention="reference", quantize="int8", offload="blocks")
    monkeypatch.undo()
    _assert_same(before, _fingerprint(model, inputs))
    assert acceleration_report(model).quantization == "fp8"
    restore(model)
    assert not any(type(m).__name__ == "QuantizedLinear" for m in model.modules())
