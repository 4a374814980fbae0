"""Bad input to ``longcat-bench``: one-line errors and a non-zero exit before any work, no
temporary files left; ``compare`` fails on NaN, empty or unknown files, and takes one threshold
syntax.

Results documents built here are SYNTHETIC test fixtures written to pytest's tmp_path only."""
import json
import os

import pytest

from longcat.bench import cli
from longcat.bench.cli import main
from longcat.bench.compare import parse_percent
from longcat.bench.results import make_results, write_results


def _doc(tmp_path, name, records):
    return write_results(make_results("kernels", records, command=["SYNTHETIC-test-fixture"]), str(tmp_path / name))


def _rec(ms=10.0, err=1e-6, key="a"):
    return {"key": f"kernels/attention.dense/synthetic/{key}", "name": "kernel", "op": "attention.dense",
            "label": "synthetic", "impl": key, "role": "subject", "status": "ok", "median_ms": ms, "max_abs_err": err}


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err


# ----------------------------------------------------------------------------------------- compare

def test_compare_fails_on_nan(tmp_path, capsys):
    old = _doc(tmp_path, "old.json", [_rec(err=1e-6)])
    new = _doc(tmp_path, "new.json", [_rec(err=float("nan"))])
    assert main(["compare", old, new]) == 1
    assert "REGRESSION" in next(l for l in capsys.readouterr().out.splitlines() if "max_abs_err" in l)
    nan_time = _doc(tmp_path, "nan_time.json", [_rec(ms=float("nan"))])
    assert main(["compare", old, nan_time, "--fail-above", "1000%"]) == 1
    # the reverse (a NaN that became a number) is a fix, not a failure
    assert main(["compare", new, old]) == 0


def test_compare_fails_on_empty_or_missing_records(tmp_path, capsys):
    old = _doc(tmp_path, "old.json", [_rec(key="a"), _rec(key="b")])
    empty = _doc(tmp_path, "empty.json", [])
    assert main(["compare", old, empty]) == 2
    _one_line_error(capsys, "holds no records")
    partial = _doc(tmp_path, "partial.json", [_rec(key="a")])
    assert main(["compare", old, partial]) == 1
    assert "missing" in capsys.readouterr().out


def test_compare_refuses_unknown_schema_and_bad_json(tmp_path, capsys):
    old = _doc(tmp_path, "old.json", [_rec()])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": 99, "records": [_rec()]}))
    assert main(["compare", old, str(other)]) == 2
    _one_line_error(capsys, "not a longcat-bench results file")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": 1, "records": [')
    assert main(["compare", str(corrupt), old]) == 2
    _one_line_error(capsys, "not valid JSON")
    assert main(["compare", old, str(tmp_path / "absent.json")]) == 2
    _one_line_error(capsys, "cannot read it")


@pytest.mark.parametrize("text,frac", [("10%", 0.10), ("1%", 0.01), ("100%", 1.0), ("2.5%", 0.025), ("0%", 0.0), (" 5 % ", 0.05)])
def test_threshold_syntax(text, frac):
    assert parse_percent(text) == pytest.approx(frac)


@pytest.mark.parametrize("text", ["1", "5", "0.1", "nan", "nan%", "inf%", "-5%", "%", "ten%", ""])
def test_threshold_refuses_ambiguous_or_bad_values(tmp_path, capsys, text):
    with pytest.raises(ValueError, match="percentage"):
        parse_percent(text)
    old = _doc(tmp_path, "old.json", [_rec()])
    with pytest.raises(SystemExit) as exit_:
        main(["compare", old, old, f"--fail-above={text}"])
    assert exit_.value.code == 2
    _one_line_error(capsys, "--fail-above")


def test_threshold_one_percent_is_one_percent(tmp_path):
    old = _doc(tmp_path, "old.json", [_rec(ms=10.0)])
    new = _doc(tmp_path, "new.json", [_rec(ms=10.5)])  # +5%
    assert main(["compare", old, new, "--fail-above", "1%"]) == 1
    assert main(["compare", old, new, "--fail-above", "10%"]) == 0


# ------------------------------------------------------------------------------- arguments, files

@pytest.mark.parametrize("argv,needle", [
    (["model", "--batch", "-1"], "--batch"),
    (["model", "--batch", "0"], "--batch"),
    (["model", "--latent", "4", "-16", "16"], "--latent"),
    (["model", "--text-len", "-3"], "--text-len"),
    (["model", "--repeats", "0"], "--repeats"),
    (["memory", "--warmup", "-1"], "--warmup"),
    (["kernels", "--repeats", "-2"], "--repeats"),
])
def test_negative_sizes_are_refused(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_line_error(capsys, needle)


def test_json_below_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "cmd_model", lambda args: ran.append(args) or 0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["model", "--json", str(blocker / "out.json")]) == 2
    _one_line_error(capsys, "is a file, not a folder")
    assert main(["model", "--json", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder")
    assert ran == [], "the run must not start"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_report_refuses_corrupt_input_and_bad_outputs(tmp_path, capsys):
    good = _doc(tmp_path, "good.json", [_rec()])
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    out = tmp_path / "B.md"
    assert main(["report", good, str(corrupt), "--output", str(out), "--plots-dir", str(tmp_path / "plots")]) == 2
    _one_line_error(capsys, "not valid JSON")
    assert main(["report", good, "--output", str(tmp_path / "good.json" / "B.md")]) == 2
    _one_line_error(capsys, "is a file, not a folder")
    assert main(["report", good, "--output", str(out), "--plots-dir", good]) == 2
    _one_line_error(capsys, "not a folder")
    assert not out.exists() and not (tmp_path / "plots").exists()


def test_check_refuses_corrupt_baseline_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_accuracy_figures", lambda *a, **k: pytest.fail("the run must not start"))
    monkeypatch.setattr("longcat.bench.cases.kernel_path", lambda device: "interpreter")
    baseline = tmp_path / "cpu.json"
    baseline.write_text('{"schema": 1, "records": [}')
    assert main(["check", "--baseline", str(baseline)]) == 2
    _one_line_error(capsys, "not valid JSON")
    assert main(["check", "--update", "--baseline", str(baseline / "cpu.json")]) == 2
    _one_line_error(capsys, "is a file, not a folder")


def test_write_results_leaves_no_temporary_file(tmp_path, monkeypatch):
    def broken_dump(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("longcat.bench.results.json.dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_results(make_results("kernels", [], command=["SYNTHETIC-test-fixture"]), str(tmp_path / "r.json"))
    assert os.listdir(tmp_path) == []
