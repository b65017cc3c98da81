"""Markdown tables of the speed benchmarks' JSON records (results/bench/*.json), for docs/RESULTS.md.

One function per benchmark, each reading the record the benchmark wrote and nothing else, so
the figures shown are always the ones on disk. Torch-free: the page is rebuilt without a model.
"""

from __future__ import annotations

import re
from fractions import Fraction

from tabulate import tabulate

from mee_bench.formatting import MISSING, fixed, percent
from mee_bench.timing.statistics import Speedup


def table(rows: list[list], header: list[str]) -> str:
    return tabulate(rows, header, tablefmt="github", disable_numparse=True)


def interval(value: float | None, bounds: list[float] | None) -> str:
    """`1.23x [1.10, 1.35]` from a value and its 95% bounds, as decode_speed writes them."""
    if value is None:
        return MISSING
    return f"{value:.2f}x" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")


def signed_percent(shift: float, low: float, high: float) -> str:
    return f"{100 * shift:+.1f}% [{100 * low:+.1f}%, {100 * high:+.1f}%]"


def machine(record: dict) -> str | None:
    """Platform, torch, threads and the other processes' load, as far as the record holds them."""
    info = record.get("machine") or {}
    if isinstance(info, str):
        return info
    parts = [
        info.get("gpu") or info.get("platform") or record.get("cpu"),
        info.get("torch") and f"torch {info['torch']}",
    ]
    threads = info.get("threads", record.get("threads"))
    parts.append(threads and f"{threads} torch thread(s)")
    load = record.get("load") or {}
    if "other_processes_cpu_cores" in load:
        parts.append(f"other processes took {load['other_processes_cpu_cores']:.2f} of {load['cpus']} CPUs")
    shown = [str(part) for part in parts if part]
    return ", ".join(shown) or None


def width_line(costs: dict[str, dict[str, float]]) -> str:
    """One sentence: what a pass over w positions costs relative to one."""
    one = costs["1"]["layers_ms"] + costs["1"]["head_ms"]
    relative = ", ".join(f"{w}: {(c['layers_ms'] + c['head_ms']) / one:.2f}x" for w, c in costs.items() if w != "1")
    return (
        f"One pass through every layer and the head costs {one:.2f} ms over 1 position "
        f"(layers {costs['1']['layers_ms']:.2f}, head {costs['1']['head_ms']:.2f}); over w positions, "
        f"relative to 1 ({relative})."
    )


def policy_speed(result: dict) -> str:
    """`benchmarks/policy_speed.py`: one row per policy, one speedup column per batch size."""
    batches = [entry["batch"] for entry in result["batches"]]
    by_policy: dict[str, dict[int, dict]] = {}
    for entry in result["batches"]:
        for row in entry["policies"]:
            by_policy.setdefault(row["policy"], {})[entry["batch"]] = row
    header = [
        "policy",
        *(f"speedup, batch {b}" for b in batches),
        "layers/token",
        "identical to full",
        "acceptance",
        "accepted drafts/round",
    ]
    rows = []
    for name, per_batch in by_policy.items():
        first = per_batch[batches[0]]
        rows.append(
            [
                f"`{name}`",
                *(per_batch[b]["speedup_vs_full"] for b in batches),
                fixed(first["layers_per_token"]),
                "yes" if all(r["identical_to_full"] for r in per_batch.values()) else "no",
                fixed(first["acceptance_rate"]),
                fixed(first["mean_accepted_draft"]),
            ]
        )
    settings = result["settings"]
    note = (
        f"{settings['sentences']} Tatoeba sentences, `{settings['model']}`, {settings['dtype']}, "
        f"{result['machine']['threads']} torch thread; speedup = ratio of paired ms/token against `full` "
        f"[95% interval]; layers/token and the speculation figures at batch {batches[0]}."
        + (f" {width_line(result['width_cost'])}" if "width_cost" in result else "")
    )
    return f"{note}\n\n{table(rows, header)}"


def policy_label(settings: dict) -> str:
    """`lstm 0.5, from 2`, `fixed, layer 2`, `full`: a policy as the benchmarks' tables name it."""
    measure = settings["measure"]
    if measure == "full":
        return "full"
    if measure == "fixed":
        return f"fixed, layer {settings['min_exit_layer']}"
    return f"{measure} {settings['threshold']:g}, from {settings['min_exit_layer']}"


