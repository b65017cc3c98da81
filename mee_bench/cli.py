"""`mee-bench`: one entry point, one module per subcommand.

Each subcommand module exposes `cli(argv: list[str]) -> int` and parses its own
arguments, so the commands stay independent and importing one does not import all.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("mee_bench.demo", "early-exit generation on the embedded default model: tokens, exit layers, speedup"),
    "train": ("mee_bench.train.loop", "train a T5 with the final / weighted_ce / weighted_ce_kd objective"),
    "train-heads": ("mee_bench.train.heads", "train the classifier, last_three_mlp and lstm exit heads of a model"),
    "sweep": ("mee_bench.sweep.runner", "run measures x thresholds x min exit layers x tasks on Ray with CodeCarbon"),
    "calibrate": ("mee_bench.calibrate.run", "pick exit thresholds with a Learn-then-Test risk guarantee (CALM)"),
    "leaderboard": ("mee_bench.sweep.leaderboard", "rebuild leaderboard tables and plots from a sweep's records"),
    "analyze": ("mee_bench.study.analysis", "the monotonicity study (the paper's Figures 1-3) on any model"),
    "model-report": ("mee_bench.study.model_report", "a model's full-depth quality, per-layer agreement and training curves"),
}


def usage() -> str:
    lines = ["usage: mee-bench COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`mee-bench COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mee-bench: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
