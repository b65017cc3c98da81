"""Vocabulary-pruned checks: the later checks of a token read k rows of the head; exits still emit the
full-vocabulary argmax."""

from __future__ import annotations

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.early_exit import CheckLogits
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import build_runner
from tests.helpers import StepSchedule, padded_batch, tiny_causal_model, tiny_model

MAX_NEW = 12


@pytest.mark.parametrize("fold", [True, False], ids=["rms-gain-folded", "norm-module"])
def test_t5_logits_for_equals_the_full_logits_at_those_ids(monkeypatch, fold):
    runner = build_runner(tiny_model(seed=0))
    with torch.no_grad():  # a gain that is not all ones, so folding it into the rows is tested
        runner.model.decoder.final_layer_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    if not fold:
        monkeypatch.setattr(runner, "rms_head_gain", lambda: None)
    hidden = 3 * torch.randn(3, 2, runner.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 32128, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = runner.logits(hidden).gather(-1, ids[:, None, :].expand(-1, 2, -1))
    rows = runner.head_rows(ids)
    assert (rows.rms_eps is not None) == fold
    torch.testing.assert_close(runner.logits_for(hidden, rows), expected)
    kept = torch.tensor([True, False, True])
    torch.testing.assert_close(runner.logits_for(hidden[kept], rows.select(kept)), expected[kept])


@pytest.mark.parametrize("family", ["t5", "llama", "gpt2"])
@pytest.mark.parametrize("copy", ["int8", "half"])
def test_approximate_logits_are_the_logits_to_int8_or_half_precision(monkeypatch, family, copy):
    runner = build_runner(tiny_model(seed=0) if family == "t5" else tiny_causal_model(family, seed=0))
    if copy == "half":  # a CPU without x86 int8 kernels (or any other device) reads a 16-bit copy
        monkeypatch.setattr("mee_bench.engine.runner.INT8_ENGINES", ())
    hidden = torch.randn(6, 2, runner.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, approximate = runner.logits(hidden), runner.approximate_logits(hidden)
    assert approximate.shape == logits.shape and set(runner._head_copies) == {"columns", copy}
    assert approximate.dtype == (torch.float32 if copy == "int8" else torch.float16)
    spread = float(logits.max() - logits.min())
    error = float((approximate.float() - logits).abs().max())
    assert 0 < error <= (2e-2 if copy == "int8" else 2e-3) * spread  # rounded, and only to the copy's precision
    assert (approximate.float().argmax(-1) == logits.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("family", ["t5", "llama", "gpt2"])
def test_inference_logits_read_a_column_major_head_that_follows_the_weight(family):
    runner = build_runner(tiny_model(seed=0) if family == "t5" else tiny_causal_model(family, seed=0))
    hidden = torch.randn(3, 2, runner.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = runner.model.lm_head(runner.head_input(hidden))
        torch.testing.assert_close(runner.logits(hidden), expected)
        assert runner._head_copies["columns"][1].is_contiguous()
        runner.model.lm_head.weight.mul_(-1.0)
    with torch.inference_mode():
        torch.testing.assert_close(runner.logits(hidden), -expected)
    runner.logits(hidden).sum().backward()  # with gradients on, the model's own head runs: training reaches it
    assert runner.model.lm_head.weight.grad is not None


@pytest.mark.parametrize("copy", ["int8", "half"])
def test_approximate_logits_follow_a_changed_head(monkeypatch, copy):
    runner = build_runner(tiny_model(seed=0))
    if copy == "half":
        monkeypatch.setattr("mee_bench.engine.runner.INT8_ENGINES", ())
    hidden = torch.randn(2, 1, runner.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = runner.approximate_logits(hidden)
        runner.model.lm_head.weight.mul_(-1.0)
        torch.testing.assert_close(runner.approximate_logits(hidden), -before)


def test_check_logits_reads_the_approximate_head_once_per_token_then_the_kept_rows():
    runner = build_runner(tiny_model(seed=0))
    generator = torch.Generator().manual_seed(2)
    first, second = (torch.randn(3, 1, runner.hidden_size, generator=generator) for _ in range(2))
    checks = CheckLogits(runner, top_k=4)
    checks.new_token()
    checks.at_layer(first)
    first_read = checks()
    torch.testing.assert_close(first_read, runner.approximate_logits(first).float())
    kept = first_read[:, -1].topk(4).indices
    assert checks() is first_read  # memoised within a layer
    checks.select(torch.tensor([True, False, True]))
    checks.at_layer(second[[0, 2]])
    pruned = checks()
    assert pruned.shape == (2, 1, 4)
    torch.testing.assert_close(pruned[:, 0], runner.logits(second[[0, 2]])[:, 0].gather(-1, kept[[0, 2]]))
    assert torch.equal(checks.rows.token_ids, kept[[0, 2]])
    assert (
        checks.full_logits_read(slice(None)) is None
    )  # a pruned read cannot choose the token: the exit reads the head
    unpruned = CheckLogits(runner, top_k=0)
    unpruned.new_token()
    unpruned.at_layer(second)
    assert unpruned.full_logits_read(slice(None)) is None  # nothing read at this layer yet
    read = unpruned()
    assert unpruned.full_logits_read(torch.tensor([2])) is not None
    torch.testing.assert_close(unpruned.full_logits_read(torch.tensor([2])), read[[2]])


class Replay(StepSchedule):
    """Test measure: the s-th token exits at the layer a recorded run (batch 1) exited it at."""

    name = "replay"


@pytest.mark.parametrize("measure, threshold, first", [("softmax", 0.3, 1), ("monotonic_heuristic", 0.2, 3)])
def test_pruned_exits_emit_the_full_vocabulary_argmax_at_their_exit_layer(monkeypatch, measure, threshold, first):
    """Replaying a pruned run's exit layers with full-vocabulary logits gives its tokens back; with k = 2 the
    exit layer's argmax is often outside the first check's two best, so a pruned argmax would differ."""
    generator = EarlyExitGenerator(tiny_model(seed=1))
    ids, mask = padded_batch([9])
    pruned = generator.generate(ids, mask, ExitPolicy(measure, threshold, first, vocab_top_k=2), MAX_NEW)
    early = [layer for layer in pruned.exit_layers[0] if layer < 4]
    assert len(early) >= 3, "the test needs tokens that exit after a pruned check"
    monkeypatch.setitem(MEASURES, Replay.name, Replay)
    monkeypatch.setattr(Replay, "schedule", tuple(pruned.exit_layers[0]))
    replayed = generator.generate(ids, mask, ExitPolicy("replay", min_exit_layer=1), MAX_NEW)
    assert replayed.tokens == pruned.tokens


@pytest.mark.parametrize("measure, threshold, first", [("softmax", 0.3, 1), ("monotonic_heuristic", 0.2, 3)])
def test_keeping_the_whole_vocabulary_changes_nothing_but_the_first_reads_rounding(
    monkeypatch, measure, threshold, first
):
    generator = EarlyExitGenerator(tiny_model(seed=1, vocab_size=512))
    monkeypatch.setattr(
        generator.runner, "approximate_logits", generator.runner.logits
    )  # no rounding: then no difference
    ids, mask = padded_batch([9, 5, 7, 3], vocab=512)
    plain = generator.generate(ids, mask, ExitPolicy(measure, threshold, first), MAX_NEW)
    whole = generator.generate(ids, mask, ExitPolicy(measure, threshold, first, vocab_top_k=512), MAX_NEW)
    assert whole.tokens == plain.tokens and whole.exit_layers == plain.exit_layers
    assert any(layer < 4 for row in plain.exit_layers for layer in row)


def test_pruned_confidence_is_the_softmax_over_the_kept_tokens():
    """Over a subset holding the top two, top-1 minus top-2 can only grow: pruned checks exit no later
    on the first token, whose context is the same with and without pruning."""
    generator = EarlyExitGenerator(tiny_model(seed=1))
    ids, mask = padded_batch([9, 5, 7, 3])
    plain = generator.generate(ids, mask, ExitPolicy("softmax", 0.4, 1), 1)
    pruned = generator.generate(ids, mask, ExitPolicy("softmax", 0.4, 1, vocab_top_k=8), 1)
    assert all(p[0] <= u[0] for p, u in zip(pruned.exit_layers, plain.exit_layers))
    assert any(p[0] < u[0] for p, u in zip(pruned.exit_layers, plain.exit_layers))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(measure="lstm", vocab_top_k=64),
            "does not apply to measure 'lstm'; use vocab_top_k=0 or one of monotonic_heuristic, softmax",
        ),
        (dict(measure="softmax", vocab_top_k=1), "must be 0 .* or an integer >= 2"),
        (dict(measure="softmax", vocab_top_k=-3), "must be 0 .* or an integer >= 2"),
    ],
)
def test_bad_pruning_says_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitPolicy(**kwargs)
