"""The lm-evaluation-harness adapter `mee`: early-exit greedy generation behind lm-eval's `LM`.

Early exit changes generation only. `generate_until` runs the early-exit decoder under the
current `ExitPolicy` and records efficiency figures per lm-eval task; `loglikelihood` and
`loglikelihood_rolling` are teacher-forced through the full model (every decoder layer), so
multiple-choice and perplexity tasks score the model itself, whatever the policy.

Either kind of checkpoint serves: an encoder-decoder (T5 family; lm-eval's `seq2seq`
backend) or a decoder-only model (Llama family, GPT-2; the `causal` backend, tokenized and
scored exactly as lm-eval's own `hf` model does). A decoder-only model reads the project
tasks in the catalogue's causal prompt format, since T5's task prefixes mean nothing to it.

One model load serves many policies: `set_policy` switches the exit policy, and
`reset_efficiency` / `efficiency_report` frame the figures of one evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy model registry before `mee` joins it)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, has_bos_prefix, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mee_bench.engine.decoding import input_limit
from mee_bench.engine.generation import GenerationStats
from mee_bench.engine.loading import ModelLoadError, load_generator, resolve_device, resolve_dtype
from mee_bench.engine.policy import ExitPolicy, read_policy_file, shipped_policy_path
from mee_bench.engine.steps import Steps, run_steps
from mee_bench.harness import catalogue
from mee_bench.harness.batch_size import BatchSize
from mee_bench.harness.catalogue import TASKS_DIR
from mee_bench.harness.chat import apply_chat_template
from mee_bench.harness.trained_for import untrained_note
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.timing.load import LoadMonitor
from mee_bench.timing.pairing import PairedBlocks
from mee_bench.timing.statistics import Speedup

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

TRAIN_DEFAULT_COMMAND = "mee-bench train configs/train/default.yaml"
WARM_UP_TOKENS = 4  # generated per row by the untimed warm-up of paired timing
PROBE_STEPS = 3  # decode steps of batch_size=auto's memory probe
TIMING_ARGS = ("paired_timing", "timing_precision", "timing_allowance_s", "timing_min_repeats")
POLICY_ARGS = (
    "measure",
    "threshold",
    "min_exit_layer",
    "threshold_schedule",
    "tau",
    "kv_strategy",
    "vocab_top_k",
    "decoding",
    "max_draft",
)
MODEL_ARGS = (
    "pretrained",
    *POLICY_ARGS,
    "calibration",
    "dtype",
    "device",
    "batch_size",
    "max_batch_size",
    "max_length",
    "heads",
    "max_gen_toks",
    "trust_remote_code",
    *TIMING_ARGS,
)
GREEDY_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}
UNNAMED_TASK = "unnamed"
LM_EVAL_FLAGS = ("device", "batch_size", "max_batch_size")  # what lm-eval passes besides model_args


class ModelArgsError(ValueError):
    """A `--model_args` value the adapter cannot use; the lm-eval hook ends the CLI with this one line."""


POSITION_LIMIT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # what lm-eval's `hf` model reads
FALLBACK_CAUSAL_LENGTH = 2048  # lm-eval's `hf` default when neither the config nor the tokenizer says


@dataclass
class TaskEfficiency:
    """What the generate_until requests of one task cost, summed over batches."""

    stats: GenerationStats
    requests: int = 0
    wall_s: float = 0.0
    paired: Speedup | None = None  # the policy against `full` on the same batches (paired_timing=true)
    paired_timings: dict | None = None  # the raw block times behind `paired`, to recompute it from the record
    load: dict | None = None  # the machine's load while this task's requests ran

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
        if self.paired is not None:
            figures["paired_speedup"] = self.paired.as_dict()
            figures["paired_timings"] = self.paired_timings
        if self.load is not None:
            figures["load"] = self.load
        return figures


@register_model("mee")
class MEELM(TemplateLM):
    """lm-eval model `mee`: a T5-family or decoder-only checkpoint decoded greedily with early exits.

    model_args: pretrained (directory or hub id of either kind; default: the embedded default model),
    measure, threshold, min_exit_layer, threshold_schedule, tau, kv_strategy, vocab_top_k,
    decoding, max_draft (the `ExitPolicy`), calibration (a `mee-bench calibrate` record or exit_policy.json whose policy
    to run), dtype, device, batch_size (a number, `auto` or `auto:N` as lm-eval's `hf` model reads them:
    `batch_size.py`), max_batch_size (where `auto` starts), max_length (encoder input tokens; for a decoder-only
    model prompt and generated tokens together, as lm-eval's `hf` model counts them), heads (exit heads
    file; default: beside the model), max_gen_toks (when a task sets none), trust_remote_code;
    paired_timing (time every batch against `full` on the same inputs, token by token in turn, and report
    the ratio of ms per generated token with its 95% timing-noise interval), timing_precision (the
    interval's relative half-width to reach, default 0.05), timing_allowance_s (re-timing
    per task stops after this, once timing_min_repeats batches were re-timed; default 60) and
    timing_min_repeats (batches re-timed at least, for the noise estimate; default 10, at least 2).

    With no measure and no calibration, the policy is the one the model ships beside its
    weights (`exit_policy.json`) if any, else `full`; the other policy args adjust it. Which
    one runs is printed and recorded under `mee_policy_source`.
    """

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
        calibration: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | str | None = None,
        max_length: int | None = None,
        heads: str | None = None,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        paired_timing: bool | str = False,
        timing_precision: float = 0.05,
        timing_allowance_s: float = 60.0,
        timing_min_repeats: int = 10,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args for --model mee: {', '.join(sorted(unknown))}; valid ones: {', '.join(MODEL_ARGS)}"
            )
        given = dict(
            zip(
                POLICY_ARGS,
                (
                    measure,
                    threshold,
                    min_exit_layer,
                    threshold_schedule,
                    tau,
                    kv_strategy,
                    vocab_top_k,
                    decoding,
                    max_draft,
                ),
            )
        )
        given = {name: value for name, value in given.items() if value is not None}
        self._batch = BatchSize.parse(batch_size, max_batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        requested_max_length = None if max_length is None else _positive_int("max_length", max_length)
        self.paired_timing = _flag("paired_timing", paired_timing)
        self.timing_precision = _positive_float("timing_precision", timing_precision)
        self.timing_allowance_s = _positive_float("timing_allowance_s", timing_allowance_s)
        self.timing_min_repeats = _positive_int("timing_min_repeats", timing_min_repeats)
        if self.timing_min_repeats < 2:
            raise ValueError(
                f"timing_min_repeats={timing_min_repeats} must be at least 2: the noise estimate needs repeats"
            )
        resolve_dtype(dtype)
        self._device = resolve_device(device, cpu_fallback=True)
        if pretrained is None and not DEFAULT_MODEL_DIR.is_dir():
            raise ModelLoadError(
                f"the embedded default model is not at {DEFAULT_MODEL_DIR} yet: train it with "
                f"`{TRAIN_DEFAULT_COMMAND}`, or pass --model_args pretrained=PATH_OR_HUB_ID"
            )
        self.pretrained = str(pretrained or DEFAULT_MODEL_DIR)
        policy, self.policy_source = _resolve_policy(given, calibration, self.pretrained)
        print(f"mee: exit policy from {self.policy_source}: {_describe_policy(policy)}", file=sys.stderr)
        self.generator = load_generator(self.pretrained, dtype, str(self._device), heads, False, trust_remote_code)
        self.model, self.tokenizer = self.generator.model, self.generator.tokenizer
        self.heads_path = self.generator.heads_path
        self.decoder_only = not self.generator.runner.is_encoder_decoder
        self.backend = "causal" if self.decoder_only else "seq2seq"
        self._max_length = (
            self._causal_length(requested_max_length)
            if self.decoder_only
            else input_limit(self.tokenizer, requested_max_length)
        )
        log.info("mee: loaded %s, a %s %s model", self.pretrained, self.model_kind, self.model.config.model_type)
        self.set_policy(policy)
        self._efficiency: dict[str, TaskEfficiency] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MEELM":
        """lm-eval's constructor from `--model_args`; see `create_from_arg_obj`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "MEELM":
        """The adapter from model_args and lm-eval's own flags (`device`, `batch_size`, `max_batch_size`).

        lm-eval always passes its flags besides the model_args, so a model arg of the same name
        wins (and the log says so) instead of colliding; a bad value becomes a `ModelArgsError`.
        """
        args = dict(arg_dict)
        for name, value in (additional_config or {}).items():
            if value is None:
                continue
            if name in args:
                if str(args[name]) != str(value):
                    log.warning("model_args %s=%s wins over lm-eval's --%s %s", name, args[name], name, value)
            else:
                log.info("%s=%s from lm-eval's --%s flag", name, value, name)
                args[name] = value
        try:
            return cls(**args)
        except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
            raise ModelArgsError(f"--model mee: {err}") from err

    # Policy and efficiency: the sweep's interface.

    def set_policy(self, policy: ExitPolicy) -> None:
        """Switch the exit policy without reloading the model; it must fit this model and its heads."""
        if policy.needs_heads and self.generator.heads is None:  # reads the heads file on first need
            raise ValueError(
                f"measure {policy.measure!r} needs trained exit heads and none were found beside {self.pretrained}; "
                "train them with `mee-bench train-heads MODEL` or pass heads=PATH"
            )
        policy.check_model(self.generator.num_layers)
        self.policy = policy

    @property
    def model_kind(self) -> str:
        return "decoder-only" if self.decoder_only else "encoder-decoder"

    def _causal_length(self, requested: int | None) -> int:
        """A decoder-only model's context: as lm-eval's `hf` model finds it (config, then tokenizer)."""
        if requested:
            return requested
        for key in POSITION_LIMIT_KEYS:
            if isinstance(getattr(self.model.config, key, None), int):
                return getattr(self.model.config, key)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else FALLBACK_CAUSAL_LENGTH

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
            "model_kind": self.model_kind,
            "model_type": self.model.config.model_type,
            "model_dtype": str(self.generator.runner.dtype),
            "model_device": str(self.device),
            "decoder_layers": self.generator.num_layers,
            "exit_heads": str(self.heads_path) if self.heads_path else None,
            "mee_policy": self.policy.as_dict(),
            "mee_policy_source": self.policy_source,
        }

    # What lm-eval reads.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS where the tokenizer has one, else EOS (as lm-eval's `hf`)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        """The batch size, or `auto` / `auto:N` as given (what lm-eval's `hf` model reports)."""
        return self._batch.fixed or self._batch.describe()

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Every size `auto` chose so far: lm-eval records them with the results (`batch_sizes`)."""
        return self._batch.chosen

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's `--apply_chat_template` (with `--system_instruction`, `--fewshot_as_multiturn`): the
        history rendered as lm-eval's `hf` model renders it (`chat.py`)."""
        return apply_chat_template(self.tokenizer, self.pretrained, chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids with the tokenizer's special tokens unless told otherwise (T5's encoder side keeps its
        EOS). A decoder-only model's text that already starts with the prefix token gets none, as
        lm-eval's `hf` model encodes it."""
        add = add_special_tokens is not False
        if add_special_tokens is None and self.decoder_only:
            add = not has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add, verbose=False)

    def _fit_prompt(self, ids: list[int], room: int = 0) -> list[int]:
        """A prompt cut to `max_length` (less `room` for generated tokens). T5: the end goes, keeping
        the closing EOS, since a T5 prompt starts with its task prefix (`summarize:`). Decoder-only:
        the start goes, since the model continues the prompt's end."""
        limit = max(self.max_length - room, 1)
        if len(ids) <= limit:
            return ids or [self.prefix_token_id]
        if self.decoder_only:
            return ids[-limit:]
        return ids[: limit - 1] + ids[-1:]

    def _prompt(self, request: Instance) -> str:
        """The request's context; for a decoder-only model on a zero-shot project task, the catalogue's
        causal prompt of the same record instead of T5's."""
        context = request.args[0]
        if not self.decoder_only or request.task_name not in catalogue.TASK_NAMES or request.doc is None:
            return context
        spec = catalogue.task(request.task_name)
        return spec.causal_prompt(request.doc) if context == spec.prompt(request.doc) else context

    def _stops(self, request: Instance, until: list[str]) -> list[str]:
        """A decoder-only model also stops where the catalogue says a project task's answer ends."""
        if not self.decoder_only or request.task_name not in catalogue.TASK_NAMES:
            return until
        return until + [stop for stop in catalogue.task(request.task_name).causal_until if stop not in until]

    # Generation: early exit.

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy early-exit generation, batched per (task, generation kwargs), longest prompts first
        (lm-eval's own `Collator` groups, orders and restores the order).

        Results come back in request order; stop strings (`until`) end a row as soon as they
        appear and are cut from the text, as lm-eval's own models do.
        """
        if not requests:
            return []
        note = untrained_note(self.pretrained, [request.task_name for request in requests if request.task_name])
        if note:
            log.warning(note.removeprefix("note: "))
        kwargs_by_key = {_kwargs_key(request): request.args[1] for request in requests}
        settings = {key: _greedy_settings(kwargs, self.max_gen_toks) for key, kwargs in kwargs_by_key.items()}
        prompts = [self._prompt(request) for request in requests]
        if self.decoder_only:
            encoded = [self.tok_encode(prompt) for prompt in prompts]
        else:
            encoded = self.tokenizer(prompts, verbose=False).input_ids
        too_long = sum(len(ids) > self.max_length for ids in encoded)
        if too_long:
            log.warning(
                "%d of %d prompts exceed max_length=%d tokens; their ends are cut (set max_length to change it)",
                too_long,
                len(requests),
                self.max_length,
            )
        room = {key: settings[key][1] if self.decoder_only else 0 for key in settings}
        collator = Collator(
            [(request, self._fit_prompt(ids, room[_kwargs_key(request)])) for request, ids in zip(requests, encoded)],
            sort_fn=lambda item: -len(item[1]),
            group_fn=lambda item: {"task": item[0].task_name or UNNAMED_TASK, "gen_kwargs": _kwargs_key(item[0])},
            group_by="gen_kwargs",
        )
        texts: list[str] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests (mee)")
        timers: dict[str, PairedBlocks] = {}
        monitors: dict[str, LoadMonitor] = {}

        def probe(size: int, item: tuple[Instance, list[int]]) -> None:
            until, max_gen_toks = settings[_kwargs_key(item[0])]
            self._probe(self._batch_steps([item[1]] * size, until, max_gen_toks, ExitPolicy("full")))

        batch_fn = None if self._batch.fixed else self._batch.scheduler(probe, self.device)
        for batch in collator.get_batched(n=self._batch.fixed or 0, batch_fn=batch_fn):
            first = batch[0][0]
            task = first.task_name or UNNAMED_TASK
            until, max_gen_toks = settings[_kwargs_key(first)]
            until = self._stops(first, until)
            work = ([ids for _, ids in batch], until, max_gen_toks)
            if task not in monitors:
                monitors[task] = LoadMonitor(threads=torch.get_num_threads()).start()
            started = time.perf_counter()
            if self.paired_timing:
                if task not in timers:
                    timers[task] = self._paired_blocks(work)
                batch_texts, stats = timers[task].run(work)
            else:
                batch_texts, stats = self._generate_batch(*work)
            wall_s = time.perf_counter() - started
            self._efficiency.setdefault(task, TaskEfficiency(GenerationStats(stats.num_layers))).add(
                stats, len(batch), wall_s
            )
            for (request, _), text in zip(batch, batch_texts):
                texts.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
            progress.update(len(batch))
        progress.close()
        for task, paired in timers.items():
            self._efficiency[task].paired = paired.speedup()
            self._efficiency[task].paired_timings = paired.timer.samples()
        for task, monitor in monitors.items():
            self._efficiency[task].load = monitor.stop()
        return collator.get_original(texts)

    def _paired_blocks(self, warm_up_work: tuple) -> PairedBlocks:
        """Times each batch of the policy against `full` on the same inputs (after one untimed
        warm-up of both, a few tokens of the first batch: enough for every first-call cost, such as
        reading exit heads or building a copy of the LM head), so the speedup does not carry the
        machine's drift between runs."""
        full = ExitPolicy("full")
        encoded, until, max_gen_toks = warm_up_work
        self._generate_batch(encoded, until, min(max_gen_toks, WARM_UP_TOKENS), policy=full)
        self._generate_batch(encoded, until, min(max_gen_toks, WARM_UP_TOKENS))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        early_exit = self.policy.decoding == "early_exit"
        return PairedBlocks(
            # `full` decodes on past its own end until stopped (one row; see `decode_steps`), so both
            # sides cover exactly the policy's positions
            baseline=lambda work: self._batch_steps(*work, policy=full, until_truncated=early_exit),
            candidate=lambda work: self._batch_steps(*work),
            target_half_width=self.timing_precision,
            allowance_s=self.timing_allowance_s,
            min_repeats=self.timing_min_repeats,
            sync=sync,
            units=lambda result: (
                result[1].tokens
            ),  # ms per generated token: a policy that writes more is not slower for it
            lockstep=True,  # the two decodes take turns token by token: drift lands on both alike
            # `full` stops where an early-exit policy did: every timed step paired, at the same positions
            # (self-speculation writes `full`'s tokens, several a step: its baseline runs to its end)
            truncate_baseline=early_exit,
        )

    @staticmethod
    def _probe(steps: Steps) -> None:
        """A few steps of a batch's decode, its whole cache allocated (`batch_size=auto`'s memory probe)."""
        for _ in range(PROBE_STEPS):
            try:
                next(steps)
            except StopIteration:
                break
        steps.close()

    def _generate_batch(
        self, encoded: Sequence[list[int]], until: list[str], max_gen_toks: int, policy: ExitPolicy | None = None
    ) -> tuple[list[str], GenerationStats]:
        return run_steps(self._batch_steps(encoded, until, max_gen_toks, policy))

    def _batch_steps(
        self,
        encoded: Sequence[list[int]],
        until: list[str],
        max_gen_toks: int,
        policy: ExitPolicy | None = None,
        until_truncated: bool = False,
    ) -> Steps[tuple[list[str], GenerationStats]]:
        """One batch's texts and figures, decoded a step at a time (for lockstep timing)."""
        input_ids, attention_mask = self._pad(encoded)
        output = yield from self.generator.decode_steps(
            input_ids, attention_mask, policy or self.policy, max_gen_toks, until, until_truncated
        )
        texts = [
            postprocess_generated_text(self.tokenizer.decode(ids, skip_special_tokens=True), until, None)
            for ids in output.tokens
        ]
        return texts, output.stats

    def _pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding for T5 and for scoring; a decoder-only prompt is left-padded by its runner."""
        width = max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
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
        pairs = [requests[i][1:] for i in order]
        batch_size = self._batch.scheduler(lambda size, pair: self._score_batch([pair] * size), self.device)
        progress = tqdm(total=len(order), disable=disable_tqdm, desc="Scoring (mee, full model)")
        start = 0
        while start < len(order):
            batch = order[start : start + batch_size(start, pairs)]
            for index, result in zip(batch, self._score_batch([requests[i][1:] for i in batch])):
                results[index] = result
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
            start += len(batch)
            progress.update(len(batch))
        progress.close()
        return results

    @torch.inference_mode()
    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        if self.decoder_only:
            return self._score_causal_batch(pairs)
        contexts = [self._fit_prompt(context) for context, _ in pairs]
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

    def _score_causal_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """lm-eval `hf`'s causal scoring: context and continuation as one sequence cut to the last
        `max_length + 1` tokens, the last one dropped, right-padded with no attention mask (causal
        attention never looks right); the continuation's log-probabilities are read off its end."""
        inputs = [(list(context) + list(target))[-(self.max_length + 1) :][:-1] for context, target in pairs]
        input_ids, _ = self._pad(inputs)
        log_probs = F.log_softmax(self.model(input_ids).logits.float(), dim=-1)
        scored = []
        for row, ((_, target), tokens) in enumerate(zip(pairs, inputs)):
            if not target:
                scored.append((0.0, True))
                continue
            expected = torch.tensor(target, device=log_probs.device)
            row_log_probs = log_probs[row, len(tokens) - len(target) : len(tokens)]
            total = row_log_probs.gather(-1, expected[:, None]).sum().item()
            scored.append((total, bool((row_log_probs.argmax(-1) == expected).all())))
        return scored

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in lm-eval's disjoint rolling windows of `max_length`
        decoder tokens; each window's context (T5: its encoder input) is the token before it, the
        prefix token (EOS for T5) for the first."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, target in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, context, target))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


def _resolve_policy(given: dict[str, Any], calibration: str | None, pretrained: str) -> tuple[ExitPolicy, str]:
    """The policy to start with and where it came from: a calibration file, the policy args,
    the model's shipped `exit_policy.json` (when no measure is named), or `full`."""
    if calibration is not None:
        if given:
            raise ValueError(
                f"model_args name both calibration= and {', '.join(sorted(given))}; a calibrated policy is used as "
                "calibrated: drop one of them"
            )
        try:
            return read_policy_file(calibration)[0], f"calibration {calibration}"
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"calibration={calibration}: {err}") from None
    if "measure" in given:
        return ExitPolicy(**given), "model_args"
    local = Path(pretrained).expanduser()
    shipped = shipped_policy_path(local if local.is_dir() else None)
    if shipped is None:
        return ExitPolicy(
            **{"measure": "full", **given}
        ), "the default (no measure in model_args, no exit_policy.json beside the model)"
    try:
        policy = read_policy_file(shipped)[0]
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"the model's shipped policy {shipped} cannot be read ({err}); fix it or pass measure=..."
        ) from None
    return dataclasses.replace(policy, **given), f"the model's shipped policy {shipped}"


