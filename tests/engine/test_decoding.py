"""The early-exit engine against Hugging Face's own generate and slow, obviously correct references."""

from __future__ import annotations

import time

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.heads import ExitHeads
from mee_bench.engine.loading import load_model
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import ExitPolicy, exit_decision, rounded_to
from mee_bench.engine.steps import Truncate, run_steps
from tests.helpers import MAX_NEW, SENTENCES, StepSchedule, hf_greedy, padded_batch, tiny_model

BATCH_OF_EIGHT = [9, 5, 7, 3, 8, 6, 4, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3], BATCH_OF_EIGHT], ids=["batch1", "batch4", "batch8"])
def test_full_policy_matches_model_generate(lengths, dtype, device):
    model = tiny_model(seed=0).to(device=device, dtype=dtype)
    ids, mask = (t.to(device) for t in padded_batch(lengths))
    out = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    assert out.tokens == hf_greedy(model, ids, mask)
    assert all(layer == 4 for row in out.exit_layers for layer in row)
    assert len(set(out.tokens[0])) > 2, "the test model must produce varied tokens for the comparison to mean anything"


def test_full_policy_matches_model_generate_on_the_embedded_default_model(device):
    model, tokenizer = load_model(device=device)  # 4 encoder and 6 decoder layers
    generator = EarlyExitGenerator(model, tokenizer)
    ids, mask = generator.tokenize([f"translate English to French: {s}" for s in SENTENCES])
    out = generator.generate(ids, mask, ExitPolicy("full"), 24)
    assert out.tokens == hf_greedy(model, ids, mask, 24, lazy_cache=True)
    assert all(len(set(row)) > 3 for row in out.tokens)


def test_different_encoder_and_decoder_depths_match_slow_greedy():
    model = tiny_model(seed=2, layers=2, decoder_layers=5)
    ids, mask = padded_batch([7, 4])
    out = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    for row in range(2):
        prefix = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(MAX_NEW):
            logits = model(
                input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], decoder_input_ids=prefix
            ).logits
            prefix = torch.cat([prefix, logits[:, -1:].argmax(-1)], dim=1)
            if prefix[0, -1] == 1:
                break
        assert out.tokens[row] == prefix[0, 1:].tolist()


@pytest.fixture
def step_schedule(monkeypatch):
    monkeypatch.setitem(MEASURES, StepSchedule.name, StepSchedule)
    return ExitPolicy


def reference_copy_decode(model, ids, schedule, max_new_tokens):
    """Slow reference for CALM's copy strategy, one row, recomputing every layer over the whole
    prefix with Hugging Face's own T5Block: a position that exited at layer e feeds its exit
    state h_e as the input of every deeper layer, which is what copying its K/V means."""
    blocks = model.decoder.block
    num_layers = len(blocks)
    encoder_states = model.encoder(input_ids=ids).last_hidden_state
    tokens, layer_inputs = [0], []  # layer_inputs[p][j] = input of layer j at position p
    for step in range(max_new_tokens):
        target = schedule[step % len(schedule)] or num_layers
        inputs = [model.decoder.embed_tokens(torch.tensor([[tokens[-1]]], device=ids.device))[0, 0]]
        length = step + 1
        causal = torch.full((length, length), torch.finfo(torch.float32).min, device=ids.device).triu(1)[None, None]
        bias = blocks[0].layer[0].SelfAttention.compute_bias(length, length) + causal
        for j in range(target):
            sequence = torch.stack([layer_inputs[p][j] for p in range(step)] + [inputs[j]])[None]
            out = blocks[j](sequence, attention_mask=None, position_bias=bias, encoder_hidden_states=encoder_states)[0]
            inputs.append(out[0, -1])
        exit_state = inputs[target]
        inputs += [exit_state] * (num_layers - target)
        layer_inputs.append(inputs)
        normed = model.decoder.final_layer_norm(exit_state) * model.config.d_model**-0.5
        tokens.append(int(model.lm_head(normed).argmax()))
        if tokens[-1] == 1:
            break
    return tokens[1:]


