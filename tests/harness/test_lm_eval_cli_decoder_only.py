"""The stock `lm_eval` command runs a project task on a tiny Llama and a tiny GPT-2 (both at once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mee_bench.harness.catalogue import SQUAD
from tests.helpers import subprocess_env

pytestmark = pytest.mark.slow  # lm-eval subprocesses

LM_EVAL = Path(sys.executable).parent / "lm_eval"
TIMEOUT_S = 480
MAX_GEN_TOKS = 8


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("lm-eval-decoder-only")
    processes = {}
    for family, directory in (("llama", tiny_llama_dir), ("gpt2", tiny_gpt2_dir)):
        command = [
            str(LM_EVAL),
            "--model",
            "mee",
            "--model_args",
            f"pretrained={directory},measure=fixed,min_exit_layer=2",
            "--tasks",
            SQUAD.name,
            "--limit",
            "3",
            "--batch_size",
            "3",
            "--gen_kwargs",
            f"max_gen_toks={MAX_GEN_TOKS}",
            "--output_path",
            str(work / family),
            "--log_samples",
        ]
        processes[family] = subprocess.Popen(
            command, cwd=work, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return work, {family: (p.communicate(timeout=TIMEOUT_S)[0], p.returncode) for family, p in processes.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_eval_runs_a_project_task_on_a_decoder_only_checkpoint(runs, family):
    work, outputs = runs
    log, returncode = outputs[family]
    assert returncode == 0, log[-4000:]
    (results_file,) = (work / family).rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert {"exact_match,none", "f1,none"} <= set(results["results"][SQUAD.name])
    assert results["config"]["model_kind"] == "decoder-only" and results["config"]["model_type"] == family
    figures = results["mee"][SQUAD.name]
    assert figures["requests"] == 3 and 0 < figures["tokens"] <= 3 * MAX_GEN_TOKS
    assert figures["exit_histogram"] == {"2": figures["tokens"]}, "the fixed policy exits every token at layer 2"
    (samples_file,) = (work / family).rglob("samples_*.jsonl")
    for sample in map(json.loads, samples_file.read_text().splitlines()):
        assert "\n" not in sample["resps"][0][0], "the causal prompt's answer ends at a newline"
