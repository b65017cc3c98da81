"""`mee-bench ship RUN`: make a finished training run the embedded default model, when it clearly leads.

A run directory lasts only as long as its machine; what is shipped lives in git, and every
copy of the weights stays in git's history. So a run replaces the shipped default only when it
is complete and its last in-loop validation BLEU leads the shipped model's by `--min-lead`
points (both read from their `training.json`, measured the same way). Shipping copies the
model files and the run's record (also as `training/<run>.json`, the stage history the model
report plots); the exit heads, the calibrated policy and the report are rebuilt afterwards
(`make ship-campaign` runs all of it). The next campaign session starts from the shipped weights.

    mee-bench ship runs/campaign-2 [--min-lead 2] [--to mee_bench/models/mee-t5-default] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mee_bench.paths import DEFAULT_MODEL_DIR

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("spiece.model",)
STALE_FILES = ("exit_heads.safetensors", "exit_heads_metrics.json", "exit_policy.json")  # fitted to the old weights
CARD = "training.json"
MAX_FILE_MB = 30.0


class ShipError(ValueError):
    """A run that cannot (or should not) replace the shipped model."""


def last_bleu(model_dir: Path) -> float | None:
    """The last in-loop validation BLEU in a model's training.json (None without one)."""
    card = model_dir / CARD
    if not card.is_file():
        return None
    evaluations = json.loads(card.read_text()).get("evaluations") or []
    return evaluations[-1]["bleu"] if evaluations else None


def check_shippable(run: Path, target: Path, min_lead: float) -> tuple[float, float | None]:
    """The run's BLEU and the shipped one's; raises `ShipError` naming what stops the ship."""
    card = run / CARD
    if not card.is_file():
        raise ShipError(f"{run} holds no {CARD}: not a training run (pass a runs/<name> directory)")
    if json.loads(card.read_text()).get("status") != "complete":
        raise ShipError(f"{run} is still training; let it finish (run the same `mee-bench train` command) first")
    missing = [name for name in MODEL_FILES if not (run / name).is_file()]
    if missing:
        raise ShipError(f"{run} lacks {', '.join(missing)}; rerun its training to write the final model")
    too_big = [
        f"{name} ({(run / name).stat().st_size / 1e6:.1f} MB)"
        for name in MODEL_FILES
        if (run / name).stat().st_size / 1e6 > MAX_FILE_MB
    ]
    if too_big:
        raise ShipError(
            f"{', '.join(too_big)} over {MAX_FILE_MB:.0f} MB per file; save in bf16 or ship a smaller shape"
        )
    bleu, shipped = last_bleu(run), last_bleu(target)
    if bleu is None:
        raise ShipError(f"{run} has no validation BLEU; train it with eval_every_steps > 0")
    if shipped is not None and bleu < shipped + min_lead:
        raise ShipError(
            f"{run} reaches BLEU {bleu:.2f} against the shipped {shipped:.2f}: less than the {min_lead:g}-point lead "
            "a ship needs (git keeps every shipped copy); train on, or pass --min-lead"
        )
    return bleu, shipped


def ship(run: Path, target: Path) -> list[Path]:
    """Copy the run's model and record into `target`; remove what was fitted to the old weights."""
    written = []
    (target / "training").mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, *(n for n in OPTIONAL_FILES if (run / n).is_file()), CARD):
        shutil.copy2(run / name, target / name)
        written.append(target / name)
    shutil.copy2(run / CARD, target / "training" / f"{run.name}.json")
    written.append(target / "training" / f"{run.name}.json")
    for name in STALE_FILES:
        (target / name).unlink(missing_ok=True)
    return written


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mee-bench ship", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished training run directory, e.g. runs/campaign-1")
    parser.add_argument("--to", type=Path, default=DEFAULT_MODEL_DIR, help="the model directory to replace")
    parser.add_argument("--min-lead", type=float, default=2.0, help="BLEU points the run must lead by")
    parser.add_argument("--dry-run", action="store_true", help="check and say what would happen; copy nothing")
    args = parser.parse_args(argv)
    try:
        bleu, shipped = check_shippable(args.run, args.to, args.min_lead)
    except ShipError as err:
        print(f"mee-bench ship: {err}", file=sys.stderr)
        return 2
    against = f"the shipped {shipped:.2f}" if shipped is not None else "no shipped model"
    if args.dry_run:
        print(f"would ship {args.run} (BLEU {bleu:.2f}, against {against}) to {args.to}")
        return 0
    for path in ship(args.run, args.to):
        print(f"wrote {path}")
    print(
        f"shipped {args.run} (BLEU {bleu:.2f}, against {against}); now rebuild its exit heads, policy and report "
        "(`make ship-campaign` does)"
    )
    return 0