def reference_deferred_decode(model, ids, schedule, max_new_tokens):
    """Slow reference for deferred (FREE-style) catch-up: every position's deep states are the
    full model's states on the generated prefix, so token t is the argmax of layer e_t's state
    in a teacher-forced forward over the prefix."""
    from mee_bench.engine.t5 import T5LayerRunner

    runner = T5LayerRunner(model)
    tokens = [0]
    for step in range(max_new_tokens):
        target = schedule[step % len(schedule)] or runner.num_layers
        states = runner.all_layer_states(ids, torch.ones_like(ids), torch.tensor([tokens], device=ids.device))
        tokens.append(int(runner.logits(states[target][0, -1]).argmax()))
        if tokens[-1] == 1:
            break
    return tokens[1:]


@pytest.mark.parametrize("strategy", ["copy", "deferred"])
def test_scheduled_exits_match_slow_reference(step_schedule, strategy, device):
    model = tiny_model(seed=4).to(device)
    ids = padded_batch([8], seed=5)[0].to(device)
    policy = step_schedule("step_schedule", threshold=0.5, min_exit_layer=1, kv_strategy=strategy)
    out = EarlyExitGenerator(model).generate(ids, None, policy, MAX_NEW)
    reference = reference_copy_decode if strategy == "copy" else reference_deferred_decode
    with torch.no_grad():
        expected = reference(model, ids, StepSchedule.schedule, MAX_NEW)
    assert out.tokens[0] == expected
    assert out.exit_layers[0] == [(StepSchedule.schedule[s % 8] or 4) for s in range(len(expected))]


def test_copy_and_deferred_differ_when_deep_tokens_follow_exits(step_schedule):
    """Guards the references above: the two strategies really take different paths."""
    model = tiny_model(seed=4)
    ids, _ = padded_batch([8], seed=5)
    runs = {}
    for strategy in ("copy", "deferred"):
        policy = step_schedule("step_schedule", threshold=0.5, min_exit_layer=1, kv_strategy=strategy)
        runs[strategy] = EarlyExitGenerator(model).generate(ids, None, policy, 24).tokens[0]
    assert runs["copy"] != runs["deferred"]


def test_catch_up_block_equals_sequential_layers():
    """One parallel catch-up call computes what running the pending positions one by one does."""
    from mee_bench.engine.t5 import T5LayerRunner

    torch.manual_seed(0)
    model = tiny_model(seed=6)
    runner = T5LayerRunner(model)
    ids, mask = padded_batch([6, 6])
    with torch.no_grad():
        states = runner.encode(ids, mask)
        hidden = torch.randn(2, 5, 32)
        sequential, parallel = runner.new_cache(states, mask, 8), runner.new_cache(states, mask, 8)
        one_by_one = torch.cat([runner.layer(0, hidden[:, p : p + 1], sequential, None, p, p) for p in range(5)], dim=1)
        positions = torch.arange(5).expand(2, 5)
        block = runner.layer(0, hidden, parallel, None, positions, 4)
    torch.testing.assert_close(block, one_by_one, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(parallel.self_k[0][:, :, :5], sequential.self_k[0][:, :, :5])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["copy", "deferred"])
def test_per_row_exits_in_a_batch_equal_batch_of_one(side, strategy, device):
    model = tiny_model(seed=7).to(device)
    ids, mask = (t.to(device) for t in padded_batch([9, 4, 7, 6], side=side, seed=8))
    policy = ExitPolicy("softmax", threshold=0.95, min_exit_layer=1, kv_strategy=strategy)
    generator = EarlyExitGenerator(model)
    batched = generator.generate(ids, mask, policy, MAX_NEW)
    layers = [layer for row in batched.exit_layers for layer in row]
    assert 1 <= min(layers) and max(layers) == 4 and len(set(layers)) > 1, "the policy must exit at mixed layers"
    for row in range(4):
        keep = mask[row].bool()
        alone = generator.generate(ids[row : row + 1, keep], None, policy, MAX_NEW)
        assert batched.tokens[row] == alone.tokens[0]
        assert batched.exit_layers[row] == alone.exit_layers[0]


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_every_measure_decodes_each_row_as_if_alone(measure, device):
    """Every registered measure runs through the engine (random exit heads for the learned ones),
    and a row's tokens and exit layers do not depend on the rows batched with it."""
    torch.manual_seed(0)
    generator = EarlyExitGenerator(tiny_model(seed=7).to(device), heads=ExitHeads(32))
    low, high = MEASURES[measure].threshold_range
    policy = ExitPolicy(measure, threshold=(low + high) / 2, min_exit_layer=2)
    ids, mask = (t.to(device) for t in padded_batch([9, 4, 7, 6], seed=8))
    batched = generator.generate(ids, mask, policy, MAX_NEW)
    assert all(2 <= layer <= 4 for row in batched.exit_layers for layer in row)
    for row in range(4):
        alone = generator.generate(ids[row : row + 1, mask[row].bool()], None, policy, MAX_NEW)
        assert (batched.tokens[row], batched.exit_layers[row]) == (alone.tokens[0], alone.exit_layers[0])


