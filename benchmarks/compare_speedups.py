"""Do two sweeps of the same config agree on their speedups? (issue: speedups you can trust)

Matches trials by task, measure, threshold and minimum exit layer, and for each pair says
whether the two paired 95% intervals overlap. A policy that never exits (average exit layer =
the model's depth) differs from `full` only by its checks, so unbiased timing reads it at
1 - (its checks' share of its decode time), its own `measure_ms` over its encoder and decoder
time: this checks that its interval holds that figure, and whether it holds 1.00x. Writes a
Markdown table beside the second sweep.

    python benchmarks/compare_speedups.py results/quickstart results/quickstart-busy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from mee_bench.sweep.store import load_records
from mee_bench.timing.statistics import Speedup


def paired_speedups(directory: Path) -> dict[tuple, tuple[Speedup, dict]]:
    """(task, measure, threshold, min exit layer) -> (paired speedup, efficiency) of each successful trial."""
    found = {}
    for record in load_records(directory):
        efficiency = record.get("efficiency", {})
        if record.get("status") == "ok" and "paired_speedup" in efficiency:
            trial = record["trial"]
            key = (trial["task"], trial["measure"], trial["threshold"], trial["min_exit_layer"])
            found[key] = (Speedup.from_dict(efficiency["paired_speedup"]), efficiency)
    return found


def overlap(a: Speedup, b: Speedup) -> bool:
    return a.low <= b.high and b.low <= a.high


def without_checks(efficiency: dict) -> float | None:
    """What a never-exiting policy should read if its checks were its only difference from `full`:
    1 - the share of its decode time spent in them. None for records without the split."""
    decode_ms = efficiency.get("encoder_ms", 0) + efficiency.get("decoder_ms", 0)
    if "measure_ms" not in efficiency or decode_ms <= 0:
        return None
    return 1 - efficiency["measure_ms"] / decode_ms


def compare(first: Path, second: Path) -> tuple[str, dict]:
    one, two = paired_speedups(first), paired_speedups(second)
    shared = sorted(set(one) & set(two), key=str)
    if not shared:
        raise ValueError(f"{first} and {second} share no trial with paired timing; run both with timing.paired=true")
    rows, agree, never_exit, never_exit_at_one, never_exit_at_checks, full_at_one = [], 0, 0, 0, 0, 0
    for key in shared:
        (a, _), (b, eff_b) = one[key], two[key]
        same = overlap(a, b)
        agree += same
        idle = eff_b.get("avg_exit_layer") == eff_b.get("num_layers") and key[1] != "full"
        if key[1] == "full":  # `full` timed against itself: the null check of the timing
            full_at_one += (a.low <= 1 <= a.high) + (b.low <= 1 <= b.high)
        note = ""
        if idle:
            never_exit += 1
            never_exit_at_one += b.low <= 1 <= b.high
            expected = without_checks(eff_b)
            holds = expected is not None and b.low <= expected <= b.high
            never_exit_at_checks += holds
            note = f"1.00x within: {'yes' if b.low <= 1 <= b.high else 'NO'}; " + (
                "no check time recorded"
                if expected is None
                else f"1 - checks' share = {expected:.3f} within: {'yes' if holds else 'NO'}"
            )
        busy = "yes" if eff_b.get("load", {}).get("busy") else "no"
        rows.append([*map(str, key), a.format(), b.format(), busy, "yes" if same else "NO", note])
    summary = {
        "rows": len(shared),
        "intervals_overlap": agree,
        "overlap_fraction": agree / len(shared),
        "never_exiting_rows": never_exit,
        "never_exiting_rows_at_one": never_exit_at_one,
        "never_exiting_rows_at_their_checks_cost": never_exit_at_checks,
        "full_against_itself_at_one": full_at_one,
        "max_half_width": max(max(one[k][0].half_width, two[k][0].half_width) for k in shared),
    }
    header = [
        "task",
        "measure",
        "threshold",
        "min exit layer",
        first.name,
        second.name,
        f"{second.name} busy",
        "intervals overlap",
        "never exits",
    ]
    text = "\n".join(
        [
            f"# Paired speedups: {first} vs {second}",
            "",
            f"{agree} of {len(shared)} rows overlap ({100 * agree / len(shared):.0f}%); {never_exit_at_one} of "
            f"{never_exit} never-exiting rows of {second.name} read 1.00x within their interval and "
            f"{never_exit_at_checks} read 1 - their checks' share of their time (what their checks alone would "
            "cost); `full` timed "
            f"against itself reads 1.00x within its interval in {full_at_one} of "
            f"{2 * sum(k[1] == 'full' for k in shared)} "
            f"cases (both runs); widest interval "
            f"+-{100 * summary['max_half_width']:.1f}%.",
            "",
            tabulate(rows, header, tablefmt="github", disable_numparse=True),
            "",
        ]
    )
    return text, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    try:
        text, _ = compare(args.first, args.second)
    except ValueError as err:
        print(f"compare_speedups: error: {err}", file=sys.stderr)
        return 2
    out = args.second / f"agreement_with_{args.first.name}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
