"""Variable-length (packed) attention (Triton) against the float64 reference: empty samples,
host-sync-free max_seqlen, gradients, strided views, validation."""
import pytest
import torch

from oracle import assert_by_rule

from longcat.kernels.attention import varlen_attention, varlen_attention_reference

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _cu(lengths, device="cpu", dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype, device=device)


def _packed(gen, q_lens, k_lens, H, D, dtype, device="cpu"):
    q = torch.randn((sum(q_lens), H, D), generator=gen).to(device=device, dtype=dtype)
    kv = torch.randn((sum(k_lens), 2, H, D), generator=gen).to(device=device, dtype=dtype)
    return q, kv[:, 0], kv[:, 1]  # k, v are strided views of one packed kv tensor


def _finite_lse(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _check_against_oracle(q, k, v, cu_q, cu_k, max_q=None, max_k=None, grads=True):
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, return_lse=True)
    lowp = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out_lowp, lse_lowp = varlen_attention_reference(*lowp, cu_q, cu_k, return_lse=True)
    exact = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    out_ref, lse_ref = varlen_attention_reference(*exact, cu_q, cu_k, return_lse=True)
    assert_by_rule(out, out_lowp, out_ref, atol=ATOL[dtype])
    # samples without keys: lse exactly -inf, output exactly 0
    empty = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out[empty] == 0).all()
    assert_by_rule(_finite_lse(lse), _finite_lse(lse_lowp), _finite_lse(lse_ref), atol=1e-5)
    if not grads:
        return
    gen = torch.Generator().manual_seed(7)
    d_out = torch.randn(out.shape, generator=gen).to(out.device)
    d_lse = torch.randn(lse.shape, generator=gen).to(out.device)
    for o, l, ts in ((out, lse, leaves), (out_lowp, lse_lowp, lowp), (out_ref, lse_ref, exact)):
        ((o.double() * d_out.double()).sum() + (_finite_lse(l).double() * d_lse.double()).sum()).backward()
    for name, t, t_lowp, t_ref in zip("qkv", leaves, lowp, exact):
        assert_by_rule(t.grad, t_lowp.grad, t_ref.grad, atol=GRAD_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward_with_empty_samples(gen, dtype):
    # sample 1 has queries but no keys (empty text), sample 2 keys but no queries
    q_lens, k_lens = [37, 21, 0, 70], [20, 0, 9, 75]
    q, k, v = _packed(gen, q_lens, k_lens, 2, 64, dtype)
    _check_against_oracle(q, k, v, _cu(q_lens), _cu(k_lens))


def test_max_seqlen_given_and_int64_offsets(gen):
    """With max_seqlen given there is no host sync; an upper bound larger than needed is fine."""
    q_lens, k_lens = [5, 66, 17], [40, 3, 90]
    q, k, v = _packed(gen, q_lens, k_lens, 1, 32, torch.float32)
    cu_q, cu_k = _cu(q_lens, dtype=torch.int64), _cu(k_lens, dtype=torch.int64)
    _check_against_oracle(q, k, v, cu_q, cu_k, max_q=66, max_k=90)
    loose = varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=200, max_seqlen_k=128)
    assert torch.equal(loose, varlen_attention(q, k, v, cu_q, cu_k))


def test_single_sample_equals_dense(gen):
    from longcat.kernels.attention import dense_attention

    q, k, v = _packed(gen, [45], [30], 2, 32, torch.float32)
    out = varlen_attention(q, k, v, _cu([45]), _cu([30]), scale=0.2)
    dense = dense_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale=0.2)
    assert torch.allclose(out, dense[0].transpose(0, 1), atol=1e-6)


def test_rejects_bad_inputs(gen):
    q, k, v = _packed(gen, [4, 4], [3, 5], 1, 32, torch.float32)
    cu_q, cu_k = _cu([4, 4]), _cu([3, 5])
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        varlen_attention(q, k, v, cu_q + 1, cu_k)
    with pytest.raises(ValueError, match="end at the packed length"):
        varlen_attention(q, k, v, _cu([4, 3]), cu_k)
    with pytest.raises(ValueError, match="same batch size"):
        varlen_attention(q, k, v, cu_q, _cu([3, 5, 0]))
    with pytest.raises(TypeError, match="cu_seqlens_k has dtype float32"):
        varlen_attention(q, k, v, cu_q, cu_k.float())
    with pytest.raises(TypeError, match="share a dtype"):
        varlen_attention(q, k.half(), v, cu_q, cu_k)
    with pytest.raises(ValueError, match="head_dim 24"):
        varlen_attention(q[..., :24], k[..., :24], v[..., :24], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"must be \[total, heads, D\]"):
        varlen_attention(q, k[:, :, :16], v, cu_q, cu_k)
    # offsets read on the host (no max_seqlen given): past the tensors, going backwards, too-small bounds
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at the packed length 8"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        varlen_attention(q, k, v, torch.tensor([0, 6, 5, 8], dtype=torch.int32), _cu([3, 5, 0]))
    with pytest.raises(ValueError, match=r"max_seqlen_q=3 is smaller than the longest sample of cu_seqlens_q \(4 rows\)"):
        varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=3)
    with pytest.raises(ValueError, match=r"max_seqlen_k=4 is smaller than the longest sample of cu_seqlens_k \(5 rows\)"):
        varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_k=4)
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match="max_seqlen_k must be a non-negative int"):
            varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=bad)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        varlen_attention(q, k, v, cu_q, cu_k, scale=-1.0)


