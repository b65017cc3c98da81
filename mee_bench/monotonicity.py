"""`mee-bench analyze`: the paper's monotonicity study (Figures 1-3) on any T5 checkpoint.

Early exiting assumes a layer's top-1 prediction, once confident, stays. We measure it:
the LM head is applied to every decoder layer's raw state, teacher-forced on references
or on the model's own greedy output, and per layer we count how often the top-1 never
changes again, how much probability the eventual prediction gets, how saturated the
hidden states are and how often MEE's "last three top-1 scores rise and reach 0.9" rule
fires and is right. The statistics are pure functions over [layers, tokens, vocab]
logits so they can be checked by hand; the driver feeds them one batch at a time and
keeps only per-layer sums, never the logits.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mee_bench.data import data_root, read_jsonl
from mee_bench.decoding import EarlyExitGenerator
from mee_bench.model import ModelLoadError, T5LayerRunner, load_model
from mee_bench.policy import ExitPolicy

log = logging.getLogger(__name__)

MODES = ("teacher_forced", "free_running")
TOP_K = 3


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's examples live and how a row becomes (T5 prompt, reference)."""

    path: str  # relative to the data root
    prompt: str  # `{dotted.field}` placeholders, list items by index: `{answers.text.0}`
    target: str  # dotted field path of the reference


# The analysis's input spec: the T5-style prompts of the project's lm-eval tasks.
ANALYSIS_TASKS: dict[str, TaskSpec] = {
    "tatoeba_enfr_mee": TaskSpec(
        "tatoeba_fra_eng/validation.jsonl", "translate English to French: {translation.en}", "translation.fr"
    ),
    "wmt15_enfr_mee": TaskSpec(
        "wmt15/validation.jsonl", "translate English to French: {translation.en}", "translation.fr"
    ),
    "squad_mee": TaskSpec("squad/validation.jsonl", "question: {question} context: {context}", "answers.text.0"),
    "cnndm_mee": TaskSpec("cnn_dailymail/validation.jsonl", "summarize: {article}", "highlights"),
    "bigpatent_mee": TaskSpec("big_patent/validation.jsonl", "summarize: {description}", "abstract"),
}


# ---------------------------------------------------------------- pure statistics


@dataclass
class TokenPredictions:
    """What the LM head says at every layer for N tokens, without the vocabulary dimension."""

    top_ids: Tensor  # [L, N, k] the k most likely tokens per layer, most likely first
    top_probs: Tensor  # [L, N, k] their probabilities
    final_prob: Tensor  # [L, N] probability of the final layer's top-1 at each layer

    @classmethod
    def from_layers(cls, per_layer: Sequence[tuple[Tensor, Tensor, Tensor]]) -> "TokenPredictions":
        """Stack `layer_predictions` results, layer 1 first."""
        return cls(*(torch.stack(parts) for parts in zip(*per_layer)))

    @property
    def top1(self) -> Tensor:
        return self.top_ids[..., 0]

    @property
    def top1_prob(self) -> Tensor:
        return self.top_probs[..., 0]


def layer_predictions(logits: Tensor, final_ids: Tensor, k: int = TOP_K) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's [N, V] logits -> (top-k ids, top-k probabilities, probability of `final_ids`)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    top = log_probs.topk(k, dim=-1)
    final_prob = log_probs.gather(-1, final_ids[:, None]).squeeze(-1).exp()
    return top.indices, top.values.exp(), final_prob


def predictions_from_logits(logits: Tensor, k: int = TOP_K) -> TokenPredictions:
    """[L, N, V] per-layer logits (layer 1 first, the final layer last) -> TokenPredictions."""
    final_ids = logits[-1].argmax(-1)
    return TokenPredictions.from_layers([layer_predictions(layer_logits, final_ids, k) for layer_logits in logits])


def top1_unchanged_after(top1: Tensor) -> Tensor:
    """[L, N] top-1 ids -> [L, N] bool: the top-1 at layer i equals the top-1 at every later layer."""
    same_as_next = torch.ones_like(top1, dtype=torch.bool)
    same_as_next[:-1] = top1[:-1] == top1[1:]
    return same_as_next.flip(0).int().cumprod(0).flip(0).bool()


def top1_matches_final(top1: Tensor) -> Tensor:
    """[L, N] top-1 ids -> [L, N] bool: the top-1 at layer i is the final layer's top-1."""
    return top1 == top1[-1:]


def rising_last_three(top1_prob: Tensor, threshold: float | None = None) -> Tensor:
    """[L, N] top-1 probabilities -> [L, N] bool: at layer i (>= 3) the top-1 probabilities of
    layers i-2 < i-1 < i strictly rise (whatever the tokens), and with `threshold` all reach it.

    This is the `monotonic_heuristic` measure's exit rule evaluated at every layer.
    """
    rising = torch.zeros_like(top1_prob, dtype=torch.bool)
    first, second, third = top1_prob[:-2], top1_prob[1:-1], top1_prob[2:]
    fires = (first < second) & (second < third)
    if threshold is not None:
        fires &= first >= threshold
    rising[2:] = fires
    return rising


