"""The harness's subcommands: kernels, accuracy, model --compare, compare, report, check; the
progress bar and the CPU notice.

Results documents built here by hand are SYNTHETIC test fixtures (marked so in their command and
records); they are written to pytest's tmp_path only and never committed as results."""
import io
import json
import os

import pytest
import torch

from longcat.bench.cli import main
from longcat.bench.progress import Progress
from longcat.bench.results import load_results, make_results, write_results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = os.path.join(REPO, "bench", "baseline", "cpu.json")
ON_GPU = torch.cuda.is_available()


def _synthetic(tmp_path, name, records, gpu=None):
    doc = make_results("kernels", records, command=["SYNTHETIC-test-fixture"])
    doc["machine"]["gpu"] = gpu
    return write_results(doc, str(tmp_path / name))


def _kernel_rec(impl, ms, err=1e-6, role="subject", sqnr=None):
    rec = {"key": f"kernels/attention.dense/synthetic/{impl}", "name": "kernel", "op": "attention.dense",
           "label": "synthetic", "impl": impl, "role": role, "params": {"seq": 1024}, "status": "ok",
           "median_ms": ms, "max_abs_err": err, "error_baseline": "reference", "tflops": 1.0}
    if sqnr is not None:
        rec["sqnr_db"] = sqnr
    return rec


# ----------------------------------------------------------------------------------------- compare

def test_compare_flags_time_regression(tmp_path, capsys):
    old = _synthetic(tmp_path, "old.json", [_kernel_rec("longcat", 10.0), _kernel_rec("sdpa", 5.0, role="peer")])
    new = _synthetic(tmp_path, "new.json", [_kernel_rec("longcat", 11.5), _kernel_rec("sdpa", 5.1, role="peer")])
    assert main(["compare", old, new, "--fail-above", "10%"]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "synthetic/longcat" in l and "median_ms" in l)
    assert "REGRESSION" in line and "+15.0%" in line
    sdpa = next(l for l in out.splitlines() if "synthetic/sdpa" in l and "median_ms" in l)
    assert "REGRESSION" not in sdpa


def test_compare_passes_within_threshold_and_improvements(tmp_path):
    old = _synthetic(tmp_path, "old.json", [_kernel_rec("longcat", 10.0)])
    new = _synthetic(tmp_path, "new.json", [_kernel_rec("longcat", 10.9)])
    assert main(["compare", old, new, "--fail-above", "10%"]) == 0
    faster = _synthetic(tmp_path, "faster.json", [_kernel_rec("longcat", 5.0)])
    assert main(["compare", old, faster, "--fail-above", "10%"]) == 0
    # a looser threshold accepts what 10% refused
    slower = _synthetic(tmp_path, "slower.json", [_kernel_rec("longcat", 11.5)])
    assert main(["compare", old, slower, "--fail-above", "20%"]) == 0


def test_compare_flags_accuracy_regression(tmp_path):
    old = _synthetic(tmp_path, "old.json", [_kernel_rec("longcat", 10.0, err=1e-3, sqnr=40.0)])
    worse_err = _synthetic(tmp_path, "e.json", [_kernel_rec("longcat", 10.0, err=2e-3, sqnr=40.0)])
    worse_sqnr = _synthetic(tmp_path, "s.json", [_kernel_rec("longcat", 10.0, err=1e-3, sqnr=39.0)])
    assert main(["compare", old, worse_err, "--fail-above", "10%"]) == 1
    assert main(["compare", old, worse_sqnr, "--fail-above", "10%"]) == 1  # 1 dB = 26% more noise
    broken = _kernel_rec("longcat", 10.0)
    broken.update(status="error", reason="synthetic failure")
    assert main(["compare", old, _synthetic(tmp_path, "b.json", [broken])]) == 1


# ------------------------------------------------------------------------------------------ report

