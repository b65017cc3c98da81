"""How one sweep trial is evaluated: the `mee` lm-eval adapter behind a small protocol.

A worker builds one backend and evaluates many trials with it; tests swap in fakes through
the same `TrialBackend` protocol, so the Ray and resume machinery is tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from mee_bench.engine.policy import ExitPolicy
from mee_bench.harness.catalogue import GROUP_NAME, TASK_NAMES
from mee_bench.sweep.config import SweepConfig, Trial, closest

OWN_TASKS = frozenset({*TASK_NAMES, GROUP_NAME})


@dataclass
class Outcome:
    metrics: dict[str, float | None]
    efficiency: dict


class TrialBackend(Protocol):
    """What a worker needs to evaluate trials; built once per worker by a factory taking the config."""

    def unknown_tasks(self, tasks: list[str]) -> dict[str, str | None]:
        """Each task the backend cannot run, with the closest one it can (or None)."""

    def warm_up(self, task: str) -> None:
        """One small untimed evaluation, so the first timed trial does not pay for cold caches."""

    def evaluate(self, trial: Trial, policy: ExitPolicy) -> Outcome:
        """Run `trial.task` under `policy`: quality metrics and the efficiency figures."""


BackendFactory = Callable[[SweepConfig], TrialBackend]


def task_metrics(results: dict) -> dict[str, float | None]:
    """lm-eval's `{"bleu,none": 12.3, "bleu_stderr,none": ...}` -> `{"bleu": 12.3}`; non-finite -> None."""
    metrics: dict[str, float | None] = {}
    for key, value in results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, filter_name = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        name = name if filter_name == "none" else f"{name},{filter_name}"
        metrics[name] = float(value) if math.isfinite(value) else None
    return metrics


def needs_builtin_tasks(tasks: Iterable[str]) -> bool:
    """Whether `tasks` name anything besides the package's own (`mee_bench/tasks`).

    Only then must a worker's TaskManager index lm-eval's ~14,000 built-in tasks (10-20 s);
    the package's own index in a moment.
    """
    return not set(tasks) <= OWN_TASKS


class LMEvalBackend:
    """The real thing: the `mee` lm-eval adapter, loaded once, switched between policies per trial."""

    def __init__(self, config: SweepConfig) -> None:
        from mee_bench.harness.lm_eval_model import MEELM, task_manager

        model = config.model
        extra = {"heads": model.heads} if model.heads else {}
        self.config = config
        self.lm = MEELM(
            pretrained=model.pretrained,
            measure="full",
            threshold_schedule=config.threshold_schedule,
            kv_strategy=config.kv_strategy,
            dtype=model.dtype,
            device=model.device,
            batch_size=config.batch_size,
            paired_timing=config.timing.paired,
            timing_precision=config.timing.precision,
            timing_allowance_s=config.timing.allowance_s,
            timing_min_repeats=config.timing.min_repeats,
            **extra,
        )
        # Decided from the config, so every worker (replacements too) indexes the same tasks.
        self.tasks = task_manager(include_defaults=needs_builtin_tasks(config.tasks))

    def unknown_tasks(self, tasks: list[str]) -> dict[str, str | None]:
        known = set(self.tasks.all_tasks)
        return {t: closest(t, sorted(known)) for t in tasks if t not in known}

    def warm_up(self, task: str) -> None:
        self._run(task, ExitPolicy(measure="full"), limit=min(2, self.config.limit or 2))

    def evaluate(self, trial: Trial, policy: ExitPolicy) -> Outcome:
        output, report = self._run(trial.task, policy, self.config.limit)
        efficiency = report.get(trial.task) or (next(iter(report.values())) if len(report) == 1 else {})
        return Outcome(task_metrics(output["results"][trial.task]), efficiency)

    def _run(self, task: str, policy: ExitPolicy, limit: int | None) -> tuple[dict, dict]:
        from lm_eval import simple_evaluate

        seed = self.config.seed
        self.lm.set_policy(policy)
        self.lm.reset_efficiency()
        output = simple_evaluate(
            model=self.lm,
            tasks=[task],
            task_manager=self.tasks,
            limit=limit,
            gen_kwargs={"max_gen_toks": self.config.max_gen_toks} if self.config.max_gen_toks else None,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        return output, self.lm.efficiency_report()
