"""Where data comes from: `MEE_DATA_DIR`, else `../shared/data` beside the repo, else the hub.

Local files are JSON Lines with the Hugging Face field names, `<root>/<dataset>/<split>.jsonl`.
Paths never depend on the current directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from mee_bench.model import REPO_ROOT

DATA_DIR_ENV = "MEE_DATA_DIR"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_root() -> Path | None:
    """The local data root, or None when only the hub is left."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        root = Path(configured).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={configured} is not a directory; point it at a data root")
        return root
    return SHARED_DATA_DIR if SHARED_DATA_DIR.is_dir() else None


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSON Lines file; a malformed line raises with its line number."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from err
