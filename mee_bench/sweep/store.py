"""A sweep's results on disk: trial ids and the resumable, atomic record store.

It exists apart from `runner.py` because what makes a sweep resumable and safe to kill has
nothing to do with Ray: a trial id is a stable hash of the grid point and of every setting
that changes its result, so a rerun recognises finished trials; each record is written to a
temp file and moved into place with `os.replace`, so a kill never leaves half a record; a
lock lets one driver write a directory at a time; and a manifest refuses to mix records of
a different config unless `--force` adopts it (records outside the new grid move to
`superseded/`). The leaderboard reads the same records; this module imports neither the
engine nor the config at run time, so reading results never loads torch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # the config imports the engine (torch); reading records must not
    from mee_bench.sweep.config import SweepConfig, Trial

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
MANIFEST = "sweep.json"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to do."""


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's whole content (a change anywhere in it counts), first 16 hex digits."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_fingerprint(pretrained: str, heads: str | None) -> str:
    """Identity of the weights: the whole content of every config, weight, tokenizer and heads file.

    A retrained model in the same directory gets a new fingerprint, so its trials are new
    trials rather than stale records skipped on resume. A hub id is its own fingerprint.
    """
    digest = hashlib.sha256(pretrained.encode())
    files = []
    if Path(pretrained).is_dir():
        files = sorted(p for p in Path(pretrained).iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".model"))
    if heads and Path(heads).is_file() and Path(heads) not in files:
        files.append(Path(heads))
    for path in files:
        digest.update(f"{path.name}:{file_digest(path)}".encode())
    return digest.hexdigest()[:16]


def task_provenance(name: str) -> dict | None:
    """Content hashes of what a catalogue task's results depend on besides the model: its data
    file (or the hub split it stands for), its YAML and the prompt/metric code; None for a task
    of lm-eval's own."""
    from mee_bench.harness.catalogue import TASKS_DIR, UnknownTaskError, task
    from mee_bench.harness.data import HUB_SOURCES, local_split_path

    try:
        spec = task(name)
    except UnknownTaskError:
        return None
    data = local_split_path(spec.dataset, spec.split)
    hub = HUB_SOURCES.get(spec.dataset)
    return {
        "data": file_digest(data) if data else f"hub:{hub.path if hub else spec.dataset}/{spec.split}",
        "yaml": file_digest(TASKS_DIR / f"{name}.yaml"),
        "code": _digest([file_digest(TASKS_DIR / "utils.py"), file_digest(TASKS_DIR.parent / "catalogue.py")])[:16],
    }


def package_version() -> str:
    from mee_bench import __version__

    return __version__


def result_settings(config: SweepConfig) -> dict:
    """Everything besides the grid point that changes a trial's result (and so its id): the
    config's settings and the provenance (model and heads content, each task's data and files,
    the package version)."""
    return {
        "model": dataclasses.asdict(config.model),
        "model_fingerprint": model_fingerprint(config.model.pretrained, config.model.heads),
        "heads_fingerprint": file_digest(config.model.heads) if config.model.heads else None,
        "tasks": {name: task_provenance(name) for name in dict.fromkeys(config.tasks)},
        "mee_bench_version": package_version(),
        **{
            k: getattr(config, k)
            for k in ("threshold_schedule", "kv_strategy", "limit", "batch_size", "max_gen_toks", "seed")
        },
        # only when on, so that the ids of sweeps from before pruned checks existed stay the same
        **({"vocab_top_k": config.vocab_top_k} if config.vocab_top_k else {}),
        "carbon": dataclasses.asdict(config.carbon),
    }


def provenance(settings: dict) -> dict:
    """The part of `settings` that no config key shows (what a resume must also find unchanged)."""
    return {k: settings[k] for k in ("model_fingerprint", "heads_fingerprint", "tasks", "mee_bench_version")}


def trial_id(trial: Trial, settings: dict) -> str:
    """A readable, file-safe name for the grid point plus a hash of it and of `settings` (of the
    provenance, only its own task's: changed data of one task leaves the other tasks' trials valid)."""
    threshold = "na" if trial.threshold is None else f"{trial.threshold:g}"
    layer = "na" if trial.min_exit_layer is None else trial.min_exit_layer
    readable = f"{trial.task}__{trial.measure}__t{threshold}__m{layer}"
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in readable)
    own = {**settings, "tasks": (settings.get("tasks") or {}).get(trial.task)}
    return f"{safe}__{_digest([dataclasses.asdict(trial), own])[:10]}"


def sweep_fingerprint(config: SweepConfig, settings: dict) -> str:
    """Same fingerprint = same sweep (resume). Execution details (Ray, paths, name) do not count."""
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("ray", "output_dir", "name")}
    return _digest([identity, settings])


