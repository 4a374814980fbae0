"""Results files: one JSON document per run, with the machine, the command and the records."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from typing import Iterable, Optional

from .machine import machine_info

__all__ = ["SCHEMA_VERSION", "make_results", "write_results", "load_results"]

SCHEMA_VERSION = 1


def make_results(kind: str, records: Iterable[dict], command: Optional[list] = None, extra: Optional[dict] = None) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command if command is not None else ["longcat-bench", *sys.argv[1:]]),
        "machine": machine_info(),
        "records": list(records),
        **(extra or {}),
    }


def write_results(doc: dict, path: str) -> str:
    """Write ``doc`` as JSON atomically (temporary file, then rename); returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_results(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION or "records" not in doc:
        raise ValueError(f"{path} is not a longcat-bench results file (schema {SCHEMA_VERSION})")
    return doc
