"""The local Ray a sweep starts, written down so that a driver killed by SIGKILL leaves nothing running.

`ray.init` starts the GCS server, the raylet, its dashboard and runtime-env agents and the
workers as descendants of the driver; a driver killed by SIGKILL cannot stop them, and they
stay. So a driver that starts a local Ray writes those processes (pid and start time, so a
reused pid is never taken for one of them) into `<output_dir>/ray_processes.json`, and a clean
stop removes the file. The next sweep in that directory, or `mee-bench sweep CONFIG --cleanup`,
ends whatever the file still names, with their descendants. A cluster the sweep only joined
(`ray.address`) is not the sweep's to stop and is never written down.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROCESSES_FILE = "ray_processes.json"
STOP_GRACE_S = 5.0


def _identity(process) -> list:
    return [process.pid, process.create_time()]


def record_started(output_dir: Path) -> None:
    """Write down every live descendant of this driver (call after Ray started, and again after
    its workers did: the raylet starts them later)."""
    import psutil

    me = psutil.Process()
    children = []
    for child in me.children(recursive=True):
        try:
            children.append(_identity(child))
        except psutil.NoSuchProcess:
            continue
    path = Path(output_dir) / PROCESSES_FILE
    partial = path.with_name(f".{PROCESSES_FILE}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"driver": _identity(me), "processes": children}))
    os.replace(partial, path)


def forget(output_dir: Path) -> None:
    """The Ray this driver started has stopped: nothing left to end."""
    (Path(output_dir) / PROCESSES_FILE).unlink(missing_ok=True)


def _alive(identity: list):
    """The process of this (pid, start time), or None when it is gone or the pid was reused."""
    import psutil

    pid, started = identity
    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - started) < 1e-3 else None
    except psutil.NoSuchProcess:
        return None


def driver_alive(output_dir: Path) -> int | None:
    """The pid of the driver that wrote the processes file, if it still runs."""
    path = Path(output_dir) / PROCESSES_FILE
    if not path.is_file():
        return None
    try:
        driver = json.loads(path.read_text())["driver"]
    except (OSError, ValueError, KeyError):
        return None
    process = _alive(driver)
    return process.pid if process is not None and process.pid != os.getpid() else None


def end_left_over(output_dir: Path) -> list[int]:
    """End the Ray processes a killed driver left behind (and their descendants); returns their pids.

    The caller makes sure that driver is gone (`driver_alive`), or holds the directory's lock.
    """
    import psutil

    path = Path(output_dir) / PROCESSES_FILE
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text())["processes"]
    except (OSError, ValueError, KeyError):  # a write cut short: nothing trustworthy to end
        log.warning("ignoring the unreadable %s", path)
        path.unlink()
        return []
    targets: dict[int, psutil.Process] = {}
    for identity in recorded:
        process = _alive(identity)
        if process is None:
            continue
        targets[process.pid] = process
        try:
            targets.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    for process in targets.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, still_running = psutil.wait_procs(list(targets.values()), timeout=STOP_GRACE_S)
    for process in still_running:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(still_running, timeout=STOP_GRACE_S)
    path.unlink()
    if targets:
        log.warning("ended %d Ray process(es) a killed sweep driver left behind: %s", len(targets), sorted(targets))
    return sorted(targets)