def test_report_renders_tables_and_says_no_gpu_results(tmp_path):
    cpu = _synthetic(tmp_path, "cpu.json", [_kernel_rec("longcat", 12.0), _kernel_rec("reference", 24.0, role="reference")])
    out = tmp_path / "BENCHMARKS.md"
    assert main(["report", cpu, "--output", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "There are no GPU results yet" in text
    assert "Command: `SYNTHETIC-test-fixture`" in text and "Machine: CPU only" in text
    assert "| attention.dense | synthetic | 1,024 | longcat | subject |" in text
    assert "bash bench/gpu_session.sh" in text and "longcat-bench kernels" in text


def test_report_with_gpu_results(tmp_path):
    gpu = _synthetic(tmp_path, "gpu.json", [_kernel_rec("longcat", 1.0)], gpu="SYNTHETIC GPU")
    out = tmp_path / "B.md"
    assert main(["report", gpu, "--output", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "There are no GPU results yet" not in text
    assert "GPU SYNTHETIC GPU" in text
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "plots" / "attention_time_vs_seq.png").is_file()
    except ImportError:
        assert "Plots skipped: matplotlib is not installed" in text


# ----------------------------------------------------------------------------------- kernels, etc.

@pytest.mark.slow
def test_kernels_cpu_writes_results_and_notice(tmp_path, capsys):
    path = tmp_path / "k.json"
    rc = main(["kernels", "--size", "cpu-tiny", "--ops", "attention.dense", "gated_residual", "quant_gemm",
               "--repeats", "1", "--warmup", "0", "--json", str(path)] + (["--device", "cpu"] if ON_GPU else []))
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("No CUDA GPU in use")
    doc = load_results(str(path))
    assert doc["kind"] == "kernels" and doc["notice"].startswith("No CUDA GPU in use")
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    recs = {r["key"]: r for r in doc["records"]}
    sub = recs["kernels/attention.dense/cpu-tiny/longcat"]
    assert sub["status"] == "ok" and sub["median_ms"] > 0 and sub["max_abs_err"] < 1e-4
    assert sub["error_baseline"] == "reference" and sub["path"] in ("triton-interpreter", "reference-fallback")
    assert recs["kernels/gated_residual/cpu-tiny/longcat"]["gbps"] > 0
    assert recs["kernels/quant_gemm/cpu-tiny/longcat-int8-w8a16"]["sqnr_db"] > 30
    json.dumps(doc)  # plain JSON all the way down


@pytest.mark.slow
def test_accuracy_cpu_writes_results(tmp_path, capsys):
    path = tmp_path / "a.json"
    rc = main(["accuracy", "--dtypes", "fp32", "--json", str(path)] + (["--device", "cpu"] if ON_GPU else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = load_results(str(path))
    kern = [r for r in doc["records"] if r["name"] == "kernel_accuracy"]
    assert {r["op"] for r in kern} >= {"attention.dense", "attention.bsa", "swiglu", "layer_norm_modulate"}
    assert all(r["within_bound"] for r in kern if r["status"] == "ok")
    quant = [r for r in doc["records"] if r["name"] == "quant_accuracy" and r["status"] == "ok"]
    assert {r["format"] for r in quant} == {"int8", "fp8", "int8-dynamic", "fp8-dynamic"}
    assert all(r["sqnr_db"] > 20 and 0.99 < r["cosine"] <= 1.0 for r in quant)


@pytest.mark.slow
def test_model_compare_cpu(tmp_path, capsys):
    path = tmp_path / "m.json"
    rc = main(["model", "--compare", "--preset", "tiny", "--latent", "2", "4", "6", "--repeats", "1", "--warmup", "0",
               "--configs", "reference", "accelerated", "--json", str(path)] + (["--device", "cpu"] if ON_GPU else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    recs = {r["config"]: r for r in load_results(str(path))["records"]}
    assert recs["reference"]["status"] == "ok" and recs["reference"]["median_ms"] > 0
    if recs["accelerated"]["status"] == "ok":  # bf16 + BSA + fused: BSA changes the math, so only bounded
        assert recs["accelerated"]["error_baseline"] == "reference"
        assert 0 <= recs["accelerated"]["output_rel_err"] < 1.0
    assert "rel. err vs ref" in out


# ------------------------------------------------------------------------------------------- check

@pytest.fixture(scope="module")
def check_figures(tmp_path_factory):
    """One check run against the committed baseline (its figures kept for the perturbation test)."""
    out = tmp_path_factory.mktemp("check") / "figures.json"
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        rc = main(["check", "--baseline", BASELINE, "--json", str(out), "--gpu-results"])
    return rc, buf.getvalue(), str(out)


@pytest.mark.slow
def test_check_passes_against_committed_baseline(check_figures):
    rc, text, _ = check_figures
    assert rc == 0, text
    assert "check: passed" in text


@pytest.mark.slow
def test_check_fails_when_a_value_regresses(tmp_path, check_figures, capsys):
    _, _, figures = check_figures
    doc = json.load(open(figures))
    rec = next(r for r in doc["records"] if r.get("name") == "kernel_accuracy" and r.get("status") == "ok"
               and r["dtype"] == "float16")
    rec["subject_max_abs_err"] /= 10  # the baseline claims a 10x smaller error than this code reaches
    perturbed = write_results(doc, str(tmp_path / "perturbed.json"))
    assert main(["check", "--baseline", perturbed, "--gpu-results"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and rec["key"] in out and "check: FAILED" in out


# ------------------------------------------------------------------------------------ progress bar

def test_progress_bar_draws_when_forced():
    buf = io.StringIO()
    with Progress(4, label="unit", stream=buf, force=True) as bar:
        bar.update(note="first")
        bar.update(2, note="second")
    text = buf.getvalue()
    assert "unit [" in text and "3/4" in text and "second" in text and text.endswith("\n")
    assert text.count("#") > 0


def test_progress_bar_silent_when_not_a_terminal():
    buf = io.StringIO()
    bar = Progress(3, stream=buf)
    bar.update()
    bar.close()
    assert buf.getvalue() == "" and bar.done == 1
