"""Provenance: the hardware, software and code a result was produced with.

A measurement means little without them. Sweep records and training cards both carry them,
so they live here, below both.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from mee_bench.paths import REPO_ROOT

PACKAGES = (
    "mee-bench",
    "torch",
    "transformers",
    "lm_eval",
    "ray",
    "codecarbon",
    "sacrebleu",
    "rouge-score",
    "omegaconf",
)


def hardware_info(torch_threads: int) -> dict:
    """Where a trial ran: enough to tell whether two trials' timings are comparable."""
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": None,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def package_versions() -> dict:
    """Versions of the packages that shape a result (None for one not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}
