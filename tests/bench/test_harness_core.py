"""Harness core: timing, memory, machine info, results files, and the main-job command."""
import json

import pytest
import torch

from longcat.bench import load_results, machine_info, make_results, time_fn, track_memory, write_results
from longcat.bench.cli import main


def test_time_fn_rotates_inputs_and_counts_calls():
    seen = []
    res = time_fn(lambda i: seen.append(i), inputs=[(0,), (1,), (2,)], warmup=2, repeats=5, device="cpu")
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    assert res.repeats == 5 and len(res.times_ms) == 5 and res.clock == "perf_counter"
    assert res.min_ms <= res.median_ms <= res.max_ms


def test_time_fn_measures_real_work():
    a = torch.randn(256, 256)
    fast = time_fn(lambda: a + 1, warmup=1, repeats=5, device="cpu")
    slow = time_fn(lambda: [a @ a for _ in range(20)], warmup=1, repeats=5, device="cpu")
    assert slow.median_ms > fast.median_ms


def test_time_fn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, repeats=0)


def test_track_memory_cpu_reports_rss():
    with track_memory("cpu") as mem:
        blob = torch.ones(32 * 1024 * 1024 // 4)  # 32 MiB
    assert mem.report.cpu_peak_rss_bytes >= blob.numel() * 4
    assert mem.report.peak_bytes == mem.report.cpu_peak_rss_bytes
    assert mem.report.torch_peak_allocated_bytes is None


def test_results_round_trip(tmp_path):
    doc = make_results("unit", [{"name": "x", "value": 1.5}], command=["longcat-bench", "unit"])
    path = write_results(doc, str(tmp_path / "sub" / "r.json"))
    back = load_results(path)
    assert back["records"] == [{"name": "x", "value": 1.5}]
    assert back["machine"]["torch"] == torch.__version__
    assert back["command"] == "longcat-bench unit"
    (tmp_path / "bad.json").write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="not a longcat-bench results file"):
        load_results(str(tmp_path / "bad.json"))


def test_machine_info_fields():
    info = machine_info()
    for key in ("python", "torch", "triton", "commit", "gpu"):
        assert key in info


def test_main_job_cpu(tmp_path, capsys):
    out = tmp_path / "model.json"
    rc = main(["--preset", "tiny", "--latent", "2", "4", "6", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "No CUDA GPU in use" in text or torch.cuda.is_available()
    assert "forward time (median)" in text
    rec = load_results(str(out))["records"][0]
    assert rec["tokens_per_sample"] == 2 * 2 * 3
    assert rec["output_finite"] and rec["timing"]["repeats"] == 2
