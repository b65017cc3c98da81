"""A training run's directory: checkpoints (safetensors, swapped in whole), the model card, the identity check.

Everything a killed run needs to resume with the same data order lives here, written so
that a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from mee_bench.provenance import git_commit
from mee_bench.train.config import TrainConfig, identity

CHECKPOINT_DIR = "checkpoint"
RUN_CONFIG = "run_config.yaml"
METRICS = "metrics.jsonl"
CARD = "training.json"
DATA_NOTE = (
    "Trained only on Tatoeba EN-FR, WMT news EN-FR 2008-2013 and the SQuAD training slice; "
    "no CNN/DailyMail or BigPatent training data exists offline, so summarisation is untrained."
)


class RunError(ValueError):
    """An output directory that the run cannot use."""


def save_checkpoint(output: Path, model, optimizer, state: dict) -> None:
    """Model and optimiser tensors in safetensors, the rest as JSON; swapped in whole, never half-written."""
    from safetensors.torch import save_file, save_model

    staging, final, old = output / f"{CHECKPOINT_DIR}.tmp", output / CHECKPOINT_DIR, output / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_model(model, str(staging / "model.safetensors"))
    optim_state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.contiguous()
        for index, entry in optim_state["state"].items()
        for key, value in entry.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(staging / "optimizer.safetensors"))
    (staging / "trainer_state.json").write_text(
        json.dumps({**state, "param_groups": optim_state["param_groups"]}, indent=1)
    )
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(output: Path, model, optimizer) -> dict:
    """Restore model, optimiser and RNG; returns the trainer state (step, epoch, position, wall time, tokens)."""
    from safetensors.torch import load_file, load_model

    directory = output / CHECKPOINT_DIR
    load_model(model, str(directory / "model.safetensors"))
    saved = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    entries: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": entries, "param_groups": saved.pop("param_groups")})
    return saved


def save_final_model(output: Path, model, dtype: str) -> None:
    """The usable model beside its tokenizer: config + safetensors in `dtype` (bf16 keeps the default under 30 MB)."""
    import copy

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(str(output))


def commit_label() -> str:
    """The checkout's commit for the model card: `<sha>`, `<sha>+dirty` or `unknown` outside a git checkout."""
    git = git_commit()
    return f"{git['commit']}{'+dirty' if git['dirty'] else ''}" if git["commit"] else "unknown"


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the run dir, or check that it holds this same run; returns (path, resuming)."""
    from omegaconf import OmegaConf

    output = Path(cfg.output_dir)
    if output.exists() and any(output.iterdir()):
        saved = output / RUN_CONFIG
        if not saved.is_file():
            raise RunError(f"output_dir {output} is not empty and holds no {RUN_CONFIG}; choose another output_dir")
        # saved over today's schema, so a key added to TrainConfig since does not make it a different run
        previous = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(saved))
        mine, theirs = identity(cfg), identity(previous)
        if mine != theirs:
            differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise RunError(
                f"output_dir {output} holds a different run (config differs at {', '.join(differing)}); "
                "choose another output_dir or the same config to resume"
            )
        OmegaConf.save(cfg, saved)
        old = output / f"{CHECKPOINT_DIR}.old"
        if old.is_dir() and not (output / CHECKPOINT_DIR).is_dir():  # killed between the two renames of a save
            old.rename(output / CHECKPOINT_DIR)
        return output, (output / CHECKPOINT_DIR).is_dir()
    output.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output / RUN_CONFIG)
    return output, False


def write_card(
    output: Path, cfg: TrainConfig, state: dict, status: str, history: list[dict], sessions: list[dict] = ()
) -> None:
    """training.json: what the run is, how far it got, its evaluations, and each session's machine and precision."""
    config = dataclasses.asdict(cfg)
    card = {
        "status": status,
        "objective": config["objective"],
        "data": {"sources": config["data"]["sources"], "note": DATA_NOTE},
        "steps": state["step"],
        "tokens_seen": state["tokens"],
        "epoch": state["epoch"],
        "init_run": state.get("init_run"),
        "seed": cfg.seed,
        "git_commit": commit_label(),
        "wall_time_minutes": round(state["wall_time"] / 60, 2),
        "init": cfg.model.init,
        "config": config,
        "sessions": list(sessions),
        "evaluations": history,
    }
    (output / CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")


def continued_from(cfg: TrainConfig) -> dict:
    """Trainer-state entries a new run takes over from the run that produced `model.init` (read from the
    init's training.json): the next epoch, so that its data order goes on to permutations the model has
    not seen, and that run's name, so that the history of a model directory rewritten by each campaign
    session still links its stages."""
    card = Path(cfg.model.init) / CARD if cfg.model.init else None
    if card is None or not card.is_file():
        return {}
    record = json.loads(card.read_text())
    continued = {"init_run": Path(record["config"]["output_dir"]).name}
    if "epoch" in record:
        continued["epoch"] = record["epoch"] + 1
    return continued


def check_init(cfg: TrainConfig) -> None:
    """A fine-tune must start from a finished model, not from a base that is still training."""
    card = Path(cfg.model.init) / CARD if cfg.model.init else None
    if card and card.is_file() and json.loads(card.read_text()).get("status") != "complete":
        raise RunError(
            f"model.init {cfg.model.init} is still training (its {CARD} says so); finish or resume that run first"
        )
