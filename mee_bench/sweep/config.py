"""The sweep config: a typed schema that OmegaConf checks on load.

A YAML file plus `key=value` overrides (OmegaConf dotlist) become one `SweepConfig`.
Every mistake a user can make in the file is caught here, before Ray or a model starts:
an unknown key (named, with the closest valid one), a wrong type, a value out of range,
an empty grid; then, reading only the model's config and heads (`check_model`), a minimum
exit layer deeper than the model or a learned measure without heads. `expand_grid` turns
a valid config into its trials.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig

from mee_bench.config_errors import ConfigError, closest, load_typed, to_typed
from mee_bench.engine.loading import DTYPES, check_device_name
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.policy import KV_STRATEGIES, THRESHOLD_SCHEDULES, ExitPolicy, read_policy_file
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.sweep.energy import CarbonConfig, known_countries

CALIBRATED = "calibrated"  # the trial measure of a policy read from a `mee-bench calibrate` output

TRACKING_MODES = ("process", "machine")


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None  # None = the embedded default model (mee_bench/models/mee-t5-default)
    dtype: str = "float32"
    device: str = "cpu"
    heads: Optional[str] = None  # None = the exit heads saved beside the model


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start a local Ray; "host:port" or "auto" = join a running cluster
    num_cpus: Optional[int] = None  # CPUs of the local Ray (None = all of this machine's)
    cpus_per_trial: float = 1.0  # also each worker's torch threads
    gpus_per_trial: float = 0.0
    max_concurrent: Optional[int] = None  # workers; None = as many as the cluster's resources allow
    connect_timeout_s: float = 10.0
    temp_dir: Optional[str] = None  # Ray's session files; None = a short directory under /tmp


@dataclass
class TimingConfig:
    # Paired timing: every batch of a trial is also decoded by `full` in the same worker, the two
    # taking turns token by token, so the speedup does not carry the machine's drift.
    paired: bool = True
    precision: float = 0.05  # relative half-width of the 95% interval to reach
    allowance_s: float = 20.0  # timing-only rounds per trial stop after this (the interval then says how wide)
    min_repeats: int = 10  # blocks re-timed at least, even past the allowance: what the noise estimate rests on


@dataclass
class SweepConfig:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: List[str] = field(default_factory=list)
    measures: List[str] = field(default_factory=list)
    thresholds: Dict[str, List[float]] = field(default_factory=dict)
    # `mee-bench calibrate` outputs (calibration.json, an exit_policy.json or a model dir shipping
    # one): each adds a `calibrated` trial per task that runs its policy as calibrated.
    calibrated: List[str] = field(default_factory=list)
    min_exit_layers: List[int] = field(default_factory=lambda: [4])
    threshold_schedule: str = "static"
    kv_strategy: str = "copy"
    vocab_top_k: int = 0  # > 0: vocabulary-pruned checks for the measures that allow them (softmax family)
    limit: Optional[int] = None
    batch_size: int = 8
    max_gen_toks: Optional[int] = None  # None = each task's own generation length
    seed: int = 1234
    output_dir: Optional[str] = None  # None = results/<name>
    timing: TimingConfig = field(default_factory=TimingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir else Path("results") / self.name)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML, apply dotlist overrides (`limit=50`, `tasks=[squad_mee]`), validate."""
    return load_typed(
        SweepConfig,
        path,
        overrides,
        validate,
        what="sweep",
        example_file="configs/quickstart.yaml",
        example_override="limit=50 or tasks=[squad_mee]",
    )


def to_config(node: DictConfig | dict) -> SweepConfig:
    """Turn a (possibly partial) mapping into a validated SweepConfig."""
    return to_typed(SweepConfig, node, validate)


def config_dict(config: SweepConfig) -> dict:
    return dataclasses.asdict(config)


def uses_threshold(measure: str) -> bool:
    """Whether the measure's exits depend on a threshold (its class says); threshold-free measures
    get one trial per min exit layer (or one)."""
    return MEASURES[measure].takes_threshold


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not valid; did you mean {closest(value, list(choices))!r}? (one of "
            f"{', '.join(choices)})"
        )


def _check_carbon(carbon: CarbonConfig) -> None:
    _check_choice("carbon.tracking_mode", carbon.tracking_mode, TRACKING_MODES)
    if carbon.measure_power_secs <= 0:
        raise ConfigError(f"carbon.measure_power_secs={carbon.measure_power_secs} must be > 0")
    if carbon.country_iso_code is None:
        if carbon.offline:
            raise ConfigError(
                "carbon.country_iso_code is required for offline carbon accounting: set the ISO 3166-1 alpha-3 "
                "code of where the sweep runs, e.g. carbon.country_iso_code=FRA"
            )
        return
    countries = known_countries()
    if carbon.country_iso_code not in countries:
        raise ConfigError(
            f"carbon.country_iso_code={carbon.country_iso_code!r} is not a country CodeCarbon knows; "
            f"use an ISO 3166-1 alpha-3 code, e.g. {closest(carbon.country_iso_code.upper(), sorted(countries))!r}"
        )


