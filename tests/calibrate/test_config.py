"""The calibration config: closest-key errors, and every value Learn-then-Test cannot use."""

from __future__ import annotations

import pytest

from mee_bench.calibrate.config import ConfigError, load_config, to_config

BASE = {
    "name": "t",
    "measures": ["softmax"],
    "thresholds": {"softmax": [0.9, 0.5]},
    "calibration": {"size": 100},
    "test": {"size": 50},
}


def config_with(**changes):
    values = {**BASE, **changes}
    return to_config(values)


def test_quickstart_config_loads_with_overrides():
    config = load_config("configs/calibrate_quickstart.yaml", ["delta=0.2", "calibration.size=150"])
    assert (config.delta, config.calibration.size, config.measures) == (0.2, 150, ["lstm", "softmax"])
    assert config.family_epsilon == pytest.approx(config.epsilon / 2)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"deltaa": 0.1}, "unknown config key 'deltaa'.*closest valid key is 'delta'"),
        ({"consistency": {"kind": "textal"}}, "consistency.kind='textal' is not valid; did you mean 'textual'"),
        ({"consistency": {"metric": "rouge"}}, "did you mean 'rougeL'"),
        ({"delta": 0.0}, "delta=0.0 must lie strictly between 0 and 1"),
        ({"epsilon": 1.0}, "epsilon=1.0 must lie strictly between 0 and 1"),
        ({"measures": []}, "empty grid"),
        ({"thresholds": {"softmax": []}}, "thresholds.softmax: empty threshold grid"),
        ({"thresholds": {"softmax": [0.5, 0.9]}}, "not ordered from most to least conservative"),
        ({"measures": ["full"], "thresholds": {}}, "measure 'full' cannot be calibrated"),
        ({"thresholds": {"softmax": [1.5, 0.5]}}, "outside"),
        ({"calibration": {"size": 10}}, "calibration.size: a calibration set of 10 examples cannot certify"),
        ({"thresholds": {"softmax": [0.9], "lstm": [0.5]}}, "`thresholds.lstm` names a measure not in `measures`"),
    ],
)
def test_bad_configs_fail_with_one_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_with(**changes)


def test_missing_config_file_points_at_the_example(tmp_path):
    with pytest.raises(ConfigError, match="calibrate_quickstart.yaml"):
        load_config(tmp_path / "nope.yaml")
