"""The calibration config: a typed schema that OmegaConf checks on load, like the sweep's.

A YAML file plus `key=value` overrides become one `CalibrationConfig`; unknown keys are named
with the closest valid one, and every value Learn-then-Test cannot use (an empty or unordered
grid, delta or epsilon outside (0, 1), an unknown consistency kind, a calibration set too small
for the bound, overlapping splits that would be drawn from too few examples) fails here, before
a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig

from mee_bench.calibrate.ltt import (
    CalibrationError,
    check_calibration_size,
    check_grid_order,
    check_level,
)
from mee_bench.config_errors import ConfigError, closest, load_typed, to_typed
from mee_bench.engine.loading import DTYPES
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import KV_STRATEGIES, THRESHOLD_SCHEDULES, ExitPolicy
from mee_bench.sweep.config import ModelConfig  # the same model section as a sweep's

CONSISTENCY_KINDS = ("textual", "risk")
CONSISTENCY_METRICS = ("rougeL", "bleu", "chrf")


@dataclass
class ConsistencyConfig:
    kind: str = "textual"  # textual: distance to the full model's output; risk: quality loss vs the reference
    metric: str = "rougeL"  # the distance/quality: rougeL, or sentence-level bleu / chrf for translation


@dataclass
class SplitConfig:
    split: str = "validation"  # the task's data split to draw from
    size: int = 200  # distinct source prompts drawn


@dataclass
class RayConfig:
    num_cpus: Optional[int] = None  # CPUs of the local Ray (None = all of this machine's)
    temp_dir: Optional[str] = None  # Ray's session files; None = a short directory under /tmp


@dataclass
class CalibrationConfig:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    task: str = "tatoeba_enfr_mee"
    measures: List[str] = field(default_factory=list)
    thresholds: Dict[str, List[float]] = field(default_factory=dict)  # per measure, most conservative first
    min_exit_layer: int = 2
    threshold_schedule: str = "static"
    kv_strategy: str = "copy"
    delta: float = 0.1  # risk tolerance
    epsilon: float = 0.1  # failure probability of the guarantee
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    calibration: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 1234
    batch_size: int = 16  # calibration decodes (exits are per row, so outputs do not depend on it)
    test_batch_size: int = 1  # the test split's timed decodes: batch 1 is the paper's setting
    timing_blocks: int = 4  # full and the chosen policy alternate over this many blocks of the test split
    max_new_tokens: Optional[int] = None  # None = the task's own max_gen_toks
    workers: int = 1  # > 1: grid points run on that many Ray workers
    output_dir: Optional[str] = None  # None = results/calibration/<name>
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir else Path("results") / "calibration" / self.name)

    def policy(self, measure: str, threshold: float | None) -> ExitPolicy:
        """The exit policy of one grid point; threshold None = never exit (`full`)."""
        if threshold is None:
            return ExitPolicy("full", kv_strategy=self.kv_strategy)
        return ExitPolicy(
            measure,
            threshold,
            self.min_exit_layer,
            threshold_schedule=self.threshold_schedule,
            kv_strategy=self.kv_strategy,
        )

    @property
    def family_epsilon(self) -> float:
        """Each measure is tested at epsilon / #measures (Bonferroni), so picking the best of the
        certified measures on calibration data keeps the guarantee at epsilon."""
        return self.epsilon / len(self.measures)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> CalibrationConfig:
    """Read a calibration YAML, apply dotlist overrides (`delta=0.05`, `calibration.size=300`), validate."""
    return load_typed(
        CalibrationConfig,
        path,
        overrides,
        validate,
        what="calibration",
        example_file="configs/calibrate_quickstart.yaml",
        example_override="delta=0.05 or measures=[softmax]",
    )


def to_config(node: DictConfig | dict) -> CalibrationConfig:
    """Turn a (possibly partial) mapping into a validated CalibrationConfig."""
    return to_typed(CalibrationConfig, node, validate)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not valid; did you mean {closest(value, list(choices))!r}? (one of "
            f"{', '.join(choices)})"
        )


def validate(config: CalibrationConfig) -> None:
    """Everything that can be checked without the model or the data."""
    if not config.name or "/" in config.name:
        raise ConfigError(
            f"name={config.name!r} must be a non-empty name without '/' (it names results/calibration/<name>)"
        )
    _check_choice("model.dtype", config.model.dtype, list(DTYPES))
    _check_choice("threshold_schedule", config.threshold_schedule, THRESHOLD_SCHEDULES)
    _check_choice("kv_strategy", config.kv_strategy, KV_STRATEGIES)
    _check_choice("consistency.kind", config.consistency.kind, CONSISTENCY_KINDS)
    _check_choice("consistency.metric", config.consistency.metric, CONSISTENCY_METRICS)
    for key in ("delta", "epsilon"):
        try:
            check_level(key, getattr(config, key))
        except CalibrationError as err:
            raise ConfigError(str(err)) from None
    if not config.measures:
        raise ConfigError("empty grid: `measures` is empty; list at least one measure, e.g. measures=[softmax]")
    calibratable = sorted(name for name, measure in MEASURES.items() if measure.takes_threshold)
    for measure in config.measures:
        if measure not in calibratable:
            hint = closest(measure, calibratable)
            raise ConfigError(
                f"measure {measure!r} cannot be calibrated; did you mean {hint!r}? (one of {', '.join(calibratable)})"
            )
        grid = config.thresholds.get(measure, [])
        try:
            check_grid_order(grid)
            for threshold in grid:
                config.policy(measure, threshold)
        except ValueError as err:
            raise ConfigError(f"thresholds.{measure}: {err}") from None
    for measure in config.thresholds:
        if measure not in config.measures:
            raise ConfigError(
                f"`thresholds.{measure}` names a measure not in `measures`; add it there or drop the grid"
            )
    if config.min_exit_layer < 1:
        raise ConfigError(f"min_exit_layer={config.min_exit_layer} must be >= 1")
    for key in ("batch_size", "test_batch_size", "timing_blocks", "workers"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)} must be >= 1")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={config.max_new_tokens} must be >= 1 (or null for the task's own)")
    for key in ("calibration", "test"):
        if getattr(config, key).size < 1:
            raise ConfigError(f"{key}.size={getattr(config, key).size} must be >= 1")
    try:
        check_calibration_size(config.calibration.size, config.delta, config.family_epsilon)
    except CalibrationError as err:
        raise ConfigError(f"calibration.size: {err}") from None