def _check_ray(ray: RayConfig) -> None:
    if ray.cpus_per_trial <= 0:
        raise ConfigError(f"ray.cpus_per_trial={ray.cpus_per_trial} must be > 0")
    if ray.gpus_per_trial < 0:
        raise ConfigError(f"ray.gpus_per_trial={ray.gpus_per_trial} must be >= 0")
    for key in ("num_cpus", "max_concurrent"):
        value = getattr(ray, key)
        if value is not None and value < 1:
            raise ConfigError(f"ray.{key}={value} must be >= 1 (or null)")
    if ray.connect_timeout_s <= 0:
        raise ConfigError(f"ray.connect_timeout_s={ray.connect_timeout_s} must be > 0")


def validate(config: SweepConfig) -> None:
    """Everything that can be checked without the model or a cluster."""
    if not config.name or "/" in config.name:
        raise ConfigError(f"name={config.name!r} must be a non-empty name without '/' (it names results/<name>)")
    _check_choice("model.dtype", config.model.dtype, list(DTYPES))
    try:
        check_device_name(config.model.device)
    except ValueError as err:
        raise ConfigError(f"model.{err}") from None
    _check_choice("threshold_schedule", config.threshold_schedule, THRESHOLD_SCHEDULES)
    _check_choice("kv_strategy", config.kv_strategy, KV_STRATEGIES)
    if not isinstance(config.vocab_top_k, int) or config.vocab_top_k < 0 or config.vocab_top_k == 1:
        raise ConfigError(f"vocab_top_k={config.vocab_top_k!r} must be 0 (off) or an integer >= 2, e.g. vocab_top_k=64")
    if not config.tasks:
        raise ConfigError("empty grid: `tasks` is empty; list at least one task, e.g. tasks=[tatoeba_enfr_mee]")
    if not config.measures and not config.calibrated:
        raise ConfigError("empty grid: `measures` is empty; list at least one measure, e.g. measures=[softmax]")
    for path in config.calibrated:
        try:
            read_policy_file(path)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"`calibrated` entry {path}: {err}") from None
    valid_measures = sorted(MEASURES)
    for measure in config.measures:
        if measure not in MEASURES:
            raise ConfigError(
                f"unknown measure {measure!r} in `measures`; did you mean {closest(measure, valid_measures)!r}?"
            )
    for measure in config.thresholds:
        if measure not in MEASURES:
            raise ConfigError(
                f"`thresholds.{measure}`: unknown measure; did you mean {closest(measure, valid_measures)!r}?"
            )
    for measure in config.measures:
        if uses_threshold(measure) and not config.thresholds.get(measure):
            raise ConfigError(
                f"empty grid for measure {measure!r}: `thresholds.{measure}` is missing or empty; "
                f"add e.g. thresholds.{measure}=[0.9]"
            )
        if measure != "full" and not config.min_exit_layers:
            raise ConfigError(
                f"empty grid for measure {measure!r}: `min_exit_layers` is empty; add e.g. min_exit_layers=[4]"
            )
        for threshold in config.thresholds.get(measure, []) if uses_threshold(measure) else []:
            try:
                ExitPolicy(measure=measure, threshold=threshold)
            except ValueError as err:
                raise ConfigError(f"thresholds.{measure}: {err}") from None
    for layer in config.min_exit_layers:
        if layer < 1:
            raise ConfigError(f"min_exit_layers holds {layer}; every minimum exit layer must be >= 1")
    for key in ("limit", "max_gen_toks"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be >= 1 (or null for no limit)")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size={config.batch_size} must be >= 1")
    if not 0 < config.timing.precision < 1:
        raise ConfigError(f"timing.precision={config.timing.precision} must be in (0, 1), e.g. 0.05 for +-5%")
    if config.timing.allowance_s <= 0:
        raise ConfigError(f"timing.allowance_s={config.timing.allowance_s} must be > 0 seconds")
    if config.timing.min_repeats < 2:
        raise ConfigError(
            f"timing.min_repeats={config.timing.min_repeats} must be at least 2: the noise estimate needs repeats"
        )
    _check_ray(config.ray)
    if config.model.device.startswith("cuda") and config.ray.gpus_per_trial <= 0:
        raise ConfigError(
            f"model.device={config.model.device!r} needs ray.gpus_per_trial > 0 (Ray hides GPUs from workers that "
            "reserve none)"
        )
    _check_carbon(config.carbon)


