"""``python -m longcat.quant``: the accuracy command shows its progress while it measures."""
from longcat.quant import accuracy as acc
from longcat.quant.__main__ import main


def test_accuracy_command_reports_progress_per_step(monkeypatch, capsys):
    monkeypatch.setattr(acc, "LAYER_SHAPES", {"attn.qkv": (96, 64), "ffn.w2": (64, 80)})
    assert main(["accuracy", "--tokens", "16"]) == 0
    out, err = capsys.readouterr()
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert [s.split("]")[0] + "]" for s in steps] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "attn.qkv 96x64 gaussian" in steps[0] and "ffn.w2 64x80 student_t" in steps[3]
    assert err.splitlines()[0].startswith("measuring 2 layer shapes")
    # the table itself stays on stdout, one row per (shape, distribution, format)
    assert sum(line.startswith(("attn.qkv", "ffn.w2")) for line in out.splitlines()) == 4 * len(acc.FORMATS)
