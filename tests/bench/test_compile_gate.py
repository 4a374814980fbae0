"""CI gate for GPU code on a machine without a GPU: the inference-path kernels compile for sm_90 in
every launch config their launchers can pick at 720p (autotune candidates included) without a
compile error, without spilling registers and within the shared memory a block may have. One test
per op, so a failure names the op, the kernel and the config.

The compilations run in a subprocess without TRITON_INTERPRET (under the interpreter kernels
cannot be compiled for a GPU). Static stats of unchanged kernels come from the committed cache
(keyed by the Triton version, the kernel's source with everything it calls, the specialisation
and the arch), so CI compiles only what changed.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from longcat.bench.compile_report import run_compile_subprocess, select_cases
from longcat.bench.report import render_markdown

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.path.join(REPO, "bench", "baseline", "compile-cache-sm90.json")
HOT_OPS = [case.op for case in select_cases(hot_only=True)]


@pytest.fixture(scope="module")
def gate_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile-gate")
    cache, out = tmp / "cache.json", tmp / "compile.json"
    if os.path.isfile(CACHE):
        shutil.copy(CACHE, cache)
    proc = run_compile_subprocess(["--arch", "90", "--sizes", "720p", "--hot", "--cache", str(cache),
                                   "--json", str(out)], timeout=1800)
    assert out.is_file(), f"longcat-bench compile wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out, encoding="utf-8") as f:
        return json.load(f)["records"]


@pytest.mark.parametrize("op", HOT_OPS)
def test_sm90_720p_launch_configs_compile_clean(gate_records, op):
    cases = [r for r in gate_records if r["name"] == "compile_case" and r["op"] == op]
    assert cases, f"{op}: not in the compile report"
    assert cases[0]["status"] == "ok", f"{op}: {cases[0]['status']}: {cases[0].get('reason')}"
    configs = [r for r in gate_records if r["name"] == "compiled_config" and r["op"] == op]
    assert configs, f"{op}: the launcher made no launch on sm_90"
    bad = [f"{r['kernel']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']}: {r['reason']}"
           for r in configs if r["status"] != "ok"]
    assert not bad, f"{op}: {len(bad)} of {len(configs)} launch configs fail on sm_90 at 720p:\n" + "\n".join(bad)


def test_an_over_limit_config_is_reported_as_failing():
    """Too many pipeline stages: 6 x 48 KB of operand tiles cannot fit 227 KB; the compiler says so
    (not an exception) and the report counts the config as failing."""
    script = textwrap.dedent("""
        import json
        from longcat.bench.compile_report import _failure
        from longcat.bench.static_compile import compile_static
        from longcat.kernels import quant_gemm
        sig = {"x_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
               "M": "i32", "N_OUT": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32",
               "NUM_PROGRAMS": "i32"}
        ce = dict(INT_ACC=True, PROMOTE_FP8=False, HAS_BIAS=False, SWIGLU=False,
                  BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8)
        sig.update({k: "constexpr" for k in ce})
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(11)}  # as a launch on aligned tensors
        stats = compile_static(quant_gemm._w8a8_kernel.fn, sig, ce, num_warps=8, num_stages=6, arch=90,
                               attrs=aligned).as_dict()
        print(json.dumps({**stats, "reason": _failure(stats)}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    if not stats["ok"]:  # Triton may refuse it outright; that too must come back as a result
        assert "OutOfResources" in stats["error"] or "shared" in stats["error"], stats["error"]
        return
    assert stats["shared_bytes"] > stats["shared_limit"] == 232_448
    assert stats["over_shared_limit"] and not stats["clean"]
    assert "shared memory" in stats["reason"]


def _config(op, kernel, status, reason="", **stats):
    return {"name": "compiled_config", "op": op, "size": "720p", "arch": 90, "hot": True, "kernel": kernel,
            "constexprs": {"BLOCK_M": 128}, "num_warps": 8, "num_stages": 3, "grid": [10, 2], "registers": 200,
            "spill_stores": 0, "spill_loads": 0, "shared_bytes": 1024, "shared_limit": 232_448, "ctas_per_sm": 1,
            "wgmma": 4, "mma_sync": 0, "tma": 0, "tiles_in_flight": 3, "advisories": [], "main_loop_instructions": 90,
            "status": status, "reason": reason, **stats}


def test_report_renders_compiled_configs_and_static_changes():
    compile_doc = {
        "schema": 1, "kind": "compile", "command": "longcat-bench compile", "machine": {"cpu_count": 2},
        "archs": [90], "sizes": ["720p"],
        "records": [
            {"name": "compile_case", "op": "swiglu_packed", "size": "720p", "arch": 90, "hot": True, "status": "ok",
             "model": {"bytes": 11_159_470_080, "flops": 0, "bound": "memory", "model_ms": 2.595}},
            _config("swiglu_packed", "_swiglu_fwd_kernel", "ok"),
            _config("bsa attention", "_bsa_fwd_kernel", "fail", "spills 36 B stores / 36 B loads", spill_stores=36, spill_loads=36),
        ],
    }
    changes = {"schema": "longcat-static-changes/1", "area": "fused SwiGLU GEMM", "arch": 90, "rows": [
        {"kernel": "_qgemm_kernel", "shape": "720p W8A8", "config": "BLOCK_M=128 BLOCK_N=128 warps=8 stages=4",
         "before": {"registers": 255, "spills": 2196, "shared_bytes": 98304, "tiles_in_flight": 4,
                    "main_loop_instructions": 300, "wgmma": 4},
         "after": {"registers": 255, "spills": 0, "shared_bytes": 98304, "tiles_in_flight": 4,
                   "main_loop_instructions": 93, "wgmma": 4}, "note": "8 warps"}]}
    text = render_markdown([("bench/results/compile-sm90.json", compile_doc),
                            ("bench/results/static-changes-gemm.json", changes)])
    assert "## Compiled, not run" in text
    assert "| swiglu_packed | yes | 11,159 |" in text and "2.595" in text
    assert "FAIL: spills 36 B stores / 36 B loads" in text and "36/36" in text
    assert "### Before / after: fused SwiGLU GEMM" in text and "2196 -> 0" in text
    assert "## compile:" not in text  # not rendered again as a measured table


def test_captured_launch_is_specialised_like_a_real_launch():
    """The compile step specialises a recorded launch with Triton's own binder: dtypes, and 16-byte
    divisibility of pointers (from the meta tensor's storage offset) and of integers."""
    script = textwrap.dedent("""
        import json
        import torch
        from longcat.bench.static_compile import launch_specialization
        from longcat.kernels._capture import capture_launches
        from longcat.kernels.swiglu import swiglu_packed
        out = {}
        for h in (64, 36):  # b = ab[:, h:] starts 2 * h bytes after a: 16-byte aligned for h = 64, not for 36
            with capture_launches(90) as launches:
                swiglu_packed(torch.empty(8, 2 * h, dtype=torch.bfloat16, device="meta"))
            signature, constexprs, attrs, options = launch_specialization(launches[0], 90)
            names = list(signature)
            out[h] = {"types": [signature[n] for n in ("A", "B", "OUT", "H")],
                      "divisible": [bool(attrs.get((names.index(n),))) for n in ("A", "B", "OUT", "H")],
                      "BLOCK": launches[0].kwargs["BLOCK"]}
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert spec["64"] == {"types": ["*bf16", "*bf16", "*bf16", "i32"], "divisible": [True, True, True, True], "BLOCK": 64}
    assert spec["36"] == {"types": ["*bf16", "*bf16", "*bf16", "i32"], "divisible": [True, False, True, False], "BLOCK": 64}
