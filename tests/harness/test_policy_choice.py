"""Which exit policy `--model mee` runs: model_args, a calibration file, the model's shipped
`exit_policy.json`, or `full`; and that it says which."""

from __future__ import annotations

import json
import shutil

import pytest

from mee_bench.engine.policy import POLICY_FILE, ExitPolicy
from mee_bench.harness.lm_eval_model import MEELM

SHIPPED = ExitPolicy("softmax", 0.6, 2)


@pytest.fixture(scope="module")
def shipping_model_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-t5-with-policy") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / POLICY_FILE).write_text(json.dumps({"policy": SHIPPED.as_dict(), "calibration": {"delta": 0.1}}))
    return path


def test_without_measure_the_shipped_policy_runs_and_is_announced(shipping_model_dir, capsys):
    lm = MEELM(pretrained=str(shipping_model_dir), device="cpu")
    assert lm.policy == SHIPPED
    assert str(shipping_model_dir / POLICY_FILE) in lm.get_model_info()["mee_policy_source"]
    assert "shipped policy" in capsys.readouterr().err


def test_without_measure_or_shipped_policy_full_runs_and_is_announced(tiny_model_dir, capsys):
    lm = MEELM(pretrained=str(tiny_model_dir), device="cpu")
    assert lm.policy.measure == "full"
    assert "no exit_policy.json" in capsys.readouterr().err


def test_policy_args_adjust_the_shipped_policy_and_a_measure_replaces_it(shipping_model_dir):
    assert MEELM(pretrained=str(shipping_model_dir), kv_strategy="deferred", device="cpu").policy == ExitPolicy(
        "softmax", 0.6, 2, kv_strategy="deferred"
    )
    assert MEELM(pretrained=str(shipping_model_dir), measure="full", device="cpu").policy.measure == "full"


def test_calibration_file_names_the_policy(tiny_model_dir, tmp_path):
    record = tmp_path / "calibration.json"
    record.write_text(json.dumps({"policy": ExitPolicy("saturation", 0.95, 3).as_dict(), "measures": {}}))
    lm = MEELM(pretrained=str(tiny_model_dir), calibration=str(record), device="cpu")
    assert lm.policy == ExitPolicy("saturation", 0.95, 3)
    assert lm.get_model_info()["mee_policy_source"] == f"calibration {record}"


def test_calibration_file_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no exit policy at .*mee-bench calibrate"):
        MEELM(pretrained=str(tiny_model_dir), calibration=str(tmp_path / "missing.json"), device="cpu")
    not_a_record = tmp_path / "other.json"
    not_a_record.write_text("{}")
    with pytest.raises(ValueError, match="holds no `policy` object"):
        MEELM(pretrained=str(tiny_model_dir), calibration=str(not_a_record), device="cpu")
    with pytest.raises(ValueError, match="both calibration= and measure"):
        MEELM(pretrained=str(tiny_model_dir), calibration=str(not_a_record), measure="softmax", device="cpu")