def hidden_state_saturation(states: Tensor) -> Tensor:
    """[L+1, N, d] raw states (decoder input embedding first) -> [L, N] cosine of h_i and h_(i-1),
    CALM's saturation signal."""
    states = states.float()
    return F.cosine_similarity(states[1:], states[:-1], dim=-1)


class LayerStatistics:
    """Per-layer sums over any number of token batches; memory does not grow with the data."""

    def __init__(self, num_layers: int, threshold: float = 0.9, min_exit_layer: int = 4) -> None:
        self.num_layers, self.threshold, self.min_exit_layer = num_layers, threshold, min_exit_layer
        self.tokens = 0
        self.final_correct = 0
        self.sums: dict[str, Tensor] = {}
        self.heuristic = {"fired": 0, "exit_equals_final": 0, "exit_layer_sum": 0}

    def _add(self, name: str, values: Tensor) -> None:
        total = values.double().sum(-1).cpu()
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def add(
        self, predictions: TokenPredictions, saturation: Tensor | None = None, targets: Tensor | None = None
    ) -> None:
        """Add N tokens: their per-layer predictions, optional [L, N] saturation and [N] target ids."""
        if predictions.top1.shape[0] != self.num_layers:
            raise ValueError(f"predictions have {predictions.top1.shape[0]} layers, expected {self.num_layers}")
        count = predictions.top1.shape[1]
        if count == 0:
            return
        self.tokens += count
        unchanged = top1_unchanged_after(predictions.top1)
        rising = rising_last_three(predictions.top1_prob)
        confident = rising_last_three(predictions.top1_prob, self.threshold)
        self._add("no_change", unchanged)
        self._add("matches_final", top1_matches_final(predictions.top1))
        self._add("confidence", predictions.final_prob)
        self._add("confidence_sq", predictions.final_prob.double() ** 2)
        self._add("top1_prob", predictions.top1_prob)
        self._add("rising", rising)
        self._add("rising_kept", rising & unchanged)
        self._add("rising_confident", confident)
        self._add("rising_confident_kept", confident & unchanged)
        if saturation is not None:
            self._add("saturation", saturation)
            self._add("saturation_sq", saturation.double() ** 2)
        if targets is not None:
            self.final_correct += int((predictions.top1[-1] == targets).sum())
        self._add_heuristic(predictions.top1, confident)

    def _add_heuristic(self, top1: Tensor, confident: Tensor) -> None:
        """MEE's heuristic as a decoder would run it: exit at the first layer in
        [min_exit_layer, L-1] where the rule fires; count exits and whether they are right."""
        window = confident[self.min_exit_layer - 1 : self.num_layers - 1]
        if window.numel() == 0:
            self.heuristic["exit_layer_sum"] += self.num_layers * top1.shape[1]
            return
        fired = window.any(0)
        first = window.int().argmax(0) + self.min_exit_layer  # 1-based layer of the first firing
        exit_layer = torch.where(fired, first, self.num_layers)
        exit_top1 = top1.gather(0, (exit_layer - 1)[None]).squeeze(0)
        self.heuristic["fired"] += int(fired.sum())
        self.heuristic["exit_equals_final"] += int((fired & (exit_top1 == top1[-1])).sum())
        self.heuristic["exit_layer_sum"] += int(exit_layer.sum())

    def rows(self) -> list[dict]:
        """One dict per layer (1-based): fractions, means and standard deviations (ddof 0)."""
        n = max(self.tokens, 1)
        mean = {name: (total / n).tolist() for name, total in self.sums.items()}

        def std(name: str) -> list[float]:
            return [math.sqrt(max(sq - m * m, 0.0)) for m, sq in zip(mean[name], mean[f"{name}_sq"])]

        def ratio(part: str, whole: str) -> list[float]:
            return [p / w if w else math.nan for p, w in zip(self.sums[part].tolist(), self.sums[whole].tolist())]

        columns = {
            "no_change": mean["no_change"],
            "matches_final": mean["matches_final"],
            "confidence_mean": mean["confidence"],
            "confidence_std": std("confidence"),
            "top1_prob_mean": mean["top1_prob"],
            "rising": mean["rising"],
            "rising_kept": ratio("rising_kept", "rising"),
            "rising_confident": mean["rising_confident"],
            "rising_confident_kept": ratio("rising_confident_kept", "rising_confident"),
        }
        if "saturation" in self.sums:
            columns["saturation_mean"] = mean["saturation"]
            columns["saturation_std"] = std("saturation")
        undefined = {"rising", "rising_kept", "rising_confident", "rising_confident_kept"}  # need three layers
        return [
            {"layer": i + 1, **{name: math.nan if i < 2 and name in undefined else values[i]
                                for name, values in columns.items()}}
            for i in range(self.num_layers)
        ]

    def heuristic_summary(self) -> dict:
        fired, n = self.heuristic["fired"], max(self.tokens, 1)
        return {
            "min_exit_layer": self.min_exit_layer,
            "threshold": self.threshold,
            "fires": fired / n,
            "exit_equals_final": self.heuristic["exit_equals_final"] / fired if fired else math.nan,
            "mean_exit_layer": self.heuristic["exit_layer_sum"] / n,
        }


