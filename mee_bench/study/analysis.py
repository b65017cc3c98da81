"""`mee-bench analyze`: the paper's monotonicity study (Figures 1-3) on any T5 or decoder-only checkpoint.

The LM head is applied to every decoder layer's raw state, teacher-forced on references
or on the model's own greedy output; the statistics of `statistics.py` are accumulated
batch by batch, and `plots.py` writes the numbers, figures and summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from mee_bench.engine.causal import continuation_ids
from mee_bench.engine.decoding import EarlyExitGenerator, input_limit
from mee_bench.engine.loading import ModelLoadError, check_checkpoint_path, load_model
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TASK_NAMES, UnknownTaskError, task
from mee_bench.harness.data import local_split_path, numbered_jsonl
from mee_bench.harness.trained_for import untrained_note
from mee_bench.paths import DATA_DIR_ENV
from mee_bench.study.results import ModelAnalysis
from mee_bench.study.statistics import LayerStatistics, TokenPredictions, hidden_state_saturation, layer_predictions

log = logging.getLogger(__name__)

MODES = ("teacher_forced", "free_running")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Example:
    input: str
    target: str | None
    causal_input: str | None = None  # a catalogue task's prompt for a decoder-only model (default: `input`)

    def prompt(self, decoder_only: bool) -> str:
        return self.causal_input or self.input if decoder_only else self.input


def task_examples(name: str, limit: int | None = None) -> list[Example]:
    """The first `limit` (prompt, reference) pairs of a catalogue task, from its local split."""
    try:
        spec = task(name)
    except UnknownTaskError as err:
        raise ValueError(f"{err} (or pass --inputs FILE.jsonl)") from err
    path = local_split_path(spec.dataset, spec.split)
    if path is None:
        raise FileNotFoundError(
            f"task {name!r} needs {spec.dataset}/{spec.split}.jsonl under the data root; set {DATA_DIR_ENV}"
        )
    examples = []
    for number, row in numbered_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(Example(spec.prompt(row), spec.target(row), spec.causal_prompt(row)))
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a {name} record ({err}); fix or remove that line") from err
    return examples


def file_examples(path: str | Path, limit: int | None = None, need_target: bool = True) -> list[Example]:
    """Examples from a JSONL file with `input` (and, for teacher forcing, `target`) fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inputs {path} does not exist")
    fields = ("input", "target") if need_target else ("input",)
    examples = []
    for number, row in numbered_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        missing = [name for name in fields if not isinstance(row.get(name), str) or not row[name].strip()]
        if missing:
            raise ValueError(
                f"{path}:{number}: no non-empty string field {' or '.join(missing)}; fix or remove that line"
            )
        examples.append(Example(row["input"], row.get("target")))
    if not examples:
        raise ValueError(f"--inputs {path} holds no records; each line needs an object with {' and '.join(fields)}")
    return examples


# ---------------------------------------------------------------- driver


@dataclass
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor
    decoder_input_ids: Tensor
    targets: Tensor  # [B, T] the token the decoder should produce at each position
    target_mask: Tensor  # [B, T] 1 for real tokens, 0 for padding
    truncated: int  # inputs that reached the input-length limit


