"""A CPU-bound process that occupies one core until killed or `--seconds` pass.

Speed figures must survive a busy machine: run a sweep or a benchmark beside this and
compare with an idle run (`make quickstart-busy`), or toggle it round by round within one
process (`benchmarks/busy_check.py`, through `hog_running`).

    python benchmarks/cpu_hog.py [--seconds 900]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

STARTUP_S = 0.3  # long enough for the interpreter to start and the loop to spin


def spin(seconds: float) -> int:
    """Integer arithmetic in a tight loop: one core at 100%, no memory traffic to speak of."""
    deadline, counter = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        for _ in range(100_000):
            counter = (counter * 1103515245 + 12345) & 0x7FFFFFFF
    return counter


@contextmanager
def hog_running(seconds: float = 900.0) -> Iterator[subprocess.Popen]:
    """This hog in a child process, spinning by the time the block starts, killed when it ends."""
    hog = subprocess.Popen([sys.executable, __file__, "--seconds", str(seconds)])
    try:
        time.sleep(STARTUP_S)
        yield hog
    finally:
        hog.kill()
        hog.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=900.0)
    spin(parser.parse_args().seconds)
