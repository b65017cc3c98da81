"""Self-speculative decoding is lossless: the full model's tokens, whatever the drafts were."""

from __future__ import annotations

import pytest
import torch

from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_model
from mee_bench.engine.policy import ExitPolicy
from tests.helpers import SENTENCES, padded_batch, recorded_caches, tiny_model

MAX_NEW = 16


def speculative(draft_layers: int, max_draft: int, measure: str = "fixed", threshold: float = 0.9) -> ExitPolicy:
    return ExitPolicy(
        measure, threshold=threshold, min_exit_layer=draft_layers, decoding="self_speculative", max_draft=max_draft
    )


def identity_after(model, layer: int):
    """`model` with its decoder layers after `layer` reduced to identities (every output projection
    zeroed), so that a draft from `layer` layers is always what the full model says."""
    with torch.no_grad():
        for block in model.decoder.block[layer:]:
            for weight in (
                block.layer[0].SelfAttention.o,
                block.layer[1].EncDecAttention.o,
                block.layer[2].DenseReluDense.wo,
            ):
                weight.weight.zero_()
    return model


@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]])
@pytest.mark.parametrize("draft_layers, max_draft", [(1, 1), (2, 3), (3, 5)])
def test_output_equals_full_at_batch_1_and_4(lengths, draft_layers, max_draft):
    generator = EarlyExitGenerator(tiny_model(seed=0))
    ids, mask = padded_batch(lengths)
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    out = generator.generate(ids, mask, speculative(draft_layers, max_draft), MAX_NEW)
    assert out.tokens == full.tokens
    assert all(layer == 4 for row in out.exit_layers for layer in row)
    counts = out.stats.speculation
    assert counts.proposed > 0 and counts.rounds >= len(lengths)


def test_rows_accept_drafts_independently_in_a_batch():
    """Seed 0 drafted from 3 of 4 layers accepts some drafts and rejects others: both paths run,
    and each row's tokens equal that row decoded alone."""
    generator = EarlyExitGenerator(tiny_model(seed=0))
    ids, mask = padded_batch([9, 5, 7, 3])
    policy = speculative(3, 3)
    out = generator.generate(ids, mask, policy, MAX_NEW)
    counts = out.stats.speculation
    assert 0 < counts.accepted < counts.proposed
    for row in range(4):
        alone = generator.generate(ids[row : row + 1, : int(mask[row].sum())], None, policy, MAX_NEW)
        assert alone.tokens[0] == out.tokens[row]


def test_drafts_the_full_model_agrees_with_are_all_accepted():
    model = identity_after(tiny_model(seed=0), 2)
    generator = EarlyExitGenerator(model)
    ids, mask = padded_batch([9, 5])
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    out = generator.generate(ids, mask, speculative(2, 3), MAX_NEW)
    assert out.tokens == full.tokens
    assert out.stats.acceptance_rate == 1.0
    # 16 tokens per row in rounds of 4 (3 accepted drafts + the full model's own token)
    assert out.stats.speculation.rounds == 2 * 4 and out.stats.mean_accepted_draft == 3.0
    assert out.stats.layers_per_token == pytest.approx(4.0)


def test_cache_after_rollbacks_equals_the_full_policys_cache():
    """Rejected positions were recomputed: every position a row fed in holds the full model's K/V."""
    generator = EarlyExitGenerator(tiny_model(seed=0))
    caches = recorded_caches(generator)
    ids, mask = padded_batch([9, 5, 7])
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    out = generator.generate(ids, mask, speculative(2, 4), MAX_NEW)
    assert out.tokens == full.tokens and out.stats.speculation.accepted < out.stats.speculation.proposed
    for row, tokens in enumerate(out.tokens):
        fed = len(tokens)  # positions 0..fed-1 took the start token and the tokens before the last
        for name in ("self_k", "self_v"):
            expected, got = getattr(caches[0], name)[:, row, :, :fed], getattr(caches[1], name)[:, row, :, :fed]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)  # block vs one-at-a-time float order


def test_a_measure_decides_how_far_to_draft():
    generator = EarlyExitGenerator(tiny_model(seed=0))
    ids, mask = padded_batch([9, 5, 7, 3])
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    never_confident = generator.generate(ids, mask, speculative(3, 4, "softmax", 1.0), MAX_NEW)
    sometimes = generator.generate(ids, mask, speculative(3, 4, "softmax", 0.2), MAX_NEW)
    assert never_confident.tokens == sometimes.tokens == full.tokens
    assert never_confident.stats.speculation.proposed == 0  # one verified position per round: the full model
    assert never_confident.stats.layers_per_token == pytest.approx(4.0)
    assert 0 < sometimes.stats.speculation.proposed < 4 * sometimes.stats.speculation.rounds


def test_a_measure_with_no_score_yet_at_the_draft_layer_proposes_nothing():
    """The monotonic heuristic compares three layers' scores, so at draft layer 2 it has none: every
    round verifies its one position (no proposal), and the output is still the full model's."""
    generator = EarlyExitGenerator(tiny_model(seed=0))
    ids, mask = padded_batch([9, 5])
    full = generator.generate(ids, mask, ExitPolicy("full"), MAX_NEW)
    out = generator.generate(ids, mask, speculative(2, 3, "monotonic_heuristic", threshold=0.1), MAX_NEW)
    assert out.tokens == full.tokens
    assert out.stats.speculation.proposed == 0 and out.stats.speculation.rounds > 0


def test_eos_and_stop_strings_end_rows_as_in_full(t5_tokenizer):
    model, tokenizer = load_model()
    generator = EarlyExitGenerator(model, tokenizer)
    prompts = [f"translate English to French: {s}" for s in SENTENCES]
    full_texts, full = generator.generate_text(prompts, ExitPolicy("full"), 24, stop_strings=["."])
    texts, out = generator.generate_text(prompts, speculative(2, 4), 24, stop_strings=["."])
    assert texts == full_texts and out.tokens == full.tokens
    assert out.stats.speculation.accepted > 0


def test_embedded_default_model_output_equals_full():
    model, tokenizer = load_model()
    generator = EarlyExitGenerator(model, tokenizer)
    ids, mask = generator.tokenize([f"translate English to French: {s}" for s in SENTENCES])
    full = generator.generate(ids, mask, ExitPolicy("full"), 32)
    out = generator.generate(ids, mask, speculative(4, 3), 32)
    assert out.tokens == full.tokens
    assert 0 < out.stats.acceptance_rate < 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(measure="full", decoding="self_speculative"), "needs a measure that can exit"),
        (dict(measure="fixed", decoding="self_speculative", max_draft=0), "max_draft=0"),
        (dict(measure="softmax", decoding="self_speculative", vocab_top_k=8), "set vocab_top_k=0"),
        (dict(measure="fixed", decoding="beam"), "decoding='beam' is unknown"),
    ],
)
def test_bad_speculative_policies_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitPolicy(**kwargs)


def test_draft_depth_must_leave_layers_to_verify():
    generator = EarlyExitGenerator(tiny_model(seed=0))
    with pytest.raises(ValueError, match="must be below the model's 4 decoder layers"):
        generator.generate(torch.ones(1, 3, dtype=torch.long), None, speculative(4, 2), 4)
