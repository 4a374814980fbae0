"""Attention kernels: block-sparse 3D, dense and variable-length."""
