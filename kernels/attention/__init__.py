"""Attention kernels: block-sparse 3D, dense and variable-length.

Each op has a Triton path (a ``torch.library`` custom op with a backward, usable under
``torch.compile``) and a pure-PyTorch ``*_reference``; the public function picks the Triton path
when the tensors are on CUDA (or on the CPU with ``TRITON_INTERPRET=1``) and otherwise warns once
and runs the reference.
"""
from .block_sparse import (
    DEFAULT_TILE,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_keys,
    block_sparse_selection,
    block_sparse_selection_reference,
)
from .dense import dense_attention, dense_attention_reference
from .varlen import varlen_attention, varlen_attention_reference

__all__ = [
    "DEFAULT_TILE",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_keys",
    "block_sparse_selection",
    "block_sparse_selection_reference",
    "dense_attention",
    "dense_attention_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
