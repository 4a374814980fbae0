"""Accuracy of the 8-bit formats at the real LongCat-Video Linear shapes.

For each layer shape (out x in), weight distribution (Gaussian, heavy-tailed Student-t with 3
degrees of freedom) and format, the float32 output ``x W^T`` is compared with the quantized one:
SQNR in dB (``10 log10(sum ref^2 / sum (ref - out)^2)``) and cosine similarity, plus the SQNR of the
weight itself. Activations are Gaussian with a few outlier channels scaled x100 (as DiT
activations have). The longcat formats are computed with the kernels' reference math in float32
on the CPU (the Triton kernels match that math; see the kernel tests); peers (bitsandbytes,
optimum-quanto) run their own modules when installed.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from longcat.kernels.quantize_activations import quantize_per_token_reference

from .config import WEIGHT_DTYPES
from .linear import dequantize_weight, quantize_weight

__all__ = [
    "LAYER_SHAPES",
    "FORMATS",
    "sqnr_db",
    "cosine_similarity",
    "make_weight",
    "make_activations",
    "quantized_output",
    "layer_accuracy",
    "accuracy_table",
    "format_table",
]

# (out_features, in_features) of every distinct Linear shape in a LongCat-Video block.
LAYER_SHAPES = OrderedDict([
    ("attn.qkv", (12288, 4096)),
    ("attn.proj / q_linear / cross proj", (4096, 4096)),
    ("cross_attn.kv_linear", (8192, 4096)),
    ("ffn.w1 / w3", (11008, 4096)),
    ("ffn.w2", (4096, 11008)),
    ("adaLN_modulation", (24576, 512)),
])
FORMATS = ("int8", "fp8", "int8-dynamic", "fp8-dynamic")
PEER_FORMATS = (("bitsandbytes", "int8"), ("bitsandbytes", "nf4"), ("quanto", "int8"), ("quanto", "fp8"))


def _chunked_sums(ref: torch.Tensor, test: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float, float, float]:
    # sum(ref^2), sum((ref - test)^2), sum(ref * test), sum(test^2) accumulated in float64 chunk
    # by chunk, so a 50M-element weight is never copied whole to float64.
    r, t = ref.reshape(-1), test.reshape(-1)
    if r.shape != t.shape:
        raise ValueError(f"ref and test must have one number of elements, got {ref.shape} and {test.shape}")
    ss = nn_ = rt = tt = 0.0
    for i in range(0, r.numel(), chunk):
        a, b = r[i:i + chunk].double(), t[i:i + chunk].double()
        ss += a.square().sum().item()
        nn_ += (a - b).square().sum().item()
        rt += (a * b).sum().item()
        tt += b.square().sum().item()
    return ss, nn_, rt, tt


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB (inf when equal)."""
    signal, noise, _, _ = _chunked_sums(ref, test)
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(ref: torch.Tensor, test: torch.Tensor) -> float:
    ss, _, rt, tt = _chunked_sums(ref, test)
    return rt / math.sqrt(ss * tt) if ss > 0 and tt > 0 else float("nan")


def make_weight(out_features: int, in_features: int, dist: str = "gaussian", generator=None, std: float = 0.02) -> torch.Tensor:
    """A float32 weight: ``"gaussian"`` or ``"student_t"`` (df = 3, heavy tails), scaled to ``std``-ish."""
    shape = (out_features, in_features)
    if dist == "gaussian":
        return torch.randn(shape, generator=generator) * std
    if dist in ("student_t", "t3", "heavy"):
        # t_3 = z / sqrt(chi2_3 / 3) with chi2_3 = chi2_2 + chi2_1 = -2 log(U) + z2^2 (two draws, not three).
        z = torch.randn(shape, generator=generator)
        chi2 = torch.rand(shape, generator=generator).clamp_min_(1e-30).log_().mul_(-2.0)
        chi2.add_(torch.randn(shape, generator=generator).square_())
        return z.mul_(torch.rsqrt(chi2.div_(3.0).clamp_min_(1e-12))).mul_(std)
    raise ValueError(f"dist must be 'gaussian' or 'student_t', got {dist!r}")


def make_activations(tokens: int, in_features: int, generator=None, outlier_channels: int = 4, outlier_scale: float = 100.0) -> torch.Tensor:
    """Gaussian activations [tokens, in] with ``outlier_channels`` channels scaled by ``outlier_scale``."""
    x = torch.randn(tokens, in_features, generator=generator)
    if outlier_channels:
        idx = torch.randperm(in_features, generator=generator)[:outlier_channels]
        x[:, idx] *= outlier_scale
    return x


