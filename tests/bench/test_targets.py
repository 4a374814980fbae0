"""The BSA targets of the GPU benchmark are computed from the kernel records of one run."""
from longcat.bench.targets import bsa_targets, format_targets


def _rec(op, label, impl, ms, sparsity=0.9375, tile=(4, 4, 4)):
    return dict(op=op, label=label, impl=impl, status="ok", median_ms=ms,
                params=dict(sparsity=sparsity, tile=list(tile)))


def test_targets_from_records():
    label = "720p/0.9375-4x4x4"
    records = [
        _rec("attention.bsa", label, "longcat", 10.0),
        _rec("attention.bsa", label, "dense-sdpa-flash", 130.0),
        _rec("attention.bsa", label, "flex-attention", 12.0),
        dict(op="attention.bsa", label=label, impl="upstream-bsa", status="unavailable", params={}),
        _rec("attention.bsa.gating", label, "longcat", 0.6),
        _rec("attention.bsa", "720p/0.875-4x4x8", "longcat", 20.0, 0.875, (4, 4, 8)),
        _rec("attention.bsa", "720p/0.875-4x4x8", "dense-sdpa-flash", 130.0, 0.875, (4, 4, 8)),
        _rec("attention.bsa", "480p/0.9375-4x4x4", "longcat", 1.0),  # not a target size
    ]
    rows = {(r["label"], r["target"]): r for r in bsa_targets(records)}
    assert not any(lbl.startswith("480p") for lbl, _ in rows)
    assert rows[(label, "speedup vs dense")]["value"] == 13.0 and rows[(label, "speedup vs dense")]["met"] is True
    assert rows[(label, "speedup vs FlexAttention")]["met"] is False  # 1.2x < 1.3x
    assert rows[(label, "speedup vs upstream BSA")]["met"] is None  # not measured
    assert abs(rows[(label, "gating share of BSA time")]["value"] - 0.06) < 1e-12
    assert rows[(label, "gating share of BSA time")]["met"] is False
    other = rows[("720p/0.875-4x4x8", "speedup vs dense")]
    assert other["value"] == 6.5 and other["threshold"] == 7.0 and other["met"] is False
    text = format_targets(list(rows.values()))
    assert "MISSED" in text and "not measured" in text
