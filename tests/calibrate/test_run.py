"""`mee-bench calibrate` end to end on a tiny random T5 and real Tatoeba prompts: the record,
the Markdown and plot, `--save-to`, `--force`, and (slow) the Ray path giving the same risks."""

from __future__ import annotations

import json

import pytest
import yaml

from mee_bench.calibrate.config import load_config
from mee_bench.calibrate.examples import Example
from mee_bench.calibrate.ltt import hoeffding_bentkus_pvalue
from mee_bench.calibrate.run import RECORD_FILE, build_generator, calibrate, cli, timed_test
from mee_bench.engine.policy import ExitPolicy, read_policy_file
from tests.helpers import DATA_DIR


@pytest.fixture
def config_file(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEE_DATA_DIR", str(DATA_DIR))
    values = {
        "name": "tiny",
        "model": {"pretrained": str(tiny_model_dir)},
        "task": "tatoeba_enfr_mee",
        "measures": ["softmax"],
        "thresholds": {"softmax": [0.9, 0.6, 0.3, 0.1]},
        "min_exit_layer": 1,
        "delta": 0.5,
        "epsilon": 0.5,
        "calibration": {"size": 6},
        "test": {"size": 4},
        "batch_size": 3,
        "timing_blocks": 2,
        "max_new_tokens": 6,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_calibrate_writes_a_consistent_record_and_ships_the_policy(config_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert cli([str(config_file), "--save-to", str(model_dir)]) == 0
    out = tmp_path / "out"
    record = json.loads((out / RECORD_FILE).read_text())
    assert (out / "calibration.md").read_text().startswith("# Calibration `tiny`")
    assert (out / "calibration.png").stat().st_size > 0

    entry = record["measures"]["softmax"]
    grid = entry["grid"]
    assert [row["threshold"] for row in grid] == [0.9, 0.6, 0.3, 0.1]
    for row in grid:
        assert row["p_value"] == pytest.approx(hoeffding_bentkus_pvalue(row["risk"], 6, 0.5))
    rejected = [row["rejected"] for row in grid]
    prefix = rejected.index(False) if False in rejected else len(rejected)
    assert rejected == [True] * prefix + [False] * (len(rejected) - prefix)  # fixed sequence: a prefix
    chosen = grid[prefix - 1]["threshold"] if prefix else None
    assert entry["chosen_threshold"] == chosen
    assert 0.0 <= entry["test"]["risk"] <= 1.0 and entry["test"]["speedup"] > 0
    assert entry["test"]["within_delta"] == (entry["test"]["risk"] <= 0.5)

    shipped, summary = read_policy_file(model_dir)
    assert shipped == ExitPolicy(**record["policy"])
    assert shipped == (ExitPolicy("softmax", chosen, 1) if chosen else ExitPolicy("full"))
    assert summary["delta"] == 0.5 and summary["chosen_threshold"] == chosen
    assert read_policy_file(out / RECORD_FILE)[0] == shipped
    assert "recommended policy" in capsys.readouterr().out


def test_the_timed_test_decodes_every_policy_in_turn_a_step_at_a_time(config_file):
    """Two blocks of two test prompts, decoded one at a time: `full` and the policy take turns one
    generated step at a time, the first block `full` first, the second the policy first."""
    config = load_config(config_file)
    generator = build_generator(config)
    trace: list[tuple[str, int]] = []  # (measure, which of its decodes) at every step
    calls: dict[str, int] = {}
    decode_steps = generator.decode_steps

    def recording(input_ids, attention_mask, policy, *args):
        call = calls[policy.measure] = calls.get(policy.measure, -1) + 1
        steps = decode_steps(input_ids, attention_mask, policy, *args)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value
            trace.append((policy.measure, call))
            yield

    generator.decode_steps = recording
    prompts = [Example(f"Sentence number {i} is here.", ("x",)) for i in range(4)]
    policy = ExitPolicy("softmax", threshold=0.9, min_exit_layer=1)
    texts, stats = timed_test(generator, prompts, {"softmax": policy}, config, 6)
    assert calls == {"full": 4, "softmax": 3}  # an untimed warm-up of `full`, then four prompts each
    blocks = [(measure, (call - (measure == "full")) // 2) for measure, call in trace if (measure, call) != ("full", 0)]
    assert blocks[:4] == [("full", 0), ("softmax", 0), ("full", 0), ("softmax", 0)]
    assert next(step for step in blocks if step[1] == 1) == ("softmax", 1)  # block two: the policy first
    assert all(len(texts[name]) == 4 and stats[name].decoder_s > 0 for name in ("full", "softmax"))


def test_an_existing_record_is_kept_without_force(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_FILE).write_text("{}")
    assert cli([str(config_file)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / RECORD_FILE).read_text() == "{}"


def test_risk_kind_on_the_tiny_model_scores_against_references(config_file):
    config = load_config(config_file, ["consistency.kind=risk", "consistency.metric=chrf"])
    record = calibrate(config)
    assert record["consistency"]["note"].startswith("risk losses are max(0")
    assert all(0.0 <= row["risk"] <= 1.0 for row in record["measures"]["softmax"]["grid"])


@pytest.mark.slow
def test_ray_workers_give_the_in_process_risks(config_file, tmp_path):
    import ray

    local = calibrate(load_config(config_file))
    try:
        spread = calibrate(
            load_config(config_file, ["workers=2", "ray.num_cpus=2", "ray.temp_dir=/tmp/mee-ray-cal-test"])
        )
    finally:
        ray.shutdown()

    def risks(record):
        return [row["risk"] for row in record["measures"]["softmax"]["grid"]]

    assert risks(spread) == risks(local)
    assert not ray.is_initialized()