@dataclass(frozen=True)
class Trial:
    """One grid point. `threshold` is None for threshold-free measures, `min_exit_layer` for `full`;
    `calibration` is the file a `calibrated` trial's policy comes from (None otherwise)."""

    task: str
    measure: str
    threshold: float | None
    min_exit_layer: int | None
    calibration: str | None = None

    def policy(self, config: SweepConfig) -> ExitPolicy:
        if self.calibration is not None:
            return read_policy_file(self.calibration)[0]
        defaults = ExitPolicy()
        return ExitPolicy(
            measure=self.measure,
            threshold=defaults.threshold if self.threshold is None else self.threshold,
            min_exit_layer=defaults.min_exit_layer if self.min_exit_layer is None else self.min_exit_layer,
            threshold_schedule=config.threshold_schedule,
            kv_strategy=config.kv_strategy,
            vocab_top_k=config.vocab_top_k if MEASURES[self.measure].vocab_prunable else 0,
        )


def expand_grid(config: SweepConfig) -> list[Trial]:
    """All trials, `full` exactly once per task (the baseline of every speedup) even if not listed."""
    trials: list[Trial] = []
    for task in dict.fromkeys(config.tasks):
        trials.append(Trial(task, "full", None, None))
        for measure in dict.fromkeys(config.measures):
            if measure == "full":
                continue
            thresholds = dict.fromkeys(config.thresholds[measure]) if uses_threshold(measure) else [None]
            for threshold in thresholds:
                for layer in dict.fromkeys(config.min_exit_layers):
                    trials.append(Trial(task, measure, threshold, layer))
        for path in dict.fromkeys(config.calibrated):
            policy = read_policy_file(path)[0]
            resolved = str(Path(path).expanduser().resolve())
            trials.append(Trial(task, CALIBRATED, policy.threshold, policy.min_exit_layer, calibration=resolved))
    return trials


def resolve_model(config: SweepConfig) -> SweepConfig:
    """Pin `pretrained` (None = embedded default) and `heads` to what the workers will load."""
    from mee_bench.engine.heads import find_heads

    pretrained = config.model.pretrained or str(DEFAULT_MODEL_DIR)
    if Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())
    try:
        heads = find_heads(pretrained, config.model.heads)
    except FileNotFoundError as err:
        raise ConfigError(f"model.heads: {err}") from None
    model = dataclasses.replace(config.model, pretrained=pretrained, heads=str(heads) if heads else None)
    return dataclasses.replace(config, model=model)


def check_model(config: SweepConfig) -> int:
    """The model exists, every min exit layer fits it, every learned measure has heads; returns its depth."""
    from transformers import AutoConfig

    from mee_bench.engine.heads import HEADS_FILE
    from mee_bench.engine.loading import ModelLoadError, check_safetensors, read_heads
    from mee_bench.engine.runner import runner_class

    pretrained = config.model.pretrained
    if pretrained == str(DEFAULT_MODEL_DIR) and not DEFAULT_MODEL_DIR.is_dir():
        raise ConfigError(
            f"the embedded default model is not at {DEFAULT_MODEL_DIR} yet (`mee-bench train` builds it); "
            "set model.pretrained=PATH_OR_HUB_ID to sweep another model"
        )
    try:
        model_config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.pretrained={pretrained!r} cannot be read ({str(err).splitlines()[0]}); "
            "point it at a saved checkpoint directory (T5 family or decoder-only) or a hub id"
        ) from None
    local = Path(pretrained)
    for weights in sorted(local.glob("*.safetensors")) if local.is_dir() else ():
        if weights.name == HEADS_FILE:  # read below, only when a learned measure needs the heads
            continue
        try:
            check_safetensors(weights, "re-download or re-save the checkpoint")
        except ModelLoadError as err:
            raise ConfigError(f"model.pretrained: {err}") from None
    try:
        layers, hidden_size = runner_class(model_config.model_type).config_dims(model_config)
    except ValueError as err:
        raise ConfigError(f"model.pretrained={pretrained!r}: {err}") from None
    for layer in config.min_exit_layers:
        if layer > layers and any(m != "full" for m in config.measures):
            raise ConfigError(
                f"min_exit_layers holds {layer} but {pretrained} has {layers} decoder layers; use values in 1..{layers}"
            )
    calibrated = [read_policy_file(path)[0].measure for path in config.calibrated]
    learned = [m for m in dict.fromkeys([*config.measures, *calibrated]) if MEASURES[m].needs_heads]
    if learned and config.model.heads is None:
        raise ConfigError(
            f"measure(s) {', '.join(learned)} need trained exit heads and none exist for {pretrained} "
            "(no exit_heads.safetensors beside it, model.heads not set): train them with "
            "`mee-bench train-heads MODEL`, set model.heads=PATH, or drop those measures"
        )
    if learned:
        try:
            read_heads(config.model.heads, layers, hidden_size)
        except ModelLoadError as err:
            raise ConfigError(f"model.heads: {err}") from None
    return layers
