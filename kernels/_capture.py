"""Record the Triton launches an op would make, without running them and without a GPU.

``capture_launches(arch)`` drives the real launchers, so the configs it records are the ones a
launch would use (no launch logic is repeated here). Inside the context:

- ``JITFunction.run`` (and the interpreter's ``InterpretedFunction.run``) record the kernel, its
  arguments, constexprs, ``num_warps``/``num_stages`` and the grid instead of compiling and
  launching;
- ``Autotuner.run`` records one launch per config that survives ``prune_configs_by`` (the configs
  autotuning would benchmark on a GPU), each marked with the autotuner's candidate count;
- ``longcat::`` custom ops run their real body for tensors on the ``meta`` device (normally a meta
  tensor would go to the op's fake implementation), and ``triton_runs_on`` says yes for meta
  tensors, as for CUDA tensors of a device of compute capability ``arch``; the fp8 guards see that
  capability too.

Meta tensors cost no memory, so launchers run at the real shapes (qkv at 720p is 4 GB in bf16).
Launchers that read tensor values on the host (varlen ``cu_seqlens``) cannot be driven this way.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _runtime

__all__ = ["Launch", "capture_launches"]


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher requested it."""

    kernel: Any  # the JITFunction (or InterpretedFunction under TRITON_INTERPRET)
    args: tuple
    kwargs: dict[str, Any]  # constexprs and launch options, as passed (autotune config included)
    grid: tuple[int, ...]
    autotune_candidates: int = 0  # configs kept by pruning when the kernel is autotuned, else 0

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def arg_names(self) -> list[str]:
        return list(self.kernel.arg_names)

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.kwargs.get("num_stages", 3))

    def named_args(self) -> dict[str, Any]:
        return {**dict(zip(self.arg_names, self.args)), **self.kwargs}

    def summary(self) -> dict[str, Any]:
        """Kernel name, constexprs and options, grid and argument dtypes: what identifies a launch config."""
        named = self.named_args()
        return {
            "kernel": self.name,
            "grid": tuple(int(g) for g in self.grid),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "scalars": {k: v for k, v in named.items() if not isinstance(v, torch.Tensor) and k not in ("num_warps", "num_stages")},
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in named.items() if isinstance(v, torch.Tensor)},
        }


def _grid(grid, named: dict[str, Any]) -> tuple[int, ...]:
    grid = grid(named) if callable(grid) else grid
    return tuple(int(g) for g in grid)


class _CustomOpsRunReal(TorchDispatchMode):
    """Run ``longcat::`` custom ops' real bodies on meta tensors (the launchers, then recorded)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name)
        if func._schema.name.startswith("longcat::") and opdef is not None:
            return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list[Launch]]:
    """Record (not run) every Triton launch made inside the block; yields the list of launches.

    Pass meta tensors (``device="meta"``) to the public ops; ``arch`` is the compute capability
    (90 = sm_90) the capability guards see. CPU tensors under ``TRITON_INTERPRET=1`` are recorded
    too (the same launch logic, for comparing with a real interpreted launch)."""
    from triton.runtime import autotuner, jit
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    kernel_classes = [jit.JITFunction, InterpretedFunction]

    def record_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            launches.append(Launch(self, tuple(args), dict(kwargs), _grid(grid, named)))

    def record_autotuned(self, *args, **kwargs):
        # kwargs hold grid and warmup too, as in a real Autotuner.run (the prune hook sees the same)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        finally:
            self.nargs = None
        launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for config in configs:
            merged = {**launch_kwargs, **config.all_kwargs()}
            named = {**dict(zip(self.arg_names, args)), **merged}
            launches.append(Launch(self.fn, tuple(args), merged, _grid(kwargs["grid"], named), len(configs)))

    saved = [(cls, cls.run) for cls in kernel_classes]
    saved_autotune_run = autotuner.Autotuner.run
    previous = _runtime._capture_capability
    try:
        for cls in kernel_classes:
            cls.run = record_run
        autotuner.Autotuner.run = record_autotuned
        _runtime._capture_capability = divmod(int(arch), 10)
        with _CustomOpsRunReal():
            yield launches
    finally:
        _runtime._capture_capability = previous
        autotuner.Autotuner.run = saved_autotune_run
        for cls, run in saved:
            cls.run = run
