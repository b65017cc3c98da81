"""`mee-bench sweep`: measures x thresholds x min exit layers x tasks, on Ray, resumable.

The driver expands the grid, checks the model can serve it, and hands trials to a pool of
Ray actors; each actor loads the model once and runs many trials (one lm-eval task under
one exit policy, inside a CodeCarbon tracker). Only the driver writes results, through
`result_store.ResultStore` (one atomic JSON record per trial, named by a stable trial id),
so a sweep killed at any moment and run again ends with every trial exactly once.
Local Ray and a cluster (`ray.address`) take the same code path.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import random
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mee_bench.engine.measures import measure_facts
from mee_bench.engine.policy import read_policy_file
from mee_bench.sweep.backend import BackendFactory, LMEvalBackend
from mee_bench.sweep.config import (
    ConfigError,
    SweepConfig,
    Trial,
    check_model,
    closest,
    config_dict,
    expand_grid,
    load_config,
    resolve_model,
)
from mee_bench.sweep.ray_session import driver_alive, end_left_over, forget, record_started
from mee_bench.sweep.store import (
    RECORDS_DIR,
    ResultStore,
    SweepError,
    load_records,
    provenance,
    result_settings,
    sweep_fingerprint,
    trial_id,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class SweepWorker:
    """A Ray actor: loads the model once, then evaluates trials one at a time. `run` never raises."""

    def __init__(self, config: SweepConfig, backend_factory: BackendFactory) -> None:
        import ray
        import torch

        from mee_bench.provenance import hardware_info, package_versions
        from mee_bench.sweep.energy import EnergyMeter

        started = time.perf_counter()
        threads = max(1, int(config.ray.cpus_per_trial))
        torch.set_num_threads(threads)
        for name in ("lm-eval", "lm_eval", "transformers", "datasets", "codecarbon"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.config = config
        self.backend = backend_factory(config)
        self.meter = EnergyMeter(config.carbon, gpu_ids=[int(i) for i in ray.get_gpu_ids()] or None)
        self.hardware = hardware_info(threads)
        self.versions = package_versions()
        self.load_s = time.perf_counter() - started
        self.warmup_s = 0.0
        self.trials_run = 0

    def ready(self) -> dict:
        return {"load_s": self.load_s, "hardware": self.hardware}

    def unknown_tasks(self, tasks: list[str]) -> dict[str, str | None]:
        return self.backend.unknown_tasks(tasks)

    def warm_up(self, task: str) -> float:
        started = time.perf_counter()
        self.backend.warm_up(task)
        self.warmup_s = time.perf_counter() - started
        return self.warmup_s

    def run(self, trial: Trial, workers: int) -> dict:
        import numpy
        import torch

        seed = self.config.seed
        random.seed(seed)
        numpy.random.seed(seed)
        torch.manual_seed(seed)
        started = time.perf_counter()
        self.trials_run += 1
        result: dict = {
            "hardware": self.hardware,
            "versions": self.versions,
            "worker": {
                "pid": os.getpid(),
                "load_s": self.load_s,
                "warmup_s": self.warmup_s,
                "trials_run": self.trials_run,
                "concurrent_workers": workers,
            },
        }
        try:
            with self.meter.measure() as energy:
                outcome = self.backend.evaluate(trial, trial.policy(self.config))
            result.update(
                status="ok", metrics=outcome.metrics, efficiency=outcome.efficiency, energy=energy.reading.as_dict()
            )
        except Exception:
            result.update(status="failed", error=traceback.format_exc(limit=20))
        result["wall_time_s"] = time.perf_counter() - started
        return result


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, with a clear message, when nothing listens at a `host:port` Ray address."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address={address!r} is not host:port (e.g. 127.0.0.1:6379), ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise SweepError(
            f"no Ray cluster answers at {address} ({err}; waited up to {timeout_s:g}s): start one with "
            f"`ray start --head --port={port}`, fix ray.address, or remove it to run on a local Ray"
        ) from None


def default_temp_dir() -> str:
    """A short path: Ray puts Unix sockets under it, and socket paths are limited to ~107 bytes."""
    return f"/tmp/mee-ray-{os.getuid()}"


def connect_ray(config: SweepConfig) -> bool:
    """Start a local Ray or join `ray.address`; returns whether this call started Ray (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    # Workers print lm-eval progress bars; they stay in the Ray session logs, records hold any errors.
    options = dict(log_to_driver=False, logging_level=logging.WARNING)
    if config.ray.address:
        check_reachable(config.ray.address, config.ray.connect_timeout_s)
        ray.init(address=config.ray.address, **options)
    else:
        ray.init(
            num_cpus=config.ray.num_cpus or os.cpu_count(),
            include_dashboard=False,
            _temp_dir=config.ray.temp_dir or default_temp_dir(),
            **options,
        )
    return True


@dataclass
class SweepResult:
    """What one `run_sweep` call did (the records say what each trial found)."""

    output_dir: Path
    total: int
    skipped: int
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    workers: int = 0
    worker_load_s: list[float] = field(default_factory=list)
    run_s: float = 0.0  # from the first trial handed out to the last record written
    wall_s: float = 0.0


def _worker_count(config: SweepConfig, pending: int) -> int:
    import ray

    resources = ray.cluster_resources()
    slots = [pending, int(resources.get("CPU", 0) // config.ray.cpus_per_trial)]
    if config.ray.gpus_per_trial > 0:
        slots.append(int(resources.get("GPU", 0) // config.ray.gpus_per_trial))
    if config.ray.max_concurrent:
        slots.append(config.ray.max_concurrent)
    if min(slots) < 1:
        raise SweepError(
            f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs, but a trial "
            f"needs {config.ray.cpus_per_trial:g} CPUs and {config.ray.gpus_per_trial:g} GPUs; lower "
            "ray.cpus_per_trial/gpus_per_trial"
        )
    return min(slots)


class _Pool:
    """Starts workers and replaces one that dies; a worker that cannot even start stops the sweep."""

    def __init__(self, config: SweepConfig, backend: BackendFactory) -> None:
        import ray

        self.remote = ray.remote(SweepWorker).options(
            num_cpus=config.ray.cpus_per_trial, num_gpus=config.ray.gpus_per_trial, max_restarts=0
        )
        self.config, self.backend = config, backend
        self.load_s: list[float] = []
        self.actors: list = []
        self.warm_task: str | None = None

    def start(self, count: int) -> list:
        """`count` new workers, loaded (and warmed up once `warm_task` is known)."""
        actors = [self.remote.remote(self.config, self.backend) for _ in range(count)]
        ready = self._get([actor.ready.remote() for actor in actors])
        self.load_s += [r["load_s"] for r in ready]
        self.actors += actors
        if self.warm_task:
            self.warm_up(actors)
        return actors

    def warm_up(self, actors: list) -> None:
        self._get([actor.warm_up.remote(self.warm_task) for actor in actors])

    @staticmethod
    def _get(refs: list) -> list:
        import ray

        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            raise SweepError(
                f"a sweep worker could not start (loading the model or evaluator, or warming up): {err}"
            ) from None

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def check_task_data(config: SweepConfig) -> None:
    """Every catalogue task's data is there and complete (no empty split, no record without a
    field its prompt or metric reads), checked before Ray starts rather than by each worker."""
    from mee_bench.harness.catalogue import UnknownTaskError, task
    from mee_bench.harness.data import load_split

    for name in dict.fromkeys(config.tasks):
        try:
            spec = task(name)
        except UnknownTaskError:  # lm-eval's own tasks: `check_task_names` or the workers check them
            continue
        try:
            load_split(spec.dataset, spec.split, spec.check_records)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"tasks: {err}") from None


def check_task_names(config: SweepConfig) -> None:
    """Every task is one lm-eval (with the package's tasks) knows, as the workers will check it."""
    from mee_bench.harness.lm_eval_model import task_manager
    from mee_bench.sweep.backend import needs_builtin_tasks

    known = set(task_manager(include_defaults=needs_builtin_tasks(config.tasks)).all_tasks)
    for name in dict.fromkeys(config.tasks):
        if name not in known:
            raise ConfigError(f"unknown task {name!r} in `tasks`; did you mean {closest(name, sorted(known))!r}?")


def say_untrained_tasks(config: SweepConfig) -> None:
    """One line before the run when the model was never trained for some of the sweep's tasks."""
    from mee_bench.harness.trained_for import untrained_note

    note = untrained_note(config.model.pretrained, config.tasks)
    if note:
        print(note, file=sys.stderr)


def sweep_identity(config: SweepConfig, settings: dict) -> dict:
    """What a resume must match: the config and the provenance of its results."""
    return {**config_dict(config), "provenance": provenance(settings)}


def run_sweep(
    config: SweepConfig,
    force: bool = False,
    backend: BackendFactory = LMEvalBackend,
    progress: bool = True,
) -> SweepResult:
    """Run every unfinished trial of `config`; records land in `config.results_dir/records/`."""
    started = time.perf_counter()
    config = resolve_model(config)
    check_model(config)
    check_task_data(config)
    say_untrained_tasks(config)
    trials = expand_grid(config)
    settings = result_settings(config)
    ids = {trial: trial_id(trial, settings) for trial in trials}
    store = ResultStore(config.results_dir)
    store.open(sweep_fingerprint(config, settings), sweep_identity(config, settings), ids.values(), force)
    try:
        finished = store.finished()
        pending = collections.deque((t, 1) for t in trials if ids[t] not in finished)
        result = SweepResult(config.results_dir, total=len(trials), skipped=len(trials) - len(pending))
        if pending:
            _run_on_ray(config, store, pending, ids, settings, backend, result, progress)
    finally:
        store.close()
    result.wall_s = time.perf_counter() - started
    return result


def _run_on_ray(
    config: SweepConfig,
    store: ResultStore,
    pending: collections.deque,
    ids: dict[Trial, str],
    settings: dict,
    backend: BackendFactory,
    result: SweepResult,
    progress: bool,
) -> None:
    import ray
    from tqdm import tqdm

    end_left_over(config.results_dir)  # what a driver killed here before left running (we hold the lock)
    owned = connect_ray(config)
    if owned and not config.ray.address:
        record_started(config.results_dir)
    pool = _Pool(config, backend)
    try:
        idle = pool.start(_worker_count(config, len(pending)))
        result.workers = len(idle)
        if owned and not config.ray.address:
            record_started(config.results_dir)  # now with the workers
        unknown = ray.get(idle[0].unknown_tasks.remote(list(dict.fromkeys(config.tasks))))
        for task, suggestion in unknown.items():
            hint = f"did you mean {suggestion!r}?" if suggestion else "`lm_eval ls tasks` lists the known ones"
            raise ConfigError(f"unknown task {task!r} in `tasks`; {hint}")
        pool.warm_task = config.tasks[0]
        pool.warm_up(idle)
        bar = tqdm(total=result.total, initial=result.skipped, unit="trial", desc=config.name, disable=not progress)
        started = time.perf_counter()
        _dispatch(config, store, pool, idle, pending, ids, settings, result, bar)
        result.run_s = time.perf_counter() - started
    finally:
        result.worker_load_s = list(pool.load_s)
        pool.stop()
        if owned:
            ray.shutdown()
            forget(config.results_dir)


def _dispatch(
    config: SweepConfig,
    store: ResultStore,
    pool: _Pool,
    idle: list,
    pending: collections.deque,
    ids: dict[Trial, str],
    settings: dict,
    result: SweepResult,
    bar: Any,
) -> None:
    """Keep every worker busy; record each outcome as it arrives; retry a failed trial once."""
    import ray

    from mee_bench.provenance import git_commit

    common = {"sweep": {"name": config.name, "output_dir": str(config.results_dir)}, "git": git_commit()}
    errors: dict[str, list[str]] = collections.defaultdict(list)
    inflight: dict = {}
    with bar:
        while pending or inflight:
            while pending and idle:
                actor = idle.pop()
                trial, attempt = pending.popleft()
                inflight[actor.run.remote(trial, result.workers)] = (actor, trial, attempt)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            actor, trial, attempt = inflight.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                outcome = {"status": "failed", "error": f"the worker died during the trial: {err}"}
                [actor] = pool.start(1)
            idle.append(actor)
            if outcome["status"] == "failed":
                errors[ids[trial]].append(outcome["error"])
            record = {
                **common,
                **{k: v for k, v in outcome.items() if k != "error"},
                "trial_id": ids[trial],
                "trial": dataclasses.asdict(trial),
                "config": {"policy": trial.policy(config).as_dict(), **settings},
                # what tables need to know about the measure, so reading results needs no engine
                "measure_facts": measure_facts(trial.policy(config).measure),
                **({"calibration": read_policy_file(trial.calibration)[1]} if trial.calibration else {}),
                "attempts": attempt,
                "errors": errors[ids[trial]],
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            store.write(record)
            if outcome["status"] == "failed" and attempt == 1:
                pending.append((trial, 2))
                continue
            result.ran += 1
            if outcome["status"] == "failed":
                result.failed.append(ids[trial])
            bar.set_postfix(failed=len(result.failed), refresh=False)
            bar.update(1)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cleanup(config: SweepConfig) -> int:
    """`--cleanup`: end what a killed driver of this sweep left running (never a live driver's Ray)."""
    running = driver_alive(config.results_dir)
    if running is not None:
        raise SweepError(f"the sweep driver (pid {running}) writing {config.results_dir} still runs; stop it first")
    ended = end_left_over(config.results_dir)
    print(
        f"ended {len(ended)} Ray process(es) left by a killed sweep in {config.results_dir}"
        if ended
        else f"no Ray processes left behind by a sweep in {config.results_dir}"
    )
    return 0


def _describe(trials: list[Trial]) -> str:
    lines = [f"{len(trials)} trials:"]
    lines += [
        f"  {t.task:<20} {t.measure:<20} threshold={t.threshold} min_exit_layer={t.min_exit_layer}" for t in trials
    ]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`mee-bench sweep CONFIG [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="mee-bench sweep",
        description="Run measures x thresholds x min exit layers x tasks on Ray (resumable), then the leaderboard.",
    )
    parser.add_argument("config", help="sweep YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. limit=50 tasks=[squad_mee]")
    parser.add_argument(
        "--force", action="store_true", help="adopt this config in an output dir that holds another sweep"
    )
    parser.add_argument("--dry-run", action="store_true", help="check the config and list the trials; run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="end the Ray processes a killed run of this sweep left behind; run nothing",
    )
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a sweep as Ctrl-C does: finished trials stay
    try:
        return _run_cli(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
        if args.cleanup:
            return _cleanup(config)
        if args.dry_run:  # every check a real run makes before and right after Ray starts
            resolved = resolve_model(config)
            check_model(resolved)
            check_task_names(resolved)
            check_task_data(resolved)
            say_untrained_tasks(resolved)
            settings = result_settings(resolved)  # a resume the real run would refuse is refused here too
            ResultStore(resolved.results_dir).check(
                sweep_fingerprint(resolved, settings), sweep_identity(resolved, settings), args.force
            )
            print(_describe(expand_grid(resolved)))
            return 0
        result = run_sweep(config, force=args.force, progress=not args.no_progress)
    except (ConfigError, SweepError) as err:
        print(f"mee-bench sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "mee-bench sweep: interrupted; finished trials are saved, run the same command to resume", file=sys.stderr
        )
        return 130
    print(
        f"{result.total} trials: {result.skipped} already done, {result.ran} run now, "
        f"{len(result.failed)} failed; records in {result.output_dir / RECORDS_DIR}"
    )
    for failed in result.failed:
        print(f"  failed twice: {failed} (see its record for the error)", file=sys.stderr)
    from mee_bench.sweep.leaderboard import build_leaderboard

    if any(r.get("status") == "ok" for r in load_records(result.output_dir)):
        for path in build_leaderboard(result.output_dir):
            print(f"wrote {path}")
    return 1 if result.failed else 0
