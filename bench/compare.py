"""Regression tables between two results documents (``longcat-bench compare`` and ``check``).

Records are matched by key. For each metric both documents have, the change is judged by the
metric's direction: times, errors and memory must not grow, SQNR and cosine must not fall. Errors
and SQNR are compared as noise power (an SQNR drop of 0.41 dB is 10% more noise); cosine as 1 - cos.
A NaN on the new side is a regression whatever the threshold.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from .runner import record_key

__all__ = ["METRICS", "Tolerances", "Row", "compare_docs", "format_rows", "parse_percent", "record_metrics", "regressions"]

# metric -> kind. Kinds: time (lower better), error (lower), bytes (lower), sqnr (higher, dB),
# cosine (higher, compared as 1 - cos), bound (bool: True must stay True).
METRICS = {
    "median_ms": "time",
    "max_abs_err": "error",
    "max_rel_err": "error",
    "subject_max_abs_err": "error",
    "output_rel_err": "error",
    "sqnr_db": "sqnr",
    "weight_sqnr_db": "sqnr",
    "cosine": "cosine",
    "peak_bytes": "bytes",
    "weights_resident_bytes": "bytes",
    "activation_peak_bytes": "bytes",
    "torch_peak_allocated_bytes": "bytes",
    "nvml_peak_used_bytes": "bytes",
    "within_bound": "bound",
    "output_finite": "bound",
}


@dataclass
class Tolerances:
    """Allowed relative growth per kind (0.10 = 10%); ``error_floor`` absorbs round-off-sized errors."""
    time: float = 0.10
    error: float = 0.10
    sqnr: float = 0.10
    cosine: float = 0.10
    bytes: float = 0.10
    error_floor: float = 1e-6

    @classmethod
    def uniform(cls, frac: float) -> "Tolerances":
        return cls(time=frac, error=frac, sqnr=frac, cosine=frac, bytes=frac)


@dataclass
class Row:
    key: str
    metric: str
    old: object
    new: object
    change: str
    status: str  # "ok" | "REGRESSION" | "improved" | "new" | "missing" | "fixed" | "broken"


def parse_percent(text: str) -> float:
    """A threshold written as a percentage with its sign, "10%" or "2.5%", as a fraction (0.1).
    One syntax only: a bare number ("0.1", "5") is refused, as are NaN, infinities and negatives."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*", str(text))
    if not m:
        raise ValueError(f"threshold must be a percentage such as '10%' or '2.5%' (a number >= 0 followed by %), got {text!r}")
    return float(m.group(1)) / 100.0


def record_metrics(rec: dict, with_time: bool = True) -> Dict[str, object]:
    out = {}
    for name, kind in METRICS.items():
        if kind == "time" and not with_time:
            continue
        if name in rec and rec[name] is not None:
            out[name] = rec[name]
    mem = rec.get("memory") or {}
    for name in ("torch_peak_allocated_bytes", "nvml_peak_used_bytes"):
        if mem.get(name) is not None and name not in out:
            out[name] = mem[name]
    return out


def _judge(kind: str, old, new, tol: Tolerances):
    """(change text, regressed?, improved?)."""
    if kind == "bound":
        return f"{old} -> {new}", bool(old) and not bool(new), (not bool(old)) and bool(new)
    old, new = float(old), float(new)
    # Every comparison with NaN is False, so a NaN would otherwise pass as "ok".
    if math.isnan(new):
        return f"{old} -> {new}", True, False
    if math.isnan(old):
        return f"{old} -> {new}", False, True
    if kind == "sqnr":
        if math.isinf(old) and math.isinf(new):
            return "0.00 dB", False, False
        delta = new - old
        noise_growth = 10 ** (-delta / 10.0) - 1.0  # relative change of the noise power
        return f"{delta:+.2f} dB", noise_growth > tol.sqnr, noise_growth < -tol.sqnr
    if kind == "cosine":
        e_old, e_new = max(1.0 - old, 0.0), max(1.0 - new, 0.0)
        change = (e_new - e_old) / e_old if e_old > 0 else (0.0 if e_new == 0 else math.inf)
        return f"{change * 100:+.1f}% (1-cos)", e_new > e_old * (1 + tol.cosine) + 1e-9, e_new < e_old * (1 - tol.cosine) - 1e-9
    frac = getattr(tol, kind)
    change = (new - old) / old if old else (0.0 if new == old else math.inf)
    floor = tol.error_floor if kind == "error" else 0.0
    regressed = new > old * (1 + frac) + floor
    improved = new < old * (1 - frac) - floor
    return f"{change * 100:+.1f}%", regressed, improved


def compare_docs(old_docs: Iterable[dict], new_docs: Iterable[dict], tol: Tolerances, with_time: bool = True,
                 keys: Optional[set] = None) -> List[Row]:
    """Rows for every (key, metric) in either side. Records that are not ``ok`` take part through
    their status only: ok -> error/unavailable is "broken" (a regression), the reverse "fixed"."""
    def index(docs):
        out = {}
        for doc in docs:
            for rec in doc.get("records", []):
                out[record_key(rec)] = rec
        return out

    old_idx, new_idx = index(old_docs), index(new_docs)
    rows: List[Row] = []
    for key in sorted(set(old_idx) | set(new_idx)):
        if keys is not None and key not in keys:
            continue
        o, n = old_idx.get(key), new_idx.get(key)
        if o is None:
            rows.append(Row(key, "-", "-", n.get("status", "ok"), "", "new"))
            continue
        if n is None:
            rows.append(Row(key, "-", o.get("status", "ok"), "-", "", "missing"))
            continue
        so, sn = o.get("status", "ok"), n.get("status", "ok")
        if so != sn and "ok" in (so, sn):
            rows.append(Row(key, "status", so, sn, "", "broken" if so == "ok" else "fixed"))
            continue
        if sn != "ok":
            continue
        mo, mn = record_metrics(o, with_time), record_metrics(n, with_time)
        for metric in sorted(set(mo) & set(mn)):
            kind = METRICS.get(metric, "bytes")
            change, regressed, improved = _judge(kind, mo[metric], mn[metric], tol)
            rows.append(Row(key, metric, mo[metric], mn[metric], change,
                            "REGRESSION" if regressed else ("improved" if improved else "ok")))
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def format_rows(rows: List[Row], show_ok: bool = True) -> str:
    shown = [r for r in rows if show_ok or r.status != "ok"]
    if not shown:
        return "(no rows)"
    head = ("key", "metric", "old", "new", "change", "status")
    table = [head] + [(r.key, r.metric, _fmt(r.old), _fmt(r.new), r.change, r.status) for r in shown]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def regressions(rows: List[Row], missing_fails: bool = False) -> List[Row]:
    bad = ("REGRESSION", "broken", "missing") if missing_fails else ("REGRESSION", "broken")
    return [r for r in rows if r.status in bad]
