"""Training configs: a typed schema, presets in configs/train/, overrides, validation, run identity, LR schedule.

Like the sweep's, the config is dataclasses that OmegaConf fills from a preset or YAML file
and `key=value` overrides, checked on load: a typo names the closest valid key, a wrong value
the expected type (`mee_bench.config_errors`, shared with the sweep). A run is defined by its
config minus the keys that may change between restarts (`RESUMABLE_KEYS`), so a resumed run
can be told apart from a different one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mee_bench.config_errors import ConfigError, apply_overrides, check_layer, instantiate
from mee_bench.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs" / "train"
SCHEDULES = ("constant", "inverse_sqrt", "wsd")
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("final", "weighted_ce", "weighted_ce_kd")
KD_MAPPINGS = ("last", "uniform", "closest")
# Keys that may change between the runs of one training without making it a different run.
RESUMABLE_KEYS = (
    "budget",
    "checkpoint_minutes",
    "threads",
    "device",
    "log_every_steps",
    "eval_every_steps",
    "output_dir",
    "compile",
)


@dataclass
class ModelConfig:
    init: Optional[str] = None  # a finished run or model to fine-tune (either kind); None = a new model as below
    d_model: int = 256
    d_kv: int = 32
    num_heads: int = 8
    d_ff: int = 768
    num_layers: int = 4
    num_decoder_layers: int = 6
    feed_forward_proj: str = "gated-gelu"
    dropout_rate: float = 0.0
    family: str = "t5"  # a new model's layout: t5, or a decoder-only type (llama, mistral, qwen2, qwen3, gpt2)
    num_kv_heads: Optional[int] = None  # decoder-only: grouped-query K/V heads (None = num_heads)


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # None = model.init's tokenizer, else a new SentencePiece trained on the data
    vocab_size: int = 8000


@dataclass
class SourceConfig:
    name: Optional[str] = None  # None = the file's folder name
    path: str = MISSING  # JSON Lines, relative to the data root or absolute
    task: str = MISSING  # how its records become (source, target) pairs: a key of train.data.TASKS
    weight: float = 1.0  # its share of each epoch's examples, relative to the other sources


@dataclass
class ValidationConfig:
    path: str = "tatoeba_fra_eng/validation.jsonl"
    task: str = "translate_en_fr"
    examples: int = 200


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    max_source_tokens: int = 256
    max_target_tokens: int = 128
    batch_tokens: int = 6000
    bucket_batches: int = 1000  # batches per length-sorted bucket: larger buckets, less padding (docs/TRAINING.md)
    limit: Optional[int] = None  # examples read per source; None = all
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class ObjectiveConfig:
    name: str = "weighted_ce"
    label_smoothing: float = 0.1
    chunk_tokens: int = 2048
    kd_exit_layer: int = 2
    kd_mapping: str = "last"
    kd_weight: float = 1.0
    # The share of target positions each shallow layer's CE reads, drawn afresh per step and layer.
    # A mean over a uniform random subset is an unbiased estimate of the mean over all positions, so
    # the objective is unchanged in expectation while the LM head (most of a weighted-CE step on a
    # CPU) runs on fewer rows. 1.0 is the exact objective; the last layer always reads every position.
    shallow_token_fraction: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "constant"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class BudgetConfig:
    steps: Optional[int] = None
    minutes: Optional[float] = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # cuda trains on the GPU (bf16 autocast follows the device)
    precision: str = "auto"  # bf16 autocast where this machine's probe finds it faster, else fp32 (train/precision.py)
    save_dtype: str = "bfloat16"
    compile: bool = (
        False  # torch.compile the encoder and decoder for training steps (minutes to compile; docs/TRAINING.md)
    )
    checkpoint_minutes: float = 5.0
    log_every_steps: int = 10
    eval_every_steps: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(config: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file or preset <- key=value overrides, validated before anything runs."""
    path = Path(config)
    if not path.is_file():
        if path.suffix or "/" in str(config):
            raise ConfigError(f"config file {config} does not exist")
        if not (CONFIG_DIR / f"{config}.yaml").is_file():
            raise ConfigError(f"unknown preset {config!r}; presets: {', '.join(presets())} (or pass a YAML file)")
        path = CONFIG_DIR / f"{config}.yaml"
    try:
        given = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(given, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of config keys (output_dir, model, data, ...)")
    check_layer(given, TrainConfig, str(path))
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), given)
    apply_overrides(merged, overrides, TrainConfig, example="budget.steps=100 or data.sources.0.weight=0.5")
    cfg: TrainConfig = instantiate(merged)
    for number, source in enumerate(cfg.data.sources):
        source.name = source.name or Path(source.path).parent.name or f"source{number}"
    _validate(cfg)
    cfg.output_dir = str(_repo_path(cfg.output_dir))
    for owner, key in ((cfg.model, "init"), (cfg.tokenizer, "path")):
        value = getattr(owner, key)
        if value and (_repo_path(value).exists() or str(value).startswith(("runs/", "mee_bench/models/"))):
            setattr(owner, key, str(_repo_path(value)))
    return cfg


