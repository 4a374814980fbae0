"""Compile a Triton kernel for a GPU architecture without a GPU, and read what the compiled code says.

Triton compiles for an explicit target on any machine, and its wheel ships ``ptxas`` and
``cuobjdump``. From one compilation this module reads: registers per thread and spill bytes
(``ptxas -v``), shared memory (kernel metadata) against the per-block limit, CTAs per SM from
registers and shared memory, tensor-core instructions (``wgmma`` on Hopper, ``mma.sync`` before),
TMA (``cp.async.bulk.tensor``), how many tiles the software pipeline keeps in flight (the largest
``num`` of ``ttg.async_wait`` in the TTGIR, plus one), ptxas advisories (C7510-C7515: serialized
wgmma), the SASS instruction count, and the SASS loops (every backward branch) with the main loop's
instructions per iteration (the loop with the most tensor-core instructions, else the longest
innermost loop).

These are static facts of the code, not timings. Run them in a process where ``TRITON_INTERPRET``
is unset: under the interpreter ``@triton.jit`` functions cannot be compiled for a GPU.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Mapping

from longcat.kernels._configs import ARCH_LIMITS

__all__ = ["ARCH_LIMITS", "StaticStats", "compile_static", "analyze_compiled", "tool_path"]

_ADVISORY = re.compile(r"(C75\d\d)[^\n]*")


@dataclasses.dataclass
class StaticStats:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]
    ok: bool
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    ctas_per_sm: int | None = None
    wgmma: int = 0
    mma_sync: int = 0
    tma: int = 0
    tiles_in_flight: int | None = None
    advisories: list[str] = dataclasses.field(default_factory=list)
    sass_instructions: int | None = None
    main_loop_instructions: int | None = None
    main_loop_mma: int | None = None
    loops: list[dict[str, int]] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def over_shared_limit(self) -> bool:
        return self.shared_bytes is not None and self.shared_limit is not None and self.shared_bytes > self.shared_limit

    @property
    def clean(self) -> bool:
        """Compiles, spills nothing and fits the shared-memory limit."""
        return self.ok and self.spills == 0 and not self.over_shared_limit

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["constexprs"] = {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v)) for k, v in self.constexprs.items()}
        d.update(spills=self.spills, over_shared_limit=self.over_shared_limit, clean=self.clean)
        return d


def tool_path(name: str) -> str:
    """Path of a CUDA tool (``ptxas``, ``cuobjdump``, ``nvdisasm``) shipped in the Triton wheel."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path})")
    return path


def _ptxas_report(ptx: str, arch: int) -> tuple[dict[str, int], list[str]]:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [tool_path("ptxas"), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, timeout=600,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-400:]}")
    stats = {}
    m = re.search(r"Used (\d+) registers", log)
    stats["registers"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        stats["stack_bytes"], stats["spill_stores"], stats["spill_loads"] = (int(g) for g in m.groups())
    advisories = sorted({a.group(0).strip() for a in _ADVISORY.finditer(log)})
    return stats, advisories


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_MMA = re.compile(r"\b(HGMMA|QGMMA|IGMMA|BGMMA|HMMA|IMMA)\b")


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction in the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool_path("cuobjdump"), "-sass", path], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return []
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.match, proc.stdout.splitlines()) if m]


def _sass_loops(sass: list[tuple[int, str]]) -> list[dict[str, int]]:
    """Every backward branch is a loop: its body runs from the branch target to the branch. Returns
    each loop's address range, instruction count and tensor-core (MMA) instruction count."""
    loops = []
    for addr, ins in sass:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:  # forward branch, or the trailing self-branch
            continue
        body = [i for a, i in sass if target <= a <= addr]
        loops.append({"start": target, "end": addr, "instructions": len(body),
                      "mma": sum(1 for i in body if _SASS_MMA.search(i))})
    return loops


def _main_loop(loops: list[dict[str, int]]) -> dict[str, int] | None:
    """The loop holding the most tensor-core instructions; without MMA, the longest innermost loop."""
    if not loops:
        return None
    with_mma = [lp for lp in loops if lp["mma"]]
    if with_mma:
        return max(with_mma, key=lambda lp: (lp["mma"], -lp["instructions"]))
    innermost = [lp for lp in loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]
    return max(innermost, key=lambda lp: lp["instructions"])


def _tiles_in_flight(ttgir: str) -> int:
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+) : i32\}", ttgir)]
    if not waits:
        # no cp.async pipeline: loads go straight to registers, one tile at a time
        return 1
    return max(waits) + 1


