"""Where a benchmark's figures go: one JSON file under results/bench/ (or --out), named on stdout."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path


def write_result(path: Path, result: dict) -> None:
    """Write `result` as indented JSON to `path` (its folder created) and say where it went. The
    record carries the day it was made (`date`), which docs/RESULTS.md shows beside its figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "date": result.get("date", date.today().isoformat())}, indent=2) + "\n")
    print(f"\n-> {path}")
