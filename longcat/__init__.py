"""LongCat-Video acceleration toolkit.

``longcat.LongCatVideoTransformer3DModel`` is a checkpoint-compatible implementation of the
LongCat-Video DiT; ``longcat.kernels`` holds the Triton kernels, ``longcat.quant`` the 8-bit
quantizer and ``longcat.bench`` the benchmark harness.
"""
import os as _os

# Running from a source checkout that was not installed: the top-level folders kernels/, quant/
# and bench/ are this package's subpackages, exactly as setup.py maps them.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout_root, "kernels", "_runtime.py")) and _checkout_root not in __path__:
    __path__.append(_checkout_root)

from .model import LongCatVideoTransformer3DModel  # noqa: E402
from .accelerate import accelerate, acceleration_report, restore  # noqa: E402
from .cuda_graphs import CUDAGraphStep  # noqa: E402
from .memory_plan import MemoryPlan, plan_memory  # noqa: E402
from .pipeline_plan import MemoryBudgetError, PipelineTactics, fit_pipeline, plan_pipeline  # noqa: E402
from .pipeline import accelerate_pipeline  # noqa: E402
from .ops import DiTOps, REFERENCE_OPS, SDPA_OPS  # noqa: E402
from .presets import PRESETS, get_preset  # noqa: E402

__version__ = "0.1.0"

# Subpackages and modules reachable as attributes after a plain ``import longcat`` (imported on
# first use: the benchmark harness and the peers pull in more than the model needs).
_LAZY_SUBMODULES = frozenset({
    "bench", "checkpoint", "context_parallel", "cuda_graphs", "kernels", "memory_plan", "model",
    "offload", "ops", "pipeline_memory", "presets", "quant",
})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LongCatVideoTransformer3DModel",
    "accelerate",
    "acceleration_report",
    "restore",
    "CUDAGraphStep",
    "plan_memory",
    "MemoryPlan",
    "plan_pipeline",
    "fit_pipeline",
    "accelerate_pipeline",
    "PipelineTactics",
    "MemoryBudgetError",
    "DiTOps",
    "REFERENCE_OPS",
    "SDPA_OPS",
    "PRESETS",
    "get_preset",
]