def pairing_check(result: dict) -> str:
    """`benchmarks/pairing_check.py`: lockstep against whole decodes one after the other."""
    rows = [
        [
            policy_label(row["policy_settings"]),
            f"{row['mean_lockstep']:.3f}",
            f"{row['mean_whole examples']:.3f}",
            signed_percent(row["shift"], row["low"], row["high"]),
            percent(row["round_scatter_lockstep"]),
            percent(row["round_scatter_whole examples"]),
        ]
        for row in result["policies"]
    ]
    settings = result["settings"]
    note = (
        f"{settings['sentences']} Tatoeba sentences, {settings['rounds']} rounds, `{settings['model']}`: "
        "speedup over `full` with the two decodes taking turns token by token (lockstep) and with whole "
        "decodes one after the other, both over the policy's positions; shift = lockstep / whole - 1 with its "
        "95% interval over rounds; scatter = the rounds' spread."
    )
    return f"{note}\n\n" + table(
        rows, ["policy", "lockstep", "whole decodes", "shift", "scatter, lockstep", "scatter, whole"]
    )


def busy_check(result: dict) -> str:
    """`benchmarks/busy_check.py`: the same paired speedups with a CPU hog on and off, round by round."""
    rows = [
        [
            row["policy"],
            f"{row['mean_idle']:.3f}",
            f"{row['mean_busy']:.3f}",
            signed_percent(row["shift"], row["low"], row["high"]),
        ]
        for row in result["policies"]
    ]
    settings, others = result["settings"], result.get("other_processes_cpu_cores", {})
    load = "".join(f"; other processes took {sum(v) / len(v):.2f} cores in {k} rounds" for k, v in others.items() if v)
    note = (
        f"{settings['sentences']} sentences of `{settings['task']}`, {settings['rounds']} rounds, "
        f"`{settings['model']}`: busy / idle - 1 of each paired speedup, 95% interval over rounds{load}."
    )
    return f"{note}\n\n" + table(rows, ["policy", "speedup, idle", "speedup, busy", "busy over idle"])


def pruned_checks(result: dict) -> str:
    """`benchmarks/pruned_checks.py`: how often vocabulary-pruned checks change an exit, and what it costs."""
    rows = [
        [
            row["policy"],
            str(row["vocab_top_k"]),
            percent(row["decisions_differing"]),
            percent(row["identical_outputs"]),
            f"{row['bleu_delta']:+.2f}",
            f"{row['chrf_delta']:+.2f}",
            f"{fixed(row['avg_exit_layer_unpruned'])} -> {fixed(row['avg_exit_layer'])}",
        ]
        for row in result["policies"]
    ]
    settings = result["settings"]
    note = (
        f"{settings['sentences']} sentences of `{settings['task']}` ({settings['split']}), batch {settings['batch']}."
    )
    return f"{note}\n\n" + table(
        rows,
        [
            "policy",
            "top-k",
            "exit decisions differing",
            "identical outputs",
            "BLEU change",
            "chrF change",
            "avg exit layer (unpruned -> pruned)",
        ],
    )


def first_read(result: dict) -> str:
    """`benchmarks/first_read.py`: the int8 and float16 first read of the head, paired in the decoding loop."""
    rows = [
        [
            shape["shape"],
            shape["head"],
            *(Speedup.from_dict(shape[key]).format() for key in ("int8_vs_float16", "int8_vs_full", "float16_vs_full")),
            "yes" if shape["identical_to_full"] else "no",
        ]
        for shape in result["shapes"]
    ]
    return f"Policy: {result['settings']['policy']}.\n\n" + table(
        rows, ["shape", "head", "int8 over float16", "int8 over full", "float16 over full", "identical to full"]
    )


def token_profile(result: dict) -> str:
    """`benchmarks/token_profile.py`: ms per token by where the decoder spends it (torch.profiler ranges)."""
    parts = list(next(iter(result["policies"].values()))["ms_per_token"])
    rows = [
        [name, fixed(entry["decoder_ms_per_token"]), *(fixed(entry["ms_per_token"][part]) for part in parts)]
        for name, entry in result["policies"].items()
    ]
    settings = result["settings"]
    note = (
        f"{settings['sentences']} Tatoeba sentences, `{settings['model']}`, batch {settings['batch']}, "
        f"{settings['threads']} thread; {settings.get('note', '')}: read shares, not absolute times."
    )
    return f"{note}\n\n" + table(rows, ["policy", "ms/token", *parts])