def _guarded(gen, rows, H, D, lead=7, tail=9, fill=float("nan")):
    """A [rows, H, D] view with ``lead``/``tail`` rows of ``fill`` on either side in memory,
    and the whole buffer: reading outside the view brings NaN in, writing outside changes fill."""
    buf = torch.full((lead + rows + tail, H, D), fill)
    buf[lead:lead + rows] = torch.randn((rows, H, D), generator=gen)
    return buf[lead:lead + rows], buf


def test_trusted_offsets_never_leave_the_tensors(gen):
    """With max_seqlen given the offsets are trusted (no host sync), so the kernels must stay
    inside their tensors whatever the offsets say: past the end, going backwards, with a
    too-small max_seqlen. Inputs sit between NaN rows (a read outside shows as NaN), outputs
    between poison rows (a write outside changes them)."""
    from longcat.kernels.attention._common import flash_backward, flash_forward

    H, D, poison = 2, 32, 12345.0
    q, _ = _guarded(gen, 100, H, D)
    k, _ = _guarded(gen, 90, H, D)
    v, _ = _guarded(gen, 90, H, D)
    # sample 0 is valid and longer than a query block and a key block; sample 1 runs backwards;
    # sample 2 runs past both tensors
    cu_q = torch.tensor([0, 80, 40, 10_000], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 30, 5_000], dtype=torch.int32)
    scale = D ** -0.5
    for max_q, max_k in ((2, 3), (10_000, 5_000)):  # far too small, and the offsets' own (huge) spans
        out, out_buf = _guarded(gen, 100, H, D, fill=poison)
        out.fill_(poison)
        lse_buf = torch.full((110, H), poison)
        lse = lse_buf[4:104]
        flash_forward(q, k, v, out, lse, cu_q, cu_k, scale, "shd", 3, H, 100, 90, max_q=max_q)
        assert (out_buf[:7] == poison).all() and (out_buf[107:] == poison).all()
        assert (lse_buf[:4] == poison).all() and (lse_buf[104:] == poison).all()
        written = (out != poison).any(dim=-1)
        assert written.any() and torch.isfinite(out[written]).all()
        assert not torch.isnan(lse).any()
        # rows 0..39 belong to sample 0 only (sample 2, clamped to rows 40..99, overlaps the rest):
        # where written, they are its exact attention
        ref = varlen_attention_reference(q[:80], k[:70], v[:70], _cu([80]), _cu([70]), scale=scale)[:40]
        rows = written[:40]
        assert torch.allclose(out[:40][rows], ref[rows], atol=1e-5)
        if max_q == 10_000:
            assert rows.all()

        grads = []
        for _ in range(3):
            g, g_buf = _guarded(gen, 100 if not grads else 90, H, D, fill=poison)
            g.fill_(poison)
            grads.append((g, g_buf))
        (dq, dq_buf), (dk, dk_buf), (dv, dv_buf) = grads
        do = torch.randn((100, H, D), generator=gen)
        delta = torch.zeros((100, H))
        lse_ok = torch.where(torch.isfinite(lse) & (lse != poison), lse, torch.zeros_like(lse))
        flash_backward(do, q, k, v, lse_ok, delta, dq, dk, dv, cu_q, cu_k, scale, "shd", 3, H, 100, 90,
                       max_q=max_q, max_k=max_k)
        for t, buf in ((dq, dq_buf), (dk, dk_buf), (dv, dv_buf)):
            assert (buf[:7] == poison).all() and (buf[-9:] == poison).all()
            assert torch.isfinite(t[(t != poison).any(dim=-1)]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_text_cross_attention_shapes(gen, dtype):
    """Video queries against per-sample packed text keys, as the DiT's cross-attention."""
    q_lens, k_lens = [1500, 1500], [0, 226]
    q, k, v = _packed(gen, q_lens, k_lens, 4, 128, dtype, "cuda")
    _check_against_oracle(q, k, v, _cu(q_lens, "cuda"), _cu(k_lens, "cuda"), max_q=1500, max_k=226)
