"""`mee-bench calibrate CONFIG`: pick thresholds with a Learn-then-Test guarantee.

One model load decodes the calibration prompts once with `full` and once per grid point;
each measure's thresholds are tested in order (`ltt.fixed_sequence_test`), and the chosen
policies are then checked on a disjoint test split: measured risk, average exit layer, and
the speedup over `full` timed in the same process on the same prompts, all policies taking turns
one generated token at a time.
With `workers > 1` the grid points run on Ray actors that each load the model once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Protocol, Sequence

from mee_bench.calibrate.config import CalibrationConfig, ConfigError, load_config
from mee_bench.calibrate.consistency import CLIPPING_NOTE, check_references, losses
from mee_bench.calibrate.examples import Example, draw_splits, load_task
from mee_bench.calibrate.ltt import CalibrationError, fixed_sequence_test
from mee_bench.engine.policy import POLICY_FILE, ExitPolicy
from mee_bench.engine.steps import run_steps
from mee_bench.timing.pairing import in_turn

RECORD_FILE = "calibration.json"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_generator(config: CalibrationConfig):
    """Load the model and its exit heads once; check that every measure can run on it."""
    from mee_bench.engine.decoding import EarlyExitGenerator
    from mee_bench.engine.heads import ExitHeads, find_heads
    from mee_bench.engine.loading import load_model
    from mee_bench.harness.trained_for import untrained_note
    from mee_bench.paths import DEFAULT_MODEL_DIR

    pretrained = config.model.pretrained or str(DEFAULT_MODEL_DIR)
    note = untrained_note(pretrained, [config.task])
    if note:
        print(note, file=sys.stderr)
    model, tokenizer = load_model(pretrained, config.model.dtype, config.model.device)
    local = Path(pretrained).expanduser()
    heads_path = find_heads(local if local.is_dir() else None, config.model.heads)
    generator = EarlyExitGenerator(model, tokenizer, ExitHeads.load(heads_path) if heads_path else None)
    for measure in config.measures:
        policy = config.policy(measure, config.thresholds[measure][0])
        if policy.needs_heads and generator.heads is None:
            raise ConfigError(
                f"measure {measure!r} needs trained exit heads and none exist beside {pretrained}: train them with "
                "`mee-bench train-heads MODEL`, set model.heads=PATH, or drop the measure"
            )
        try:
            policy.check_model(generator.num_layers)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return generator


def decode_steps(generator, prompts: Sequence[str], policy: ExitPolicy, max_new_tokens: int, batch_size: int):
    """Texts and merged GenerationStats of `prompts` under `policy`, in order, `batch_size` at a time,
    decoded a step at a time (a generator returning them; `decode` runs it through)."""
    texts, stats = [], None
    for start in range(0, len(prompts), batch_size):
        batch_texts, output = yield from generator.text_steps(
            prompts[start : start + batch_size], policy, max_new_tokens
        )
        texts += batch_texts
        stats = output.stats if stats is None else stats.merge(output.stats)
    return texts, stats


def decode(generator, prompts: Sequence[str], policy: ExitPolicy, max_new_tokens: int, batch_size: int):
    """Texts and merged GenerationStats of `prompts` under `policy`, in order, `batch_size` at a time."""
    return run_steps(decode_steps(generator, prompts, policy, max_new_tokens, batch_size))


class GridDecoder(Protocol):
    def decode_all(self, policies: list[ExitPolicy]) -> list[tuple[list[str], dict]]:
        """Each policy's calibration outputs and efficiency figures, in order."""


class InProcessDecoder:
    def __init__(self, generator, prompts: list[str], max_new_tokens: int, batch_size: int) -> None:
        self.generator, self.prompts, self.max_new_tokens, self.batch_size = (
            generator,
            prompts,
            max_new_tokens,
            batch_size,
        )

    def decode_all(self, policies: list[ExitPolicy]) -> list[tuple[list[str], dict]]:
        results = []
        for policy in policies:
            texts, stats = decode(self.generator, self.prompts, policy, self.max_new_tokens, self.batch_size)
            results.append((texts, stats.as_dict()))
        return results


