"""Objective maths: CALM's layer weights, raw-state logits, chunked CE, FREE's KD mappings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mee_bench.engine.t5 import T5LayerRunner
from mee_bench.train.objectives import (
    Objective,
    chunked_cross_entropy,
    cross_entropy_and_gradient,
    decoder_layer_states,
    distillation_loss,
    kd_mapping,
    layer_weights,
)
from tests.helpers import tiny_model

VOCAB = 300


def _batch(seed: int = 0, batch: int = 3, source: int = 7, target: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, VOCAB, (batch, target), generator=generator)
    labels[0, -2:] = -100
    decoder_input_ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
    return {
        "input_ids": torch.randint(3, VOCAB, (batch, source), generator=generator),
        "attention_mask": torch.ones(batch, source, dtype=torch.long),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, vocab_size=VOCAB, layers=2, decoder_layers=4)


def test_layer_weights_follow_calm_and_sum_to_one():
    weights = layer_weights(6)
    assert weights == pytest.approx([i / 21 for i in range(1, 7)])
    assert sum(weights) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(weights, weights[1:]))


def test_last_layer_logits_equal_the_models_own(model):
    batch = _batch()
    states = decoder_layer_states(T5LayerRunner(model), batch)
    assert len(states) == 4
    expected = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    ).logits
    torch.testing.assert_close(T5LayerRunner(model).logits(states[-1]), expected)


def test_final_objective_equals_the_models_own_loss(model):
    batch = _batch()
    runner = T5LayerRunner(model)
    loss, parts = Objective("final", label_smoothing=0.0, chunk_tokens=4)(
        runner, decoder_layer_states(runner, batch), batch["labels"]
    )
    expected = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        labels=batch["labels"],
    ).loss
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce4", "loss"}


def test_weighted_ce_is_the_alpha_weighted_sum_of_layer_losses(model):
    batch = _batch(seed=2)
    runner = T5LayerRunner(model)
    states = decoder_layer_states(runner, batch)
    loss, parts = Objective("weighted_ce", label_smoothing=0.1, chunk_tokens=5)(runner, states, batch["labels"])
    mask = batch["labels"] != -100
    per_layer = [F.cross_entropy(runner.logits(s[mask]), batch["labels"][mask], label_smoothing=0.1) for s in states]
    expected = sum(w * ce for w, ce in zip(layer_weights(4), per_layer))
    torch.testing.assert_close(loss, expected)
    assert [parts[f"ce{i}"] for i in range(1, 5)] == pytest.approx([float(x.detach()) for x in per_layer], rel=1e-5)


def test_chunked_loss_equals_unchunked_value_and_gradient(model):
    runner = T5LayerRunner(model)
    params = [model.decoder.final_layer_norm.weight, model.lm_head.weight]
    torch.manual_seed(0)
    hidden = torch.randn(23, 32, requires_grad=True)
    labels = torch.randint(0, VOCAB, (23,))
    chunked = chunked_cross_entropy(hidden * 2, labels, runner.logits, params, chunk=5, label_smoothing=0.1)
    chunked_grads = torch.autograd.grad(chunked * 3, [hidden, *params])
    plain = F.cross_entropy(runner.logits(hidden * 2), labels, label_smoothing=0.1)
    plain_grads = torch.autograd.grad(plain * 3, [hidden, *params])
    torch.testing.assert_close(chunked, plain)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want)


def test_kd_mappings():
    assert kd_mapping(2, 6, "last") == [6, 6]
    assert kd_mapping(2, 6, "uniform") == [4, 6]
    assert kd_mapping(3, 6, "uniform") == [4, 5, 6]
    assert kd_mapping(4, 6, "uniform") == [5, 5, 6, 6]
    shallow = [torch.zeros(2, 3), torch.full((2, 3), 5.0)]
    deep = [torch.full((2, 3), 4.0), torch.full((2, 3), 0.5), torch.full((2, 3), 9.0)]
    assert kd_mapping(2, 5, "closest", shallow, deep) == [4, 3]
    with pytest.raises(ValueError, match="exit_layer"):
        kd_mapping(6, 6, "last")
    with pytest.raises(ValueError, match="unknown kd mapping"):
        kd_mapping(2, 6, "nearest")


def test_distillation_pulls_shallow_states_only():
    states = [torch.randn(5, 4, requires_grad=True) for _ in range(4)]
    loss = distillation_loss(states, exit_layer=2, mapping="last")
    expected = (F.mse_loss(states[0], states[3]) + F.mse_loss(states[1], states[3])) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert states[0].grad.abs().sum() > 0 and states[3].grad is None
    same = [torch.ones(2, 4)] * 4
    assert float(distillation_loss(same, 2, "uniform")) == 0.0


def test_kd_term_compares_final_normed_states_so_the_residual_scale_cannot_run_away(model):
    runner = T5LayerRunner(model)
    batch = _batch(seed=3)
    with torch.no_grad():
        states = decoder_layer_states(runner, batch)
        objective = Objective("weighted_ce_kd", kd_exit_layer=2, kd_mapping="last")
        _, parts = objective(runner, states, batch["labels"])
        _, scaled = objective(runner, [s * 1000.0 for s in states], batch["labels"])
        mask = batch["labels"] != -100
        norm = model.decoder.final_layer_norm
        expected = distillation_loss([norm(s[mask]) for s in states], 2, "last")
    assert parts["kd"] == pytest.approx(float(expected), rel=1e-5)
    assert scaled["kd"] == pytest.approx(parts["kd"], rel=1e-3)
    raw = float(distillation_loss([s[mask] * 1000.0 for s in states], 2, "last"))
    assert raw > 1e3 * parts["kd"]  # what an MSE on raw states would have been


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective 'calm'"):
        Objective("calm")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_and_its_written_gradient_equal_autograds(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(17, 40, requires_grad=True)
    labels = torch.randint(0, 40, (17,))
    loss, gradient = cross_entropy_and_gradient(logits.detach(), labels, smoothing)
    expected = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(gradient, torch.autograd.grad(expected, logits)[0])


class _CountingRunner(T5LayerRunner):
    """Records how many rows each call of the LM head reads."""

    def __init__(self, model):
        super().__init__(model)
        self.rows: list[int] = []

    def logits(self, hidden):
        self.rows.append(hidden.shape[0])
        return super().logits(hidden)


def test_sampled_shallow_layers_read_fewer_rows_and_the_last_layer_reads_all(model):
    batch = _batch(seed=4, batch=4, target=10)
    positions = int((batch["labels"] != -100).sum())
    runner = _CountingRunner(model)
    with torch.no_grad():
        states = decoder_layer_states(runner, batch)
        Objective("weighted_ce", shallow_token_fraction=0.25, chunk_tokens=10_000)(
            runner, states, batch["labels"], step=3
        )
    assert runner.rows == [round(0.25 * positions)] * 3 + [positions]


def test_sampled_weighted_ce_is_unbiased_and_a_pure_function_of_the_step(model):
    batch = _batch(seed=5, batch=4, target=10)
    runner = T5LayerRunner(model)
    with torch.no_grad():
        states = decoder_layer_states(runner, batch)
        exact, exact_parts = Objective("weighted_ce", label_smoothing=0.1)(runner, states, batch["labels"])
        sampled = Objective("weighted_ce", label_smoothing=0.1, shallow_token_fraction=0.25)
        draws = [sampled(runner, states, batch["labels"], step) for step in range(400)]
        again = sampled(runner, states, batch["labels"], 7)
    assert float(again[0]) == float(draws[7][0]) and float(draws[7][0]) != float(draws[8][0])
    assert all(parts["ce4"] == exact_parts["ce4"] for _, parts in draws)  # the last layer is never sampled
    mean = torch.stack([loss for loss, _ in draws]).mean()
    spread = torch.stack([loss for loss, _ in draws]).std() / 20  # standard error of the mean of 400 draws
    assert abs(float(mean - exact)) < 4 * float(spread)
    assert float(spread) > 0


def test_under_bf16_autocast_the_loss_reads_fp32_logits_and_norms_stay_fp32(model, monkeypatch):
    """CPU autocast runs matrix products in bf16; the CE's log-softmax over the vocabulary and the RMS
    norms must not follow them (a bf16 log-softmax over 8k classes loses the small probabilities)."""
    from mee_bench.train import objectives

    seen: list[torch.dtype] = []
    real = objectives.cross_entropy_and_gradient
    monkeypatch.setattr(
        objectives, "cross_entropy_and_gradient", lambda logits, *args: seen.append(logits.dtype) or real(logits, *args)
    )
    norms: list[torch.dtype] = []
    hook = model.decoder.final_layer_norm.register_forward_hook(lambda _m, _i, out: norms.append(out.dtype))
    runner = T5LayerRunner(model)
    batch = _batch(seed=6)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = decoder_layer_states(runner, batch)
            loss, _ = Objective("weighted_ce", label_smoothing=0.1)(runner, states, batch["labels"])
    finally:
        hook.remove()
    loss.backward()
    assert seen and set(seen) == {torch.float32}
    assert norms and set(norms) == {torch.float32}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
