"""The machine's load while a trial ran: what other processes took of the CPUs it was meant to have."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

BUSY_MARGIN_CORES = 0.25  # others may use this much of our share before a trial counts as busy


@dataclass
class LoadMonitor:
    """The machine's load while something ran: load average, CPU frequency, and how much CPU
    other processes took (system busy time minus this process's and its children's)."""

    threads: int = 1  # CPUs this process is meant to use (its torch threads)
    started: float = 0.0
    elapsed: float = 0.0
    other_cores: float = 0.0
    _system_busy: float = 0.0
    _own: float = 0.0

    def start(self) -> "LoadMonitor":
        self.started = time.perf_counter()
        self._system_busy, self._own = _system_busy_s(), _own_cpu_s()
        return self

    def stop(self) -> dict:
        """End the watch; returns `report()`."""
        self.elapsed = time.perf_counter() - self.started
        self.other_cores = max(0.0, (_system_busy_s() - self._system_busy) - (_own_cpu_s() - self._own)) / max(
            self.elapsed, 1e-9
        )
        return self.report()

    def __enter__(self) -> "LoadMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def report(self) -> dict:
        cpus = os.cpu_count() or 1
        spare = max(cpus - self.threads, 0)
        return {
            "load_avg_1m": os.getloadavg()[0],
            "cpus": cpus,
            "cpu_mhz": _cpu_mhz(),
            "other_processes_cpu_cores": round(self.other_cores, 3),
            "busy": self.other_cores > spare + BUSY_MARGIN_CORES,
        }


def _system_busy_s() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu_s() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _cpu_mhz() -> float | None:
    """Current mean CPU frequency where the OS exposes it, else None."""
    import psutil

    try:
        frequency = psutil.cpu_freq()
    except (NotImplementedError, FileNotFoundError, OSError):
        return None
    return round(frequency.current, 1) if frequency and frequency.current else None
