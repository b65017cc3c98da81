"""The monotonicity study and the model report's layer agreement on decoder-only checkpoints."""

from __future__ import annotations

import pytest

from mee_bench.engine.causal import continuation_ids
from mee_bench.engine.decoding import EarlyExitGenerator
from mee_bench.engine.loading import load_model
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TATOEBA_ENFR
from mee_bench.study.analysis import analyze_model, cli, task_examples
from mee_bench.study.model_report import layer_agreement


@pytest.fixture(scope="module")
def examples():
    return task_examples(TATOEBA_ENFR.name, 5)


def test_teacher_forced_study_reads_the_causal_prompt_and_the_reference_as_its_continuation(tiny_llama_dir, examples):
    model, tokenizer = load_model(tiny_llama_dir)
    analysis = analyze_model(
        model,
        tokenizer,
        examples,
        "teacher_forced",
        batch_size=2,
        max_output_tokens=16,
        example_count=2,
        min_exit_layer=1,
    )
    expected = sum(len(row) for row in continuation_ids(tokenizer, [ex.target for ex in examples], 16))
    assert analysis.tokens == expected and analysis.num_layers == 4
    assert analysis.layers[-1]["matches_final"] == 1.0 and analysis.layers[-1]["no_change"] == 1.0
    assert analysis.examples and analysis.examples[0]["input"].startswith("English: ")
    assert examples[0].prompt(decoder_only=True).endswith("\nFrench:")
    assert examples[0].prompt(decoder_only=False).startswith("translate English to French: ")


def test_free_running_study_covers_exactly_the_models_own_greedy_tokens(tiny_gpt2_dir, examples):
    model, tokenizer = load_model(tiny_gpt2_dir)
    analysis = analyze_model(
        model, tokenizer, examples, "free_running", batch_size=5, max_output_tokens=6, example_count=0, min_exit_layer=1
    )
    generator = EarlyExitGenerator(model, tokenizer)
    ids, mask = generator.tokenize([ex.prompt(decoder_only=True) for ex in examples])
    greedy = generator.generate(ids, mask, ExitPolicy("full"), 6).tokens
    assert analysis.tokens == sum(len(row) for row in greedy)
    assert analysis.final_top1_accuracy == 1.0  # its own greedy output is what the last layer predicts


def test_analyze_cli_and_the_model_reports_layer_agreement_accept_a_decoder_only_checkpoint(tiny_llama_dir, tmp_path):
    assert (
        cli(
            [
                "--model",
                str(tiny_llama_dir),
                "--task",
                TATOEBA_ENFR.name,
                "--limit",
                "3",
                "--out",
                str(tmp_path),
                "--max-output-tokens",
                "8",
                "--min-exit-layer",
                "1",
            ]
        )
        == 0
    )
    assert any(tmp_path.iterdir())
    agreement = layer_agreement(str(tiny_llama_dir), 3)
    assert len(agreement["layers"]) == 4 and agreement["layers"][-1]["matches_final"] == 1.0
