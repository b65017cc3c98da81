"""`mee-bench train-heads MODEL`: train the classifier, last_three_mlp and lstm exit heads of a model.

Oracle labels come from teacher-forced per-layer top-1s: a token may exit at layer i iff
the top-1 at layer i equals the final layer's top-1 and does not change at any later
layer (`strict`, the monotonic oracle), or, as in CALM, iff it equals the final top-1
(`equals_final`). States are computed batch by batch and thrown away: no dataset of
states is ever held. Heads read raw layer outputs exactly as `mee_bench.engine.measures` does
at inference (decoder input embedding standing in for h_0 and h_-1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.engine.heads import HEADS_FILE, ExitHeads
from mee_bench.engine.loading import ModelLoadError, load_model
from mee_bench.engine.measures import head_names
from mee_bench.engine.oracle import top1_unchanged_after
from mee_bench.engine.runner import LayerRunner, build_runner
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.train.data import (
    IGNORE_INDEX,
    DataError,
    MixtureBatches,
    TokenizedSource,
    collate,
    encode_pairs,
    read_examples,
)

LABEL_MODES = ("strict", "equals_final")
METRICS_FILE = "exit_heads_metrics.json"
HEAD_NAMES = tuple(head_names())  # the heads the registered measures read


def oracle_labels(top1: Tensor, mode: str = "strict") -> Tensor:
    """top1 [L, N] per-layer predictions (row i-1 = layer i) -> labels [L, N], 1 = may exit at that layer.

    `strict`: layer i's top-1 equals layer L's and every layer after i agrees; `equals_final`:
    layer i's top-1 equals layer L's. Row L-1 (the last layer) is always 1.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}")
    if mode == "equals_final":
        return top1 == top1[-1:]
    return top1_unchanged_after(top1)


def layer_top1(runner: LayerRunner, states: list[Tensor]) -> Tensor:
    """Top-1 token of every layer 1..L for each row of the [N, d] states (one layer's logits at a time)."""
    return torch.stack([runner.logits(state).argmax(-1) for state in states[1:]])


def head_logits(heads: ExitHeads, states: list[Tensor]) -> dict[str, Tensor]:
    """Each head's logits [L, N, 2] for layers 1..L from [N, d] states (embedding first), as at inference."""
    embedding, layers = states[0], states[1:]
    history = [embedding, embedding, *layers]
    classifier = torch.stack([heads.classifier(h) for h in layers])
    last_three = torch.stack([heads.last_three_mlp(torch.cat(history[i : i + 3], -1)) for i in range(len(layers))])
    lstm, _ = heads.lstm(torch.stack(layers, 1))
    return {"classifier": classifier, "last_three_mlp": last_three, "lstm": lstm.transpose(0, 1)}


