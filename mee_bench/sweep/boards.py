"""A sweep's records as comparisons with `full`: one board per task, one row per configuration.

Speedup is `full`'s time over the configuration's, only between trials of the same sweep on the
same hardware (paired when the trial timed both in lockstep); an analysis-only measure (the oracle
runs every layer, it is a bound) gets none. Everything comes from the JSON records, without torch:
what a table needs to know about a measure, the sweep wrote into each record (`measure_facts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mee_bench.formatting import MISSING
from mee_bench.harness.catalogue import TASKS
from mee_bench.harness.trained_for import untrained_note
from mee_bench.timing.statistics import Speedup

# The quality number a task is judged by is the catalogue's primary metric; other metrics are
# shown beside it. Tasks outside the catalogue use the first metric of METRIC_PREFERENCE present.
PRIMARY_METRIC = {spec.name: spec.primary_metric for spec in TASKS}
METRIC_PREFERENCE = ("f1", "exact_match", "rougeL", "rougeLsum", "rouge1", "bleu", "chrf", "acc")


@dataclass
class Row:
    task: str
    measure: str
    analysis_only: bool
    threshold: float | None
    min_exit_layer: int | None
    metrics: dict[str, float | None]
    quality: float | None
    delta: float | None
    avg_exit_layer: float | None
    num_layers: int | None
    speedup: Speedup | None
    paired: bool  # the speedup comes from paired timing (else: full's ms/token over this trial's)
    busy: bool  # other processes took CPU this trial was meant to have
    ms_per_token: float | None
    energy_wh: float | None
    co2_g: float | None
    power: str
    calibration: dict | None = None  # a `calibrated` row's guarantee: delta, epsilon, test risk
    options: str = ""  # policy options that change how the measure runs, as a label suffix


def policy_options(record: dict) -> str:
    """A suffix for the measure's label naming the policy options that are on (vocabulary-pruned checks)."""
    top_k = record.get("config", {}).get("policy", {}).get("vocab_top_k")
    return f", top-{top_k} checks" if top_k else ""


@dataclass
class TaskBoard:
    task: str
    metric: str
    metric_names: list[str]
    rows: list[Row]
    failed: int = 0
    notes: list[str] = field(default_factory=list)
    untrained: bool = False  # the model's training record shows it was never trained for this task


def primary_metric(task: str, names: list[str]) -> str | None:
    if PRIMARY_METRIC.get(task) in names:
        return PRIMARY_METRIC[task]
    preferred = [m for m in METRIC_PREFERENCE if m in names]
    return (preferred or sorted(names) or [None])[0]


def _hardware_key(record: dict) -> tuple:
    hw = record.get("hardware", {})
    return hw.get("cpu_model"), hw.get("cpu_count"), hw.get("torch_threads"), hw.get("gpu")


def _order(measures: list[str]) -> dict[str, int]:
    order = {"full": -1}
    for index, measure in enumerate(measures):
        order.setdefault(measure, index)
    return order


def measure_facts(record: dict) -> dict:
    """What the sweep recorded about the trial's measure (`analysis_only`, `takes_threshold`)."""
    if "measure_facts" not in record:
        raise ValueError(
            f"record {record.get('trial_id', '?')} has no measure_facts (it predates them); "
            "rerun its sweep into a new output_dir to rebuild the records"
        )
    return record["measure_facts"]