def layer_statistics(logits: Tensor, states: Tensor | None = None, threshold: float = 0.9) -> list[dict]:
    """Per-layer statistics of [L, N, V] logits (and [L+1, N, d] raw states, if given)."""
    stats = LayerStatistics(logits.shape[0], threshold)
    stats.add(predictions_from_logits(logits), None if states is None else hidden_state_saturation(states))
    return stats.rows()


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Example:
    input: str
    target: str | None


def _field(row: dict, path: str):
    value = row
    try:
        for part in path.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
    except (KeyError, IndexError, ValueError, TypeError) as err:
        raise ValueError(f"row has no field {path!r} ({err!r}); the task's data does not match ANALYSIS_TASKS") from err
    return value


def task_examples(task: str, limit: int | None = None) -> list[Example]:
    """The first `limit` (prompt, reference) pairs of a task in ANALYSIS_TASKS, from local data."""
    if task not in ANALYSIS_TASKS:
        known = ", ".join(ANALYSIS_TASKS)
        raise ValueError(f"unknown task {task!r}; known tasks: {known} (or pass --inputs FILE.jsonl)")
    spec, root = ANALYSIS_TASKS[task], data_root()
    if root is None or not (root / spec.path).is_file():
        raise FileNotFoundError(f"task {task!r} needs {spec.path} under the data root ({root}); set MEE_DATA_DIR")
    examples = []
    for row in read_jsonl(root / spec.path):
        if limit is not None and len(examples) >= limit:
            break
        prompt = re.sub(r"\{([^{}]+)\}", lambda m: str(_field(row, m.group(1))), spec.prompt)
        examples.append(Example(prompt, str(_field(row, spec.target))))
    return examples


def file_examples(path: str | Path, limit: int | None = None, need_target: bool = True) -> list[Example]:
    """Examples from a JSONL file with `input` (and, for teacher forcing, `target`) fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inputs {path} does not exist")
    fields = ("input", "target") if need_target else ("input",)
    examples = []
    for number, row in enumerate(read_jsonl(path), start=1):
        if limit is not None and len(examples) >= limit:
            break
        missing = [name for name in fields if not isinstance(row.get(name), str)]
        if missing:
            raise ValueError(f"{path}: row {number} has no string field {' or '.join(missing)}")
        examples.append(Example(row["input"], row.get("target")))
    return examples


# ---------------------------------------------------------------- driver


@dataclass
class ModelAnalysis:
    """One model's results: what is written to JSON, CSV, the summary and the plots."""

    label: str
    model: str
    mode: str
    num_layers: int
    sequences: int
    tokens: int
    final_top1_accuracy: float  # vs the reference; in free_running mode a self-check (~1, float32 near-ties aside)
    truncated_inputs: int
    layers: list[dict]
    heuristic: dict
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor
    decoder_input_ids: Tensor
    targets: Tensor  # [B, T] the token the decoder should produce at each position
    target_mask: Tensor  # [B, T] 1 for real tokens, 0 for padding
    truncated: int  # inputs that reached the input-length limit


def _max_input_tokens(tokenizer, requested: int | None) -> int:
    if requested:
        return requested
    limit = tokenizer.model_max_length
    return limit if limit and limit < 1_000_000 else 512


