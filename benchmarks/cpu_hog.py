"""A CPU-bound process that occupies one core until killed or `--seconds` pass.

Speed figures must survive a busy machine: run a sweep or a benchmark beside this and
compare with an idle run (`make quickstart-busy`).

    python benchmarks/cpu_hog.py [--seconds 900]
"""

from __future__ import annotations

import argparse
import time


def spin(seconds: float) -> int:
    """Integer arithmetic in a tight loop: one core at 100%, no memory traffic to speak of."""
    deadline, counter = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        for _ in range(100_000):
            counter = (counter * 1103515245 + 12345) & 0x7FFFFFFF
    return counter


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=900.0)
    spin(parser.parse_args().seconds)
