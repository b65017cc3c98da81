"""docs/CHECKPOINTS.md cannot drift from the code: its family tables list exactly the registered and the
refused model types, and its LayerSkip recipe's model_args and sweep config are valid for the 1B model."""

from __future__ import annotations

import re
import shlex

import pytest

import mee_bench.engine  # noqa: F401  (registers every runner)
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import REFUSED, supported_model_types
from mee_bench.harness.lm_eval_model import MODEL_ARGS, POLICY_ARGS
from mee_bench.sweep.config import expand_grid, load_config
from tests.helpers import REPO

DOC = (REPO / "docs" / "CHECKPOINTS.md").read_text(encoding="utf-8")
LAYERSKIP_1B_LAYERS = 16  # Llama 3.2 1B's decoder layers
TYPED = {"threshold": float, "min_exit_layer": int, "max_draft": int}


def table_types(heading: str) -> set[str]:
    """The `model_type`s in the first column of the table after `heading`."""
    table = re.search(r"^\|.*?(?=^[^|])", DOC.split(heading, 1)[1], re.MULTILINE | re.DOTALL).group(0)
    return {match for row in table.splitlines()[2:] for match in re.findall(r"^\| `(\w+)`", row)}


def test_the_families_table_lists_every_registered_model_type():
    assert table_types("## Families") == set(supported_model_types())


def test_the_refused_table_names_every_refused_model_type():
    assert set(REFUSED) <= table_types("Refused, with the reason in the error:")


def lm_eval_model_args() -> list[dict[str, str]]:
    commands = [line for line in DOC.splitlines() if line.startswith("lm_eval --model mee")]
    assert len(commands) == 3
    parsed = []
    for command in commands:
        words = shlex.split(command)
        parsed.append(dict(item.split("=", 1) for item in words[words.index("--model_args") + 1].split(",")))
    return parsed


@pytest.mark.parametrize("args", lm_eval_model_args(), ids=lambda args: args.get("decoding", args["measure"]))
def test_the_recipes_lm_eval_model_args_are_valid_for_the_1b_model(args):
    assert set(args) <= set(MODEL_ARGS)
    policy = ExitPolicy(**{name: TYPED.get(name, str)(value) for name, value in args.items() if name in POLICY_ARGS})
    policy.check_model(LAYERSKIP_1B_LAYERS)
    assert policy.min_exit_layer == 4  # LayerSkip's draft depth for its 1B model


def test_the_recipes_sweep_config_is_a_valid_sweep_for_the_1b_model(tmp_path):
    [block] = re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL)
    path = tmp_path / "layerskip.yaml"
    path.write_text(block)
    config = load_config(path)
    assert config.name == "layerskip-llama3.2-1B" and config.model.pretrained == "models/layerskip-llama3.2-1B"
    assert max(config.min_exit_layers) < LAYERSKIP_1B_LAYERS
    assert len(expand_grid(config)) > len(config.measures)
