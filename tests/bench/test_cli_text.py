"""What ``longcat-bench`` prints for a new user: help for every model option, and a CPU memory
figure labelled as what it is (the process's peak RSS, not the model's allocation)."""
import argparse

import pytest

from longcat.bench.cli import _model_summary, build_parser
from longcat.bench.memory import MemoryReport


@pytest.mark.parametrize("command", ["model", "memory"])
def test_every_model_option_has_help(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]
    missing = [a.option_strings[0] for a in options if not a.help]
    assert len(options) >= 10 and not missing, missing


def test_cpu_peak_memory_is_labelled_as_process_rss(capsys):
    record = {"config": "reference", "status": "ok", "median_ms": 12.0, "throughput_tokens_per_s": 100.0,
              "memory": MemoryReport(device="cpu", cpu_peak_rss_bytes=3 << 30).as_dict()}
    _model_summary([record], "title")
    out = capsys.readouterr().out
    assert "process peak RSS*" in out and "* process peak RSS since start" in out and "not what the model allocates" in out
    assert MemoryReport(device="cpu").peak_label.startswith("process peak RSS")
    assert MemoryReport(device="cuda:0").peak_label == "torch allocator peak"
    gpu = dict(record, memory=MemoryReport(device="cuda:0", torch_peak_allocated_bytes=5 << 30).as_dict())
    _model_summary([gpu], "title")
    out = capsys.readouterr().out
    assert "peak memory" in out and "RSS" not in out
