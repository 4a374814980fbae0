"""The resource rule for tiled configs (kernels._configs), the fp8 capability guards, and launch
capture (kernels._capture): what it records must be what a real launch uses."""
import contextlib

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from longcat.kernels import _runtime
from longcat.kernels._capture import capture_launches
from longcat.kernels._configs import ARCH_LIMITS, TileShape, dot_registers, dot_shared_bytes, fits, prune_configs
from longcat.kernels.attention import block_sparse_attention, dense_attention
from longcat.kernels.modulate import layer_norm_modulate, layer_norm_modulate_quant
from longcat.kernels.quant_gemm import dynamic_linear, weight_only_linear
from longcat.kernels.quantize_activations import quantize_per_token
from longcat.kernels.rope import rms_norm, rope_3d
from longcat.kernels.swiglu import swiglu_packed

# ---- resource rule -------------------------------------------------------------------------------

# Shared memory Triton 3.7 allocates for _qgemm_kernel on sm_90 (read from compiled kernels):
# (tile, num_stages, bytes)
MEASURED_SHARED = [
    (TileShape(128, 128, 128, 1, 1, b_operands=2, accumulators=2), 4, 196_608),  # W8A8 int8 SwiGLU
    (TileShape(128, 256, 64, 1, 1, b_operands=2, accumulators=2), 3, 122_880),   # W8A8 int8 SwiGLU
    (TileShape(128, 128, 64, 2, 1, b_convert_bytes=2), 4, 106_496),              # W8A16 int8
    (TileShape(128, 256, 128, 2, 1, b_convert_bytes=2), 3, 229_376),             # W8A16 int8
]


@pytest.mark.parametrize("tile,stages,measured", MEASURED_SHARED)
def test_shared_memory_estimate_covers_the_compiled_kernel(tile, stages, measured):
    est = dot_shared_bytes(tile, stages)
    assert measured <= est <= measured * 1.15


def test_deliberately_bad_configs_are_rejected():
    good = TileShape(128, 128, 64, 2, 2)
    assert fits(good, num_warps=4, num_stages=3, arch=90)
    # too many stages: 8 x 32 KB of operand tiles
    assert dot_shared_bytes(good, 8) > ARCH_LIMITS[90]["smem_per_block"]
    assert not fits(good, num_warps=4, num_stages=8, arch=90)
    # a huge block: a 256x256 fp32 accumulator over 4 warps is 512 registers per thread
    huge = TileShape(256, 256, 32, 2, 2)
    assert dot_registers(huge, 4) > 255 and not fits(huge, num_warps=4, num_stages=2, arch=90)
    # two SwiGLU accumulators of 128x256 over 8 warps: 256 registers before anything else
    assert not fits(TileShape(128, 256, 64, 1, 1, b_operands=2, accumulators=2), num_warps=8, num_stages=3)
    # the arch matters: what fits sm_90's 227 KB does not fit sm_89's 99 KB
    mid = TileShape(128, 128, 64, 2, 2)
    assert fits(mid, 8, 4, arch=90) and not fits(mid, 8, 4, arch=89)


def test_prune_configs_keeps_order_and_refuses_to_return_nothing():
    configs = [triton.Config({"BM": bm}, num_warps=4, num_stages=s) for bm, s in ((64, 3), (256, 3), (32, 2), (64, 12))]
    tile_of = lambda c: TileShape(c.kwargs["BM"], 128, 64, 2, 2)  # noqa: E731
    kept = prune_configs(configs, tile_of, arch=90)
    assert [(c.kwargs["BM"], c.num_stages) for c in kept] == [(64, 3), (32, 2)]
    with pytest.raises(ValueError, match="no config fits sm_90"):
        prune_configs(configs[1:2], tile_of, arch=90)


# ---- fp8 capability guards -------------------------------------------------------------------------

def test_fp8_launchers_fall_back_below_sm89_and_launch_from_sm89():
    x = torch.empty(1, 64, 256, device="meta", dtype=torch.float16)
    mod = torch.empty(1, 2, 256, device="meta")
    xq = torch.empty(64, 256, device="meta", dtype=torch.float8_e4m3fn)
    w = torch.empty(128, 256, device="meta", dtype=torch.float8_e4m3fn)
    ws, xs = torch.empty(128, device="meta"), torch.empty(64, device="meta")

    def fp8_ops():
        layer_norm_modulate_quant(x, mod, mod, qdtype=torch.float8_e4m3fn)
        quantize_per_token(x.reshape(64, 256), torch.float8_e4m3fn)
        dynamic_linear(xq, xs, w, ws, None, torch.float16)
        weight_only_linear(x.reshape(64, 256), w, ws)

    for arch, expected in ((80, 0), (89, 4), (90, 4)):
        with pytest.warns(RuntimeWarning) if expected == 0 else contextlib.nullcontext():
            _runtime._WARNED.clear()
            with capture_launches(arch) as launches:
                fp8_ops()
        assert len(launches) == expected, arch
    # int8 is not guarded
    with capture_launches(80) as launches:
        layer_norm_modulate_quant(x, mod, mod, qdtype=torch.int8)
    assert [lc.name for lc in launches] == ["_fused_norm_fwd_kernel"]


