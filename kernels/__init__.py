"""Triton kernels of the LongCat-Video DiT, each beside its pure-PyTorch ``*_reference`` oracle.

Submodules (import the op from its module):
- ``longcat.kernels.attention``: block-sparse 3D attention, dense and variable-length attention;
- ``longcat.kernels.modulate``: LayerNorm + per-frame adaLN modulate (optionally emitting 8-bit
  activations with per-token scales);
- ``longcat.kernels.residual``: per-frame gated residual, fused with the following norm;
- ``longcat.kernels.rope``: per-head RMSNorm and 3D RoPE;
- ``longcat.kernels.qkv_prep``: q/k RMSNorm + 3D RoPE of the qkv GEMM output in one pass;
- ``longcat.kernels.quantize_activations``: per-token activation quantization (the one rounding
  rule every 8-bit activation producer follows);
- ``longcat.kernels.swiglu``: the SwiGLU gate of the FFN.

On a CUDA device the Triton kernels run; on the CPU they run in the Triton interpreter when
``TRITON_INTERPRET=1``, and otherwise the public functions fall back to the references.
"""