class CalibrationWorker:
    """A Ray actor: loads the model once, then decodes the calibration prompts under one policy per call."""

    def __init__(self, config: CalibrationConfig, prompts: list[str], max_new_tokens: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.decoder = InProcessDecoder(build_generator(config), prompts, max_new_tokens, config.batch_size)

    def decode(self, policy: ExitPolicy) -> tuple[list[str], dict]:
        return self.decoder.decode_all([policy])[0]


class RayDecoder:
    """Grid points spread over `config.workers` Ray actors (the sweep's conventions: no usage
    stats, session files in a short directory outside the repository, shut down when done)."""

    def __init__(self, config: CalibrationConfig, prompts: list[str], max_new_tokens: int) -> None:
        self.config, self.prompts, self.max_new_tokens = config, prompts, max_new_tokens

    def decode_all(self, policies: list[ExitPolicy]) -> list[tuple[list[str], dict]]:
        import ray

        from mee_bench.sweep.runner import default_temp_dir

        owned = not ray.is_initialized()
        if owned:
            ray.init(
                num_cpus=self.config.ray.num_cpus or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=self.config.ray.temp_dir or default_temp_dir(),
            )
        try:
            remote = ray.remote(CalibrationWorker).options(num_cpus=1)
            actors = [
                remote.remote(self.config, self.prompts, self.max_new_tokens)
                for _ in range(min(self.config.workers, len(policies)))
            ]
            refs = [actors[i % len(actors)].decode.remote(policy) for i, policy in enumerate(policies)]
            results = ray.get(refs)
            for actor in actors:
                ray.kill(actor)
            return results
        finally:
            if owned:
                ray.shutdown()


def timed_test(
    generator, examples: list[Example], policies: dict[str, ExitPolicy], config: CalibrationConfig, max_new_tokens: int
):
    """Every policy (and `full`) decodes the test prompts block by block, all of them taking turns one
    generated token at a time, the order alternating per block, so drift in the machine's speed hits
    all of them alike (each decode's stats count its own steps only). Returns texts and stats per name."""
    prompts = [e.prompt for e in examples]
    everyone = {"full": ExitPolicy("full", kv_strategy=config.kv_strategy), **policies}
    generator.generate_text(prompts[:1], everyone["full"], max_new_tokens)  # warm-up, untimed
    blocks = max(1, min(config.timing_blocks, len(prompts)))
    bounds = [round(i * len(prompts) / blocks) for i in range(blocks + 1)]
    texts = {name: [] for name in everyone}
    stats = {name: None for name in everyone}
    for block in range(blocks):
        names = list(everyone) if block % 2 == 0 else list(reversed(everyone))
        chunk = prompts[bounds[block] : bounds[block + 1]]
        runs = [
            decode_steps(generator, chunk, everyone[name], max_new_tokens, config.test_batch_size) for name in names
        ]
        for name, (_, (block_texts, block_stats)) in zip(names, in_turn(runs)):
            texts[name] += block_texts
            stats[name] = block_stats if stats[name] is None else stats[name].merge(block_stats)
    return texts, stats


def calibrate(config: CalibrationConfig) -> dict:
    """Run the whole calibration and return its record (nothing is written here)."""
    started = time.perf_counter()
    data = load_task(config)
    calibration, test = draw_splits(data, config.calibration, config.test, config.seed)
    if config.consistency.kind == "risk":
        check_references("risk", [e.references for e in calibration + test], config.task)
    generator = build_generator(config)
    prompts = [e.prompt for e in calibration]
    if config.workers > 1:
        decoder = RayDecoder(config, prompts, data.max_new_tokens)
    else:
        decoder = InProcessDecoder(generator, prompts, data.max_new_tokens, config.batch_size)
    grid = [(m, t) for m in config.measures for t in config.thresholds[m]]
    full_texts, full_stats = InProcessDecoder(generator, prompts, data.max_new_tokens, config.batch_size).decode_all(
        [config.policy("full", None)]
    )[0]
    outputs = decoder.decode_all([config.policy(m, t) for m, t in grid])
    references = [e.references for e in calibration]
    kind, metric = config.consistency.kind, config.consistency.metric
    per_point = {
        (m, t): (sum(losses(kind, metric, texts, full_texts, references)) / len(prompts), stats)
        for (m, t), (texts, stats) in zip(grid, outputs)
    }

    measures: dict[str, dict] = {}
    chosen_policies: dict[str, ExitPolicy] = {}
    for measure in config.measures:
        thresholds = config.thresholds[measure]
        tests, chosen = fixed_sequence_test(
            thresholds,
            [per_point[(measure, t)][0] for t in thresholds],
            len(prompts),
            config.delta,
            config.family_epsilon,
        )
        rows = [
            {**dataclasses.asdict(test_), "avg_exit_layer": per_point[(measure, test_.threshold)][1]["avg_exit_layer"]}
            for test_ in tests
        ]
        threshold = thresholds[chosen] if chosen is not None else None
        policy = config.policy(measure, threshold)
        if threshold is not None:
            chosen_policies[measure] = policy
        measures[measure] = {
            "grid": rows,
            "chosen_threshold": threshold,
            "calibration_avg_exit_layer": rows[chosen]["avg_exit_layer"]
            if chosen is not None
            else full_stats["avg_exit_layer"],
            "policy": policy.as_dict(),
            "note": None
            if threshold is not None
            else (
                f"no threshold passed: even the most conservative one ({thresholds[0]}) is not certified, "
                "so the calibrated policy never exits (full)"
            ),
        }

    test_texts, test_stats = timed_test(generator, test, chosen_policies, config, data.max_new_tokens)
    test_refs = [e.references for e in test]
    full_ms = test_stats["full"].as_dict()["decode_ms_per_token"]
    for measure, entry in measures.items():
        if measure not in chosen_policies:
            entry["test"] = {
                "risk": 0.0,
                "avg_exit_layer": float(generator.num_layers),
                "speedup": 1.0,
                "within_delta": True,
                "decode_ms_per_token": full_ms,
                "tokens": test_stats["full"].tokens,
            }
            continue
        figures = test_stats[measure].as_dict()
        risk = sum(losses(kind, metric, test_texts[measure], test_texts["full"], test_refs)) / len(test)
        entry["test"] = {
            "risk": risk,
            "avg_exit_layer": figures["avg_exit_layer"],
            "speedup": full_ms / figures["decode_ms_per_token"],
            "within_delta": risk <= config.delta,
            "decode_ms_per_token": figures["decode_ms_per_token"],
            "tokens": figures["tokens"],
        }
    best = min(chosen_policies, key=lambda m: measures[m]["calibration_avg_exit_layer"], default=None)
    recommended = chosen_policies[best] if best else config.policy("full", None)
    return {
        "name": config.name,
        "task": config.task,
        "model": {"pretrained": config.model.pretrained, "num_layers": generator.num_layers},
        "delta": config.delta,
        "epsilon": config.epsilon,
        "epsilon_per_measure": config.family_epsilon,
        "consistency": {"kind": kind, "metric": metric, "note": CLIPPING_NOTE if kind == "risk" else None},
        "splits": {
            "calibration": {"split": config.calibration.split, "size": len(calibration), "seed": config.seed},
            "test": {
                "split": config.test.split,
                "size": len(test),
                "timing_blocks": config.timing_blocks,
                "batch_size": config.test_batch_size,
                "full_decode_ms_per_token": full_ms,
            },
        },
        "max_new_tokens": data.max_new_tokens,
        "full_calibration_avg_exit_layer": full_stats["avg_exit_layer"],
        "measures": measures,
        # The shipped policy and its summary, as in `exit_policy.json`: `calibration=PATH` reads either file.
        "policy": recommended.as_dict(),
        "calibration": shipped_summary(config, best, measures),
        "config": dataclasses.asdict(config),
        "wall_s": time.perf_counter() - started,
    }


def shipped_summary(config: CalibrationConfig, measure: str | None, measures: dict[str, dict]) -> dict:
    """What travels with the policy into `exit_policy.json` and leaderboards."""
    entry = measures.get(measure, {}) if measure else {}
    return {
        "name": config.name,
        "task": config.task,
        "delta": config.delta,
        "epsilon": config.epsilon,
        "consistency": dataclasses.asdict(config.consistency),
        "measure": measure,
        "chosen_threshold": entry.get("chosen_threshold"),
        "test_risk": entry.get("test", {}).get("risk"),
        "within_delta": entry.get("test", {}).get("within_delta"),
        "test_speedup": entry.get("test", {}).get("speedup"),
    }


def policy_file_content(record: dict) -> dict:
    return {"policy": record["policy"], "calibration": record["calibration"]}


def write_outputs(record: dict, directory: Path) -> list[Path]:
    from mee_bench.calibrate.report import write_markdown, write_plot

    directory.mkdir(parents=True, exist_ok=True)
    record_path = directory / RECORD_FILE
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return [record_path, write_markdown(record, directory), write_plot(record, directory)]


def cli(argv: list[str]) -> int:
    """`mee-bench calibrate CONFIG [key=value ...] [--save-to MODEL_DIR] [--force]`."""
    parser = argparse.ArgumentParser(prog="mee-bench calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="calibration YAML, e.g. configs/calibrate_quickstart.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. delta=0.05 calibration.size=300"
    )
    parser.add_argument(
        "--save-to", metavar="MODEL_DIR", help=f"also write the chosen policy as MODEL_DIR/{POLICY_FILE}"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing calibration record / exit_policy.json"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        record_path = config.results_dir / RECORD_FILE
        targets = [record_path] + ([Path(args.save_to) / POLICY_FILE] if args.save_to else [])
        if args.save_to and not Path(args.save_to).is_dir():
            raise ConfigError(f"--save-to {args.save_to} is not a directory; point it at the model's directory")
        for target in targets:
            if target.exists() and not args.force:
                raise ConfigError(
                    f"{target} exists; pass --force to overwrite it, or set output_dir=... for a new record"
                )
        record = calibrate(config)
    except (CalibrationError, ConfigError, FileNotFoundError) as err:
        print(f"mee-bench calibrate: error: {err}", file=sys.stderr)
        return 2
    for path in write_outputs(record, config.results_dir):
        print(f"wrote {path}")
    if args.save_to:
        target = Path(args.save_to) / POLICY_FILE
        target.write_text(json.dumps(policy_file_content(record), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {target}")
    from mee_bench.calibrate.report import summary_lines

    print("\n".join(summary_lines(record)))
    return 0