def test_a_batch_step_reads_the_head_once_however_many_layers_its_rows_exit_at():
    """The tokens of rows exiting at different layers come from one head call at the end of the step
    (the head is the largest matrix; at batch 4 reading it per exit layer cost more than the exits saved)."""
    torch.manual_seed(0)
    generator = EarlyExitGenerator(tiny_model(seed=7), heads=ExitHeads(32))
    calls = []
    logits = generator.runner.logits
    generator.runner.logits = lambda hidden: calls.append(hidden.shape[0]) or logits(hidden)
    ids, mask = padded_batch([9, 4, 7, 6], seed=8)
    out = generator.generate(ids, mask, ExitPolicy("lstm", threshold=0.5, min_exit_layer=1), MAX_NEW)
    steps = max(len(row) for row in out.tokens)
    mixed = [s for s in range(steps) if len({row[s] for row in out.exit_layers if s < len(row)}) > 1]
    assert mixed, "rows must exit at different layers within a step for the test to mean anything"
    assert len(calls) == steps
    assert calls == [sum(s < len(row) for row in out.tokens) for s in range(steps)]  # every running row, once


def test_exited_rows_leave_the_active_set():
    """A row that exits costs nothing deeper: count the rows each decoder layer computes."""
    model = tiny_model(seed=7)
    seen: dict[int, int] = {}
    hooks = [
        block.layer[-1].register_forward_hook(
            lambda _m, inp, _o, j=j: seen.__setitem__(j, seen.get(j, 0) + inp[0].shape[0])
        )
        for j, block in enumerate(model.decoder.block)
    ]
    ids, mask = padded_batch([9, 4, 7, 6], seed=8)
    out = EarlyExitGenerator(model).generate(
        ids, mask, ExitPolicy("softmax", threshold=0.95, min_exit_layer=1), MAX_NEW
    )
    for hook in hooks:
        hook.remove()
    for j in range(4):
        expected = sum(layer > j for row in out.exit_layers for layer in row)
        assert seen[j] == expected


def test_min_exit_layer_is_respected():
    model = tiny_model(seed=7)
    ids, mask = padded_batch([9, 5], seed=8)
    out = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("softmax", threshold=0.0, min_exit_layer=3), MAX_NEW)
    assert {layer for row in out.exit_layers for layer in row} == {3}


def test_fixed_policy_exits_at_the_minimum_layer_and_stats_add_up():
    model = tiny_model(seed=7)
    ids, mask = padded_batch([9, 5], seed=8)
    out = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("fixed", min_exit_layer=2), MAX_NEW)
    stats = out.stats.as_dict()
    assert stats["tokens"] == sum(len(row) for row in out.tokens)
    assert stats["avg_exit_layer"] == 2.0
    assert stats["exit_histogram"] == {"2": stats["tokens"]}
    assert stats["encoder_ms"] > 0 and stats["decoder_ms"] > 0


@pytest.mark.parametrize(
    "policy",
    [
        ExitPolicy("softmax", threshold=0.2, min_exit_layer=1),
        ExitPolicy("fixed", min_exit_layer=2, decoding="self_speculative", max_draft=2),
    ],
    ids=["early_exit", "self_speculative"],
)
def test_decode_steps_yields_between_steps_and_its_timings_leave_out_the_waits(policy, monkeypatch):
    """Stepped through, a decode gives what `generate` gives; the clock moves only while it waits
    at its yields (as when a lockstep timer runs the other side), and none of that is counted."""
    generator = EarlyExitGenerator(tiny_model(seed=7))
    ids, mask = padded_batch([9, 5], seed=8)
    expected = generator.generate(ids, mask, policy, MAX_NEW)
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    steps, yields = generator.decode_steps(ids, mask, policy, MAX_NEW), 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            output = stop.value
            break
        yields += 1
        clock[0] += 100.0
    assert (output.tokens, output.exit_layers) == (expected.tokens, expected.exit_layers)
    assert output.stats.encoder_s == output.stats.decoder_s == output.stats.measure_s == 0.0
    longest = max(len(row) for row in output.tokens)
    if policy.decoding == "early_exit":
        assert yields == longest  # after the prompt, then after every step but the last
    else:
        assert 1 < yields <= longest  # a round emits one token or more per row


