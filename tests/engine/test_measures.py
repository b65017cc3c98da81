"""Each confidence measure on hand-built tensors, the policy's validation and threshold schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mee_bench.engine.heads import ExitHeads, find_heads
from mee_bench.engine.measures import MEASURES, build_measure
from mee_bench.engine.policy import ExitPolicy

D = 8


def states(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


def logits_from_probs(*rows: list[float]):
    tensor = torch.log(torch.tensor(rows))[:, None, :]
    return lambda: tensor


def test_registry_holds_every_policy_of_the_paper():
    assert {
        "full",
        "softmax",
        "saturation",
        "classifier",
        "lstm",
        "last_three_mlp",
        "monotonic_heuristic",
        "oracle",
    } <= set(MEASURES)


def test_softmax_measure_is_top1_minus_top2():
    measure = build_measure("softmax")
    measure.start(states([0.0] * 3, [0.0] * 3), first_check_layer=2)
    probs = logits_from_probs([0.7, 0.2, 0.1], [0.4, 0.35, 0.25])
    assert measure.step(1, states([0.0] * 3, [0.0] * 3), probs) is None
    torch.testing.assert_close(measure.step(2, states([0.0] * 3, [0.0] * 3), probs), torch.tensor([0.5, 0.05]))


def test_saturation_is_cosine_with_the_previous_state():
    measure = build_measure("saturation")
    measure.start(states([1.0, 0.0], [1.0, 0.0]), first_check_layer=1)
    first = measure.step(1, states([1.0, 0.0], [0.0, 1.0]), None)
    torch.testing.assert_close(first, torch.tensor([1.0, 0.0]))
    second = measure.step(2, states([1.0, 1.0], [0.0, -2.0]), None)
    torch.testing.assert_close(second, torch.tensor([1 / math.sqrt(2), -1.0]))


@pytest.mark.parametrize(
    "scores, exits",
    [
        ((0.91, 0.95, 0.99), True),
        ((0.95, 0.93, 0.99), False),  # not rising
        ((0.85, 0.95, 0.99), False),  # one below 0.9
        ((0.95, 0.95, 0.99), False),  # equal is not strictly rising
        ((0.92, 0.96, 0.955), False),  # falls at the end
        ((0.90, 0.91, 0.92), True),  # all reach the threshold
    ],
)
def test_monotonic_heuristic_truth_table(scores, exits):
    policy = ExitPolicy("monotonic_heuristic", threshold=0.9, min_exit_layer=4)
    measure = policy.build_measure()
    measure.start(states([0.0]), first_check_layer=4)
    hidden = states([0.0])
    assert measure.step(1, hidden, None) is None  # layer 1 is not needed for a check at layer 4
    results = []
    for layer, top in zip((2, 3, 4), scores):
        results.append(measure.step(layer, hidden, logits_from_probs([top, 1 - top])))
    assert results[0] is None and results[1] is None
    assert bool(results[2] >= policy.threshold) is exits


def test_monotonic_heuristic_keeps_rows_in_step_with_selection():
    measure = build_measure("monotonic_heuristic")
    measure.start(states([0.0], [0.0]), first_check_layer=3)
    for layer, tops in zip((1, 2), ((0.91, 0.5), (0.95, 0.6))):
        measure.step(layer, states([0.0], [0.0]), logits_from_probs([tops[0], 1 - tops[0]], [tops[1], 1 - tops[1]]))
    measure.select(torch.tensor([False, True]))
    out = measure.step(3, states([0.0]), logits_from_probs([0.7, 0.3]))
    assert out.tolist() == [pytest.approx(0.5)]  # row 2's scores: 0.5 < 0.6 < 0.7


@pytest.mark.parametrize("first_check", [2, 3, 4])
def test_monotonic_heuristic_reads_only_layers_that_can_decide_and_decides_the_same(first_check):
    """Against reading every layer (no known threshold or depth): the same exit layer on random
    probability profiles at 6 layers, with fewer head reads."""
    generator = torch.Generator().manual_seed(first_check)
    threshold, last = 0.6, 5
    reads = {"eager": 0, "lazy": 0}

    def exit_layer(profile: torch.Tensor, lazy: bool) -> int:
        measure = build_measure("monotonic_heuristic")
        if lazy:
            measure.threshold, measure.last_check_layer = threshold, last
        measure.start(states([0.0]), first_check_layer=first_check)
        for layer in range(1, last + 1):

            def logits(top=float(profile[layer - 1])):
                reads["lazy" if lazy else "eager"] += 1
                return logits_from_probs([top, 1 - top])()

            score = measure.step(layer, states([0.0]), logits)
            if score is not None and bool(score >= threshold):
                return layer
        return last + 1

    profiles = torch.rand(400, last, generator=generator).sort(dim=1).values * 0.5 + 0.45  # many rise
    profiles[::2] = torch.rand(200, last, generator=generator)  # half of them at random
    for profile in profiles:
        assert exit_layer(profile, lazy=True) == exit_layer(profile, lazy=False)
    assert reads["lazy"] < reads["eager"]


def test_monotonic_heuristic_reads_two_layers_for_a_token_never_near_the_threshold():
    measure = build_measure("monotonic_heuristic")
    measure.threshold, measure.last_check_layer = 0.9, 5
    measure.start(states([0.0]), first_check_layer=4)
    read_at = []
    for layer in range(1, 6):
        measure.step(layer, states([0.0]), lambda layer=layer: read_at.append(layer) or logits_from_probs([0.5, 0.5])())
    assert read_at == [2, 3]


def make_heads(seed: int = 0) -> ExitHeads:
    torch.manual_seed(seed)
    return ExitHeads(D, classifier_hidden=4, lstm_hidden=4).eval()


def test_learned_measures_need_heads_and_name_the_training_command():
    for name in ("classifier", "lstm", "last_three_mlp"):
        with pytest.raises(ValueError, match="mee-bench train-heads"):
            build_measure(name)


def test_classifier_is_the_head_on_the_current_state():
    heads = make_heads()
    measure = build_measure("classifier", heads)
    measure.start(torch.zeros(2, 1, D), first_check_layer=1)
    hidden = torch.randn(2, 1, D)
    expected = heads.classifier(hidden[:, 0]).softmax(-1)[:, 1]
    torch.testing.assert_close(measure.step(1, hidden, None), expected)


def test_lstm_carries_its_state_across_layers_as_one_sequence():
    heads = make_heads()
    measure = build_measure("lstm", heads)
    layers = torch.randn(3, 2, 1, D)
    measure.start(torch.zeros(2, 1, D), first_check_layer=3)
    outputs = [measure.step(i + 1, layers[i], None) for i in range(3)]
    assert outputs[0] is None and outputs[1] is None
    whole, _ = heads.lstm(layers[:, :, 0].transpose(0, 1))
    torch.testing.assert_close(outputs[2], whole[:, -1].softmax(-1)[:, 1])


def test_lstm_selection_keeps_the_right_rows_carry():
    heads = make_heads()
    layers = torch.randn(3, 3, 1, D)
    measure = build_measure("lstm", heads)
    measure.start(torch.zeros(3, 1, D), first_check_layer=3)
    measure.step(1, layers[0], None)
    measure.select(torch.tensor([True, False, True]))
    measure.step(2, layers[1][[0, 2]], None)
    out = measure.step(3, layers[2][[0, 2]], None)
    whole, _ = heads.lstm(layers[:, [0, 2], 0].transpose(0, 1))
    torch.testing.assert_close(out, whole[:, -1].softmax(-1)[:, 1])


def test_last_three_mlp_reads_the_three_latest_states_with_the_embedding_as_layer_zero():
    heads = make_heads()
    measure = build_measure("last_three_mlp", heads)
    embedding, h1, h2 = torch.randn(3, 1, 1, D)
    measure.start(embedding, first_check_layer=1)
    out1 = measure.step(1, h1, None)
    out2 = measure.step(2, h2, None)
    expect1 = heads.last_three_mlp(torch.cat([embedding, embedding, h1], -1)[:, 0]).softmax(-1)[:, 1]
    expect2 = heads.last_three_mlp(torch.cat([embedding, h1, h2], -1)[:, 0]).softmax(-1)[:, 1]
    torch.testing.assert_close(out1, expect1)
    torch.testing.assert_close(out2, expect2)


def test_heads_round_trip_through_safetensors(tmp_path):
    heads = make_heads(3)
    heads.save(tmp_path, metadata={"model": "tiny"})
    loaded = ExitHeads.load(tmp_path)
    x = torch.randn(2, D)
    torch.testing.assert_close(loaded.classifier(x), heads.classifier(x))
    assert find_heads(tmp_path) == tmp_path / "exit_heads.safetensors"
    assert find_heads(tmp_path / "nowhere") is None
    with pytest.raises(FileNotFoundError, match="train-heads"):
        find_heads(tmp_path, heads=tmp_path / "missing.safetensors")


def test_oracle_exit_layer_is_the_first_layer_after_which_top1_never_changes():
    measure = build_measure("oracle")
    measure.start(torch.zeros(3, 1, D), first_check_layer=2)
    # layers 2..4 of a 5-layer model; the final (layer 5) tokens are [7, 7, 7]
    tops = {1: [0, 0, 0], 2: [7, 7, 1], 3: [1, 7, 7], 4: [7, 7, 1]}
    for layer, top in tops.items():
        one_hot = torch.nn.functional.one_hot(torch.tensor(top), 8).float()[:, None] * 10
        measure.step(layer, torch.zeros(3, 1, D), lambda one_hot=one_hot: one_hot)
    assert measure.finish(torch.tensor([7, 7, 7]), torch.tensor([5, 5, 5]), 5).tolist() == [4, 2, 5]


def test_decaying_threshold_values():
    policy = ExitPolicy("softmax", threshold=0.8, threshold_schedule="decaying", tau=4.0)
    assert policy.threshold_at(0, 10) == pytest.approx(0.8)
    assert policy.threshold_at(5, 10) == pytest.approx(0.72 + 0.08 * math.exp(-2.0))
    assert policy.threshold_at(10, 10) == pytest.approx(0.72 + 0.08 * math.exp(-4.0))
    values = [policy.threshold_at(t, 10) for t in range(11)]
    assert values == sorted(values, reverse=True)
    assert ExitPolicy("softmax", threshold=0.8).threshold_at(7, 10) == 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"measure": "entropy"}, "valid measures: .*classifier.*softmax"),
        ({"measure": "softmax", "threshold": 1.5}, r"outside \[0.0, 1.0\]"),
        ({"measure": "saturation", "threshold": -1.2}, r"outside \[-1.0, 1.0\]"),
        ({"measure": "softmax", "min_exit_layer": 0}, "min_exit_layer=0 must be an integer >= 1"),
        ({"measure": "softmax", "threshold_schedule": "cosine"}, "static, decaying"),
        ({"measure": "softmax", "kv_strategy": "recompute"}, "copy, deferred"),
    ],
)
def test_bad_policies_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitPolicy(**kwargs)


def test_min_exit_layer_beyond_the_decoder_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's 6 decoder layers; use a value in 1..6"):
        ExitPolicy("softmax", min_exit_layer=7).check_model(6)
    ExitPolicy("full", min_exit_layer=7).check_model(6)
