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

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mee_bench.config_errors import ConfigError, check_layer, closest
from mee_bench.engine.measures import MEASURES
from mee_bench.engine.loading import DTYPES, check_device_name
from mee_bench.paths import DEFAULT_MODEL_DIR
from mee_bench.engine.policy import KV_STRATEGIES, THRESHOLD_SCHEDULES, ExitPolicy
from mee_bench.sweep.energy import CarbonConfig, known_countries

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
class SweepConfig:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: List[str] = field(default_factory=list)
    measures: List[str] = field(default_factory=list)
    thresholds: Dict[str, List[float]] = field(default_factory=dict)
    min_exit_layers: List[int] = field(default_factory=lambda: [4])
    threshold_schedule: str = "static"
    kv_strategy: str = "copy"
    vocab_top_k: int = 0  # > 0: vocabulary-pruned checks for the measures that allow them (softmax family)
    limit: Optional[int] = None
    batch_size: int = 8
    max_gen_toks: Optional[int] = None  # None = each task's own generation length
    seed: int = 1234
    output_dir: Optional[str] = None  # None = results/<name>
    ray: RayConfig = field(default_factory=RayConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir else Path("results") / self.name)


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    check_layer(layer, SweepConfig, source)
    return OmegaConf.merge(base, layer)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML, apply dotlist overrides (`limit=50`, `tasks=[squad_mee]`), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {path} does not exist; see configs/quickstart.yaml for an example")
    merged = OmegaConf.structured(SweepConfig)
    merged = _merge(merged, OmegaConf.load(path), str(path))
    if OmegaConf.is_missing(merged, "name"):
        merged.name = path.stem
    if overrides:
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. limit=50 or tasks=[squad_mee])")
        merged = _merge(merged, OmegaConf.from_dotlist(list(overrides)), "the command-line overrides")
    return to_config(merged)


def to_config(node: DictConfig | dict) -> SweepConfig:
    """Turn a (possibly partial) mapping into a validated SweepConfig."""
    if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is not SweepConfig:
        node = _merge(OmegaConf.structured(SweepConfig), OmegaConf.create(node), "the config")
    try:
        config = OmegaConf.to_object(node)
    except MissingMandatoryValue as err:
        raise ConfigError(f"config key {err.full_key!r} is required and missing") from None
    validate(config)
    return config


def config_dict(config: SweepConfig) -> dict:
    return dataclasses.asdict(config)


def uses_threshold(measure: str) -> bool:
    """Whether the measure's exits depend on a threshold (its class says); threshold-free measures
    get one trial per min exit layer (or one)."""
    return MEASURES[measure].takes_threshold


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; did you mean {closest(value, list(choices))!r}? (one of {', '.join(choices)})")


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
    if not config.measures:
        raise ConfigError("empty grid: `measures` is empty; list at least one measure, e.g. measures=[softmax]")
    valid_measures = sorted(MEASURES)
    for measure in config.measures:
        if measure not in MEASURES:
            raise ConfigError(f"unknown measure {measure!r} in `measures`; did you mean {closest(measure, valid_measures)!r}?")
    for measure in config.thresholds:
        if measure not in MEASURES:
            raise ConfigError(f"`thresholds.{measure}`: unknown measure; did you mean {closest(measure, valid_measures)!r}?")
    for measure in config.measures:
        if uses_threshold(measure) and not config.thresholds.get(measure):
            raise ConfigError(
                f"empty grid for measure {measure!r}: `thresholds.{measure}` is missing or empty; "
                f"add e.g. thresholds.{measure}=[0.9]"
            )
        if measure != "full" and not config.min_exit_layers:
            raise ConfigError(f"empty grid for measure {measure!r}: `min_exit_layers` is empty; add e.g. min_exit_layers=[4]")
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
    _check_ray(config.ray)
    if config.model.device.startswith("cuda") and config.ray.gpus_per_trial <= 0:
        raise ConfigError(
            f"model.device={config.model.device!r} needs ray.gpus_per_trial > 0 (Ray hides GPUs from workers that reserve none)"
        )
    _check_carbon(config.carbon)


@dataclass(frozen=True)
class Trial:
    """One grid point. `threshold` is None for threshold-free measures, `min_exit_layer` for `full`."""

    task: str
    measure: str
    threshold: float | None
    min_exit_layer: int | None

    def policy(self, config: SweepConfig) -> ExitPolicy:
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

    from mee_bench.engine.heads import ExitHeads
    from mee_bench.engine.loading import ModelLoadError, check_heads
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
            "point it at a saved T5 checkpoint directory or a hub id"
        ) from None
    try:
        layers, hidden_size = runner_class(model_config.model_type).config_dims(model_config)
    except ValueError as err:
        raise ConfigError(f"model.pretrained={pretrained!r}: {err}") from None
    for layer in config.min_exit_layers:
        if layer > layers and any(m != "full" for m in config.measures):
            raise ConfigError(
                f"min_exit_layers holds {layer} but {pretrained} has {layers} decoder layers; use values in 1..{layers}"
            )
    learned = [m for m in dict.fromkeys(config.measures) if MEASURES[m].needs_heads]
    if learned and config.model.heads is None:
        raise ConfigError(
            f"measure(s) {', '.join(learned)} need trained exit heads and none exist for {pretrained} "
            "(no exit_heads.safetensors beside it, model.heads not set): train them with "
            "`mee-bench train-heads MODEL`, set model.heads=PATH, or drop those measures"
        )
    if learned:
        try:
            check_heads(ExitHeads.load(config.model.heads), layers, hidden_size, config.model.heads)
        except ModelLoadError as err:
            raise ConfigError(f"model.heads: {err}") from None
    return layers
