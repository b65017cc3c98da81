"""Every registered measure, and one registered here, keeps the contract the decoding loop relies on:
start / step / select / finish on random states of a tiny model shape, and facts that agree
with its behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.measures import MEASURES, ExitMeasure, build_measure, head_names

HIDDEN, VOCAB, LAYERS, ROWS, FIRST_CHECK = 8, 16, 5, 6, 2


class RunningMeanMeasure(ExitMeasure):
    """A stateful measure written by the test: sigmoid of the running mean of the states' first channel."""

    name = "test_running_mean"

    def start(self, embedding, first_check_layer):
        super().start(embedding, first_check_layer)
        self.total, self.count = embedding[:, -1, 0].float(), 1

    def observe(self, layer, hidden, logits):
        self.total, self.count = self.total + hidden[:, -1, 0].float(), self.count + 1

    def score(self, layer, hidden, logits):
        return torch.sigmoid(self.total / self.count)

    def select(self, keep):
        self.total = self.total[keep]


@pytest.fixture(params=[*sorted(MEASURES), RunningMeanMeasure.name])
def measure_cls(request, monkeypatch) -> type[ExitMeasure]:
    """Each measure class, read from the registry when the test runs; the test's own is registered
    for the duration of its case only."""
    monkeypatch.setitem(MEASURES, RunningMeanMeasure.name, RunningMeanMeasure)
    return MEASURES[request.param]


@pytest.fixture
def heads() -> ExitHeads:
    torch.manual_seed(0)
    return ExitHeads(HIDDEN, classifier_hidden=8, lstm_hidden=8).eval()


def run_layers(measure: ExitMeasure, keep_after: int | None, seed: int) -> tuple[list[Tensor | None], list[int]]:
    """Steps through layers 1..L-1 (the loop never asks at the last layer) on random states; after
    layer `keep_after`, rows 1 and 3 exit (`select`). Returns the scores and the row counts asked."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(HIDDEN, VOCAB, generator=generator)
    rows = ROWS
    measure.start(torch.randn(rows, 1, HIDDEN, generator=generator), FIRST_CHECK)
    scores, asked = [], []
    for layer in range(1, LAYERS):
        hidden = torch.randn(rows, 1, HIDDEN, generator=generator) * 3
        with torch.no_grad():
            scores.append(measure.step(layer, hidden, lambda hidden=hidden: hidden @ head))
        asked.append(rows)
        if layer == keep_after:
            keep = torch.ones(rows, dtype=torch.bool)
            keep[[1, 3]] = False
            measure.select(keep)
            rows = int(keep.sum())
    return scores, asked


def test_steps_return_one_confidence_per_running_row_within_the_threshold_range(measure_cls, heads):
    low, high = measure_cls.threshold_range
    assert low < high
    for keep_after in (None, FIRST_CHECK) if measure_cls.can_exit else (None,):
        scores, asked = run_layers(build_measure(measure_cls.name, heads), keep_after, seed=1)
        for layer, (score, rows) in enumerate(zip(scores, asked), start=1):
            if layer < FIRST_CHECK:
                assert score is None, f"{measure_cls.name} scored layer {layer} below the minimum exit layer"
                continue
            if score is None:
                continue
            assert score.shape == (rows,) and score.dtype.is_floating_point
            assert bool(((score >= low - 1e-5) & (score <= high + 1e-5)).all()), (measure_cls.name, score)
        if keep_after is not None:  # state shrank with the rows: later layers score only the 4 left
            assert asked[-1] == ROWS - 2 and any(s is not None and s.shape == (ROWS - 2,) for s in scores[keep_after:])


def test_finish_keeps_the_loops_exits_unless_analysis_only(measure_cls, heads):
    measure = build_measure(measure_cls.name, heads)
    run_layers(measure, None, seed=2)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(3))
    exit_layers = torch.full((ROWS,), LAYERS)
    finished = measure.finish(tokens, exit_layers, LAYERS)
    assert finished.shape == (ROWS,) and bool(((finished >= 1) & (finished <= LAYERS)).all())
    if not measure_cls.analysis_only:
        assert torch.equal(finished, exit_layers)


def test_facts_agree_with_behaviour(measure_cls, heads):
    scores, _ = run_layers(build_measure(measure_cls.name, heads), None, seed=4)
    checked = [s for s in scores if s is not None]
    if not measure_cls.can_exit:
        assert not checked, f"{measure_cls.name} says it never exits but returned confidences"
        assert not measure_cls.takes_threshold
    elif not measure_cls.takes_threshold:  # exits at the minimum layer whatever the threshold
        assert scores[FIRST_CHECK - 1] is not None and bool(
            (scores[FIRST_CHECK - 1] >= measure_cls.threshold_range[1]).all()
        )
    else:  # some confidence on random states stays below the top of the range, so the threshold matters
        assert checked and not all(bool((s >= measure_cls.threshold_range[1]).all()) for s in checked)
    if measure_cls.analysis_only:
        assert not measure_cls.can_exit
    assert measure_cls.needs_heads == (measure_cls.head is not None)
    if measure_cls.head is not None:
        assert measure_cls.head in head_names() and hasattr(heads, measure_cls.head)
        with pytest.raises(ValueError, match="train-heads"):
            build_measure(measure_cls.name)


def test_vocab_prunable_measures_read_pruned_logits(measure_cls, heads):
    """A `vocab_prunable` measure reads logits over each row's k kept tokens (here 4 of 16, the first
    layer's best) at every layer and still gives one confidence per row within its range."""
    if not measure_cls.vocab_prunable:
        assert measure_cls.name not in ("softmax", "monotonic_heuristic")
        return
    generator = torch.Generator().manual_seed(5)
    head = torch.randn(HIDDEN, VOCAB, generator=generator)
    states = [torch.randn(ROWS, 1, HIDDEN, generator=generator) * 3 for _ in range(1, LAYERS)]
    kept = (states[0] @ head)[:, -1].topk(4).indices[:, None, :]
    measure = build_measure(measure_cls.name, heads)
    measure.start(torch.zeros(ROWS, 1, HIDDEN), FIRST_CHECK)
    low, high = measure_cls.threshold_range
    scored = 0
    for layer, hidden in enumerate(states, start=1):
        score = measure.step(layer, hidden, lambda hidden=hidden: (hidden @ head).gather(-1, kept))
        if score is not None:
            scored += 1
            assert score.shape == (ROWS,) and bool(((score >= low - 1e-5) & (score <= high + 1e-5)).all())
    assert scored
