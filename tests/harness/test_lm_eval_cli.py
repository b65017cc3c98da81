"""The stock `lm_eval` command with no flags of ours and the start-up hook (what a wheel ships:
`tests/test_packaging.py`): its three subcommands `run`, `ls` and `validate` (lm-eval >= 0.4.10;
the form without a subcommand, which lm-eval reads as `run`, is what `tests/test_packaging.py` runs).

The three `lm_eval` subprocesses each index lm-eval's ~14k built-in tasks (tens of seconds on
a busy machine), so they run concurrently and cover all five tasks and the group at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mee_bench.harness.catalogue import GROUP_NAME, TASK_NAMES, TASKS, TASKS_DIR, TATOEBA_ENFR
from mee_bench.harness.install_hook import PTH_LINE, SHIPPED_PTH, site_packages_pth
from mee_bench.harness.lm_eval_hook import DISABLE_ENV, TRIGGER_NAME
from tests.helpers import subprocess_env

pytestmark = pytest.mark.slow  # starts Ray or subprocesses: `make test-fast` skips it

LM_EVAL = Path(sys.executable).parent / "lm_eval"
EFFICIENCY_KEYS = {
    "tokens",
    "num_layers",
    "avg_exit_layer",
    "exit_histogram",
    "encoder_ms",
    "decoder_ms",
    "measure_ms",
    "decode_ms_per_token",
    "layers_per_token",
    "acceptance_rate",
    "mean_accepted_draft",
    "requests",
    "wall_ms",
    "wall_ms_per_token",
    "load",
}
TIMEOUT_S = 480


@pytest.fixture(scope="module")
def cli(tiny_model_dir, tmp_path_factory):
    """`lm_eval run` (softmax exits, the `mee` group + tatoeba, 16 new tokens at most), `lm_eval ls tasks`
    and `lm_eval validate` of a task and the group, run side by side."""
    work = tmp_path_factory.mktemp("lm-eval-cli")
    model_args = f"pretrained={tiny_model_dir},measure=softmax,threshold=0.5,min_exit_layer=1"
    commands = {
        "run": [
            str(LM_EVAL),
            "run",
            "--model",
            "mee",
            "--model_args",
            model_args,
            "--tasks",
            f"{GROUP_NAME},{TATOEBA_ENFR.name}",
            "--limit",
            "4",
            "--batch_size",
            "4",
            "--gen_kwargs",
            "max_gen_toks=16",
            "--output_path",
            str(work / "results"),
        ],
        "ls": [str(LM_EVAL), "ls", "tasks"],
        "validate": [str(LM_EVAL), "validate", "--tasks", f"{TATOEBA_ENFR.name},{GROUP_NAME}"],
    }
    processes = {
        name: subprocess.Popen(
            command, cwd=work, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, command in commands.items()
    }
    outputs = {
        name: (process.communicate(timeout=TIMEOUT_S)[0], process.returncode) for name, process in processes.items()
    }
    return work, outputs


def test_lm_eval_run_writes_task_metrics_and_the_mee_block_and_prints_its_table(cli):
    work, outputs = cli
    log, returncode = outputs["run"]
    assert returncode == 0, log[-4000:]
    (results_file,) = (work / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    for spec in TASKS:
        assert {f"{m},none" for m in spec.metrics} <= set(results["results"][spec.name]), spec.name
    assert set(results["mee"]) == set(TASK_NAMES)
    for task, figures in results["mee"].items():
        assert set(figures) == EFFICIENCY_KEYS, task
        assert figures["requests"] == 4 and figures["num_layers"] == 4 and figures["tokens"] <= 4 * 16
        assert sum(figures["exit_histogram"].values()) == figures["tokens"] > 0
        assert 1.0 <= figures["avg_exit_layer"] <= 4.0
    assert any(int(layer) < 4 for figures in results["mee"].values() for layer in figures["exit_histogram"]), (
        "softmax with threshold 0.5 from layer 1 should exit early somewhere"
    )
    assert results["config"]["mee_policy"]["measure"] == "softmax"
    last_lm_eval_table = max(m.start() for m in re.finditer(r"^\|\s*(Tasks|Groups)\s*\|", log, re.MULTILINE))
    assert last_lm_eval_table < log.index("mee early-exit efficiency")


def test_lm_eval_ls_tasks_lists_the_five_tasks_and_the_group(cli):
    _, outputs = cli
    listing, returncode = outputs["ls"]
    assert returncode == 0, listing[-4000:]
    rows = {line.split("|")[1].strip(): line for line in listing.splitlines() if line.startswith("|")}
    for name in (*TASK_NAMES, GROUP_NAME):
        assert name in rows and str(TASKS_DIR) in rows[name], name


def test_lm_eval_validate_finds_a_task_and_the_group(cli):
    _, outputs = cli
    log, returncode = outputs["validate"]
    assert returncode == 0, log[-4000:]
    assert f"Validating tasks: {[TATOEBA_ENFR.name, GROUP_NAME]}" in log
    assert log.strip().splitlines()[-1] == "All tasks found and valid"


PROBE = (
    """
import json, sys
import lm_eval.models
from lm_eval.api.registry import model_registry
from lm_eval.tasks import TaskManager
print(json.dumps({
    "trigger": [getattr(f, "__name__", "") for f in sys.meta_path].count(%r),
    "mee_registered": "mee" in model_registry,
    "tasks_patched": hasattr(TaskManager.__init__, "__wrapped__"),
    "adapter_imported": "mee_bench.harness.lm_eval_model" in sys.modules,
}))
"""
    % TRIGGER_NAME
)


@pytest.mark.parametrize(("disable", "active"), [(None, True), ("1", False)])
def test_the_hook_registers_lazily_and_the_environment_variable_turns_it_off(disable, active):
    env = subprocess_env(**({DISABLE_ENV: disable} if disable else {}))
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert probe.returncode == 0, probe.stderr
    state = json.loads(probe.stdout)
    assert state == {
        "trigger": int(active),
        "mee_registered": active,
        "tasks_patched": active,
        "adapter_imported": False,
    }


def test_python_start_up_imports_nothing_of_mee_bench():
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print(sorted(m for m in sys.modules if m.startswith(('mee_bench', 'lm_eval'))))",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_a_user_include_path_still_comes_after_the_package_tasks(tmp_path, monkeypatch):
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        pytest.skip(f"{DISABLE_ENV} is set in this test run")
    from lm_eval.tasks import TaskManager, manager

    indexed = []
    monkeypatch.setattr(manager.TaskIndex, "build", staticmethod(lambda paths, **kw: indexed.append(list(paths)) or {}))
    TaskManager(include_path=str(tmp_path))
    TaskManager(include_path=[TASKS_DIR, tmp_path])
    TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm_eval_tasks = Path(manager.__file__).parent
    assert indexed == [
        [lm_eval_tasks, TASKS_DIR, tmp_path],
        [lm_eval_tasks, TASKS_DIR, tmp_path],
        [tmp_path],
    ]


def test_the_pth_files_hold_the_generated_trigger():
    assert SHIPPED_PTH.read_text(encoding="utf-8") == PTH_LINE
    installed = site_packages_pth()
    assert installed.is_file() and installed.read_text(encoding="utf-8") == PTH_LINE, (
        f"{installed} is missing or stale: run `python -m mee_bench.harness.install_hook` (editable installs need it)"
    )
