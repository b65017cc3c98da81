"""The sweep config: schema, overrides and every bad input a user can type."""

from __future__ import annotations

from pathlib import Path

import pytest

from mee_bench.harness.catalogue import GROUP_TASK_NAMES
from mee_bench.sweep.config import ConfigError, SweepConfig, expand_grid, load_config, to_config
from tests.helpers import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"
ALL_MEASURES = REPO / "configs" / "all_measures.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


MINIMAL = """
tasks: [tatoeba_enfr_mee]
measures: [softmax]
thresholds: {softmax: [0.9]}
carbon: {country_iso_code: FRA}
"""


def test_shipped_configs_load_and_cover_the_paper_grid():
    full_grid = load_config(ALL_MEASURES)
    assert full_grid.tasks == list(GROUP_TASK_NAMES)
    paper_policies = {"full", "softmax", "saturation", "classifier", "lstm", "last_three_mlp", "monotonic_heuristic"}
    assert paper_policies <= set(full_grid.measures)
    assert 4 in full_grid.min_exit_layers and len(full_grid.min_exit_layers) > 1
    assert full_grid.model.pretrained is None  # the embedded default model
    quick = load_config(QUICKSTART)
    assert "tatoeba_enfr_mee" in quick.tasks and len(quick.tasks) == 2
    assert quick.results_dir == Path("results/quickstart")


def test_name_defaults_to_the_file_name_and_output_dir_to_results(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.name == "sweep" and config.results_dir == Path("results/sweep")
    assert config.model.dtype == "float32" and config.ray.cpus_per_trial == 1.0


def test_dotlist_overrides_replace_lists_and_single_dict_entries():
    config = load_config(
        QUICKSTART, ["tasks=[squad_mee]", "limit=5", "thresholds.softmax=[0.3]", "ray.max_concurrent=2"]
    )
    assert config.tasks == ["squad_mee"] and config.limit == 5 and config.ray.max_concurrent == 2
    assert config.thresholds["softmax"] == [0.3]
    assert config.thresholds["saturation"] == load_config(QUICKSTART).thresholds["saturation"]


@pytest.mark.parametrize(
    "text, overrides, unknown, suggestion",
    [
        (MINIMAL + "tresholds: {softmax: [0.5]}\n", [], "'tresholds'", "'thresholds'"),
        (MINIMAL + "model: {pretrainned: x}\n", [], "'model.pretrainned'", "'model.pretrained'"),
        (MINIMAL, ["ray.adress=127.0.0.1:6379"], "'ray.adress'", "'ray.address'"),
        (MINIMAL, ["min_exit_layer=[4]"], "'min_exit_layer'", "'min_exit_layers'"),
    ],
)
def test_unknown_key_is_named_with_the_closest_valid_key(tmp_path, text, overrides, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert f"unknown config key {unknown}" in str(err.value)
    assert f"closest valid key is {suggestion}" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks=[]", "empty grid: `tasks` is empty"),
        ("measures=[]", "empty grid: `measures` is empty"),
        ("thresholds.softmax=[]", "empty grid for measure 'softmax'"),
        ("min_exit_layers=[]", "empty grid for measure 'softmax': `min_exit_layers` is empty"),
    ],
)
def test_empty_grid_is_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("measures=[softmx]", "did you mean 'softmax'"),
        ("thresholds.lsmt=[0.5]", "did you mean 'lstm'"),
        ("thresholds.softmax=[1.5]", "outside"),
        ("min_exit_layers=[0]", ">= 1"),
        ("limit=abc", "bad value for 'limit'"),
        ("limit=0", "limit=0 must be >= 1"),
        ("kv_strategy=defered", "did you mean 'deferred'"),
        ("vocab_top_k=1", "vocab_top_k=1 must be 0 .off. or an integer >= 2"),
        ("model.dtype=fp16", "model.dtype='fp16' is not valid"),
        ("ray.cpus_per_trial=0", "must be > 0"),
        ("timing.min_repeats=1", "timing.min_repeats=1 must be at least 2"),
        ("model.device=cuda", "needs ray.gpus_per_trial > 0"),
        ("carbon.country_iso_code=FRX", "not a country CodeCarbon knows"),
        ("carbon.country_iso_code=null", "country_iso_code is required"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), [override])


def test_online_carbon_needs_no_country(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["carbon.country_iso_code=null", "carbon.offline=false"])
    assert config.carbon.country_iso_code is None


def test_override_without_equals_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(write(tmp_path, MINIMAL), ["limit"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_to_config_accepts_a_plain_mapping_and_expands_full_once_per_task():
    config = to_config(
        {
            "name": "x",
            "tasks": ["a", "b", "a"],
            "measures": ["full", "softmax", "oracle", "full"],
            "thresholds": {"softmax": [0.5, 0.9, 0.5]},
            "min_exit_layers": [2, 4],
            "carbon": {"country_iso_code": "FRA"},
        }
    )
    assert isinstance(config, SweepConfig)
    trials = expand_grid(config)
    for task in ("a", "b"):
        mine = [t for t in trials if t.task == task]
        assert [t.measure for t in mine].count("full") == 1
        assert {(t.threshold, t.min_exit_layer) for t in mine if t.measure == "softmax"} == {
            (0.5, 2),
            (0.5, 4),
            (0.9, 2),
            (0.9, 4),
        }
        assert {(t.threshold, t.min_exit_layer) for t in mine if t.measure == "oracle"} == {(None, 2), (None, 4)}
    assert len(trials) == 2 * (1 + 4 + 2)


def test_full_is_added_even_when_not_listed(tmp_path):
    trials = expand_grid(load_config(write(tmp_path, MINIMAL)))
    assert [t.measure for t in trials] == ["full", "softmax"]


def test_pruned_checks_reach_the_measures_that_allow_them_only(tmp_path):
    config = to_config(
        {
            "name": "x",
            "tasks": ["a"],
            "measures": ["softmax", "lstm"],
            "thresholds": {"softmax": [0.5], "lstm": [0.5]},
            "vocab_top_k": 64,
            "carbon": {"country_iso_code": "FRA"},
        }
    )
    policies = {t.measure: t.policy(config) for t in expand_grid(config)}
    assert policies["softmax"].vocab_top_k == 64
    assert policies["lstm"].vocab_top_k == 0 and policies["full"].vocab_top_k == 0