def _ctas_per_sm(arch: int, registers: int | None, shared: int | None, num_warps: int) -> int | None:
    limits = ARCH_LIMITS.get(arch)
    if limits is None or registers is None:
        return None
    threads = 32 * num_warps
    # registers are allocated per warp in units of 256 (8 per thread, rounded up)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = limits["regs_per_sm"] // (regs_per_warp * num_warps)
    by_threads = limits["threads_per_sm"] // threads
    by_smem = limits["smem_per_sm"] // shared if shared else limits["blocks_per_sm"]
    return max(0, min(by_regs, by_threads, by_smem, limits["blocks_per_sm"]))


def analyze_compiled(compiled, *, kernel: str, arch: int, num_warps: int, num_stages: int,
                     constexprs: Mapping[str, Any] | None = None, compile_s: float = 0.0) -> StaticStats:
    """Read the static facts of an already compiled kernel (``triton.compile`` output)."""
    ptx = compiled.asm["ptx"]
    stats = StaticStats(kernel=kernel, arch=arch, num_warps=num_warps, num_stages=num_stages,
                        constexprs=dict(constexprs or {}), ok=True, compile_s=compile_s)
    report, stats.advisories = _ptxas_report(ptx, arch)
    for k, v in report.items():
        setattr(stats, k, v)
    stats.shared_bytes = int(compiled.metadata.shared)
    stats.shared_limit = ARCH_LIMITS.get(arch, {}).get("smem_per_block")
    stats.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    stats.mma_sync = len(re.findall(r"\bmma\.sync", ptx))
    stats.tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    stats.tiles_in_flight = _tiles_in_flight(compiled.asm.get("ttgir", ""))
    stats.ctas_per_sm = _ctas_per_sm(arch, stats.registers, stats.shared_bytes, num_warps)
    sass = _sass(compiled.asm["cubin"]) if "cubin" in compiled.asm else []
    stats.sass_instructions = len(sass) or None
    stats.loops = _sass_loops(sass)
    main = _main_loop(stats.loops)
    if main is not None:
        stats.main_loop_instructions, stats.main_loop_mma = main["instructions"], main["mma"]
    return stats


def compile_static(fn, signature: Mapping[str, str], constexprs: Mapping[str, Any] | None = None, *,
                   num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                   attrs: Mapping | None = None, options: Mapping[str, Any] | None = None) -> StaticStats:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<arch>`` and analyse it.

    ``signature`` maps every argument name to its Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the constexpr values; ``attrs`` the specialisation hints a
    real launch would add (e.g. ``{(0,): [["tt.divisibility", 16]]}``). A compile error is returned
    as ``ok=False`` with the message, not raised.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = getattr(fn, "__name__", str(fn))
    opts = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}
    start = time.perf_counter()
    try:
        src = ASTSource(fn, dict(signature), dict(constexprs or {}), dict(attrs or {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as exc:  # compile errors are a result here, not a failure of the tool
        msg = " ".join(str(exc).split())[:400]
        return StaticStats(kernel=name, arch=arch, num_warps=num_warps, num_stages=num_stages,
                           constexprs=dict(constexprs or {}), ok=False, error=f"{type(exc).__name__}: {msg}",
                           compile_s=time.perf_counter() - start)
    return analyze_compiled(compiled, kernel=name, arch=arch, num_warps=num_warps, num_stages=num_stages,
                            constexprs=constexprs, compile_s=time.perf_counter() - start)


def launch_specialization(launch, arch: int = 90) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a recorded launch (``longcat.kernels._capture``),
    computed by Triton's own argument binder for ``sm_<arch>``: the same dtype, 16-byte alignment
    and integer specialisation a real launch on that GPU would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound_args, specialization, options)
    names = set(fn.arg_names)
    launch_options = {k: v for k, v in launch.kwargs.items() if k not in names}
    return signature, constexprs, attrs, launch_options


def compile_launch(launch, arch: int = 90) -> StaticStats:
    """Compile a recorded launch exactly as specialised for ``sm_<arch>`` and analyse it."""
    signature, constexprs, attrs, options = launch_specialization(launch, arch)
    named = {name: value for name, value in launch.named_args().items() if signature.get(name) == "constexpr"}
    stats = compile_static(launch.kernel, signature, constexprs, num_warps=launch.num_warps,
                           num_stages=launch.num_stages, arch=arch, attrs=attrs,
                           options={k: v for k, v in options.items() if k not in ("num_warps", "num_stages")})
    stats.constexprs = named
    return stats
