"""`mee-bench`: one entry point, one module per subcommand.

Each subcommand module exposes `cli(argv: list[str]) -> int` and parses its own
arguments, so the commands stay independent and importing one does not import all.
Errors a user can fix (a bad value, a missing or damaged file) end in one line and exit
status 2; anything else in one line that says how to see the traceback (`--debug` or
`MEE_BENCH_DEBUG=1` shows it for both).
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "demo": ("mee_bench.demo", "early-exit generation on the embedded default model: tokens, exit layers, speedup"),
    "train": (
        "mee_bench.train.loop",
        "train a T5 or decoder-only model with the final / weighted_ce / weighted_ce_kd objective",
    ),
    "train-heads": ("mee_bench.train.heads", "train the classifier, last_three_mlp and lstm exit heads of a model"),
    "sweep": ("mee_bench.sweep.runner", "run measures x thresholds x min exit layers x tasks on Ray with CodeCarbon"),
    "calibrate": ("mee_bench.calibrate.run", "pick exit thresholds with a Learn-then-Test risk guarantee (CALM)"),
    "leaderboard": ("mee_bench.sweep.leaderboard", "rebuild leaderboard tables and plots from a sweep's records"),
    "analyze": ("mee_bench.study.analysis", "the monotonicity study (the paper's Figures 1-3) on any model"),
    "ship": ("mee_bench.train.ship", "make a finished training run the embedded default model when it clearly leads"),
    "model-report": (
        "mee_bench.study.model_report",
        "a model's full-depth quality, per-layer agreement and training curves",
    ),
    "results-page": (
        "mee_bench.study.results_page",
        "regenerate docs/RESULTS.md and the README's summary table from results/",
    ),
}


DEBUG_ENV = "MEE_BENCH_DEBUG"
USAGE_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def usage() -> str:
    lines = ["usage: mee-bench COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`mee-bench COMMAND --help` shows a command's options; `--debug` shows tracebacks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mee-bench: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli(rest) or 0)
    except USAGE_ERRORS as err:
        if debug:
            raise
        print(f"mee-bench {name}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mee-bench {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the last line of defence: one line, the traceback on request)
        if debug:
            raise
        print(
            f"mee-bench {name}: internal error: {type(err).__name__}: {one_line(err)} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback, and report it)",
            file=sys.stderr,
        )
        return 1


def one_line(err: BaseException) -> str:
    """The error's message on one line (a FileNotFoundError without one names its file)."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
