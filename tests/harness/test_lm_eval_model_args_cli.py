"""The real `lm_eval` command with every model arg the adapter lists, and with a bad one.

The CLI runs through the hook of this checkout (not the `.pth` installed in site-packages,
which `test_lm_eval_cli.py` checks separately), so the test follows the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.install_hook import TRIGGER_SOURCE
from mee_bench.harness.lm_eval_hook import DISABLE_ENV
from mee_bench.harness.lm_eval_model import MODEL_ARGS
from tests.helpers import subprocess_env

pytestmark = pytest.mark.slow

TIMEOUT_S = 480
# `lm_eval` itself (its console script's two lines) behind this checkout's trigger; the installed one stays off.
LM_EVAL_WITH_THIS_HOOK = (
    f"import sys\nexec({TRIGGER_SOURCE!r})\n"
    "from lm_eval.__main__ import cli_evaluate\nsys.argv[0] = 'lm_eval'\nsys.exit(cli_evaluate())\n"
)


def lm_eval_run(model_args: str, *flags: str, cwd) -> subprocess.Popen:
    command = [
        sys.executable,
        "-c",
        LM_EVAL_WITH_THIS_HOOK,
        "run",
        "--model",
        "mee",
        "--model_args",
        model_args,
        "--tasks",
        "squad_mee",
        "--limit",
        "2",
        *flags,
    ]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=subprocess_env(**{DISABLE_ENV: "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Every model arg set at once (colliding with lm-eval's --device and --batch_size; `calibration`
    names a policy, so it runs without the policy args), a bad one, and lm-eval's --batch_size auto:2."""
    work = tmp_path_factory.mktemp("model-args")
    heads = ExitHeads(d_model=32).save(work, metadata={"num_layers": 4})
    policy_file = work / "exit_policy.json"
    policy_file.write_text(
        json.dumps({"policy": ExitPolicy("softmax", 0.5, 1).as_dict(), "calibration": {"delta": 0.1}})
    )
    every_arg = {
        "pretrained": tiny_model_dir,
        "measure": "lstm",
        "threshold": 0.5,
        "min_exit_layer": 1,
        "threshold_schedule": "decaying",
        "tau": 2.0,
        "kv_strategy": "deferred",
        "dtype": "float32",
        "device": "cpu",
        "batch_size": 2,
        "max_batch_size": 4,
        "max_length": 128,
        "heads": heads,
        "max_gen_toks": 4,
        "trust_remote_code": False,
        "paired_timing": True,
        "timing_precision": 0.2,
        "timing_allowance_s": 1,
        "timing_min_repeats": 3,
        "vocab_top_k": 0,
        "decoding": "early_exit",
        "max_draft": 2,
    }
    calibrated = {"pretrained": tiny_model_dir, "calibration": policy_file}
    assert set(every_arg) | set(calibrated) == set(MODEL_ARGS), "a model arg the adapter lists is not exercised here"
    good = ",".join(f"{name}={value}" for name, value in every_arg.items())
    processes = {
        "good": lm_eval_run(good, "--device", "cuda:0", "--batch_size", "1", cwd=work),
        "calibrated": lm_eval_run(",".join(f"{name}={value}" for name, value in calibrated.items()), cwd=work),
        "bad": lm_eval_run(f"pretrained={tiny_model_dir},measure=softmax,threshold=1.5", cwd=work),
        "auto": lm_eval_run(f"pretrained={tiny_model_dir}", "--batch_size", "auto:2", cwd=work),
    }
    return {name: (*process.communicate(timeout=TIMEOUT_S), process.returncode) for name, process in processes.items()}


def test_every_listed_model_arg_runs_and_model_args_win_over_lm_evals_flags(runs):
    stdout, stderr, returncode = runs["good"]
    assert returncode == 0, stderr[-4000:]
    assert "model_args device=cpu wins over lm-eval's --device cuda:0" in stderr
    assert "model_args batch_size=2 wins over lm-eval's --batch_size 1" in stderr
    assert "mee early-exit efficiency" in stdout
    assert "x [" in stdout  # paired_timing=true: the speedup against full with its interval


def test_a_calibration_file_runs_its_policy(runs):
    stdout, stderr, returncode = runs["calibrated"]
    assert returncode == 0, stderr[-4000:]
    assert "exit_policy.json" in stderr and "softmax" in stderr


def test_a_bad_model_arg_ends_the_cli_in_one_line_and_exit_status_2(runs):
    stdout, stderr, returncode = runs["bad"]
    assert returncode == 2, stderr[-4000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "lm_eval: error: --model mee: threshold=1.5 is outside [0.0, 1.0] for measure 'softmax'; pick a value in "
        "that range"
    )


def test_lm_evals_batch_size_auto_runs_and_says_what_it_chose_on_a_cpu(runs):
    stdout, stderr, returncode = runs["auto"]
    assert returncode == 0, stderr[-4000:]
    assert stderr.count("mee: batch_size=auto:2 on the CPU: running batch_size 8 (the adapter's default") == 1
    assert "batch_size: auto:2 (8,8)" in stdout  # lm-eval's own summary line lists the sizes chosen