def token_states(runner: LayerRunner, batch: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
    """Teacher-forced raw states [N, d] of the labelled positions, embedding first, and the oracle top-1s [L, N]."""
    with torch.no_grad():
        states = runner.all_layer_states(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        mask = batch["labels"] != IGNORE_INDEX
        states = [s[mask].float() for s in states]
        return states, layer_top1(runner, states)


def class_weighted_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """CE with each class weighted by N / (2 * its count) in the batch, so rare exits (or stays) still count."""
    flat_labels = labels.reshape(-1).long()
    counts = torch.bincount(flat_labels, minlength=2).float().clamp(min=1)
    weights = flat_labels.numel() / (2 * counts)
    return F.cross_entropy(logits.reshape(-1, 2), flat_labels, weight=weights)


def prf(predicted: Tensor, labels: Tensor) -> dict[str, float]:
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((predicted == labels).float().mean())
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accuracy": round(accuracy, 4),
    }


def evaluate_heads(heads: ExitHeads, runner: LayerRunner, batches, mode: str) -> dict:
    """Per-head, per-layer precision/recall/F1/accuracy on validation batches (P(exit) >= 0.5 predicts exit)."""
    predictions: dict[str, list[Tensor]] = {name: [] for name in HEAD_NAMES}
    labels_all = []
    heads.eval()
    with torch.no_grad():
        for batch in batches:
            states, top1 = token_states(runner, batch)
            labels_all.append(oracle_labels(top1, mode))
            for name, logits in head_logits(heads, states).items():
                predictions[name].append(logits.argmax(-1).bool())
    heads.train()
    labels = torch.cat(labels_all, 1)
    report: dict = {"positive_rate": [round(float(x), 4) for x in labels.float().mean(1)]}
    report["constant_accuracy"] = [round(max(p, 1 - p), 4) for p in report["positive_rate"]]
    for name in HEAD_NAMES:
        predicted = torch.cat(predictions[name], 1)
        report[name] = [{"layer": i + 1, **prf(predicted[i], labels[i])} for i in range(labels.shape[0] - 1)]
    return report


def _on(device: torch.device, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _batches(mixture: MixtureBatches, pad_id: int, start_id: int, epochs: int = 1000):
    for epoch in range(epochs):
        for indices in mixture.epoch(epoch):
            yield mixture.collate(indices, start_id, pad_id)


def train_heads(
    model_dir: str | Path,
    data: list[tuple[str, str]],
    validation: tuple[str, str] = ("tatoeba_fra_eng/validation.jsonl", "translate_en_fr"),
    steps: int = 300,
    batch_tokens: int = 4096,
    validation_examples: int = 500,
    mode: str = "strict",
    lr: float = 1e-3,
    seed: int = 0,
    limit: int | None = 50_000,
    log=print,
    device: str = "cpu",
    force: bool = False,
) -> tuple[Path, dict]:
    """Train all three heads for the model in `model_dir`; save them and their validation metrics beside it.

    Heads or metrics already there are replaced only with `force` (checked before any compute).
    """
    existing = [Path(model_dir) / name for name in (HEADS_FILE, METRICS_FILE) if (Path(model_dir) / name).exists()]
    if existing and not force:
        raise ValueError(
            f"{model_dir} already has trained exit heads ({', '.join(p.name for p in existing)}); "
            "pass --force to replace them, or train heads for a copy of the model"
        )
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}")
    model, tokenizer = load_model(model_dir, device=device)
    runner = build_runner(model)
    causal = not runner.is_encoder_decoder  # a decoder-only model reads its prompts and targets as one text
    start_id = runner.start_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else runner.eos_token_id
    sources = [
        TokenizedSource(path, read_examples(path, task, limit, causal), tokenizer, 256, 96, causal)
        for path, task in data
    ]
    mixture = MixtureBatches(sources, [1.0] * len(sources), batch_tokens, seed)
    val_rows = read_examples(validation[0], validation[1], validation_examples, causal)
    val_pairs = list(zip(*encode_pairs(tokenizer, val_rows, 256, 96, causal)))
    val_batches = [
        _on(runner.device, collate(val_pairs[i : i + 64], start_id, pad_id)) for i in range(0, len(val_pairs), 64)
    ]
    torch.manual_seed(seed)
    heads = ExitHeads(runner.hidden_size).to(runner.device)
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    layers = runner.num_layers
    for step, batch in enumerate(_batches(mixture, pad_id, start_id), start=1):
        states, top1 = token_states(runner, _on(runner.device, batch))
        labels = oracle_labels(top1, mode)[: layers - 1]
        losses = {
            name: class_weighted_loss(logits[: layers - 1], labels)
            for name, logits in head_logits(heads, states).items()
        }
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            log(f"step {step}/{steps} " + " ".join(f"{k}={v.item():.4f}" for k, v in losses.items()))
        if step >= steps:
            break
    report = evaluate_heads(heads, runner, val_batches, mode)
    report.update(
        {
            "labels": mode,
            "steps": steps,
            "batch_tokens": batch_tokens,
            "seed": seed,
            "data": [p for p, _ in data],
            "validation": validation[0],
            "validation_examples": len(val_rows),
        }
    )
    path = heads.save(model_dir, metadata={"labels": mode, "steps": steps, "seed": seed, "num_layers": layers})
    (Path(model_dir) / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return path, report


def format_report(report: dict) -> str:
    lines = [f"{'layer':>5} {'exit rate':>9} " + " ".join(f"{name + ' P/R/F1':>26}" for name in HEAD_NAMES)]
    for index, rate in enumerate(report["positive_rate"][:-1]):
        cells = [report[name][index] for name in HEAD_NAMES]
        row = " ".join(f"{c['precision']:>8.3f} {c['recall']:>8.3f} {c['f1']:>8.3f}" for c in cells)
        lines.append(f"{index + 1:>5} {rate:>9.3f} {row}")
    return "\n".join(lines)


def _source(text: str) -> tuple[str, str]:
    path, _, task = text.partition(":")
    return path, task or "translate_en_fr"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mee-bench train-heads", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        nargs="?",
        help=f"a saved T5 directory (required: the embedded model, {DEFAULT_MODEL_DIR}, only when named)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace the exit heads and metrics already beside the model"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=["tatoeba_fra_eng/train.jsonl", "wmt_news_enfr_2008_2013/train.jsonl"],
        help="training sources PATH[:TASK] under the data root (TASK: translate_en_fr or squad)",
    )
    parser.add_argument("--validation", default="tatoeba_fra_eng/validation.jsonl:translate_en_fr")
    parser.add_argument("--validation-examples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument(
        "--labels",
        choices=LABEL_MODES,
        default="strict",
        help="strict: top-1 equals the final one and never changes later; equals_final: CALM's looser oracle",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.model is None:
        raise ValueError(
            f"name the model whose heads to train, e.g. `mee-bench train-heads runs/my-model`; the embedded default's "
            f"heads are replaced only when named: `mee-bench train-heads {DEFAULT_MODEL_DIR} --force`"
        )
    torch.set_num_threads(args.threads)
    try:
        path, report = train_heads(
            args.model,
            [_source(d) for d in args.data],
            _source(args.validation),
            args.steps,
            args.batch_tokens,
            args.validation_examples,
            args.labels,
            args.lr,
            args.seed,
            device=args.device,
            force=args.force,
        )
    except (DataError, ModelLoadError, ValueError) as err:
        print(f"mee-bench train-heads: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"heads saved to {path}; metrics in {Path(args.model) / METRICS_FILE}")
    return 0