def test_truncate_thrown_into_a_decode_ends_it_with_the_tokens_so_far():
    """How a lockstep timer stops `full` where the policy it is paired with stopped."""
    generator = EarlyExitGenerator(tiny_model(seed=7))
    ids, mask = padded_batch([9, 5], seed=8)
    expected = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    steps = generator.decode_steps(ids, mask, ExitPolicy("full"), MAX_NEW)
    for _ in range(3):  # the prompt, then two generated steps
        next(steps)
    with pytest.raises(StopIteration) as stopped:
        steps.throw(Truncate())
    output = stopped.value.value
    assert output.tokens == [row[:2] for row in expected.tokens] and output.stats.tokens == 4
    assert output.exit_layers == [row[:2] for row in expected.exit_layers]


def test_a_decode_until_truncated_runs_past_its_end_and_keeps_what_it_wrote_before(monkeypatch):
    """A one-row timing baseline ends at no EOS, so it can be stopped at the step its policy
    stopped; the rows of a batch still end at theirs (kept alive, they would widen its steps)."""
    generator = EarlyExitGenerator(tiny_model(seed=7))
    ids, mask = padded_batch([9, 5], seed=8)
    one_row = ids[:1, :9], mask[:1, :9]
    unbounded = generator.generate(*one_row, ExitPolicy("full"), MAX_NEW)
    monkeypatch.setattr(generator.runner, "eos_token_id", unbounded.tokens[0][2])  # the row now ends at its 3rd token
    natural = generator.generate(*one_row, ExitPolicy("full"), MAX_NEW)
    assert len(natural.tokens[0]) == 3
    long = run_steps(generator.decode_steps(*one_row, ExitPolicy("full"), MAX_NEW, until_truncated=True))
    assert long.tokens == unbounded.tokens and len(long.tokens[0]) == MAX_NEW
    batch = run_steps(generator.decode_steps(ids, mask, ExitPolicy("full"), MAX_NEW, until_truncated=True))
    assert batch.tokens == generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW).tokens
    assert len(batch.tokens[0]) == 3
    with pytest.raises(ValueError, match="until_truncated"):
        next(
            generator.decode_steps(
                ids,
                mask,
                ExitPolicy("fixed", min_exit_layer=2, decoding="self_speculative"),
                MAX_NEW,
                until_truncated=True,
            )
        )


def test_oracle_keeps_full_tokens_and_reports_the_stable_layer():
    model = tiny_model(seed=0)
    ids, mask = padded_batch([9, 5])
    generator = EarlyExitGenerator(model)
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    oracle = generator.generate(ids, mask, ExitPolicy("oracle", min_exit_layer=1), MAX_NEW)
    assert oracle.tokens == full.tokens
    from mee_bench.engine.t5 import T5LayerRunner

    runner = T5LayerRunner(model)
    with torch.no_grad():
        for row in range(2):
            prefix = torch.tensor([[0] + full.tokens[row][:-1]])
            states = runner.all_layer_states(ids[row : row + 1], mask[row : row + 1], prefix)
            top1 = torch.stack([runner.logits(s[0]).argmax(-1) for s in states[1:]])  # [layers, tokens]
            for t, layer in enumerate(oracle.exit_layers[row]):
                assert (top1[layer - 1 :, t] == top1[-1, t]).all()
                assert layer == 1 or top1[layer - 2, t] != top1[-1, t]


def test_stop_strings_end_a_row(t5_tokenizer):
    model = tiny_model(seed=0)
    generator = EarlyExitGenerator(model, t5_tokenizer)
    texts, free = generator.generate_text(["translate English to French: The house."], ExitPolicy("full"), MAX_NEW)
    assert len(free.tokens[0]) > 3
    word = t5_tokenizer.decode(free.tokens[0][:3], skip_special_tokens=True).split()[-1]
    stopped, out = generator.generate_text(
        ["translate English to French: The house."], ExitPolicy("full"), MAX_NEW, [word]
    )
    assert word in stopped[0] and len(out.tokens[0]) < len(free.tokens[0])
    assert texts[0].startswith(stopped[0].split(word)[0])


