"""Block offload: DiT block weights live in pinned CPU memory; each block is copied to the GPU
just before it runs and dropped after, while the next ``prefetch`` blocks are copied on a side
stream.

With 48 blocks of ~280 M parameters each, only 1 + prefetch blocks' weights are on the GPU at
any time; the copies overlap the previous blocks' compute. On a device other than CUDA (the meta
device, used to check the schedule without a GPU) the copies are synchronous.
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["BlockOffloader", "first_tensor_device"]


def first_tensor_device(args, kwargs) -> Optional[torch.device]:
    """The device of a module call's first tensor argument (None when it has none)."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _tensor_slots(block: nn.Module) -> List[Tuple[nn.Module, str, str]]:
    slots = []
    for module in block.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None:
                    slots.append((module, kind, name))
    return slots


def _get(slot):
    module, kind, name = slot
    return getattr(module, kind)[name]


def _set(slot, tensor: torch.Tensor) -> None:
    module, kind, name = slot
    if kind == "_parameters":
        param = module._parameters[name]
        if "meta" in (param.device.type, tensor.device.type):  # set_data refuses meta <-> real tensors
            module._parameters[name] = nn.Parameter(tensor, requires_grad=param.requires_grad)
        else:
            param.data = tensor
    else:
        module._buffers[name] = tensor


class BlockOffloader:
    """Installs forward hooks on ``blocks``; ``remove()`` puts every weight back where it was.

    prefetch: how many of the following blocks are copied in while a block computes (1 + prefetch
    blocks resident). ``events`` records the schedule as ("load", i) when block i's copy is
    issued, ("run", i) when it starts computing and ("free", i) when its weights are dropped.
    """

    def __init__(self, blocks: nn.ModuleList, prefetch: int = 1):
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int (blocks copied ahead), got {prefetch!r}")
        self.prefetch = prefetch
        self.blocks = list(blocks)
        self.events: Deque[Tuple[str, int]] = collections.deque(maxlen=3 * len(self.blocks))  # the last forward
        self.slots = [_tensor_slots(b) for b in self.blocks]
        self.home: List[List[torch.device]] = []
        self.cpu: List[List[torch.Tensor]] = []
        pin = torch.cuda.is_available()
        for slots in self.slots:
            self.home.append([_get(s).device for s in slots])
            copies = []
            for s in slots:
                t = _get(s).detach().to("cpu")
                if pin and not t.is_pinned():
                    t = t.pin_memory()
                copies.append(t)
                _set(s, t)
            self.cpu.append(copies)
        self.stream: Optional[torch.cuda.Stream] = None
        self.pending: Dict[int, Optional[torch.cuda.Event]] = {}  # copied in, not yet run
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._make_post_hook(i)))


    def _copy_in(self, i: int, device: torch.device) -> None:
        """Start copying block i to ``device`` (on the side stream on CUDA); no-op if already issued."""
        if i >= len(self.blocks) or i in self.pending:
            return
        self.events.append(("load", i))
        if device.type != "cuda":
            for s, cpu_t in zip(self.slots[i], self.cpu[i]):
                _set(s, cpu_t.to(device))
            self.pending[i] = None
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            for s, cpu_t in zip(self.slots[i], self.cpu[i]):
                _set(s, cpu_t.to(device, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.pending[i] = ev

    def _make_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            device = first_tensor_device(args, kwargs) or torch.device("cpu")
            if device.type == "cpu":
                return None
            self._copy_in(i, device)
            ev = self.pending.pop(i)
            if ev is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(ev)
                for s in self.slots[i]:
                    _get(s).record_stream(current)  # the side stream allocated it; compute uses it here
            self.events.append(("run", i))
            for j in range(i + 1, i + 1 + self.prefetch):
                self._copy_in(j, device)  # prefetch while block i computes
            return None

        return hook

    def _make_post_hook(self, i: int):
        def hook(module, args, output):
            if _get(self.slots[i][0]).device.type != "cpu":
                for s, cpu_t in zip(self.slots[i], self.cpu[i]):
                    _set(s, cpu_t)
                self.events.append(("free", i))
            return None

        return hook

    def resident_blocks(self) -> List[int]:
        """Indices of the blocks whose weights are off the CPU now."""
        return [i for i, slots in enumerate(self.slots) if _get(slots[0]).device.type != "cpu"]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.stream is not None:
            torch.cuda.synchronize()
        self.pending.clear()
        for slots, homes, copies in zip(self.slots, self.home, self.cpu):
            for s, device, cpu_t in zip(slots, homes, copies):
                _set(s, cpu_t.to(device))
