"""Decoder-only runners (Llama family and its variants, GPT-2) against Hugging Face's generate and slow references.

Every family in `CAUSAL_FAMILIES` passes the same checks: `full` equals `generate` at batch 1 and 4
(fp32 and bf16), scheduled (forced) exits with copied or deferred K/V equal a slow reference that runs
the model's own `forward`, the layer states and logits are the model's own, pruned logits equal full
ones, and self-speculation is lossless where tested."""

from __future__ import annotations

import pytest
import torch

from mee_bench.engine.causal import left_align
from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import ExitPolicy
from mee_bench.engine.runner import build_runner
from tests.helpers import CAUSAL_FAMILIES, recorded_caches, tiny_causal_model
from tests.helpers import StepSchedule as HelperStepSchedule

MAX_NEW = 12
VOCAB = 512
EOS = 1


def padded_batch(lengths: list[int], side: str = "left", seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, span] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[row, span] = 1
    return ids, mask


def cut_at_eos(row: list[int]) -> list[int]:
    return row[: row.index(EOS) + 1] if EOS in row else row


def hf_greedy(model, ids, mask, max_new_tokens=MAX_NEW) -> list[list[int]]:
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=0
    )
    return [cut_at_eos(row) for row in out[:, ids.shape[1] :].tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]], ids=["batch1", "batch4"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_full_policy_matches_model_generate(family, lengths, dtype):
    model = tiny_causal_model(family, dtype=dtype)
    ids, mask = padded_batch(lengths)
    out = EarlyExitGenerator(model).generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    assert out.tokens == hf_greedy(model, ids, mask)
    assert all(layer == 4 for row in out.exit_layers for layer in row)
    assert len(set(out.tokens[0])) > 2, "the test model must produce varied tokens for the comparison to mean anything"


def test_right_padded_prompts_decode_as_left_padded_ones():
    model = tiny_causal_model("llama", seed=1)
    ids, mask = padded_batch([9, 4, 6], side="right")
    generator = EarlyExitGenerator(model)
    right = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    assert right.tokens == generator.generate(*left_align(ids, mask), ExitPolicy("full"), MAX_NEW).tokens
    assert right.tokens == hf_greedy(model, *left_align(ids, mask))


def test_a_one_token_prompt_is_a_one_token_prefill():
    model = tiny_causal_model("qwen2", seed=2)
    ids = torch.tensor([[17]])
    generator = EarlyExitGenerator(model)
    out = generator.generate(ids, None, ExitPolicy("full"), MAX_NEW)
    assert out.tokens == hf_greedy(model, ids, torch.ones_like(ids))
    # an exit at step 0 reads the prefill's layer-2 state of the prompt's last (and only) token
    fixed = generator.generate(ids, None, ExitPolicy("fixed", min_exit_layer=2), MAX_NEW)
    with torch.no_grad():
        state = model(ids, output_hidden_states=True).hidden_states[2][0, -1]
    assert fixed.tokens[0][0] == int(model.lm_head(model.model.norm(state)).argmax())
    assert fixed.exit_layers[0] == [2] * len(fixed.tokens[0])


@pytest.mark.parametrize("strategy", ["copy", "deferred"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_an_exit_at_step_0_leaves_the_prompts_kv_as_the_model_computes_it(family, strategy):
    """Step 0's input is the prompt's last token, which the prefill ran through every layer: an exit
    there reads its token from a shallow layer but copies nothing over the prompt's real K/V."""
    model = tiny_causal_model(family, seed=3)
    generator = EarlyExitGenerator(model)
    caches = recorded_caches(generator)
    ids, mask = padded_batch([9, 5, 7])
    out = generator.generate(ids, mask, ExitPolicy("fixed", min_exit_layer=1, kv_strategy=strategy), 4)
    assert all(row[0] == 1 for row in out.exit_layers)
    cache = caches[0]
    with torch.no_grad():
        for row in range(3):
            prompt = ids[row, mask[row].bool()][None]
            own = model(prompt, use_cache=True).cache
            for index, layer in enumerate(own.layers):
                slots = slice(int(cache.pads[row]), cache.offset + 1)
                torch.testing.assert_close(cache.keys[index, row, :, slots], layer.keys[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cache.values[index, row, :, slots], layer.values[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_runs_one_prefill_and_no_single_token_pass_for_step_0(family):
    """N new tokens cost the prefill (one call per layer over the whole prompt) and N - 1 single-token
    passes, as in the model's own generate: step 0 is read from the prefill."""
    model = tiny_causal_model(family, seed=1)
    generator = EarlyExitGenerator(model)
    calls: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(args[0].shape[1]), with_kwargs=True)
        for layer in generator.runner.layers
    ]
    ids, mask = padded_batch([9, 6])
    try:
        out = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    finally:
        for hook in hooks:
            hook.remove()
    steps = max(len(row) for row in out.tokens)
    assert calls == [9] * 4 + [1] * ((steps - 1) * 4)
    assert out.stats.layer_positions == sum(len(row) - 1 for row in out.tokens) * 4


class StepSchedule(HelperStepSchedule):
    """Test measure: token number s exits at layer SCHEDULE[s % len] (0 = full depth)."""

    name = "causal_step_schedule"
    schedule = (2, 0, 1, 3, 0, 2, 2, 0, 1, 1)


@pytest.fixture
def step_schedule(monkeypatch):
    monkeypatch.setitem(MEASURES, StepSchedule.name, StepSchedule)
    return ExitPolicy(StepSchedule.name, threshold=0.5, min_exit_layer=1)


def scheduled_layer(step: int, num_layers: int) -> int:
    return StepSchedule.schedule[step % len(StepSchedule.schedule)] or num_layers


class HFLayers:
    """One row through the model's own `forward` (its embedding scale, masks, rotary tables, layer
    types), with forward hooks that replace a layer's output by its input at the positions that
    exited before it: such a position hands its exit state on unchanged to every deeper layer, which
    is what copying K/V projected from the exit state amounts to."""

    def __init__(self, model):
        self.model = model
        base = model.base_model
        self.layers = base.h if hasattr(base, "h") else base.layers
        self.norm = base.ln_f if hasattr(base, "ln_f") else base.norm

    def token(self, state: torch.Tensor) -> int:
        """The greedy token of a raw layer output (Granite's logit scaling and Gemma's soft-capping
        leave the argmax as it is)."""
        return int(self.model.lm_head(self.norm(state)).argmax())


def layer_states(hf: HFLayers, tokens: list[int], exits: list[int]) -> list[torch.Tensor]:
    """Inputs of every layer (then the last output) at every position, [P, d] each, when position p
    runs layers 1..exits[p] and hands its exit state on to every deeper layer. Recomputed from
    scratch: causal, so it equals the incremental computation."""
    states: list[torch.Tensor] = []

    def replacing(index: int):
        runs = torch.tensor([index < e for e in exits])[None, :, None]

        def hook(_module, args, kwargs, output):
            given = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                states.append(given[0])
            out = output[0] if isinstance(output, tuple) else output
            kept = torch.where(runs, out, given)
            states.append(kept[0])
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        return hook

    hooks = [layer.register_forward_hook(replacing(j), with_kwargs=True) for j, layer in enumerate(hf.layers)]
    try:
        hf.model(torch.tensor([tokens]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def reference_decode(model, prompt: list[int], max_new_tokens: int, strategy: str) -> list[int]:
    """Slow reference, one row. Every prompt token runs every layer (step 0's input, the prompt's
    last token, included: an exit at step 0 only picks the layer its token is read from).
    copy: skipped layers of a later exited position see its exit state. deferred: every earlier
    position's deep states are the full model's (the catch-up ran them before anything attends
    to them), so token t is layer e_t's state in a full forward."""
    hf = HFLayers(model)
    num_layers = len(hf.layers)
    generated: list[int] = []
    for step in range(max_new_tokens):
        scheduled = [scheduled_layer(s, num_layers) for s in range(step + 1)]
        # the last position's own exit only matters to later positions: it runs fully, its token is layer e_t's
        exits = [num_layers] * (len(prompt) + step)
        if strategy == "copy":
            exits[len(prompt) : -1] = scheduled[1:step]
        states = layer_states(hf, prompt + generated, exits)
        generated.append(hf.token(states[scheduled[-1]][-1]))
        if generated[-1] == EOS:
            break
    return generated


# A model on which copy and deferred K/V take different paths for the prompt below (checked by the
# guard test): most families' seed-7 tiny models do; these families' random models are calmer.
REFERENCE_SEEDS = {"granite": 10, "olmo2": 10, "gemma3_text": 11}


@pytest.mark.parametrize("strategy", ["copy", "deferred"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_scheduled_exits_match_slow_reference(step_schedule, family, strategy):
    model = tiny_causal_model(family, seed=REFERENCE_SEEDS.get(family, 7))
    ids, _ = padded_batch([8], seed=5)
    policy = ExitPolicy(StepSchedule.name, threshold=0.5, min_exit_layer=1, kv_strategy=strategy)
    out = EarlyExitGenerator(model).generate(ids, None, policy, MAX_NEW)
    with torch.no_grad():
        expected = reference_decode(model, ids[0].tolist(), MAX_NEW, strategy)
    assert out.tokens[0] == expected
    assert out.exit_layers[0] == [scheduled_layer(s, 4) for s in range(len(expected))]


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_copy_and_deferred_differ_when_deep_tokens_follow_exits(step_schedule, family):
    """Guards the references above: on their models and prompt the two strategies really take different paths."""
    model = tiny_causal_model(family, seed=REFERENCE_SEEDS.get(family, 7))
    ids, _ = padded_batch([8], seed=5)
    runs = {
        strategy: EarlyExitGenerator(model)
        .generate(
            ids, None, ExitPolicy(StepSchedule.name, threshold=0.5, min_exit_layer=1, kv_strategy=strategy), MAX_NEW
        )
        .tokens[0]
        for strategy in ("copy", "deferred")
    }
    assert runs["copy"] != runs["deferred"]


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_catch_up_block_equals_sequential_layers(family):
    """One parallel catch-up call over several positions per row computes what running them one
    by one does: explicit causal mask, left padding and rotary positions included."""
    torch.manual_seed(0)
    model = tiny_causal_model(family, seed=6)
    runner = build_runner(model)
    ids, mask = padded_batch([6, 4])
    with torch.no_grad():
        (sequential, _), (parallel, _) = runner.start(ids, mask, 8), runner.start(ids, mask, 8)
        hidden = torch.randn(2, 5, 32)
        one_by_one = torch.cat(
            [runner.layer(1, hidden[:, p - 1 : p], sequential, None, p, p) for p in range(1, 6)], dim=1
        )  # from step 1: the prefill ran step 0
        block = runner.layer(1, hidden, parallel, None, torch.arange(1, 6).expand(2, 5), 5)
    torch.testing.assert_close(block, one_by_one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parallel.keys[1], sequential.keys[1])


@pytest.mark.parametrize("lengths", [[9, 4, 7, 6], [7, 7, 7, 7]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("strategy", ["copy", "deferred"])
@pytest.mark.parametrize("family", ["mistral", "gpt2", "olmo2", "phi3", "gemma3_text"])
def test_per_row_exits_in_a_batch_equal_batch_of_one(family, strategy, lengths):
    """Unpadded rows attend with no mask at all (sdpa's fast path); padded ones through the explicit mask."""
    model = tiny_causal_model(family, seed=7)
    ids, mask = padded_batch(lengths, seed=8)
    threshold = 0.001 if family == "gemma3_text" else 0.01  # its tiny logit cap flattens the softmax
    policy = ExitPolicy("softmax", threshold=threshold, min_exit_layer=1, kv_strategy=strategy)
    generator = EarlyExitGenerator(model)
    batched = generator.generate(ids, mask, policy, MAX_NEW)
    layers = [layer for row in batched.exit_layers for layer in row]
    assert 1 <= min(layers) and max(layers) == 4 and len(set(layers)) > 1, "the policy must exit at mixed layers"
    for row in range(4):
        alone = generator.generate(ids[row : row + 1, mask[row].bool()], None, policy, MAX_NEW)
        assert batched.tokens[row] == alone.tokens[0]
        assert batched.exit_layers[row] == alone.exit_layers[0]


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_all_layer_states_are_the_models_own_hidden_states(family):
    """Teacher-forced states at the generation steps: the prompt's last token stands for step 0."""
    model = tiny_causal_model(family, seed=9)
    runner = build_runner(model)
    ids, mask = padded_batch([7, 4], seed=3)
    targets = torch.tensor([[5, 6, 7], [8, 9, 10]])
    decoder_input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), targets[:, :-1]], dim=1)
    with torch.no_grad():
        states = runner.all_layer_states(ids, mask, decoder_input_ids)
        for row in range(2):
            sequence = torch.cat([ids[row, mask[row].bool()], targets[row, :-1]])[None]
            hidden = model(sequence, output_hidden_states=True).hidden_states
            for layer in range(1, runner.num_layers):
                torch.testing.assert_close(states[layer][row], hidden[layer][0, -3:], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                runner.logits(states[-1][row]), model(sequence).logits[0, -3:], rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_pruned_logits_are_the_full_logits_at_those_ids(family):
    runner = build_runner(tiny_causal_model(family))
    norm = runner.model.model.norm if family != "gpt2" else runner.model.transformer.ln_f
    with torch.no_grad():  # a gain that is not all ones, so folding it into the rows is tested
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    hidden = 3 * torch.randn(3, 2, runner.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = runner.logits(hidden).gather(-1, ids[:, None, :].expand(3, 2, 5))
    rows = runner.head_rows(ids)
    assert (rows.rms_eps is None) == (family == "gpt2")  # GPT-2's LayerNorm is not an RMS norm: run as is
    assert torch.allclose(runner.logits_for(hidden, rows), expected, atol=1e-5)


@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]], ids=["batch1", "batch4"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_self_speculation_is_lossless_on_decoder_only_models(family, lengths):
    generator = EarlyExitGenerator(tiny_causal_model(family))
    ids, mask = padded_batch(lengths)
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    policy = ExitPolicy("fixed", min_exit_layer=2, decoding="self_speculative", max_draft=3)
    assert generator.generate(ids, mask, policy, MAX_NEW).tokens == full.tokens


@pytest.mark.parametrize("max_new_tokens", [1, 2, MAX_NEW])
def test_self_speculation_takes_step_0_from_the_prefill(max_new_tokens):
    """Step 0's token is the full model's already (the prefill ran it): no draft or verification for it,
    a one-token prompt and a single new token included."""
    generator = EarlyExitGenerator(tiny_causal_model("llama"))
    policy = ExitPolicy("fixed", min_exit_layer=2, decoding="self_speculative", max_draft=3)
    for ids, mask in (padded_batch([9, 5]), (torch.tensor([[17]]), None)):
        full = generator.generate(ids, mask, ExitPolicy("full"), max_new_tokens)
        out = generator.generate(ids, mask, policy, max_new_tokens)
        assert out.tokens == full.tokens
        assert out.stats.layer_positions >= full.stats.layer_positions
        if max_new_tokens == 1:
            assert out.stats.layer_positions == 0 and out.stats.speculation.rounds == 0