def test_several_stop_strings_cost_one_decode_of_the_row_a_step(t5_tokenizer, monkeypatch):
    generator = EarlyExitGenerator(tiny_model(seed=0), t5_tokenizer)
    prompt = ["translate English to French: The house."]
    _, free = generator.generate_text(prompt, ExitPolicy("full"), MAX_NEW)
    word = t5_tokenizer.decode(free.tokens[0][:3], skip_special_tokens=True).split()[-1]
    decodes = []
    decode = t5_tokenizer.decode
    monkeypatch.setattr(t5_tokenizer, "decode", lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs))
    stopped, out = generator.generate_text(prompt, ExitPolicy("full"), MAX_NEW, ["never in any text", word, "nor this"])
    assert word in stopped[0] and len(out.tokens[0]) < len(free.tokens[0])
    assert len(decodes) == len(out.tokens[0]) + 1  # one check per step, then the returned text


def test_eos_ends_generation():
    generator = EarlyExitGenerator(tiny_model(seed=0))
    model_logits = generator.runner.logits
    eos_after_two = torch.zeros(32128)
    eos_after_two[1] = 1e4
    calls = []

    def logits(hidden):
        calls.append(hidden.shape[0])
        return model_logits(hidden) + (eos_after_two if len(calls) > 2 else 0)

    generator.runner.logits = logits
    out = generator.generate(*padded_batch([5, 3]), ExitPolicy("full"), MAX_NEW)
    assert [row[-1] for row in out.tokens] == [1, 1] and [len(row) for row in out.tokens] == [3, 3]


def test_exit_logits_use_the_final_norm_exactly_once():
    """With a perturbed final-norm weight, the engine's last-layer logits are the model's own."""
    from mee_bench.engine.t5 import T5LayerRunner

    model = tiny_model(seed=9)
    with torch.no_grad():
        model.decoder.final_layer_norm.weight.mul_(torch.linspace(0.2, 3.0, 32))
    runner = T5LayerRunner(model)
    ids, mask = padded_batch([6])
    decoder_ids = torch.tensor([[0, 5, 9, 11]])
    with torch.no_grad():
        states = runner.all_layer_states(ids, mask, decoder_ids)
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(runner.logits(states[-1]), expected)


def test_confidence_is_the_value_at_the_exit_or_the_last_check():
    model = tiny_model(seed=7)
    ids, mask = padded_batch([9, 4, 7, 6], seed=8)
    out = EarlyExitGenerator(model).generate(
        ids, mask, ExitPolicy("softmax", threshold=0.95, min_exit_layer=2), MAX_NEW
    )
    pairs = [(layer, conf) for row in range(4) for layer, conf in zip(out.exit_layers[row], out.confidences[row])]
    assert {layer for layer, _ in pairs} >= {2, 4}
    assert all(conf >= 0.95 for layer, conf in pairs if layer < 4)
    assert all(0.0 <= conf < 0.95 for layer, conf in pairs if layer == 4)
    full = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    assert all(conf != conf for row in full.confidences for conf in row)  # never checked: nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.95, 0.99, 0.123456789])
def test_a_host_comparison_with_the_rounded_threshold_decides_as_the_tensor_comparison(dtype, threshold):
    """Batch size 1 compares a score with the threshold on the host; scores at, just above and just
    below the threshold as `dtype` holds it exit exactly when `score >= threshold` on tensors says so,
    and exactly as the same scores decide as rows of a batch."""
    at = torch.tensor(threshold, dtype=dtype).float()
    scores = torch.stack([at, torch.nextafter(at, torch.tensor(2.0)), torch.nextafter(at, torch.tensor(-2.0))]).to(
        dtype
    )
    for score in scores:
        assert (float(score) >= rounded_to(threshold, dtype)) == bool(score.reshape(1) >= threshold)
    one_by_one = [exit_decision(score.reshape(1), threshold) for score in scores]
    assert all(mask is None for mask, _ in one_by_one)
    mask, exiting = exit_decision(scores, threshold)
    assert mask.tolist() == [bool(n) for _, n in one_by_one] == (scores >= threshold).tolist()
    assert exiting == sum(n for _, n in one_by_one) == int((scores >= threshold).sum()) >= 2
    if threshold == 0.9:
        assert float(at) != threshold  # a host comparison with 0.9 itself would decide differently at the threshold
    per_row, count = exit_decision(scores, [threshold, 2.0, threshold])  # self-speculation: a threshold per row
    assert per_row.tolist() == [mask.tolist()[0], False, mask.tolist()[2]] and count == int(per_row.sum())
