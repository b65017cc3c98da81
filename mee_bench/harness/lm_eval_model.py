"""The lm-evaluation-harness adapter `mee`: early-exit greedy generation behind lm-eval's `LM`.

Early exit changes generation only. `generate_until` runs the early-exit decoder under the
current `ExitPolicy` and records efficiency figures per lm-eval task; `loglikelihood` and
`loglikelihood_rolling` are teacher-forced through the full model (every decoder layer), so
multiple-choice and perplexity tasks score the model itself, whatever the policy.

One model load serves many policies: `set_policy` switches the exit policy, and
`reset_efficiency` / `efficiency_report` frame the figures of one evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy model registry before `mee` joins it)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mee_bench.engine.decoding import GenerationStats, input_limit
from mee_bench.engine.loading import ModelLoadError, load_generator, resolve_device, resolve_dtype
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import TASKS_DIR

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

TRAIN_DEFAULT_COMMAND = "mee-bench train configs/train/default.yaml"
POLICY_ARGS = (
    "measure", "threshold", "min_exit_layer", "threshold_schedule", "tau", "kv_strategy", "vocab_top_k", "decoding",
    "max_draft",
)
MODEL_ARGS = (
    "pretrained", *POLICY_ARGS, "dtype", "device", "batch_size", "max_length", "heads", "max_gen_toks",
    "trust_remote_code",
)
GREEDY_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}
UNNAMED_TASK = "unnamed"


@dataclass
class TaskEfficiency:
    """What the generate_until requests of one task cost, summed over batches."""

    stats: GenerationStats
    requests: int = 0
    wall_s: float = 0.0

    def add(self, stats: GenerationStats, requests: int, wall_s: float) -> None:
        self.stats = self.stats.merge(stats)
        self.requests += requests
        self.wall_s += wall_s

    def as_dict(self) -> dict:
        figures = self.stats.as_dict()
        figures.update(
            requests=self.requests,
            wall_ms=1e3 * self.wall_s,
            wall_ms_per_token=1e3 * self.wall_s / max(self.stats.tokens, 1),
        )
        return figures


@register_model("mee")
class MEELM(TemplateLM):
    """lm-eval model `mee`: a T5-family checkpoint decoded greedily with early exits.

    model_args: pretrained (directory or hub id; default: the embedded default model),
    measure, threshold, min_exit_layer, threshold_schedule, tau, kv_strategy, vocab_top_k,
    decoding, max_draft (the `ExitPolicy`; unset ones keep its defaults), dtype, device, batch_size, max_length
    (encoder input tokens), heads (exit heads file; default: beside the model),
    max_gen_toks (when a task sets none), trust_remote_code.
    """

    backend = "seq2seq"

    def __init__(
        self,
        pretrained: str | None = None,
        measure: str | None = None,
        threshold: float | None = None,
        min_exit_layer: int | None = None,
        threshold_schedule: str | None = None,
        tau: float | None = None,
        kv_strategy: str | None = None,
        vocab_top_k: int | None = None,
        decoding: str | None = None,
        max_draft: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        heads: str | None = None,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args for --model mee: {', '.join(sorted(unknown))}; valid ones: {', '.join(MODEL_ARGS)}"
            )
        given = dict(zip(POLICY_ARGS, (
            measure, threshold, min_exit_layer, threshold_schedule, tau, kv_strategy, vocab_top_k, decoding, max_draft
        )))
        policy = ExitPolicy(**{name: value for name, value in given.items() if value is not None})
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        requested_max_length = None if max_length is None else _positive_int("max_length", max_length)
        resolve_dtype(dtype)
        self._device = resolve_device(device, cpu_fallback=True)
        if pretrained is None and not DEFAULT_MODEL_DIR.is_dir():
            raise ModelLoadError(
                f"the embedded default model is not at {DEFAULT_MODEL_DIR} yet: train it with "
                f"`{TRAIN_DEFAULT_COMMAND}`, or pass --model_args pretrained=PATH_OR_HUB_ID"
            )
        self.pretrained = str(pretrained or DEFAULT_MODEL_DIR)
        self.generator = load_generator(self.pretrained, dtype, str(self._device), heads, False, trust_remote_code)
        self.model, self.tokenizer = self.generator.model, self.generator.tokenizer
        self.heads_path = self.generator.heads_path
        self._max_length = input_limit(self.tokenizer, requested_max_length)
        self.set_policy(policy)
        self._efficiency: dict[str, TaskEfficiency] = {}

    # Policy and efficiency: the sweep's interface.

    def set_policy(self, policy: ExitPolicy) -> None:
        """Switch the exit policy without reloading the model; it must fit this model and its heads."""
        if policy.needs_heads and self.generator.heads is None:
            raise ValueError(
                f"measure {policy.measure!r} needs trained exit heads and none were found beside {self.pretrained}; "
                "train them with `mee-bench train-heads MODEL` or pass heads=PATH"
            )
        policy.check_model(self.generator.num_layers)
        self.policy = policy

    def reset_efficiency(self) -> None:
        """Forget the efficiency figures gathered so far (start of an evaluation)."""
        self._efficiency = {}

    def efficiency_report(self) -> dict[str, dict]:
        """lm-eval task name -> efficiency figures of its generate_until requests since the last reset."""
        return {task: figures.as_dict() for task, figures in self._efficiency.items()}

    def get_model_info(self) -> dict:
        """Recorded by lm-eval under the results' `config`."""
        return {
            "pretrained": self.pretrained,
            "model_dtype": str(self.generator.runner.dtype),
            "model_device": str(self.device),
            "decoder_layers": self.generator.num_layers,
            "exit_heads": str(self.heads_path) if self.heads_path else None,
            "mee_policy": self.policy.as_dict(),
        }

    # What lm-eval reads.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """T5 token ids; the encoder side keeps the tokenizer's EOS unless told otherwise."""
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False, verbose=False)

    def _fit_encoder_input(self, ids: list[int]) -> list[int]:
        """Cut the end off inputs longer than `max_length`, keeping the closing EOS: a T5 prompt
        starts with its task prefix (`summarize:`), which must survive."""
        if len(ids) <= self.max_length:
            return ids
        return ids[: self.max_length - 1] + ids[-1:]

    # Generation: early exit.

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy early-exit generation, batched per (task, generation kwargs), longest prompts first
        (lm-eval's own `Collator` groups, orders and restores the order).

        Results come back in request order; stop strings (`until`) end a row as soon as they
        appear and are cut from the text, as lm-eval's own models do.
        """
        if not requests:
            return []
        kwargs_by_key = {_kwargs_key(request): request.args[1] for request in requests}
        settings = {key: _greedy_settings(kwargs, self.max_gen_toks) for key, kwargs in kwargs_by_key.items()}
        encoded = self.tokenizer([request.args[0] for request in requests], verbose=False).input_ids
        too_long = sum(len(ids) > self.max_length for ids in encoded)
        if too_long:
            log.warning(
                "%d of %d prompts exceed max_length=%d tokens; their ends are cut (set max_length to change it)",
                too_long, len(requests), self.max_length,
            )
        collator = Collator(
            list(zip(requests, (self._fit_encoder_input(ids) for ids in encoded))),
            sort_fn=lambda item: -len(item[1]),
            group_fn=lambda item: {"task": item[0].task_name or UNNAMED_TASK, "gen_kwargs": _kwargs_key(item[0])},
            group_by="gen_kwargs",
        )
        texts: list[str] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests (mee)")
        for batch in collator.get_batched(n=self.batch_size):
            first = batch[0][0]
            until, max_gen_toks = settings[_kwargs_key(first)]
            started = time.perf_counter()
            batch_texts, stats = self._generate_batch([ids for _, ids in batch], until, max_gen_toks)
            wall_s = time.perf_counter() - started
            self._efficiency.setdefault(
                first.task_name or UNNAMED_TASK, TaskEfficiency(GenerationStats(stats.num_layers))
            ).add(stats, len(batch), wall_s)
            for (request, _), text in zip(batch, batch_texts):
                texts.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
            progress.update(len(batch))
        progress.close()
        return collator.get_original(texts)

    def _generate_batch(
        self, encoded: Sequence[list[int]], until: list[str], max_gen_toks: int
    ) -> tuple[list[str], GenerationStats]:
        input_ids, attention_mask = self._pad(encoded)
        output = self.generator.generate(input_ids, attention_mask, self.policy, max_gen_toks, until)
        texts = [_cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), until) for ids in output.tokens]
        return texts, output.stats

    def _pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    # Scoring: teacher-forced, full model.

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether greedy
        decoding would have produced it; batches sorted by length, answers in request order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="Scoring (mee, full model)"):
            batch = order[start : start + self.batch_size]
            for index, result in zip(batch, self._score_batch([requests[i][1:] for i in batch])):
                results[index] = result
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
        return results

    @torch.inference_mode()
    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        contexts = [self._fit_encoder_input(context) for context, _ in pairs]
        targets = [list(target) for _, target in pairs]
        if not any(targets):
            return [(0.0, True)] * len(pairs)
        input_ids, attention_mask = self._pad(contexts)
        start_id = self.generator.runner.start_token_id
        decoder_ids, _ = self._pad([[start_id] + target[:-1] for target in targets])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids).logits
        log_probs = F.log_softmax(logits.float(), dim=-1)
        scored = []
        for row, target in enumerate(targets):
            if not target:
                scored.append((0.0, True))
                continue
            expected = torch.tensor(target, device=log_probs.device)
            row_log_probs = log_probs[row, : len(target)]
            total = row_log_probs.gather(-1, expected[:, None]).sum().item()
            scored.append((total, bool((row_log_probs.argmax(-1) == expected).all())))
        return scored

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in lm-eval's disjoint rolling windows of `max_length`
        decoder tokens; each window's encoder input is the token before it (EOS for the first)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, target in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, 1)
            ):
                windows.append((None, context, target))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1; model_args may arrive as strings (`batch_size=auto` is refused here)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _kwargs_key(request: Instance) -> str:
    """A request's generation kwargs as a hashable key (requests with equal keys share batches)."""
    return json.dumps(request.args[1], sort_keys=True, default=str)


def _greedy_settings(gen_kwargs: dict, default_max_gen_toks: int) -> tuple[list[str], int]:
    """(stop strings, max new tokens) from a request's generation kwargs; anything but greedy is an error."""
    from lm_eval.models.utils import normalize_gen_kwargs

    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
    kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        asked = {name: gen_kwargs[name] for name in ("do_sample", "temperature") if name in gen_kwargs}
        raise ValueError(
            f"mee decodes greedily (early exit is defined on the argmax token), but the request asks for "
            f"sampling ({asked}); set do_sample=false / temperature=0 in the task or --gen_kwargs"
        )
    if int(kwargs.get("num_beams", 1)) != 1:
        raise ValueError(f"mee decodes greedily; num_beams={kwargs['num_beams']} is not supported")
    ignored = sorted(set(kwargs) - GREEDY_KWARGS - {"num_beams"})
    if ignored:
        log.warning("generation kwargs %s do not apply to greedy early-exit decoding and are ignored", ignored)
    until = kwargs["until"]
    until = [until] if isinstance(until, str) else list(until or [])
    if kwargs["max_gen_toks"] < 1:
        raise ValueError(f"max_gen_toks={kwargs['max_gen_toks']} must be >= 1")
    return [stop for stop in until if stop], kwargs["max_gen_toks"]


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((text.find(stop) for stop in until if stop in text), default=len(text))
    return text[:cut]


def attach_efficiency(results: dict, lm: MEELM) -> dict:
    """Put `lm`'s efficiency figures into lm-eval results as `results["mee"][task]`.

    A top-level entry keyed by task, like lm-eval's own `versions` and `n-shot`, keeps
    `results["results"]` numeric, so lm-eval's table, loggers and group averages are untouched.
    The lm-eval hook calls this after every evaluation of a `mee` model; without the hook,
    call it on `simple_evaluate`'s output.
    """
    results["mee"] = lm.efficiency_report()
    return results


def efficiency_table(block: dict[str, dict]) -> str:
    """A Markdown table of `results["mee"]`, printed after lm-eval's own tables."""
    from tabulate import tabulate

    headers = ["Task", "Requests", "Tokens", "Avg exit layer", "Decode ms/token", "Encoder ms", "Measure ms", "Exit layers"]
    rows = []
    for task, figures in block.items():
        histogram = " ".join(f"{layer}:{count}" for layer, count in figures["exit_histogram"].items())
        rows.append([
            task, figures["requests"], figures["tokens"],
            f"{figures['avg_exit_layer']:.2f} / {figures['num_layers']}",
            f"{figures['decode_ms_per_token']:.2f}", f"{figures['encoder_ms']:.1f}", f"{figures['measure_ms']:.1f}",
            histogram,
        ])
    return "mee early-exit efficiency (generate_until)\n" + tabulate(rows, headers=headers, tablefmt="github")


def task_manager(include_path: str | Path | list[str | Path] | None = None, **kwargs: Any) -> TaskManager:
    """An lm-eval `TaskManager` that knows the `*_mee` tasks and the `mee` group, hook or not."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    return TaskManager(include_path=[TASKS_DIR, *extra], **kwargs)
