"""The GPU suite dry-runs on the CPU, and what travels to the GPU imports nothing it does not need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import DATA_DIR, REPO

# What the GPU image lacks and the suite does not carry: importing these at module level would
# break the suite there. (OmegaConf, which the typed training config needs, travels as a wheel.)
ABSENT_ON_THE_GPU = ("ray", "lm_eval", "codecarbon", "datasets")
GPU_PATH_MODULES = (
    "mee_bench.engine.decoding",
    "mee_bench.engine.loading",
    "mee_bench.engine.measures",
    "mee_bench.engine.policy",
    "mee_bench.engine.heads",
    "mee_bench.engine.t5",
    "mee_bench.train.loop",
    "mee_bench.train.heads",
    "mee_bench.train.config",
    "mee_bench.train.data",
    "mee_bench.study.model_report",
    "mee_bench.cli",
)


def test_engine_training_and_benchmarks_import_no_heavy_optional_package():
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'benchmarks')!r}]\n"
        f"for name in {GPU_PATH_MODULES!r} + ('decode_speed', 'policy_speed', 'gpu_suite'):\n"
        "    __import__(name)\n"
        f"print(sorted(m for m in {ABSENT_ON_THE_GPU!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_dry_run_produces_every_step_and_a_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, MEE_DATA_DIR=str(DATA_DIR), RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_suite.py",
            "run",
            "--dry-run",
            "--out",
            str(out),
            "--build",
            str(tmp_path / "no-build"),
        ],
        cwd=REPO,
        env=env,
        check=True,
        timeout=1800,
    )
    summary = json.loads((out / "summary.json").read_text())
    statuses = {name: step["status"] for name, step in summary["steps"].items()}
    assert statuses == {
        "correctness": "ok",
        "decode_speed": "ok",
        "policy_speed": "ok",
        "training": "ok",
        "energy": statuses["energy"],
    }
    assert statuses["energy"].startswith("skipped: ")
    assert summary["steps"]["correctness"]["tests"] > summary["steps"]["correctness"]["failures"] == 0
    assert json.loads((out / "decode_speed_gpu.json").read_text())["settings"]["repeats"] >= 1
    policy_speed = json.loads((out / "policy_speed_gpu.json").read_text())
    assert policy_speed["batches"] and all(len(entry["policies"]) > 1 for entry in policy_speed["batches"])
    assert len(list(out.iterdir())) <= 8, "at most 8 files come back from the GPU machine"
    pieces = sorted(out.glob("model.tar.gz.part*"))
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"".join(piece.read_bytes() for piece in pieces))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"mee-t5-gpu/model.safetensors", "mee-t5-gpu/exit_heads.safetensors", "mee-t5-gpu/training.json"} <= names
    assert any(name.startswith("mee-t5-gpu/training/gpu-base.") for name in names)
    agreement = summary["steps"]["training"]["agreement"]["no_change_after_layer"]
    assert len(agreement) == 3 and agreement[-1] == 1.0
    assert "| training | ok |" in (out / "gpu.md").read_text()


def test_the_energy_steps_workload_is_built_without_a_gpu():
    """The energy step runs only on a GPU, so its prompts are built by a function the CPU can call."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    prompts = gpu_suite.energy_prompts(200)
    assert len(prompts) == len(set(prompts)) == 200 and all(
        p.startswith("translate English to French: ") for p in prompts
    )
