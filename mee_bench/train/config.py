"""Training configs: defaults, presets in configs/train/, overrides, validation, run identity, LR schedule.

A run is defined by its config minus the keys that may change between restarts
(`RESUMABLE_KEYS`), so a resumed run can be told apart from a different one.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from mee_bench.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs" / "train"


class ConfigError(ValueError):
    """A config that names an unknown key, preset, objective or an impossible budget."""


DEFAULTS = {
    "output_dir": "runs/train",
    "seed": 0,
    "threads": 2,
    "device": "cpu",
    "precision": "fp32",
    "save_dtype": "bfloat16",
    "checkpoint_minutes": 5.0,
    "log_every_steps": 10,
    "eval_every_steps": 0,
    "model": {
        "init": None,
        "d_model": 256,
        "d_kv": 32,
        "num_heads": 8,
        "d_ff": 768,
        "num_layers": 4,
        "num_decoder_layers": 6,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
    },
    "tokenizer": {"path": None, "vocab_size": 8000},
    "data": {
        "sources": [],
        "max_source_tokens": 256,
        "max_target_tokens": 128,
        "batch_tokens": 6000,
        "bucket_batches": 50,
        "limit": None,
        "validation": {"path": "tatoeba_fra_eng/validation.jsonl", "task": "translate_en_fr", "examples": 200},
    },
    "objective": {
        "name": "weighted_ce",
        "label_smoothing": 0.1,
        "chunk_tokens": 2048,
        "kd_exit_layer": 2,
        "kd_mapping": "last",
        "kd_weight": 1.0,
    },
    "optim": {
        "lr": 1e-3,
        "betas": [0.9, 0.98],
        "weight_decay": 0.01,
        "warmup_steps": 100,
        "schedule": "constant",
        "decay_fraction": 0.2,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
    },
    "budget": {"steps": None, "minutes": None},
}


SOURCE_KEYS = {"name", "path", "task", "weight"}
SCHEDULES = ("constant", "inverse_sqrt", "wsd")
# Keys that may change between the runs of one training without making it a different run.
RESUMABLE_KEYS = (
    "budget", "checkpoint_minutes", "threads", "device", "log_every_steps", "eval_every_steps", "output_dir"
)


def _check_keys(given: dict, allowed: dict, prefix: str = "") -> None:
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(k) for k in allowed], n=1)
            hint = (
                f"; did you mean {prefix}{close[0]}?"
                if close
                else f"; valid keys: {', '.join(f'{prefix}{k}' for k in allowed)}"
            )
            raise ConfigError(f"unknown config key {name!r}{hint}")
        if isinstance(allowed[key], dict) and allowed[key] and isinstance(value, dict):
            _check_keys(value, allowed[key], f"{name}.")
    for number, source in enumerate(given.get("sources", []) if prefix == "data." else []):
        unknown = set(source) - SOURCE_KEYS
        if unknown or not {"path", "task"} <= set(source):
            raise ConfigError(
                f"data.sources[{number}] needs path and task (and optional name, weight), got {sorted(source)}"
            )


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(config: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults <- YAML file or preset <- key=value overrides, validated before anything runs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(config)
    if not path.is_file():
        if path.suffix or "/" in str(config):
            raise ConfigError(f"config file {config} does not exist")
        if not (CONFIG_DIR / f"{config}.yaml").is_file():
            raise ConfigError(f"unknown preset {config!r}; presets: {', '.join(presets())} (or pass a YAML file)")
        path = CONFIG_DIR / f"{config}.yaml"
    try:
        given = OmegaConf.load(path)
        given.merge_with_dotlist(list(overrides))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"cannot read config {path} with overrides {list(overrides)}: {err}") from err
    given_dict = OmegaConf.to_container(given)
    _check_keys(given_dict, DEFAULTS)
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), given_dict)
    for number, source in enumerate(cfg.data.sources):
        source.name = source.get("name") or Path(source.path).parent.name or f"source{number}"
        source.weight = float(source.get("weight") or 1.0)
    _validate(cfg)
    cfg.output_dir = str(_repo_path(cfg.output_dir))
    for key in ("model.init", "tokenizer.path"):
        value = OmegaConf.select(cfg, key)
        if value and (_repo_path(value).exists() or str(value).startswith(("runs/", "models/"))):
            OmegaConf.update(cfg, key, str(_repo_path(value)))
    return cfg


def _repo_path(path: str) -> Path:
    """Relative paths in configs are relative to the repository, never to the current directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _validate(cfg) -> None:
    from mee_bench.train.objectives import KD_MAPPINGS, OBJECTIVES

    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective.name!r}; use one of {', '.join(OBJECTIVES)}")
    if cfg.objective.kd_mapping not in KD_MAPPINGS:
        raise ConfigError(
            f"unknown objective.kd_mapping {cfg.objective.kd_mapping!r}; use one of {', '.join(KD_MAPPINGS)}"
        )
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"unknown optim.schedule {cfg.optim.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg.device!r}")
    if cfg.precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be bf16 or fp32, got {cfg.precision!r}")
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


def identity(cfg) -> dict:
    """The config keys that define a run (everything except budget and bookkeeping), flattened."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg) if not isinstance(cfg, dict) else cfg
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


def learning_rate(cfg, step: int) -> float:
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
