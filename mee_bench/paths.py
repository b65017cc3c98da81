"""Where things are: the repository, the embedded default model and the local data root.

One module so that no path depends on the current directory or is computed twice.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
# Inside the package, so that a wheel carries it (declared as package data in pyproject.toml).
DEFAULT_MODEL_DIR = PACKAGE_DIR / "models" / "mee-t5-default"
DATA_DIR_ENV = "MEE_DATA_DIR"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_root() -> Path | None:
    """The local data root (`MEE_DATA_DIR`, else `../shared/data` beside the repo), or None when only the hub is
    left."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        root = Path(configured).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={configured} is not a directory; point it at a data root")
        return root.resolve()
    return SHARED_DATA_DIR if SHARED_DATA_DIR.is_dir() else None