def _batches(
    generator: EarlyExitGenerator,
    examples: Sequence[Example],
    mode: str,
    batch_size: int,
    max_input_tokens: int,
    max_output_tokens: int,
) -> Iterator[_Batch]:
    """Tokenized batches with decoder inputs: the reference or the model's own greedy output. A decoder-only
    model reads its own prompt format and the reference as the prompt's continuation."""
    model, tokenizer = generator.model, generator.tokenizer
    decoder_only = not generator.runner.is_encoder_decoder
    start_id = generator.runner.start_token_id
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else generator.runner.eos_token_id
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        enc = tokenizer(
            [ex.prompt(decoder_only) for ex in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_input_tokens,
        )
        input_ids, attention_mask = enc.input_ids.to(model.device), enc.attention_mask.to(model.device)
        truncated = int((attention_mask.sum(1) >= max_input_tokens).sum())
        if mode == "teacher_forced" and decoder_only:
            tokens = continuation_ids(tokenizer, [ex.target for ex in chunk], max_output_tokens)
            targets, target_mask = _padded(tokens, pad_id, model.device)
        elif mode == "teacher_forced":
            dec = tokenizer(
                text_target=[ex.target for ex in chunk],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_output_tokens,
            )
            targets, target_mask = dec.input_ids.to(model.device), dec.attention_mask.to(model.device)
        else:
            tokens = generator.generate(input_ids, attention_mask, ExitPolicy("full"), max_output_tokens).tokens
            targets, target_mask = _padded(tokens, pad_id, model.device)
        starts = torch.full_like(targets[:, :1], start_id)
        decoder_input_ids = torch.cat([starts, targets[:, :-1]], dim=1).masked_fill(
            torch.cat([torch.ones_like(starts), target_mask[:, :-1]], dim=1) == 0, pad_id
        )
        yield _Batch(input_ids, attention_mask, decoder_input_ids, targets, target_mask, truncated)


def _padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded token rows and their mask."""
    width = max(len(row) for row in rows)
    targets = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    lengths = torch.tensor([len(row) for row in rows], device=device)
    return targets, (torch.arange(width, device=device) < lengths[:, None]).long()


def example_positions(length: int, count: int) -> list[int]:
    """`count` positions spread evenly inside an output of `length` tokens, first and last
    (usually EOS) excluded, so the examples show mid-sequence tokens."""
    if length <= 2 or count <= 0:
        return list(range(min(length, count)))
    spaced = torch.linspace(0, length - 1, count + 2)[1:-1].round().long().tolist()
    return sorted(set(spaced))


def _describe_example(
    tokenizer, batch: _Batch, position: int, top_ids: Tensor, top_probs: Tensor, probs: Tensor, input_text: str
) -> dict:
    """Figure 3's data for one token: top-3 per layer, and every such token's probability at every layer."""
    strings = tokenizer.convert_ids_to_tokens
    union = list(dict.fromkeys(top_ids.flatten().tolist()))
    prefix = batch.targets[0, max(0, position - 12) : position].tolist()
    return {
        "input_index": 0,
        "position": position,
        "input": input_text[:300],
        "prefix": tokenizer.decode(prefix, skip_special_tokens=False),
        "token": strings([int(batch.targets[0, position])])[0],
        "final_prediction": strings([int(top_ids[-1, 0])])[0],
        "top3": [
            [{"token": s, "id": i, "prob": p} for s, i, p in zip(strings(ids), ids, ps)]
            for ids, ps in zip(top_ids.tolist(), top_probs.tolist())
        ],
        "traces": [{"token": s, "id": i, "probs": probs[:, i].tolist()} for s, i in zip(strings(union), union)],
    }


@torch.inference_mode()
def analyze_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    mode: str = "teacher_forced",
    *,
    label: str = "model",
    name: str = "",
    batch_size: int = 8,
    max_input_tokens: int | None = None,
    max_output_tokens: int = 128,
    example_count: int = 3,
    threshold: float = 0.9,
    min_exit_layer: int = 4,
) -> ModelAnalysis:
    """Run the monotonicity study of one model over `examples`, batch by batch."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if not examples:
        raise ValueError("no examples to analyze")
    generator = EarlyExitGenerator(model, tokenizer)
    runner = generator.runner
    stats = LayerStatistics(runner.num_layers, threshold, min_exit_layer)
    described: list[dict] = []
    sequences = truncated = 0
    batches = _batches(
        generator, examples, mode, batch_size, input_limit(tokenizer, max_input_tokens), max_output_tokens
    )
    for number, batch in enumerate(batches, start=1):
        states = runner.all_layer_states(batch.input_ids, batch.attention_mask, batch.decoder_input_ids)
        valid = batch.target_mask.bool()
        states = torch.stack([state[valid] for state in states])  # [L+1, N, d]; row 0's tokens come first
        chosen = example_positions(int(valid[0].sum()), example_count) if number == 1 else []
        final_logits = runner.logits(states[-1]).float()
        final_ids = final_logits.argmax(-1)
        per_layer, chosen_probs = [], []
        for layer in range(1, runner.num_layers + 1):
            logits = final_logits if layer == runner.num_layers else runner.logits(states[layer]).float()
            per_layer.append(layer_predictions(logits, final_ids))
            if chosen:
                chosen_probs.append(logits[chosen].softmax(-1))
        predictions = TokenPredictions.from_layers(per_layer)
        stats.add(predictions, hidden_state_saturation(states), batch.targets[valid])
        for slot, position in enumerate(chosen):
            probs = torch.stack([p[slot] for p in chosen_probs])
            described.append(
                _describe_example(
                    tokenizer,
                    batch,
                    position,
                    predictions.top_ids[:, position],
                    predictions.top_probs[:, position],
                    probs,
                    examples[0].prompt(not runner.is_encoder_decoder),
                )
            )
        sequences += batch.input_ids.shape[0]
        truncated += batch.truncated
        log.info("%s: batch %d, %d sequences, %d tokens", label, number, sequences, stats.tokens)
    if truncated:
        log.warning(
            "%s: %d of %d inputs reach the %d-token input limit and are truncated",
            label,
            truncated,
            sequences,
            input_limit(tokenizer, max_input_tokens),
        )
    return ModelAnalysis(
        label=label,
        model=name,
        mode=mode,
        num_layers=runner.num_layers,
        sequences=sequences,
        tokens=stats.tokens,
        final_top1_accuracy=stats.final_correct / max(stats.tokens, 1),
        truncated_inputs=truncated,
        layers=stats.rows(),
        heuristic=stats.heuristic_summary(),
        examples=described,
    )


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mee-bench analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint dir or hub id (repeat to overlay)")
    parser.add_argument("--label", action="append", help="a name per --model for plots and tables (default: dir name)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"one of {', '.join(TASK_NAMES)}")
    source.add_argument("--inputs", help="JSONL with `input` and `target` fields")
    parser.add_argument("--limit", type=int, help="analyze the first N examples (default: all)")
    parser.add_argument("--mode", choices=MODES, default="teacher_forced")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-input-tokens", type=int, help="truncate inputs (default: the tokenizer's max length)")
    parser.add_argument("--max-output-tokens", type=int, default=128, help="reference truncation / generation length")
    parser.add_argument("--examples", type=int, default=3, help="tokens of the first input shown in Figure 3")
    parser.add_argument("--threshold", type=float, default=0.9, help="MEE heuristic threshold")
    parser.add_argument("--min-exit-layer", type=int, default=4, help="MEE heuristic minimum exit layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    return parser


def _check_model_paths(models: Sequence[str]) -> None:
    """Fail before any model runs if one of them is a local path that is not a checkpoint."""
    for spec in models:
        try:
            check_checkpoint_path(spec)
        except ModelLoadError as err:
            raise ModelLoadError(f"--model {spec}: {err}") from None


def cli(argv: list[str]) -> int:
    """`mee-bench analyze`: run the study on every --model, write numbers, figures and a summary."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.label and len(args.label) != len(args.model):
            raise ValueError(f"{len(args.label)} --label for {len(args.model)} --model; give one per model or none")
        for name in ("limit", "batch_size", "max_output_tokens", "min_exit_layer"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        labels = args.label or [Path(m).name or m for m in args.model]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels {labels} are not unique; pass --label per model")
        need_target = args.mode == "teacher_forced"
        examples = (
            task_examples(args.task, args.limit) if args.task else file_examples(args.inputs, args.limit, need_target)
        )
        _check_model_paths(args.model)
        analyses = []
        for spec, label in zip(args.model, labels):
            note = untrained_note(spec, [args.task]) if args.task else None
            if note:
                print(note, file=sys.stderr)
            model, tokenizer = load_model(spec, args.dtype, args.device)
            analyses.append(
                analyze_model(
                    model,
                    tokenizer,
                    examples,
                    args.mode,
                    label=label,
                    name=spec,
                    batch_size=args.batch_size,
                    max_input_tokens=args.max_input_tokens,
                    max_output_tokens=args.max_output_tokens,
                    example_count=args.examples,
                    threshold=args.threshold,
                    min_exit_layer=args.min_exit_layer,
                )
            )
            del model
    except (ValueError, FileNotFoundError) as err:
        print(f"mee-bench analyze: error: {err}", file=sys.stderr)
        return 2
    from mee_bench.study.plots import summary_markdown, write_report

    config = {key: value for key, value in vars(args).items() if key not in ("label",)}
    config["labels"] = labels
    for path in write_report(analyses, args.out, config):
        print(path)
    print(summary_markdown(analyses, config))
    return 0
