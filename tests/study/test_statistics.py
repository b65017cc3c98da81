"""The monotonicity study: exact statistics on hand-built logits, padding, both modes via the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mee_bench.harness.catalogue import TASKS
from mee_bench.harness.data import local_split_path, read_jsonl
from mee_bench.paths import DATA_DIR_ENV, data_root
from mee_bench.study.analysis import Example, analyze_model, cli, file_examples, task_examples
from mee_bench.study.statistics import (
    LayerStatistics,
    TokenPredictions,
    hidden_state_saturation,
    layer_statistics,
    rising_last_three,
)
from tests.helpers import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("fraction-no-change.png", "mean-top1-curves.png", "examples-monotonicity.png", "exit-signals.png")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits make these tests 10x slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_hot_logits(top1: list[list[int]], vocab: int = 5, peak: float = 5.0) -> torch.Tensor:
    """[L, N, V] logits whose top-1 at layer l for token n is top1[n][l] (logit `peak`, others 0)."""
    ids = torch.tensor(top1).T  # [L, N]
    return torch.nn.functional.one_hot(ids, vocab).float() * peak


def test_fractions_are_exact_on_hand_built_logits():
    top1 = [
        [1, 1, 1, 1],  # never changes
        [2, 1, 1, 1],  # settles at layer 2
        [1, 2, 1, 1],  # right at layer 1 by chance, settles at layer 3
        [3, 3, 3, 2],  # settles only at the last layer
    ]
    rows = layer_statistics(one_hot_logits(top1))
    assert [row["no_change"] for row in rows] == [0.25, 0.5, 0.75, 1.0]
    assert [row["matches_final"] for row in rows] == [0.5, 0.5, 0.75, 1.0]
    high = math.exp(5) / (math.exp(5) + 4)  # probability of the peaked token
    low = 1 / (math.exp(5) + 4)
    for row in rows:
        hits = round(4 * row["matches_final"])  # the final token is the peak exactly where top-1 = final
        values = [high] * hits + [low] * (4 - hits)
        mean = sum(values) / 4
        assert row["confidence_mean"] == pytest.approx(mean, abs=1e-6)
        assert row["confidence_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 4), abs=1e-6)
        assert row["top1_prob_mean"] == pytest.approx(high, abs=1e-6)


def test_last_layer_is_one_and_fractions_are_ordered():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, 7, generator=generator) * 3
    rows = layer_statistics(logits)
    no_change = [row["no_change"] for row in rows]
    assert no_change[-1] == 1.0 and rows[-1]["matches_final"] == 1.0
    assert no_change == sorted(no_change)  # settled at i implies settled at i + 1
    assert all(row["no_change"] <= row["matches_final"] for row in rows)
    assert rows[-1]["confidence_mean"] == pytest.approx(rows[-1]["top1_prob_mean"])


def test_rising_rule_and_heuristic_exits():
    probs = torch.tensor(
        [
            [0.50, 0.91, 0.95, 0.97, 0.99],  # rises from layer 3, all >= 0.9 from layer 4
            [0.90, 0.90, 0.95, 0.96, 0.97],  # equal is not rising; >= 0.9 is inclusive
            [0.99, 0.95, 0.93, 0.92, 0.91],  # falls
        ]
    ).T  # [L=5, N=3]
    rising = rising_last_three(probs)
    confident = rising_last_three(probs, 0.9)
    assert rising.T.tolist() == [[False, False, True, True, True], [False, False, False, True, True], [False] * 5]
    assert confident.T.tolist() == [[False, False, False, True, True], [False, False, False, True, True], [False] * 5]

    top1 = torch.tensor([[4, 4, 4, 4, 4], [2, 2, 2, 2, 3], [1, 1, 1, 1, 1]]).T
    predictions = TokenPredictions(top1[..., None], probs[..., None], probs)
    stats = LayerStatistics(num_layers=5, threshold=0.9, min_exit_layer=4)
    stats.add(predictions)
    rows = stats.rows()
    assert all(math.isnan(rows[i][key]) for i in (0, 1) for key in ("rising", "rising_confident"))
    assert rows[3]["rising_confident"] == pytest.approx(2 / 3)
    assert rows[3]["rising_confident_kept"] == 0.5  # token 1 changes its top-1 at layer 5
    assert stats.heuristic_summary() == {
        "min_exit_layer": 4,
        "threshold": 0.9,
        "fires": pytest.approx(2 / 3),
        "exit_equals_final": 0.5,
        "mean_exit_layer": pytest.approx(13 / 3),
    }


def test_saturation_is_the_cosine_of_consecutive_states():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    states = torch.stack([e1, 2 * e1, e2, -e2])[:, None]  # [L+1=4, N=1, d=2]
    assert hidden_state_saturation(states)[:, 0].tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_padding_is_excluded(t5_tokenizer):
    model = tiny_model(seed=3, layers=2, decoder_layers=3)
    examples = [
        Example("translate English to French: Hi.", "Salut."),
        Example(
            "translate English to French: The weather is very nice today, isn't it?",
            "Il fait très beau aujourd'hui, n'est-ce pas ?",
        ),
        Example("translate English to French: Go.", "Va, et ne reviens pas avant ce soir !"),
    ]
    batched = analyze_model(model, t5_tokenizer, examples, batch_size=3, example_count=0)
    alone = analyze_model(model, t5_tokenizer, examples, batch_size=1, example_count=0)
    assert batched.tokens == alone.tokens == sum(len(t5_tokenizer(text_target=e.target).input_ids) for e in examples)
    for padded, unpadded in zip(batched.layers, alone.layers):
        assert padded == pytest.approx(unpadded, abs=1e-5, nan_ok=True)


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, t5_tokenizer):
    path = tmp_path_factory.mktemp("tiny-t5-b")
    tiny_model(seed=1, layers=2, decoder_layers=4).save_pretrained(path)
    t5_tokenizer.save_pretrained(path)
    return path


def assert_report(out, labels: list[str], num_layers: int) -> dict:
    report = json.loads((out / "monotonicity.json").read_text())
    assert [m["label"] for m in report["models"]] == labels
    for analysis in report["models"]:
        assert len(analysis["layers"]) == num_layers and analysis["tokens"] > 0
        assert analysis["layers"][-1]["no_change"] == 1.0
        assert analysis["examples"], "Figure 3 needs example tokens"
        for top3 in analysis["examples"][0]["top3"]:
            probs = [entry["prob"] for entry in top3]
            assert len(top3) == 3 and probs == sorted(probs, reverse=True)
    assert len((out / "monotonicity.csv").read_text().strip().splitlines()) == 1 + num_layers * len(labels)
    summary = (out / "README.md").read_text()
    assert "no change after L2" in summary and all(label in summary for label in labels)
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    return report


@pytest.mark.skipif(data_root() is None, reason="no local data root")
def test_cli_teacher_forced_on_a_task(tiny_model_dir, second_model_dir, tmp_path):
    out = tmp_path / "tf"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--model",
        str(second_model_dir),
        "--label",
        "a",
        "--label",
        "b",
        "--task",
        "tatoeba_enfr_mee",
        "--limit",
        "5",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    report = assert_report(out, ["a", "b"], num_layers=4)
    assert report["models"][0]["tokens"] == report["models"][1]["tokens"]  # same references
    positions = [[e["position"] for e in m["examples"]] for m in report["models"]]
    assert positions[0] == positions[1]  # Figure 3 compares the same tokens


def test_cli_free_running_on_an_inputs_file(tiny_model_dir, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    prompts = ["summarize: The cat sat on the mat all day long.", "question: Who? context: Nobody was there."]
    inputs.write_text("".join(json.dumps({"input": p}) + "\n" for p in prompts))
    out = tmp_path / "fr"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--inputs",
        str(inputs),
        "--mode",
        "free_running",
        "--max-output-tokens",
        "10",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    analysis = assert_report(out, [tiny_model_dir.name], num_layers=4)["models"][0]
    # The final layer's top-1 is the token the model generated: the teacher-forced re-read lines up
    # (an off-by-one would give ~0; float32 near-ties in a random model may flip a rare token).
    assert analysis["final_top1_accuracy"] >= 0.9


def test_task_examples_are_the_catalogues_prompts_and_reference_of_local_records():
    if data_root() is None:
        pytest.skip("no local data root")
    for spec in TASKS:
        examples = task_examples(spec.name, limit=2)
        records = list(zip(read_jsonl(local_split_path(spec.dataset, spec.split)), range(2)))
        assert examples == [
            Example(spec.prompt(row), spec.target(row), spec.causal_prompt(row)) for row, _ in records
        ], spec.name


def test_a_local_record_without_the_tasks_fields_is_refused_naming_file_row_and_field(tmp_path, monkeypatch):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "validation.jsonl").write_text(json.dumps({"question": "Who?"}) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"squad/validation.jsonl:1: not a squad_mee record \(context is missing\)"):
        task_examples("squad_mee")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("", r"inputs.jsonl holds no records"),
        ('{"input": "a", "target": "b"}\n\n{"input": "c"}\n', r"inputs.jsonl:3: no non-empty string field target"),
        ('{"input": "", "target": "b"}\n', r"inputs.jsonl:1: no non-empty string field input"),
    ],
)
def test_bad_inputs_files_name_file_and_line_before_any_compute(tmp_path, lines, message):
    (tmp_path / "inputs.jsonl").write_text(lines)
    with pytest.raises(ValueError, match=message):
        file_examples(tmp_path / "inputs.jsonl")


def test_clear_errors(tiny_model_dir, tmp_path, capsys):
    base = ["--limit", "2", "--out", str(tmp_path / "out")]
    assert cli(["--model", str(tiny_model_dir), "--task", "no_such_task", *base]) == 2
    error = capsys.readouterr().err
    assert "unknown task 'no_such_task'" in error and "tatoeba_enfr_mee" in error

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"input": "x", "target": "y"}) + "\n")
    missing = tmp_path / "missing-model"
    assert cli(["--model", str(tiny_model_dir), "--model", str(missing), "--inputs", str(inputs), *base]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # failed before any model ran