def _describe_policy(policy: ExitPolicy) -> str:
    if policy.measure == "full":
        return "full (every token runs every decoder layer)"
    return (
        f"{policy.measure}, threshold {policy.threshold}, min exit layer {policy.min_exit_layer}, {policy.kv_strategy}"
    )


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1; model_args may arrive as strings."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _positive_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ValueError(f"{name}={value!r} must be a number > 0")
    return number


def _flag(name: str, value: bool | str) -> bool:
    """A boolean model arg: lm-eval passes `true`/`false` through as strings or booleans."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use true or false")


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
    until = handle_stop_sequences(kwargs["until"], None)
    if kwargs["max_gen_toks"] < 1:
        raise ValueError(f"max_gen_toks={kwargs['max_gen_toks']} must be >= 1")
    return [stop for stop in until if stop], kwargs["max_gen_toks"]


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

    headers = [
        "Task",
        "Requests",
        "Tokens",
        "Avg exit layer",
        "Decode ms/token",
        "Encoder ms",
        "Measure ms",
        "Exit layers",
        "Speedup vs full (paired, 95%)",
    ]
    rows = []
    for task, figures in block.items():
        histogram = " ".join(f"{layer}:{count}" for layer, count in figures["exit_histogram"].items())
        paired = figures.get("paired_speedup")
        busy = " (busy machine)" if figures.get("load", {}).get("busy") else ""
        rows.append(
            [
                task,
                figures["requests"],
                figures["tokens"],
                f"{figures['avg_exit_layer']:.2f} / {figures['num_layers']}",
                f"{figures['decode_ms_per_token']:.2f}",
                f"{figures['encoder_ms']:.1f}",
                f"{figures['measure_ms']:.1f}",
                histogram,
                f"{Speedup.from_dict(paired).format()}{busy}" if paired else "paired_timing=false",
            ]
        )
    return "mee early-exit efficiency (generate_until)\n" + tabulate(rows, headers=headers, tablefmt="github")


def task_manager(include_path: str | Path | list[str | Path] | None = None, **kwargs: Any) -> TaskManager:
    """An lm-eval `TaskManager` that knows the `*_mee` tasks and the `mee` group, hook or not."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    return TaskManager(include_path=[TASKS_DIR, *extra], **kwargs)
