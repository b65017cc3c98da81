"""A calibration record as a Markdown summary and a plot (risk vs threshold, delta marked,
the chosen threshold highlighted), one panel per measure."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

SUMMARY_FILE = "calibration.md"
PLOT_FILE = "calibration.png"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(record: dict) -> list[str]:
    """The verdict per measure: chosen threshold, test risk against delta, exit layer, speedup."""
    lines = []
    for measure, entry in record["measures"].items():
        test = entry["test"]
        if entry["chosen_threshold"] is None:
            lines.append(f"{measure}: {entry['note']}")
            continue
        verdict = "within" if test["within_delta"] else "ABOVE"
        lines.append(
            f"{measure}: threshold {entry['chosen_threshold']} certified; test risk {test['risk']:.4f} ({verdict} "
            f"delta={record['delta']}), average exit layer {test['avg_exit_layer']:.2f} of "
            f"{record['model']['num_layers']}, "
            f"speedup {test['speedup']:.2f}x over full"
        )
    shipped = record["policy"]
    lines.append(
        f"recommended policy: {shipped['measure']}"
        + (
            f", threshold {shipped['threshold']}, min exit layer {shipped['min_exit_layer']}"
            if shipped["measure"] != "full"
            else " (never exit)"
        )
    )
    return lines


def markdown(record: dict) -> str:
    calibration, test = record["splits"]["calibration"], record["splits"]["test"]
    consistency = record["consistency"]
    parts = [
        f"# Calibration `{record['name']}`: {record['task']}",
        "",
        f"Learn-then-Test with fixed-sequence testing and the Hoeffding-Bentkus p-value: with probability at least "
        f"1 - epsilon = {1 - record['epsilon']:.2f} over the calibration draw, the chosen threshold's risk is at most "
        f"delta = {record['delta']}. Consistency: `{consistency['kind']}` with `{consistency['metric']}` "
        f"({'distance to the full model' if consistency['kind'] == 'textual' else 'quality loss to the reference'})"
        ". "
        f"{len(record['measures'])} measure(s), each tested at epsilon / {len(record['measures'])} = "
        f"{record['epsilon_per_measure']:.3g} so the recommended pick among them keeps the guarantee.",
        "",
        f"Calibration: {calibration['size']} distinct prompts of `{calibration['split']}` (seed "
        f"{calibration['seed']}); "
        f"test: {test['size']} other prompts of `{test['split']}`, decoded at batch size {test['batch_size']}, "
        f"`full` and each policy alternating over {test['timing_blocks']} blocks in one process.",
    ]
    if consistency.get("note"):
        parts += ["", f"Note: {consistency['note']}."]
    for measure, entry in record["measures"].items():
        rows = [
            [
                _fmt(row["threshold"], 3),
                _fmt(row["risk"], 4),
                f"{row['p_value']:.3g}",
                _fmt(row["avg_exit_layer"], 2),
                "rejected" if row["rejected"] else ("not rejected (stop)" if row["tested"] else "not tested"),
            ]
            for row in entry["grid"]
        ]
        parts += [
            "",
            f"## {measure}",
            "",
            tabulate(
                rows, headers=["threshold", "risk", "p-value", "avg exit layer", "H: risk > delta"], tablefmt="github"
            ),
        ]
    parts += ["", "## Test split", ""]
    rows = []
    for measure, entry in record["measures"].items():
        test_ = entry["test"]
        rows.append(
            [
                measure,
                _fmt(entry["chosen_threshold"], 3),
                _fmt(test_["risk"], 4),
                "yes" if test_["within_delta"] else "no",
                f"{test_['avg_exit_layer']:.2f} / {record['model']['num_layers']}",
                f"{test_['speedup']:.2f}x",
            ]
        )
    parts.append(
        tabulate(
            rows,
            headers=["measure", "chosen threshold", "test risk", "within delta", "avg exit layer", "speedup vs full"],
            tablefmt="github",
        )
    )
    parts += ["", *[f"- {line}" for line in summary_lines(record)], ""]
    return "\n".join(parts)


def write_markdown(record: dict, directory: Path) -> Path:
    path = Path(directory) / SUMMARY_FILE
    path.write_text(markdown(record), encoding="utf-8")
    return path


def write_plot(record: dict, directory: Path) -> Path:
    from matplotlib.figure import Figure

    measures = record["measures"]
    figure = Figure(figsize=(4.5 * len(measures), 3.6), layout="constrained")
    axes = figure.subplots(1, len(measures), squeeze=False)[0]
    for ax, (measure, entry) in zip(axes, measures.items()):
        thresholds = [row["threshold"] for row in entry["grid"]]
        risks = [row["risk"] for row in entry["grid"]]
        ax.plot(thresholds, risks, marker="o", color="tab:blue", label="calibration risk")
        ax.axhline(record["delta"], color="tab:red", linestyle="--", label=f"delta = {record['delta']}")
        if entry["chosen_threshold"] is not None:
            chosen = thresholds.index(entry["chosen_threshold"])
            ax.plot(
                [thresholds[chosen]],
                [risks[chosen]],
                marker="*",
                markersize=16,
                color="tab:orange",
                linestyle="none",
                label=f"chosen {thresholds[chosen]:g} (test risk {entry['test']['risk']:.3f})",
            )
        ax.invert_xaxis()  # left to right: most to least conservative, the testing order
        ax.set_xlabel(f"{measure} threshold (testing order ->)")
        ax.set_ylabel(f"risk ({record['consistency']['kind']}, {record['consistency']['metric']})")
        ax.set_title(measure)
        ax.legend(fontsize="small")
    figure.suptitle(f"{record['task']}: Learn-then-Test, epsilon = {record['epsilon']}")
    path = Path(directory) / PLOT_FILE
    figure.savefig(path, dpi=120)
    return path
