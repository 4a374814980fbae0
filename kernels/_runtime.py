"""Shared plumbing for every op in ``longcat.kernels``: where a Triton kernel can run, the
one-time fallback warning, and the input checks that give clear errors.

An op runs its Triton kernel when its tensors live on a CUDA device, or on the CPU when the
Triton interpreter is switched on (``TRITON_INTERPRET=1`` set before triton is imported; this is
how the test-suite exercises the kernels without a GPU) and none of them is bfloat16: the
interpreter cannot compute in bfloat16 (``tl.dot`` multiplies raw bit patterns), so such calls
take the reference path rather than return wrong numbers. Otherwise the public function falls
back to the op's pure-PyTorch ``*_reference``. A process gets one warning per reason for falling
back, naming the first op; every op that falls back is logged once at INFO level
(``logging.getLogger("longcat.kernels")``).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Iterable, Sequence

import torch

__all__ = [
    "interpreter_enabled",
    "triton_runs_on",
    "device_capability",
    "fp8_supported",
    "warn_once",
    "check_tensor",
    "check_same_device",
    "check_latent_shape",
]

_WARNED: set[str] = set()
_LOGGER = logging.getLogger("longcat.kernels")
# Why the latest triton_runs_on call in this thread said no; fallback_warning reads it, because
# every launcher calls fallback_warning right after triton_runs_on refused its tensors.
_REFUSAL = threading.local()

_NO_DEVICE = "no CUDA device and TRITON_INTERPRET is not set"
_BF16_IN_INTERPRETER = "the Triton CPU interpreter cannot compute in bfloat16"
_MIXED_DEVICES = "the tensors are not all on one CUDA device (or all on the CPU under the interpreter)"
_UNSUPPORTED = "this device does not support the Triton kernel for these inputs"

# (major, minor) compute capability while ``longcat.kernels._capture.capture_launches`` records
# launches on meta tensors: they then count as tensors of such a CUDA device.
_capture_capability: tuple[int, int] | None = None


def interpreter_enabled() -> bool:
    """True when Triton kernels execute in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _refusal_reason(tensors) -> str | None:
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        if not interpreter_enabled():
            return _NO_DEVICE
        if any(t.dtype == torch.bfloat16 for t in tensors):
            return _BF16_IN_INTERPRETER
        return None
    if devices == {"meta"} and _capture_capability is not None:
        return None
    return _MIXED_DEVICES


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can take these tensors as they are: all on one CUDA device, or
    all on the CPU with the interpreter on and none of them bfloat16 (which the interpreter
    computes wrongly), or meta tensors while launches are being captured. ``None`` entries
    (absent optional inputs) are ignored."""
    reason = _refusal_reason(tensors)
    _REFUSAL.reason = reason
    return reason is None


def device_capability(*tensors: torch.Tensor) -> tuple[int, int] | None:
    """(major, minor) compute capability of the first CUDA tensor's device (of the captured target
    for meta tensors); None for tensors that run on the CPU (interpreter or reference)."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type == "cuda":
            return torch.cuda.get_device_capability(t.device)
        if t.device.type == "meta" and _capture_capability is not None:
            return _capture_capability
    return None


def fp8_supported(*tensors: torch.Tensor) -> bool:
    """Whether float8_e4m3fn kernels can be compiled for these tensors' device: sm_89 (Ada) and
    later convert and multiply fp8 natively; Triton rejects e4m3 on sm_80 and older. The
    interpreter (CPU) handles fp8."""
    capability = device_capability(*tensors)
    return capability is None or capability >= (8, 9)


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


FP8_NEEDS_SM89 = "float8_e4m3fn kernels need a GPU of compute capability 8.9 or later"


def fallback_warning(op: str, reason: str | None = None) -> None:
    """Record that ``op`` runs its pure-PyTorch reference: one warning per reason per process
    (naming this first op), one INFO log line per op. Call it right after ``triton_runs_on``
    refused the op's tensors, or pass the ``reason`` of an op-specific check that failed."""
    reason = reason or getattr(_REFUSAL, "reason", None) or _UNSUPPORTED
    _REFUSAL.reason = None
    if f"fallback-op:{op}" not in _WARNED:
        _WARNED.add(f"fallback-op:{op}")
        _LOGGER.info("longcat.kernels.%s runs its reference: %s", op, reason)
    warn_once(
        f"fallback:{reason}",
        f"longcat.kernels: {reason}; ops run their pure-PyTorch reference implementations "
        f"(correct, not fast), starting with {op}. This warning is shown once; "
        "logging.getLogger('longcat.kernels') lists each op at INFO level.",
    )


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    last_dim: int | None = None,
) -> None:
    """Raise a TypeError/ValueError naming ``name`` when ``t`` is not the expected tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if last_dim is not None and t.shape[-1] != last_dim:
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise a ValueError listing the devices when the named tensors are not on one device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device; got {listing}")


def check_latent_shape(name: str, shape: Sequence[int], num_tokens: int | None = None) -> tuple[int, int, int]:
    """Validate a (T, H, W) latent grid, optionally against a token count; returns it as ints."""
    try:
        grid = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be a (T, H, W) sequence of ints, got {shape!r}") from None
    if len(grid) != 3 or any(s <= 0 for s in grid):
        raise ValueError(f"{name} must be three positive ints (T, H, W), got {shape!r}")
    if num_tokens is not None and grid[0] * grid[1] * grid[2] != num_tokens:
        raise ValueError(
            f"{name}={grid} holds {grid[0] * grid[1] * grid[2]} tokens but the sequence has {num_tokens}"
        )
    return grid