def _batches(model, tokenizer, examples: Sequence[Example], mode: str, batch_size: int,
             max_input_tokens: int, max_output_tokens: int) -> Iterator[_Batch]:
    """Tokenized batches with decoder inputs: the reference or the model's own greedy output."""
    start_id, pad_id = model.config.decoder_start_token_id, model.config.pad_token_id
    generator = EarlyExitGenerator(model, tokenizer) if mode == "free_running" else None
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        enc = tokenizer([ex.input for ex in chunk], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_input_tokens)
        input_ids, attention_mask = enc.input_ids.to(model.device), enc.attention_mask.to(model.device)
        truncated = int((attention_mask.sum(1) >= max_input_tokens).sum())
        if generator is None:
            dec = tokenizer(text_target=[ex.target for ex in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_output_tokens)
            targets, target_mask = dec.input_ids.to(model.device), dec.attention_mask.to(model.device)
        else:
            tokens = generator.generate(input_ids, attention_mask, ExitPolicy("full"), max_output_tokens).tokens
            width = max(len(row) for row in tokens)
            targets = torch.tensor([row + [pad_id] * (width - len(row)) for row in tokens], device=model.device)
            lengths = torch.tensor([len(row) for row in tokens], device=model.device)
            target_mask = (torch.arange(width, device=model.device) < lengths[:, None]).long()
        starts = torch.full_like(targets[:, :1], start_id)
        decoder_input_ids = torch.cat([starts, targets[:, :-1]], dim=1).masked_fill(
            torch.cat([torch.ones_like(starts), target_mask[:, :-1]], dim=1) == 0, pad_id)
        yield _Batch(input_ids, attention_mask, decoder_input_ids, targets, target_mask, truncated)


def example_positions(length: int, count: int) -> list[int]:
    """`count` positions spread evenly inside an output of `length` tokens, first and last
    (usually EOS) excluded, so the examples show mid-sequence tokens."""
    if length <= 2 or count <= 0:
        return list(range(min(length, count)))
    spaced = torch.linspace(0, length - 1, count + 2)[1:-1].round().long().tolist()
    return sorted(set(spaced))


def _describe_example(tokenizer, batch: _Batch, position: int, top_ids: Tensor, top_probs: Tensor,
                      probs: Tensor, input_text: str) -> dict:
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
def analyze_model(model, tokenizer, examples: Sequence[Example], mode: str = "teacher_forced", *, label: str = "model",
                  name: str = "", batch_size: int = 8, max_input_tokens: int | None = None,
                  max_output_tokens: int = 128, example_count: int = 3, threshold: float = 0.9,
                  min_exit_layer: int = 4) -> ModelAnalysis:
    """Run the monotonicity study of one model over `examples`, batch by batch."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if not examples:
        raise ValueError("no examples to analyze")
    runner = T5LayerRunner(model)
    stats = LayerStatistics(runner.num_layers, threshold, min_exit_layer)
    described: list[dict] = []
    sequences = truncated = 0
    batches = _batches(model, tokenizer, examples, mode, batch_size, _max_input_tokens(tokenizer, max_input_tokens),
                       max_output_tokens)
    for number, batch in enumerate(batches, start=1):
        states = runner.all_layer_states(batch.input_ids, batch.attention_mask, batch.decoder_input_ids)[1]
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
            described.append(_describe_example(tokenizer, batch, position, predictions.top_ids[:, position],
                                               predictions.top_probs[:, position], probs, examples[0].input))
        sequences += batch.input_ids.shape[0]
        truncated += batch.truncated
        log.info("%s: batch %d, %d sequences, %d tokens", label, number, sequences, stats.tokens)
    if truncated:
        log.warning("%s: %d of %d inputs reach the %d-token input limit and are truncated", label, truncated,
                    sequences, _max_input_tokens(tokenizer, max_input_tokens))
    return ModelAnalysis(
        label=label, model=name, mode=mode, num_layers=runner.num_layers, sequences=sequences, tokens=stats.tokens,
        final_top1_accuracy=stats.final_correct / max(stats.tokens, 1), truncated_inputs=truncated, layers=stats.rows(),
        heuristic=stats.heuristic_summary(), examples=described,
    )


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mee-bench analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint dir or hub id (repeat to overlay)")
    parser.add_argument("--label", action="append", help="a name per --model for plots and tables (default: dir name)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"one of {', '.join(ANALYSIS_TASKS)}")
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
        path = Path(spec).expanduser()
        looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if (path.exists() and not (path / "config.json").is_file()) or (looks_local and not path.exists()):
            raise ModelLoadError(f"--model {spec}: not a checkpoint directory (no {path / 'config.json'})")


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
        examples = (task_examples(args.task, args.limit) if args.task
                    else file_examples(args.inputs, args.limit, need_target))
        _check_model_paths(args.model)
        analyses = []
        for spec, label in zip(args.model, labels):
            model, tokenizer = load_model(spec, args.dtype, args.device)
            analyses.append(analyze_model(
                model, tokenizer, examples, args.mode, label=label, name=spec, batch_size=args.batch_size,
                max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
                example_count=args.examples, threshold=args.threshold, min_exit_layer=args.min_exit_layer,
            ))
            del model
    except (ValueError, FileNotFoundError) as err:
        print(f"mee-bench analyze: error: {err}", file=sys.stderr)
        return 2
    from mee_bench.monotonicity_plots import summary_markdown, write_report

    config = {key: value for key, value in vars(args).items() if key not in ("label",)}
    config["labels"] = labels
    for path in write_report(analyses, args.out, config):
        print(path)
    print(summary_markdown(analyses, config))
    return 0
