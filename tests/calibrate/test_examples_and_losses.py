"""Examples as distinct prompts drawn into disjoint sets, and the consistency losses."""

from __future__ import annotations

import pytest

from mee_bench.calibrate.config import ConfigError, SplitConfig
from mee_bench.calibrate.consistency import check_references, losses, similarity
from mee_bench.calibrate.examples import (
    Example,
    TaskData,
    check_disjoint,
    draw_splits,
    group_examples,
)


def test_group_examples_merges_references_of_one_prompt():
    examples = group_examples([("a", "x"), ("b", "y"), ("a", "z"), ("a", "x"), ("c", None)])
    assert examples == [Example("a", ("x", "z")), Example("b", ("y",)), Example("c", ())]


def data(count: int, splits=("validation",)) -> TaskData:
    return TaskData("task", {s: [Example(f"p{i}", ("r",)) for i in range(count)] for s in splits}, 8)


def test_draws_are_seeded_and_disjoint():
    cal, test = draw_splits(data(50), SplitConfig(size=20), SplitConfig(size=30), seed=3)
    assert len(cal) == 20 and len(test) == 30
    assert not {e.prompt for e in cal} & {e.prompt for e in test}
    assert draw_splits(data(50), SplitConfig(size=20), SplitConfig(size=30), seed=3) == (cal, test)
    assert draw_splits(data(50), SplitConfig(size=20), SplitConfig(size=30), seed=4) != (cal, test)


def test_test_split_from_another_data_split_drops_calibration_prompts():
    both = data(10, splits=("validation", "train"))
    cal, test = draw_splits(both, SplitConfig("validation", 4), SplitConfig("train", 6), seed=0)
    assert not {e.prompt for e in cal} & {e.prompt for e in test}
    with pytest.raises(ConfigError, match="must not overlap"):
        draw_splits(both, SplitConfig("validation", 4), SplitConfig("train", 7), seed=0)


def test_sizes_beyond_the_data_and_overlaps_are_errors():
    with pytest.raises(ConfigError, match="calibration.size=60 but task/validation has 50"):
        draw_splits(data(50), SplitConfig(size=60), SplitConfig(size=1), seed=0)
    with pytest.raises(ConfigError, match="only 10 prompts"):
        draw_splits(data(50), SplitConfig(size=40), SplitConfig(size=11), seed=0)
    with pytest.raises(ConfigError, match="share 1 prompts"):
        check_disjoint([Example("a", ())], [Example("a", ()), Example("b", ())])


def test_textual_losses_are_distances_to_the_full_output():
    early = ["le chat noir", "le chat noir", "tout autre chose"]
    full = ["le chat noir", "le chien noir", "le chat noir"]
    values = losses("textual", "rougeL", early, full)
    assert values[0] == 0.0 and 0.0 < values[1] < 1.0 and values[2] == 1.0
    for metric in ("bleu", "chrf"):
        assert losses("textual", metric, early[:1], full[:1]) == [0.0]
        assert 0.0 < losses("textual", metric, early[1:2], full[1:2])[0] <= 1.0


def test_risk_losses_are_quality_drops_clipped_at_zero():
    references = [["le chat noir"], ["le chat noir"]]
    early = ["le chien", "le chat noir"]
    full = ["le chat noir", "le chien"]  # early exit better on the second: no credit
    values = losses("risk", "rougeL", early, full, references)
    assert values[0] == pytest.approx(1.0 - similarity("rougeL", "le chien", ["le chat noir"]))
    assert values[1] == 0.0


def test_risk_kind_needs_references_and_unknown_kinds_are_refused():
    with pytest.raises(ConfigError, match="needs a reference for every example.*use consistency.kind=textual"):
        check_references("risk", [("r",), ()], "some_task")
    check_references("textual", [()], "some_task")
    with pytest.raises(ConfigError, match="unknown; use textual or risk"):
        losses("bleurt", "rougeL", ["a"], ["a"])
