"""Peak memory of a region: PyTorch's allocator statistics and, on NVIDIA GPUs, NVML's view of
the whole device (used memory, SM clock, power); on the CPU, the process's peak resident set
(labelled as such wherever it is printed: it is not a per-region or per-model figure)."""
from __future__ import annotations

import resource
import sys
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["MemoryReport", "track_memory", "nvml_snapshot", "LiveTensorBytes", "CPU_PEAK_LABEL"]

GiB = 1024**3


@dataclass
class MemoryReport:
    device: str
    torch_peak_allocated_bytes: Optional[int] = None
    torch_peak_reserved_bytes: Optional[int] = None
    nvml_peak_used_bytes: Optional[int] = None
    nvml_total_bytes: Optional[int] = None
    sm_clock_mhz_max: Optional[int] = None
    power_w_max: Optional[float] = None
    cpu_peak_rss_bytes: Optional[int] = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def peak_bytes(self) -> Optional[int]:
        """The number to report: torch's peak allocation on a GPU, peak RSS on the CPU."""
        return self.torch_peak_allocated_bytes if self.device.startswith("cuda") else self.cpu_peak_rss_bytes

    @property
    def peak_label(self) -> str:
        """What ``peak_bytes`` measures, to print beside it. The CPU has no allocator statistics:
        its figure is the process's peak resident set, which includes PyTorch's own footprint
        and never decreases, so it is not what one model or configuration allocates."""
        if self.device.startswith("cuda"):
            return "torch allocator peak"
        return CPU_PEAK_LABEL


CPU_PEAK_LABEL = ("process peak RSS since start: includes PyTorch itself and never decreases, "
                  "so it is not what the model allocates")


def _nvml_handle(index: int):
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None, None


def nvml_snapshot(index: int = 0) -> dict:
    """Used/total memory, SM clock and power of GPU ``index`` via NVML ({} without NVML)."""
    nv, h = _nvml_handle(index)
    if h is None:
        return {}
    out = {}
    try:
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out.update(used_bytes=int(mem.used), total_bytes=int(mem.total))
        out["sm_clock_mhz"] = int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        out["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
    except Exception:
        pass
    return out


def _cpu_peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class track_memory:
    """Context manager: ``with track_memory("cuda") as mem: ...; mem.report``.

    On CUDA it resets the allocator's peak counters at entry and polls NVML every
    ``poll_s`` seconds in a background thread (NVML sees memory outside PyTorch too).
    """

    def __init__(self, device="cuda", poll_s: float = 0.005):
        self.device = torch.device(device)
        self.poll_s = poll_s
        self.report: Optional[MemoryReport] = None
        self._stop = threading.Event()
        self._samples: list = []

    def _poll(self, index):
        while not self._stop.is_set():
            snap = nvml_snapshot(index)
            if snap:
                self._samples.append(snap)
            self._stop.wait(self.poll_s)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._thread = threading.Thread(target=self._poll, args=(index,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        rep = MemoryReport(device=str(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._stop.set()
            self._thread.join()
            rep.torch_peak_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))
            rep.torch_peak_reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))
            if self._samples:
                rep.nvml_peak_used_bytes = max(s.get("used_bytes", 0) for s in self._samples)
                rep.nvml_total_bytes = self._samples[-1].get("total_bytes")
                rep.sm_clock_mhz_max = max(s.get("sm_clock_mhz", 0) for s in self._samples)
                rep.power_w_max = max(s.get("power_w", 0.0) for s in self._samples)
        rep.cpu_peak_rss_bytes = _cpu_peak_rss()
        self.report = rep
        return False


class LiveTensorBytes:
    """Context manager counting the bytes of tensor storages created inside it that are still
    alive, and their peak: an allocator-free view of an activation peak, on any device, the meta
    device included (so real sizes can be traced without memory). Tensors that existed before
    (weights, inputs) are not counted; freed means no Python reference to any view is left."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._track(out)
                return out

        self.live = self.peak = 0
        self._refs: dict = {}
        self._mode = _Mode()

    def _drop(self, key, nbytes):
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def _track(self, out):
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key not in self._refs:
                self._refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(t, self._drop, key, nbytes)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
