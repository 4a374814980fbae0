"""The block-sparse attention targets of the GPU benchmark (H200, 720p, one run), computed from the
records of ``longcat-bench kernels``: each is a ratio of two medians measured in the same run.

  BSA forward with gating >= 12x dense attention at 0.9375 / 4x4x4 (the published config)
                           >=  7x dense attention at 0.875 / 4x4x8
                           >=  2x upstream's BSA kernel, >= 1.3x FlexAttention with the same block mask
  gating <= 5% of the BSA forward time
"""
from __future__ import annotations

from typing import List

__all__ = ["BSA_TARGETS", "bsa_targets", "format_targets"]

TARGET_SIZE = "720p"
# (sparsity, tile) -> minimum speedup of the BSA forward over dense attention
DENSE_SPEEDUP = {(0.9375, (4, 4, 4)): 12.0, (0.875, (4, 4, 8)): 7.0}
BSA_TARGETS = dict(vs_upstream=2.0, vs_flex=1.3, gating_share=0.05)


def _median(records, op, label, impl_prefix):
    for r in records:
        if r.get("op") == op and r.get("label") == label and r.get("impl", "").startswith(impl_prefix) \
                and r.get("status") == "ok":
            return r["median_ms"]
    return None


def bsa_targets(records: List[dict]) -> List[dict]:
    """One row per target and BSA setting found in ``records``: measured value, target, met (None
    when a side was not measured). Only the 720p cases are targets; other sizes are not judged."""
    rows = []
    labels = sorted({r["label"] for r in records if r.get("op") == "attention.bsa"})
    for label in labels:
        if not label.startswith(TARGET_SIZE + "/"):
            continue
        params = next(r["params"] for r in records if r.get("op") == "attention.bsa" and r["label"] == label)
        setting = (params["sparsity"], tuple(params["tile"]))
        ours = _median(records, "attention.bsa", label, "longcat")
        gating = _median(records, "attention.bsa.gating", label, "longcat")

        def ratio(other, ours=ours):
            return None if other is None or ours is None else other / ours

        checks = []
        if setting in DENSE_SPEEDUP:
            checks.append(("speedup vs dense", ratio(_median(records, "attention.bsa", label, "dense-")),
                           ">=", DENSE_SPEEDUP[setting]))
        checks.append(("speedup vs upstream BSA", ratio(_median(records, "attention.bsa", label, "upstream-bsa")),
                       ">=", BSA_TARGETS["vs_upstream"]))
        checks.append(("speedup vs FlexAttention", ratio(_median(records, "attention.bsa", label, "flex-attention")),
                       ">=", BSA_TARGETS["vs_flex"]))
        share = None if gating is None or ours is None else gating / ours
        checks.append(("gating share of BSA time", share, "<=", BSA_TARGETS["gating_share"]))
        for name, value, op, target in checks:
            met = None if value is None else (value >= target if op == ">=" else value <= target)
            rows.append(dict(label=label, target=name, value=value, op=op, threshold=target, met=met))
    return rows


def format_targets(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        value = "not measured" if r["value"] is None else f"{r['value']:.3g}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[r["met"]]
        lines.append(f"  {r['label']:<22} {r['target']:<26} {value:>12}  (target {r['op']} {r['threshold']:g})  {verdict}")
    return "\n".join(lines)
