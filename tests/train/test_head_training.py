"""Exit-head training: oracle labels layer by layer, heads read states as at inference, heads beat a constant."""

from __future__ import annotations

import json

import pytest
import torch

from mee_bench.engine.heads import ExitHeads
from mee_bench.train.heads import METRICS_FILE, head_logits, layer_top1, oracle_labels, train_heads


def _one_hot_logits(top1_per_layer: list[list[int]], vocab: int = 10) -> list[torch.Tensor]:
    """Per-layer logits [N, vocab] whose argmax is the given token of each column."""
    return [torch.nn.functional.one_hot(torch.tensor(row), vocab).float() for row in top1_per_layer]


class _IdentityRunner:
    """Stands in for T5LayerRunner: a layer's 'state' is its logits."""

    @staticmethod
    def logits(state: torch.Tensor) -> torch.Tensor:
        return state


def test_labels_on_hand_built_logits_layer_by_layer():
    # columns are tokens, rows layers 1..4; states[0] is the embedding and must be ignored
    per_layer = [
        [5, 7, 7, 1, 3],
        [7, 5, 7, 2, 3],
        [7, 7, 7, 3, 4],
        [7, 7, 7, 4, 3],
    ]
    embedding = _one_hot_logits([[9, 9, 9, 9, 9]])[0]
    top1 = layer_top1(_IdentityRunner(), [embedding, *_one_hot_logits(per_layer)])
    assert top1.tolist() == per_layer
    strict = oracle_labels(top1, "strict").int().tolist()
    assert strict == [
        [0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    looser = oracle_labels(top1, "equals_final").int().tolist()
    assert looser == [
        [0, 1, 1, 0, 1],
        [1, 0, 1, 0, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    with pytest.raises(ValueError, match="unknown label mode"):
        oracle_labels(top1, "calm")


def test_heads_at_layer_i_see_only_layers_up_to_i_and_the_embedding_first():
    torch.manual_seed(0)
    heads = ExitHeads(d_model=8).eval()
    states = [torch.randn(5, 8) for _ in range(5)]  # embedding, h1..h4
    before = head_logits(heads, states)
    changed = [*states[:3], states[3] + 1.0, states[4]]  # perturb h3
    after = head_logits(heads, changed)
    for name in ("classifier", "last_three_mlp", "lstm"):
        torch.testing.assert_close(after[name][:2], before[name][:2])  # layers 1-2 unaffected
        assert not torch.allclose(after[name][2], before[name][2])
    expected = heads.last_three_mlp(torch.cat([states[0], states[0], states[1]], -1))
    torch.testing.assert_close(before["last_three_mlp"][0], expected)
    torch.testing.assert_close(before["classifier"][1], heads.classifier(states[2]))


def test_heads_beat_a_constant_predictor_on_a_tiny_trained_model(trained_tiny, tiny_corpus):  # noqa: F811
    path, report = train_heads(
        trained_tiny,
        data=[(str(tiny_corpus / "train.jsonl"), "translate_en_fr")],
        validation=(str(tiny_corpus / "validation.jsonl"), "translate_en_fr"),
        steps=60,
        batch_tokens=600,
        validation_examples=60,
        seed=0,
        log=lambda _line: None,
    )
    assert path == trained_tiny / "exit_heads.safetensors"
    saved = json.loads((trained_tiny / METRICS_FILE).read_text())
    assert saved["labels"] == "strict" and len(saved["classifier"]) == 2
    loaded = ExitHeads.load(path)
    assert loaded.d_model == 32
    for name in ("classifier", "last_three_mlp", "lstm"):
        accuracy = sum(row["accuracy"] for row in report[name]) / 2
        constant = sum(report["constant_accuracy"][:2]) / 2
        assert accuracy > constant, (name, report[name], report["constant_accuracy"])


def test_train_heads_never_replaces_heads_without_force_nor_picks_the_default_model(tmp_path, capsys):
    from mee_bench.cli import main
    from mee_bench.engine.heads import HEADS_FILE
    from mee_bench.paths import DEFAULT_MODEL_DIR

    assert main(["train-heads"]) == 2
    error = capsys.readouterr().err
    assert "name the model whose heads to train" in error and f"{DEFAULT_MODEL_DIR} --force" in error
    ExitHeads(d_model=32).save(tmp_path, metadata={"num_layers": 4})
    (tmp_path / METRICS_FILE).write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["train-heads", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"already has trained exit heads ({HEADS_FILE}, {METRICS_FILE}); pass --force" in error
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