def _repo_path(path: str) -> Path:
    """Relative paths in configs are relative to the repository, never to the current directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _validate(cfg: TrainConfig) -> None:
    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective.name!r}; use one of {', '.join(OBJECTIVES)}")
    if cfg.objective.kd_mapping not in KD_MAPPINGS:
        raise ConfigError(
            f"unknown objective.kd_mapping {cfg.objective.kd_mapping!r}; use one of {', '.join(KD_MAPPINGS)}"
        )
    if not 0.0 < cfg.objective.shallow_token_fraction <= 1.0:
        raise ConfigError(
            f"objective.shallow_token_fraction must be in (0, 1], got {cfg.objective.shallow_token_fraction}"
        )
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"unknown optim.schedule {cfg.optim.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg.device!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    steps, minutes = cfg.budget.steps, cfg.budget.minutes
    if steps is None and minutes is None:
        raise ConfigError("set a budget: budget.steps or budget.minutes")
    for name, value in (("budget.steps", steps), ("budget.minutes", minutes)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if cfg.optim.schedule == "wsd" and steps is None:
        raise ConfigError("optim.schedule=wsd decays over the last steps, so it needs budget.steps")
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: list at least one {path, task, weight}")
    for number, source in enumerate(cfg.data.sources):
        if source.weight <= 0:
            raise ConfigError(f"data.sources[{number}].weight must be positive, got {source.weight}")
    _validate_family(cfg.model)


T5_ONLY_MODEL_KEYS = ("num_layers", "d_kv", "feed_forward_proj")  # a decoder-only model has no encoder, no d_kv


def decoder_only_families() -> list[str]:
    """The decoder-only model types the engine has runners for (the runner registry is the one list)."""
    import mee_bench.engine  # noqa: F401  (registers every runner)
    from mee_bench.engine.runner import runner_class, supported_model_types

    return [name for name in supported_model_types() if not runner_class(name).is_encoder_decoder]


def _validate_family(model: ModelConfig) -> None:
    """A new model's family has a runner, and a decoder-only one is not given T5-only shape keys."""
    decoder_only = decoder_only_families()
    if model.family not in ("t5", *decoder_only):
        raise ConfigError(
            f"unknown model.family {model.family!r}; use t5 or a decoder-only one: {', '.join(decoder_only)}"
        )
    if model.family == "t5":
        if model.num_kv_heads is not None:
            raise ConfigError(
                "model.num_kv_heads is a decoder-only option; T5 has no grouped-query attention: remove it"
            )
        return
    defaults = ModelConfig()
    asked = [key for key in T5_ONLY_MODEL_KEYS if getattr(model, key) != getattr(defaults, key)]
    if asked:
        raise ConfigError(
            f"model.{asked[0]} is a T5-only option, but model.family={model.family} is decoder-only; remove it "
            "(its depth is model.num_decoder_layers, its head width d_model / num_heads)"
        )
    if model.num_kv_heads is not None and model.num_heads % model.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={model.num_kv_heads} must divide model.num_heads={model.num_heads}")


def identity(cfg: TrainConfig | object) -> dict:
    """The config keys that define a run (everything except budget and bookkeeping), flattened.
    `cfg` is a TrainConfig or an OmegaConf node of one (a saved run_config.yaml)."""
    container = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else OmegaConf.to_container(cfg)
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if prefix == "" and key in RESUMABLE_KEYS:
                continue
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(container, "")
    return flat


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """LR at `step` (0-based): linear warmup, then constant, inverse-sqrt, or warmup-stable-decay."""
    optim = cfg.optim
    warmup = max(1, optim.warmup_steps)
    base = optim.lr * min(1.0, (step + 1) / warmup)
    if optim.schedule == "constant":
        return base
    if optim.schedule == "inverse_sqrt":
        return max(base * math.sqrt(warmup / max(step + 1, warmup)), optim.lr * optim.min_lr_ratio)
    total = cfg.budget.steps
    decay_start = total * (1.0 - optim.decay_fraction)
    if step < decay_start:
        return base
    progress = (step - decay_start) / max(1.0, total - decay_start)
    return optim.lr * (1.0 - progress * (1.0 - optim.min_lr_ratio))
