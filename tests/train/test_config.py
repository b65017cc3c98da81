"""The typed training config: presets load, mistakes in a file or an override name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mee_bench.train.config import ConfigError, TrainConfig, identity, load_config, presets

SOURCE = "{name: tatoeba, path: tatoeba_fra_eng/train.jsonl, task: translate_en_fr}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\ndata:\n  sources: [{SOURCE}]\nbudget: {{steps: 10}}\n{text}")
    return path


def test_every_preset_loads_as_a_typed_config():
    assert len(presets()) >= 7
    for preset in presets():
        cfg = load_config(preset)
        assert (
            isinstance(cfg, TrainConfig)
            and cfg.data.sources
            and (cfg.budget.steps or 0) + (cfg.budget.minutes or 0) > 0
        )
        assert isinstance(cfg.optim.lr, float) and all(source.name for source in cfg.data.sources)
        assert Path(cfg.output_dir).is_absolute()


def test_file_and_overrides_fill_the_schema_and_a_list_entry_is_reachable(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 2e-3}\n"), ["data.sources.0.weight=3", "seed=7"])
    assert (cfg.optim.lr, cfg.seed, cfg.data.sources[0].weight) == (2e-3, 7, 3.0)
    assert cfg.data.validation.examples == 200  # untouched defaults stay
    assert cfg.data.sources[0].name == "tatoeba"


def test_a_source_without_a_name_is_named_after_its_folder(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["data.sources=[{path: squad/train.jsonl, task: squad}]"])
    assert (cfg.data.sources[0].name, cfg.data.sources[0].weight) == ("squad", 1.0)


@pytest.mark.parametrize(
    "text, overrides, unknown, suggestion",
    [
        ("optim: {lrr: 0.1}\n", [], "'optim.lrr'", "'optim.lr'"),
        ("sed: 3\n", [], "'sed'", "'seed'"),
        ("", ["optim.warmup=5"], "'optim.warmup'", "'optim.warmup_steps'"),
        ("", ["data.sources.0.pth=x.jsonl"], "'data.sources.0.pth'", "'data.sources.0.path'"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(tmp_path, text, overrides, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert f"unknown config key {unknown}" in str(err.value)
    assert f"the closest valid key is {suggestion}" in str(err.value)
    assert ("the command-line overrides" if overrides else "run.yaml") in str(err.value)


def test_unknown_key_inside_a_source_in_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  sources: [{path: a.jsonl, task: squad, wieght: 2}]\nbudget: {steps: 1}\n")
    with pytest.raises(
        ConfigError, match=r"'data.sources\[0\].wieght' .* closest valid key is 'data.sources\[0\].weight'"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("seed: abc\n", [], "bad value for 'seed' in .*run.yaml: expected int, got 'abc'"),
        ("optim: {betas: [0.9, fast]}\n", [], r"bad value for 'optim.betas' in .*run.yaml: expected a list of float"),
        ("model: 4\n", [], "bad value for 'model' in .*run.yaml: expected a mapping with keys init, d_model"),
        ("", ["optim.lr=fast"], "bad value for 'optim.lr' in the command-line overrides: expected float, got 'fast'"),
        ("", ["budget.steps=1.5"], "bad value for 'budget.steps' .*: expected int or null, got '1.5'"),
        ("", ["data.sources.0.weight=heavy"], "bad value for 'data.sources.0.weight' .*: expected float, got 'heavy'"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["budget.steps"], "override 'budget.steps' is not key=value"),
        (["seed.value=1"], "'seed.value' .* goes inside 'seed', which is int"),
        (["data.sources=[{task: squad}]"], r"config key 'data.sources\[0\].path' is required and missing"),
        (["data.sources.0.weight=0"], r"data.sources\[0\].weight must be positive"),
    ],
)
def test_malformed_overrides_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, ""), overrides)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of config keys"):
        load_config(path)


def test_identity_leaves_out_the_resumable_keys_only(tmp_path):
    base = identity(load_config(write(tmp_path, "")))
    assert identity(load_config(write(tmp_path, ""), ["budget.steps=99", "threads=1", "checkpoint_minutes=1"])) == base
    changed = identity(load_config(write(tmp_path, ""), ["optim.lr=0.5"]))
    assert {key for key in base if base[key] != changed[key]} == {"optim.lr"}
    assert "data.sources" in base and not any(key.startswith(("budget", "output_dir")) for key in base)