def test_fp8_guard_names_the_capability():
    _runtime._WARNED.clear()
    x = torch.empty(1, 8, 64, device="meta", dtype=torch.float16)
    with capture_launches(80), pytest.warns(RuntimeWarning, match="compute capability 8.9"):
        layer_norm_modulate_quant(x, qdtype=torch.float8_e4m3fn)


# ---- capture against a real (interpreted) launch ---------------------------------------------------

@contextlib.contextmanager
def spy_interpreted_launches():
    """Record every interpreted launch's summary, then run it for real."""
    from longcat.kernels._capture import Launch, _grid

    seen = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        seen.append(Launch(self, tuple(args), dict(kwargs), _grid(grid, named)).summary())
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield seen
    finally:
        InterpretedFunction.run = original


def _ops(device, gen):
    """Each op at a tiny shape, on ``device`` (real data on the CPU, empty tensors on meta)."""
    def t(*shape, dtype=torch.float32, grad=False):
        if device == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    def q8(*shape):
        if device == "meta":
            return torch.empty(*shape, dtype=torch.int8, device="meta")
        return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)

    def swiglu_fwd_bwd():
        y = swiglu_packed(t(5, 2 * 40, grad=True))
        y.backward(t(*y.shape))

    def lnm_fwd_bwd():
        y = layer_norm_modulate(t(1, 6, 48, dtype=torch.float16, grad=True), t(1, 2, 48), t(1, 2, 48))
        y.backward(t(*y.shape, dtype=torch.float16))

    def attention():
        q, k, v = (t(1, 2, 24, 16, dtype=torch.float16) for _ in range(3))
        dense_attention(q, k, v)
        block_sparse_attention(q, k, v, (2, 3, 4), (2, 3, 4), sparsity=0.5, tile=(1, 3, 4))

    return {
        "swiglu_packed fwd+bwd": swiglu_fwd_bwd,
        "rope_3d": lambda: rope_3d(t(1, 2, 24, 16, dtype=torch.float16), (2, 3, 4)),
        "rms_norm": lambda: rms_norm(t(3, 5, 32), t(32)),
        "layer_norm_modulate fwd+bwd": lnm_fwd_bwd,
        "quantize_per_token": lambda: quantize_per_token(t(7, 40), torch.int8),
        "int8 dynamic_linear (autotuned)": lambda: dynamic_linear(q8(9, 64), t(9).abs(), q8(48, 64), t(48).abs(), None, torch.float32),
        "attention": attention,
    }


@pytest.mark.parametrize("op", list(_ops("meta", None)))
def test_capture_records_what_a_real_launch_runs(op, gen):
    if not _runtime.interpreter_enabled():
        pytest.skip("compares with an interpreted launch")
    with spy_interpreted_launches() as real:
        _ops("cpu", gen)[op]()
    with capture_launches(90) as captured:
        _ops("meta", gen)[op]()
    assert real, "the op launched no kernel"
    assert [lc.summary() for lc in captured] == real


def test_capture_restores_triton_and_the_runtime():
    run, runs_on = InterpretedFunction.run, _runtime._capture_capability
    with pytest.raises(RuntimeError, match="boom"):
        with capture_launches(90):
            raise RuntimeError("boom")
    assert InterpretedFunction.run is run and _runtime._capture_capability is runs_on is None
    assert not _runtime.triton_runs_on(torch.empty(1, device="meta"))


@pytest.mark.parametrize("m", [1, 48, 1024, 168_960])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("k", [4096, 11008])
@pytest.mark.parametrize("fmt", ["w8a16-int8", "w8a16-fp8", "w8a8-int8", "w8a8-fp8"])
def test_quant_gemm_offers_a_fitting_config_at_every_size(fmt, k, swiglu, m):
    """The GPU config tables of the quantized GEMMs, pruned as autotuning prunes them on sm_90:
    never empty, every config kept passes the resource rule, and the configs come from the call's
    M range whenever one of that range fits."""
    from longcat.kernels import quant_gemm as qg

    wdt = torch.int8 if fmt.endswith("int8") else torch.float8_e4m3fn
    a8 = fmt.startswith("w8a8")
    x = torch.empty(m, k, dtype=wdt if a8 else torch.bfloat16, device="meta")
    w = torch.empty(2 * 4096 if swiglu else 4096, k, dtype=wdt, device="meta")
    named = {"M": m, "x_ptr": x, "w_ptr": w}
    table = qg._W8A8_CONFIGS if a8 else qg._W8A16_CONFIGS
    x_bytes = x.element_size()
    convert = 0 if a8 else qg._w8a16_convert_bytes(named)
    promote = a8 and wdt == torch.float8_e4m3fn and k > qg.FP8_PROMOTE_ABOVE_K
    kept = qg._prune(table, lambda a: x_bytes, lambda a: convert)([c for _, c in table], named, SWIGLU=swiglu, PROMOTE_FP8=promote)
    assert kept
    ranges = {id(c): r for r, c in table}
    wanted = qg._m_range(m)
    fitting_wanted = [c for r, c in table if r == wanted and qg._fits(c, x_bytes, swiglu, promote, convert)]
    for c in kept:
        assert qg._fits(c, x_bytes, swiglu, promote, convert)
        assert ranges[id(c)] == (wanted if fitting_wanted else "small")