def scan_records(output_dir: str | Path) -> tuple[list[dict], dict[Path, str]]:
    """The readable trial records of a sweep directory, and each unreadable one's path and reason
    (cut short, not JSON, or not a trial record), which the leaderboard lists in its tables."""
    records, unreadable = [], {}
    for path in sorted((Path(output_dir) / RECORDS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            unreadable[path] = f"{type(err).__name__}: {err}"
            continue
        if not isinstance(record, dict) or record.get("trial_id") != path.stem or "trial" not in record:
            unreadable[path] = "not a trial record of this file's name"
            continue
        records.append(record)
    return records, unreadable


def load_records(output_dir: str | Path) -> list[dict]:
    """Every readable trial record of a sweep directory (an unreadable one is skipped with a warning)."""
    records, unreadable = scan_records(output_dir)
    for path, reason in unreadable.items():
        log.warning(
            "skipping unreadable record %s (%s): delete it and rerun the sweep to redo that trial", path, reason
        )
    return records


def read_manifest(path: Path) -> dict | None:
    """A sweep directory's manifest, None when there is none; a damaged one is named with the fix."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SweepError(
            f"the sweep manifest {path} cannot be read ({err}): rerun with --force to write a new one "
            "(records whose trial ids the new grid does not hold move to superseded/)"
        ) from None


def _flatten(value: Any, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat: dict = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


class ResultStore:
    """The records of one sweep directory, guarded by a lock so one driver writes at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.records = self.root / RECORDS_DIR
        self._lock: IO[str] | None = None

    def open(self, fingerprint: str, config: dict, trial_ids: Iterable[str], force: bool) -> None:
        """Claim the directory: new, or the same config (resume), or `force` (records outside the grid move aside)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "w")
        try:
            self._claim(fingerprint, config, set(trial_ids), force)
        except BaseException:
            self.close()
            raise

    def check(self, fingerprint: str, config: dict, force: bool) -> tuple[dict | None, bool, list[Path]]:
        """Whether a run may write here, without writing anything (what `--dry-run` asks): raises the
        refusal a real run would; returns (previous manifest, same sweep, existing records)."""
        manifest_path = self.root / MANIFEST
        existing = sorted(self.records.glob("*.json")) if self.records.is_dir() else []
        try:
            previous = read_manifest(manifest_path)
        except SweepError:
            if not force:
                raise
            previous = None  # --force writes a new manifest; only records of this grid's trial ids stay
        same = previous is not None and previous.get("fingerprint") == fingerprint
        if existing and not same and not force:  # a manifest without records has nothing to protect
            raise SweepError(self._difference(previous, config, len(existing)))
        return previous, same, existing

    def _claim(self, fingerprint: str, config: dict, trial_ids: set[str], force: bool) -> None:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(
                f"another sweep is writing to {self.root}; wait for it or use another output_dir"
            ) from None
        manifest_path = self.root / MANIFEST
        _, same, existing = self.check(fingerprint, config, force)
        self.records.mkdir(exist_ok=True)
        for stale in [*self.root.glob(".*.tmp"), *self.records.glob(".*.tmp")]:  # a write cut short by a kill
            stale.unlink()
        if not same:
            aside = self.root / "superseded" / time.strftime("%Y%m%d-%H%M%S")
            for path in existing:
                if path.stem not in trial_ids:
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(path), aside / path.name)
            if aside.is_dir() and manifest_path.is_file():  # the records moved aside keep their provenance
                shutil.copy2(manifest_path, aside / MANIFEST)
            manifest = {
                "fingerprint": fingerprint,
                "config": config,
                "trials": sorted(trial_ids),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            self._atomic_write(manifest_path, manifest)

    def _difference(self, previous: dict | None, config: dict, count: int) -> str:
        where = f"{self.root} holds {count} record(s) of a different sweep config"
        if previous is None:
            return f"{where} (no {MANIFEST}); refusing to mix them: pick another output_dir or pass --force"
        old, new = _flatten(previous.get("config", {})), _flatten(config)
        changed = sorted(
            k
            for k in old.keys() | new.keys()
            if old.get(k) != new.get(k) and not k.startswith(("ray.", "output_dir", "name"))
        )
        shown = ", ".join(changed[:6]) or "the model files"
        what = (
            " (provenance.*: the content of the model, heads or task files, or the package version)"
            if any(k.startswith("provenance.") for k in changed[:6])
            else ""
        )
        return (
            f"{where} (differs in: {shown}){what}; refusing to mix them. Use another output_dir, or pass --force "
            "to adopt the new config (records of trials whose config and provenance are unchanged are kept, "
            "the others move with the old manifest to superseded/)"
        )

    def finished(self) -> set[str]:
        """Ids of the trials with an `ok` record; failed ones are not finished, so a rerun retries them."""
        return {r["trial_id"] for r in load_records(self.root) if r.get("status") == "ok"}

    def write(self, record: dict) -> None:
        """Write (or replace) the record of `record["trial_id"]` atomically; a failed write (a full
        disk) stops the sweep with the fix, and leaves the previous record, never half of one."""
        path = self.records / f"{record['trial_id']}.json"
        try:
            self._atomic_write(path, record)
        except OSError as err:
            raise SweepError(
                f"cannot write the record {path} ({err}); nothing of it was kept: free space or fix the directory, "
                "then run the same command to resume"
            ) from None

    @staticmethod
    def _atomic_write(path: Path, payload: dict) -> None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        try:
            with tmp.open("w") as handle:
                json.dump(payload, handle, indent=2, sort_keys=True, default=str)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Release the lock (a second call does nothing)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
