"""Frame-chunked blocks (``attention_chunk_frames``): the same results as whole-sequence blocks on
every path, and no whole-sequence tensor besides x, K and V."""
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longcat
from longcat import LongCatVideoTransformer3DModel, accelerate
from longcat.model import chunked_block_forward
from longcat.ops import kernel_ops

from dit_cases import assert_paths_close, forward_paths, random_inputs

BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 4]}


def _model(bsa=False):
    torch.manual_seed(5)
    m = LongCatVideoTransformer3DModel.from_preset("tiny", num_heads=4).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    if bsa:
        m.blocks[0].attn.bsa_params = m.blocks[1].attn.bsa_params = BSA
        m.enable_bsa()
    return m


def _inputs(gen, B=2, T=5):
    return random_inputs(gen, B=B, T=T, H=8, W=8)


def _paths(model, *inputs):
    return forward_paths(model, *inputs)


# (attention, fused ops, BSA on, frames per chunk, batch): the Triton cases (interpreter on the
# CPU) are kept small; chunk 1 with BSA tiles of 2 frames is rounded up to 2.
CASES = [
    ("reference", False, False, 1, 2),
    ("reference", False, False, 3, 2),
    ("sdpa", False, False, 3, 2),
    ("dense", True, False, 3, 2),
    ("bsa", True, True, 1, 1),
]


@pytest.mark.parametrize("attention, fused, bsa, chunk, batch", CASES)
def test_chunked_blocks_match_whole_blocks(gen, attention, fused, bsa, chunk, batch):
    inputs = _inputs(gen, B=batch)
    want = _paths(accelerate(_model(bsa), attention=attention, fused=fused), *inputs)
    # A chunk of 3 frames also runs its FFN 2 frames at a time (ffn_chunk_frames).
    m = accelerate(_model(bsa), attention=attention, fused=fused, attention_chunk_frames=chunk,
                   ffn_chunk_frames=2 if chunk == 3 else None)
    assert longcat.acceleration_report(m).chunking == f"blocks {chunk}, FFN {2 if chunk == 3 else chunk}"
    got = _paths(m, *inputs)
    assert_paths_close(got, want)


def test_block_sparse_chunks_keep_upstream_tiles(gen):
    """With tile t = 2 a chunk of 1 frame is rounded up to whole tiles, and on the condition path
    the noise tiles start at the first noise frame: selection and output equal the reference's."""
    inputs = _inputs(gen)
    want = _paths(_model(bsa=True).set_ops(longcat.REFERENCE_OPS), *inputs)
    got = _paths(_model(bsa=True).set_ops(longcat.REFERENCE_OPS.replace(attention_chunk_frames=1)), *inputs)
    assert_paths_close(got, want)


def test_quantized_and_wrapped_linears(gen):
    """QuantizedLinear computes only the rows it is asked for; a Linear whose forward was replaced
    (a LoRA-style wrapper) runs whole and is sliced. Both give the unchunked results."""
    inputs = _inputs(gen, T=3)

    def wrapped(model):
        for block in model.blocks:
            qkv = block.attn.qkv
            down = torch.randn(4, qkv.in_features, generator=torch.Generator().manual_seed(1)) * 0.05
            up = torch.randn(qkv.out_features, 4, generator=torch.Generator().manual_seed(2)) * 0.05
            qkv.forward = types.MethodType(lambda self, x, d=down, u=up: torch.nn.functional.linear(x, self.weight, self.bias) + x @ d.T @ u.T, qkv)
        return model

    for make in (lambda: accelerate(_model(), attention="sdpa", fused=False, quantize="int8"),
                 lambda: wrapped(accelerate(_model(), attention="sdpa", fused=False))):
        want = _paths(make(), *inputs)
        m = make()
        m.set_ops(m.ops.replace(attention_chunk_frames=1))
        got = _paths(m, *inputs)
        assert_paths_close(got, want)


class _LargeStorages(TorchDispatchMode):
    """Records the storages of op outputs holding at least ``min_bytes``."""

    def __init__(self, min_bytes):
        super().__init__()
        self.min_bytes, self.seen = min_bytes, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() >= self.min_bytes:
                self.seen[o.untyped_storage().data_ptr()] = str(func)
        return out


@pytest.mark.parametrize("chunked", [False, True])
def test_only_k_and_v_span_the_sequence(gen, chunked):
    """Inside a chunked block no tensor as large as the residual stream is made except K and V
    (the whole-sequence block makes many: the check can fail)."""
    m = _model()
    block = m.blocks[0]
    B, T, H, W, C = 1, 6, 4, 4, 256
    N = T * H * W
    x = torch.randn(B, N, C, generator=gen)
    t = torch.randn(B, T, 64, generator=gen)
    text = torch.randn(5, C, generator=gen)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    ops = longcat.SDPA_OPS.replace(attention_chunk_frames=1)
    rec = _LargeStorages(x.untyped_storage().nbytes())
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    with torch.no_grad(), rec:
        if chunked:
            chunked_block_forward(block, x.clone(), t, text, cu, (T, H, W), ops)
        else:
            longcat.model.block_forward(block, x.clone(), t, text, cu, (T, H, W), longcat.SDPA_OPS)
    big = len(set(rec.seen) - weights) - 1  # minus the clone of x
    if chunked:
        assert big == 2, rec.seen
    else:
        assert big > 2, rec.seen


def test_chunk_arguments_are_checked():
    with pytest.raises(ValueError, match="attention_chunk_frames must be None or a positive int"):
        kernel_ops("sdpa", attention_chunk_frames=0)
    with pytest.raises(ValueError, match="ffn_chunk_frames must be None or a positive int"):
        accelerate(_model(), attention="sdpa", ffn_chunk_frames=-1)


def _gpu_step(quantize, gen, **chunks):
    """Output and peak memory of one bf16 step of the small preset (BSA, fused Triton ops)."""
    torch.manual_seed(5)
    m = LongCatVideoTransformer3DModel.from_preset("small").to("cuda", torch.bfloat16).eval()
    m.blocks[0].attn.bsa_params = {"sparsity": 0.75}
    accelerate(m, attention="bsa", fused=True, bsa=True, quantize=quantize, **chunks)
    x, t, y, mask = (v.cuda() for v in random_inputs(gen, B=1, T=16, H=64, W=64, L=32, caption_channels=256))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = m(x, t, y, mask)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_chunked_blocks_bf16_on_gpu_lower_the_peak(quantize):
    """bf16 on the GPU (16 x 32 x 32 tokens): chunked blocks give the whole-block output within
    bf16 rounding and a lower activation peak."""
    whole, whole_peak = _gpu_step(quantize, torch.Generator().manual_seed(0))
    chunked, chunked_peak = _gpu_step(quantize, torch.Generator().manual_seed(0), attention_chunk_frames=4, ffn_chunk_frames=1)
    err = (chunked - whole).norm() / whole.norm()
    assert err < 2e-2, err
    assert chunked_peak < 0.75 * whole_peak, (chunked_peak, whole_peak)
