"""Peers the subject is measured against, each found at run time: PyTorch SDPA backends,
FlexAttention, ``torch.compile``, bitsandbytes, optimum-quanto and upstream LongCat-Video.

Every lookup returns a callable or a reason it is not available; nothing here raises because a
peer is missing, so one absent library never stops a run.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Unavailable",
    "optional_attr",
    "sdpa_backend_fns",
    "flex_attention_fn",
    "compiled",
    "peer_packages",
    "upstream_bsa_fn",
]


class Unavailable(Exception):
    """A peer or API that cannot run here; the message says why."""


def optional_attr(module: str, name: str):
    """``module.name`` or raise Unavailable naming what is missing (for APIs still being written)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"{module} not importable ({e})") from None
    if not hasattr(mod, name):
        raise Unavailable(f"{module}.{name} not available yet")
    return getattr(mod, name)


def sdpa_backend_fns(device: torch.device) -> dict:
    """name -> fn(q, k, v) for SDPA. On CUDA one entry per backend (flash, cuDNN, efficient), each
    forced with ``sdpa_kernel`` so a missing backend fails loudly instead of silently falling back;
    on the CPU one entry, PyTorch's own choice."""
    if device.type != "cuda":
        return {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    fns = {}
    for name, attr in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION")):
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            continue

        def fn(q, k, v, _b=backend):
            with sdpa_kernel(_b):
                return F.scaled_dot_product_attention(q, k, v)

        fns[name] = fn
    return fns


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(device: torch.device):
    """(fn(q, k, v, block_mask), make_block_mask(indices, counts, q_len, kv_len)) for FlexAttention
    on CUDA, or raise Unavailable. The block mask comes from the BSA selection, the same tiles BSA
    uses: each selected key tile is a full 128-token block, so no mask_mod is evaluated."""
    if device.type != "cuda":
        raise Unavailable("FlexAttention is measured on a GPU only")
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention not importable ({e})") from None
    flex = _compiled_flex()

    def make_block_mask(indices, counts, block_size: int, q_len: int, kv_len: int):
        zeros = torch.zeros_like(counts)
        return BlockMask.from_kv_blocks(
            zeros, indices, full_kv_num_blocks=counts, full_kv_indices=indices,
            BLOCK_SIZE=block_size, seq_lengths=(q_len, kv_len),
        )

    def run(q, k, v, block_mask):
        return flex(q, k, v, block_mask=block_mask)

    return run, make_block_mask


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn`` (the element-wise references' natural peer); raises Unavailable
    when the compiler cannot be used here (e.g. no C++ compiler for the CPU backend)."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the installation
        raise Unavailable(f"torch.compile unavailable ({type(e).__name__}: {e})") from None


def peer_packages() -> dict:
    """Which optional peer packages are importable: name -> version or None."""
    out = {}
    for name, module in (("bitsandbytes", "bitsandbytes"), ("optimum-quanto", "optimum.quanto"), ("longcat_video", "longcat_video")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            out[name] = None
            continue
        try:
            mod = importlib.import_module(module)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception:
            out[name] = None
    return out


def upstream_bsa_fn() -> Tuple[Optional[Callable], str]:
    """Upstream LongCat-Video's block-sparse attention when the package ``longcat_video`` is
    importable: (fn, "") or (None, reason)."""
    if importlib.util.find_spec("longcat_video") is None:
        return None, "longcat_video (upstream) not installed"
    try:
        mod = importlib.import_module("longcat_video.block_sparse_attention.bsa_interface")
        return getattr(mod, "flash_attn_bsa_3d"), ""
    except Exception as e:
        return None, f"upstream BSA not importable ({type(e).__name__}: {e})"