def quantized_output(fmt: str, x: torch.Tensor, w: torch.Tensor, _cache: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, dequantised weight) of the longcat format ``fmt`` in float32 reference math."""
    weight, _, mode = fmt.partition("-")
    if weight not in WEIGHT_DTYPES or mode not in ("", "dynamic"):
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    cache = {} if _cache is None else _cache
    if weight not in cache:
        w_q, scale = quantize_weight(w, WEIGHT_DTYPES[weight])
        codes = w_q.float()  # exact: int8 and e4m3 values are float32 numbers
        cache[weight] = (codes, scale, codes * scale.unsqueeze(1))
    codes, scale, w_dq = cache[weight]
    # The kernels' reference math (weight_only_linear_reference / dynamic_linear_reference) with the
    # float32 codes kept between formats; the dynamic integer sums are done by a float32 GEMM here
    # (< 1e-7 relative error, far below the quantization noise) to keep the CPU table fast.
    if mode == "dynamic":
        x_q, x_scale = quantize_per_token_reference(x, WEIGHT_DTYPES[weight])
        y = (x_q.float() @ codes.t()) * x_scale.unsqueeze(-1) * scale
    else:
        y = (x.float() @ codes.t()) * scale
    return y, w_dq


def _peer_output(backend: str, fmt: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from .peers import quantize_peer

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    holder = nn.Sequential(OrderedDict(layer=lin))
    quantize_peer(holder, fmt, backend=backend)
    with torch.no_grad():
        return holder(x).float()


def layer_accuracy(out_features: int, in_features: int, *, dist: str = "gaussian", formats: Iterable[str] = FORMATS,
                   tokens: int = 256, seed: int = 0, peers: Iterable[tuple[str, str]] = (),
                   outlier_channels: int = 4) -> list[dict]:
    """Rows of metrics for one layer shape and weight distribution."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(out_features, in_features, dist, g)
    x = make_activations(tokens, in_features, g, outlier_channels=outlier_channels)
    ref = x @ w.t()
    rows = []
    cache: dict = {}
    for fmt in formats:
        t0 = time.perf_counter()
        y, w_dq = quantized_output(fmt, x, w, cache)
        wkey = "sqnr:" + fmt.partition("-")[0]
        if wkey not in cache:
            cache[wkey] = sqnr_db(w, w_dq)
        rows.append(dict(shape=(out_features, in_features), dist=dist, backend="longcat", format=fmt,
                         weight_sqnr_db=cache[wkey], out_sqnr_db=sqnr_db(ref, y),
                         out_cosine=cosine_similarity(ref, y), seconds=time.perf_counter() - t0))
    for backend, fmt in peers:
        t0 = time.perf_counter()
        y = _peer_output(backend, fmt, x, w)
        rows.append(dict(shape=(out_features, in_features), dist=dist, backend=backend, format=fmt,
                         weight_sqnr_db=float("nan"), out_sqnr_db=sqnr_db(ref, y),
                         out_cosine=cosine_similarity(ref, y), seconds=time.perf_counter() - t0))
    return rows


def accuracy_table(shapes: Optional[dict] = None, dists: Iterable[str] = ("gaussian", "student_t"),
                   formats: Iterable[str] = FORMATS, tokens: int = 256, seed: int = 0,
                   peers: Iterable[tuple[str, str]] = (),
                   on_step: Optional[Callable[[int, int, str], None]] = None) -> list[dict]:
    """Rows for every (layer, distribution, format[, peer]). ``on_step(done, total, what)`` is
    called after each (layer, distribution), e.g. to show progress."""
    shapes = LAYER_SHAPES if shapes is None else shapes
    dists = tuple(dists)
    total = len(shapes) * len(dists)
    rows = []
    for i, (layer, (n, k)) in enumerate(shapes.items()):
        for j, dist in enumerate(dists):
            for row in layer_accuracy(n, k, dist=dist, formats=formats, tokens=tokens, seed=seed + 100 * i + j, peers=peers):
                row["layer"] = layer
                rows.append(row)
            if on_step is not None:
                on_step(i * len(dists) + j + 1, total, f"{layer} {n}x{k} {dist}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'layer':<36}{'out x in':>14}  {'weights':<10}{'backend':<14}{'format':<14}{'W SQNR dB':>10}{'out SQNR dB':>12}{'cosine':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        wsq = "" if math.isnan(r["weight_sqnr_db"]) else f"{r['weight_sqnr_db']:.2f}"
        lines.append(f"{r.get('layer', ''):<36}{shape:>14}  {r['dist']:<10}{r['backend']:<14}{r['format']:<14}"
                     f"{wsq:>10}{r['out_sqnr_db']:>12.2f}{r['out_cosine']:>10.6f}")
    return "\n".join(lines)