EXIT_KEY = re.compile(r"^speedup_exit(\d+)(_deferred)?_of_(\d+)$")


def _exit_column(key: str) -> str:
    """`speedup_exit4_deferred_of_12` -> `exit at 1/3 of the depth, deferred K/V`: shapes of any depth share columns."""
    layer, deferred, depth = EXIT_KEY.match(key).groups()
    return f"exit at {Fraction(int(layer), int(depth))} of the depth, {'deferred' if deferred else 'copied'} K/V"


def decode_speed(result: dict) -> str:
    """`benchmarks/decode_speed.py`: `full` against `model.generate`, forced exits, per-check overheads."""
    speed = result.get("speed", [])
    columns = {}
    for entry in speed:
        for key in entry:
            if EXIT_KEY.match(key):
                columns.setdefault(_exit_column(key), None)
    rows = []
    for entry in speed:
        cells = {
            _exit_column(key): interval(entry[key], entry.get(f"{key}_ci95")) for key in entry if EXIT_KEY.match(key)
        }
        rows.append(
            [
                entry["shape"],
                entry["dtype"],
                str(entry["batch"]),
                interval(entry.get("full_vs_hf_generate"), entry.get("full_vs_hf_generate_ci95")),
                *(cells.get(column, MISSING) for column in columns),
            ]
        )
    parts = [table(rows, ["shape", "dtype", "batch", "`full` time / `generate` time", *columns])]
    overhead = result.get("overhead", [])
    measures = list(
        dict.fromkeys(
            k
            for entry in overhead
            for k in entry
            if k not in ("shape", "dtype", "batch", "layer_ms") and not k.endswith("_ci95")
        )
    )
    if measures:
        runs = [f"{entry['shape']}, {entry['dtype']}, batch {entry['batch']}" for entry in overhead]
        rows = [
            [
                f"`{m}`",
                *(
                    f"{entry[m]:.2f} [{entry[m + '_ci95'][0]:.2f}, {entry[m + '_ci95'][1]:.2f}]"
                    if m in entry
                    else MISSING
                    for entry in overhead
                ),
            ]
            for m in measures
        ]
        rows.append(["one layer (ms)", *(fixed(entry.get("layer_ms")) for entry in overhead)])
        parts += [
            (
                "A check's cost in decoder layers, the median over rounds with its 95% interval "
                "(`@top64`: vocabulary-pruned checks; `_pruned_check`: a check after the token's first):"
            ),
            table(rows, ["measure", *runs]),
        ]
    return "\n\n".join(parts)


def train_speed(result: dict) -> str:
    """`benchmarks/train_speed.py`: the training preset's step time against the fp32 reference."""
    rows = []
    for objective, entry in result["objectives"].items():
        reference, preset = entry["reference"], entry["preset"]
        rows.append(
            [
                objective,
                f"{reference['s_per_step']:.2f}",
                f"{preset['s_per_step']:.2f}",
                f"{entry['speedup_vs_fp32_reference']:.2f}x",
                preset["precision"],
                percent(entry["padding_fraction"]),
                str(preset["tokens_per_s"]),
            ]
        )
    note = (
        f"Preset `{result['preset']}`, {result['steps']} steps, {result['threads']} threads; reference: "
        f"{', '.join(result['reference'])}; peak memory of the preset {result['peak_rss_gb_preset']} GB."
    )
    return f"{note}\n\n" + table(
        rows, ["objective", "reference s/step", "preset s/step", "speedup", "precision", "padding", "tokens/s"]
    )


def sweep_throughput(result: dict) -> str:
    """`benchmarks/sweep_throughput.py`: trials per minute for workers x CPUs on one machine."""
    rows = [
        [
            name,
            str(run["trials"]),
            f"{run['trials_per_min']:.1f}",
            f"{run['trials_per_min_end_to_end']:.1f}",
            percent(run["model_load_share"]),
        ]
        for name, run in result["runs"].items()
    ]
    note = (
        f"`{result['task']}`, {result['limit']} examples, at most {result['max_gen_toks']} new tokens, "
        f"{result['model']}."
    )
    return f"{note}\n\n" + table(
        rows, ["workers", "trials", "trials/min (running)", "trials/min (end to end)", "model load share"]
    )