def task_boards(records: list[dict], measure_order: list[str] | None = None) -> list[TaskBoard]:
    """Group records by task and compute each configuration's comparison with `full`."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["trial"]["task"], []).append(record)
    boards = []
    for task, task_records in by_task.items():
        ok = [r for r in task_records if r.get("status") == "ok"]
        names = sorted({name for r in ok for name in r.get("metrics", {})})
        metric = primary_metric(task, names)
        full = next((r for r in ok if r["trial"]["measure"] == "full"), None)
        board = TaskBoard(task, metric or MISSING, [metric] + [n for n in names if n != metric] if metric else [], [])
        board.failed = len(task_records) - len(ok)
        pretrained = next((r["config"]["model"]["pretrained"] for r in task_records if "config" in r), None)
        note = untrained_note(pretrained, [task]) if pretrained else None
        if note:
            board.untrained = True
            board.notes.append(note.removeprefix("note: "))
        if full is None:
            board.notes.append("no successful `full` trial: deltas and speedups are not available")
        for record in ok:
            board.rows.append(_row(task, record, metric, full, board))
        order = _order(measure_order or sorted({r.measure for r in board.rows}))
        board.rows.sort(key=lambda r: (order.get(r.measure, len(order)), r.threshold or 0.0, r.min_exit_layer or 0))
        boards.append(board)
    return sorted(boards, key=lambda b: b.task)


def _row(task: str, record: dict, metric: str | None, full: dict | None, board: TaskBoard) -> Row:
    trial, efficiency, energy = record["trial"], record.get("efficiency", {}), record.get("energy", {})
    quality = record["metrics"].get(metric) if metric else None
    full_quality = full["metrics"].get(metric) if full and metric else None
    analysis_only = measure_facts(record)["analysis_only"]
    speedup, paired = None, "paired_speedup" in efficiency
    ms = efficiency.get("decode_ms_per_token")
    if paired and not analysis_only:
        speedup = Speedup.from_dict(efficiency["paired_speedup"])
    elif full is not None and ms and not analysis_only:
        if _hardware_key(full) == _hardware_key(record):
            ratio = full["efficiency"]["decode_ms_per_token"] / ms
            speedup = Speedup(ratio, ratio, ratio, 1)
        else:
            board.notes.append(f"{trial['measure']} ran on different hardware than `full`: no speedup shown")
    kwh, kg = energy.get("energy_kwh"), energy.get("emissions_kg_co2eq")
    calibrated = trial["measure"] == "calibrated"
    return Row(
        task=task,
        measure=f"calibrated {record['config']['policy']['measure']}" if calibrated else trial["measure"],
        analysis_only=analysis_only,
        threshold=trial["threshold"],
        min_exit_layer=trial["min_exit_layer"],
        metrics=record["metrics"],
        quality=quality,
        delta=None if quality is None or full_quality is None else quality - full_quality,
        avg_exit_layer=efficiency.get("avg_exit_layer"),
        num_layers=efficiency.get("num_layers"),
        speedup=speedup,
        paired=paired,
        busy=bool(efficiency.get("load", {}).get("busy")),
        ms_per_token=ms,
        energy_wh=None if kwh is None else 1e3 * kwh,
        co2_g=None if kg is None else 1e3 * kg,
        power=energy.get("power_source", "unknown"),
        calibration=record.get("calibration", {}) if calibrated else None,
        options=policy_options(record),
    )


@dataclass
class SummaryRow:
    task: str
    measure: str
    best: Row | None
    reason: str = ""


def summary(boards: list[TaskBoard], tolerance: float = 1.0) -> list[SummaryRow]:
    """Per task and measure: the fastest policy within `tolerance` quality points of `full`, or none."""
    result = []
    for board in boards:
        measures = dict.fromkeys(r.measure for r in board.rows if r.measure != "full" and not r.analysis_only)
        for measure in measures:
            candidates = [
                r
                for r in board.rows
                if r.measure == measure and r.speedup is not None and r.delta is not None and r.delta >= -tolerance
            ]
            best = max(candidates, key=lambda r: r.speedup.ratio) if candidates else None
            reason = "" if best else f"none within {tolerance:g} point(s) of full"
            result.append(SummaryRow(board.task, measure, best, reason))
    return result


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both speedup and quality, by increasing speedup."""
    front: list[tuple[float, float]] = []
    for speed, quality in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or quality > front[-1][1]:
            front.append((speed, quality))
    return front[::-1]
