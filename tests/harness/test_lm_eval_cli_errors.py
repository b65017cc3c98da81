"""The real `lm_eval` command ends in one line on whatever mee-bench refuses, at every stage of a run.

Bad task data (refused while lm-eval builds the tasks), generation kwargs that ask for sampling
(refused while the model runs), through the console script's `lm_eval run` and through
`python -m lm_eval`; `MEE_BENCH_DEBUG=1` keeps the traceback. The CLI runs behind this
checkout's trigger (the installed `.pth` is switched off), so the test follows the code under
test. A bad `--model_args` value: `test_lm_eval_model_args_cli.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mee_bench.harness.install_hook import TRIGGER_SOURCE
from mee_bench.harness.lm_eval_hook import DEBUG_ENV, DISABLE_ENV
from mee_bench.paths import DATA_DIR_ENV
from tests.helpers import DATA_DIR, subprocess_env

pytestmark = pytest.mark.slow

TIMEOUT_S = 480
GOOD_WMT = {"translation": {"en": "The house.", "fr": "La maison."}}
# `lm_eval` as its console script runs it, and as `python -m lm_eval` does (runpy executes
# `lm_eval/__main__.py` as `__main__`), each behind this checkout's trigger.
CONSOLE_SCRIPT = (
    f"import sys\nexec({TRIGGER_SOURCE!r})\n"
    "from lm_eval.__main__ import cli_evaluate\nsys.argv[0] = 'lm_eval'\nsys.exit(cli_evaluate())\n"
)
DASH_M = (
    f"import runpy, sys\nexec({TRIGGER_SOURCE!r})\n"
    "sys.argv[0] = 'lm_eval'\nrunpy.run_module('lm_eval', run_name='__main__', alter_sys=True)\n"
)


def write_task_data(root: Path, rows: list[dict]) -> Path:
    path = root / "wmt15" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Four runs side by side: an empty task file, a record without its source field (through
    `python -m lm_eval`), sampling asked for, and the empty file again with MEE_BENCH_DEBUG=1."""
    work = tmp_path_factory.mktemp("cli-errors")
    empty, no_source = work / "empty", work / "no-source"
    files = {
        "empty": write_task_data(empty, []),
        "no_source": write_task_data(no_source, [GOOD_WMT, {"translation": {"fr": "Salut."}}]),
    }
    model = ["--model", "mee", "--model_args", f"pretrained={tiny_model_dir}", "--limit", "2"]
    runs = {
        "empty": (CONSOLE_SCRIPT, ["run", *model, "--tasks", "wmt15_enfr_mee"], empty, {}),
        "no_source": (DASH_M, [*model, "--tasks", "wmt15_enfr_mee"], no_source, {}),
        "sampling": (
            CONSOLE_SCRIPT,
            ["run", *model, "--tasks", "tatoeba_enfr_mee", "--gen_kwargs", "do_sample=true,temperature=0.7"],
            DATA_DIR,
            {},
        ),
        "debug": (CONSOLE_SCRIPT, ["run", *model, "--tasks", "wmt15_enfr_mee"], empty, {DEBUG_ENV: "1"}),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(**{DISABLE_ENV: "1", DATA_DIR_ENV: str(data)}, **extra),
        )
        for name, (script, args, data, extra) in runs.items()
    }
    outputs = {
        name: (*process.communicate(timeout=TIMEOUT_S), process.returncode) for name, process in processes.items()
    }
    return files, outputs


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_an_empty_task_file_ends_lm_eval_run_in_one_line_naming_the_file(runs):
    files, outputs = runs
    _, stderr, returncode = outputs["empty"]
    assert returncode == 2, stderr[-4000:]
    assert "Traceback" not in stderr
    assert last_line(stderr) == (
        f"lm_eval: error: {files['empty']} holds no records, so task wmt15_enfr_mee has nothing to evaluate; "
        "point the data root at a non-empty split"
    )


def test_a_record_without_its_source_ends_python_dash_m_lm_eval_in_one_line_naming_file_and_line(runs):
    files, outputs = runs
    _, stderr, returncode = outputs["no_source"]
    assert returncode == 2, stderr[-4000:]
    assert "Traceback" not in stderr
    assert last_line(stderr) == (
        f"lm_eval: error: {files['no_source']}:2: not a wmt15_enfr_mee record (translation[en] is missing); "
        "fix or remove that record"
    )


def test_sampling_refused_while_the_model_runs_ends_in_one_line(runs):
    _, outputs = runs
    _, stderr, returncode = outputs["sampling"]
    assert returncode == 2, stderr[-4000:]
    assert "Traceback" not in stderr
    assert last_line(stderr).startswith(
        "lm_eval: error: mee decodes greedily (early exit is defined on the argmax token)"
    )
    assert "set do_sample=false / temperature=0" in last_line(stderr)


def test_mee_bench_debug_keeps_the_traceback(runs):
    files, outputs = runs
    _, stderr, returncode = outputs["debug"]
    assert returncode == 1
    assert "Traceback (most recent call last)" in stderr
    assert last_line(stderr).startswith(f"mee_bench.harness.catalogue.TaskDataError: {files['empty']} holds no records")
