"""One prepared GPU suite: prove mee-bench on CUDA and train the stronger default, in one command.

GPU time here comes rarely and briefly, with no network and a preinstalled image (torch,
transformers, sacrebleu, tabulate, matplotlib; no OmegaConf, lm-eval, Ray or CodeCarbon).
So everything is prepared on the CPU and the GPU only runs it:

    python benchmarks/gpu_suite.py prepare            # here: data + wheels into build/gpu/, prints the run line
    python3 benchmarks/gpu_suite.py run --out $OUT    # there: the five steps below, in about 8 minutes
    python benchmarks/gpu_suite.py run --out DIR --dry-run   # here: the same steps at tiny sizes, about a minute

Steps, in order, each with its own wall budget; a failing step is recorded and the next runs:
  1. correctness: the engine's reference tests (`full` == `generate` fp32/bf16 at batch 1/4/8,
     copy and deferred K/V against slow references, every measure) marked `cuda`;
  2. decode_speed: benchmarks/decode_speed.py on t5-small's and t5-large's shapes, bf16, batch 1/8/32;
  3. policy_speed: benchmarks/policy_speed.py on the embedded default at batch 1 and 16;
  4. training: configs/train/gpu-base -> gpu-weighted-ce -> exit heads (shipped candidate), then
     gpu-final and gpu-free for the monotonicity study, within the step's budget;
  5. energy: one evaluation's GPU energy (CodeCarbon when it was carried, else NVML's own counter).
DIR ends up holding at most 8 files: summary.json, gpu.md (a draft), decode_speed_gpu.json,
policy_speed_gpu.json, logs.tar.gz and the trained model as model.tar.gz.partNN (16 MiB pieces).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "gpu"
DATA_ARCHIVE = "data.tar.gz"
WHEELS = "wheels"
MANIFEST = "manifest.json"
DATA_FILES = (
    "tatoeba_fra_eng/train.jsonl",
    "tatoeba_fra_eng/validation.jsonl",
    "wmt_news_enfr_2008_2013/train.jsonl",
)
# Pure-python wheels the suite needs and the GPU image lacks: OmegaConf reads training configs,
# nvidia-ml-py reads the GPU's own energy counter.
SMALL_WHEELS = ("omegaconf==2.4.0", "nvidia-ml-py==13.615.71")
CODECARBON = "codecarbon==3.3.2"
IMAGE_HAS = {"numpy", "psutil", "pyyaml", "typing-extensions", "typing_extensions", "nvidia-ml-py", "nvidia_ml_py"}
CARRY_LIMIT_MIB = 64
PIP_TARGET = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]
STEPS = ("correctness", "decode_speed", "policy_speed", "training", "energy")
# Shares of the wall budget per step: 480 s on the GPU (8 minutes, the pip install of carried wheels
# included); a dry run on a small shared CPU gets 3000 s, which it should not need
# (its policy_speed step, 45 s here, must fit 5% of it on a slower CI runner).
BUDGET_SHARES = {"correctness": 0.08, "decode_speed": 0.18, "policy_speed": 0.05, "training": 0.60, "energy": 0.04}
GPU_BUDGET_S, DRY_RUN_BUDGET_S = 480, 3000
PIECE_BYTES = 15 * 2**20
TINY_MODEL = [
    "model.d_model=32",
    "model.d_kv=8",
    "model.num_heads=4",
    "model.d_ff=64",
    "model.num_layers=1",
    "model.num_decoder_layers=3",
    "data.batch_tokens=600",
    "data.limit=400",
    "data.validation.examples=8",
    "objective.kd_exit_layer=1",
    "budget.steps=3",
    "device=cpu",
    "precision=fp32",
    "threads=1",
]
# Shares of the training step's budget (each stage also spends ~10-20 s loading and tokenizing).
FINE_TUNES = {"gpu-weighted-ce": 0.2, "gpu-final": 0.09, "gpu-free": 0.09}
BASE_SHARE, HEADS_SHARE = 0.45, 0.05


# --- prepare (on the CPU) ---------------------------------------------------------------


def tree_bytes() -> int:
    """Bytes of what travels with the working tree: tracked and untracked-not-ignored files."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def pack_data(data_root: Path, build: Path) -> Path:
    missing = [name for name in DATA_FILES if not (data_root / name).is_file()]
    if missing:
        raise SystemExit(f"prepare: {', '.join(missing)} missing under {data_root}; set MEE_DATA_DIR to the data root")
    archive = build / DATA_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name in DATA_FILES:
            tar.add(data_root / name, arcname=name)
    return archive


def pip_download(specs: list[str], dest: Path, deps: bool) -> None:
    command = [sys.executable, "-m", "pip", "download", "-q", *PIP_TARGET, "-d", str(dest), *specs]
    subprocess.run(command + ([] if deps else ["--no-deps"]), check=True)


def codecarbon_closure(build: Path, room: int) -> dict:
    """Download CodeCarbon and the dependencies the image lacks; keep them only if they fit in `room` bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            pip_download([CODECARBON], Path(scratch), deps=True)
        except subprocess.CalledProcessError as err:
            return {"carried": False, "reason": f"pip could not download {CODECARBON} and its dependencies: {err}"}
        wheels = [w for w in Path(scratch).glob("*.whl") if w.name.split("-")[0].lower() not in IMAGE_HAS]
        size = sum(w.stat().st_size for w in wheels)
        if size > room:
            biggest = sorted(wheels, key=lambda w: -w.stat().st_size)[:3]
            return {
                "carried": False,
                "bytes": size,
                "reason": f"{CODECARBON} needs {size / 2**20:.1f} MiB of wheels the GPU image lacks "
                f"(largest: {', '.join(w.name.split('-')[0] for w in biggest)}), but only "
                f"{room / 2**20:.1f} MiB of the {CARRY_LIMIT_MIB} MiB that travel are left",
            }
        for wheel in wheels:
            shutil.copy(wheel, build / WHEELS / wheel.name)
        return {"carried": True, "bytes": size, "reason": None}


def prepare(args: argparse.Namespace) -> int:
    from mee_bench.paths import data_root

    build: Path = args.build
    shutil.rmtree(build, ignore_errors=True)
    (build / WHEELS).mkdir(parents=True)
    root = data_root()
    if root is None:
        raise SystemExit("prepare: no data root; set MEE_DATA_DIR to the folder holding tatoeba_fra_eng/ etc.")
    pack_data(root, build)
    pip_download(list(SMALL_WHEELS), build / WHEELS, deps=False)
    used = tree_bytes() + sum(f.stat().st_size for f in build.rglob("*") if f.is_file())
    room = CARRY_LIMIT_MIB * 2**20 - used - 2 * 2**20  # a margin for files committed before the run
    codecarbon = (
        codecarbon_closure(build, room)
        if not args.no_codecarbon
        else {"carried": False, "reason": "prepare --no-codecarbon"}
    )
    carried = sum(f.stat().st_size for f in build.rglob("*") if f.is_file())
    manifest = {
        "data": list(DATA_FILES),
        "wheels": sorted(w.name for w in (build / WHEELS).glob("*.whl")),
        "codecarbon": codecarbon,
        "tree_mib": round(tree_bytes() / 2**20, 1),
        "build_mib": round(carried / 2**20, 1),
        "prepared": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (build / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    relative = build.relative_to(REPO)
    print(json.dumps(manifest, indent=2))
    print(
        f"\nworking tree {manifest['tree_mib']} MiB + {relative} {manifest['build_mib']} MiB "
        f"(limit {CARRY_LIMIT_MIB} MiB)"
    )
    print(f'carry: ["{relative}"]')
    print(f"command: python3 benchmarks/gpu_suite.py run --out $OUT --build {relative}")
    return 0


# --- run (on the GPU, or on the CPU with --dry-run) --------------------------------------


class Suite:
    """Runs the steps as subprocesses with their budgets and collects what each produced."""

    def __init__(self, out: Path, work: Path, build: Path, dry_run: bool, budget_s: float) -> None:
        self.out, self.work, self.build, self.dry_run = out, work, build, dry_run
        self.budgets = {step: share * budget_s for step, share in BUDGET_SHARES.items()}
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.device = "cpu" if dry_run else "cuda"

    def call(self, name: str, command: list[str], timeout: float) -> None:
        """Run one command, its output in logs/NAME.log; a non-zero exit or a timeout raises."""
        log = self.logs / f"{name}.log"
        with log.open("a") as stream:
            stream.write(f"$ {' '.join(command)}\n")
            stream.flush()
            try:
                result = subprocess.run(
                    command, cwd=REPO, env=self.env, stdout=stream, stderr=subprocess.STDOUT, timeout=max(5.0, timeout)
                )
            except subprocess.TimeoutExpired as err:
                raise RuntimeError(f"{name}: over its {timeout:.0f} s budget (see logs/{log.name})") from err
        if result.returncode != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"{name}: exit {result.returncode}: {' | '.join(tail)}")

    def install_wheels(self) -> dict:
        """Install the carried wheels into a private folder (the image's own packages stay as they are)."""
        wheels = sorted((self.build / WHEELS).glob("*.whl"))
        if not wheels:
            return {"installed": []}
        site = self.work / "site"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--target",
                str(site),
                *map(str, wheels),
            ],
            check=True,
            capture_output=True,
        )
        self.env["PYTHONPATH"] = os.pathsep.join([self.env["PYTHONPATH"], str(site)])
        sys.path.append(str(site))
        return {"installed": [w.name for w in wheels]}

    def unpack_data(self) -> str | None:
        """Unpack the carried data and point MEE_DATA_DIR at it; without an archive, keep the local data root."""
        archive = self.build / DATA_ARCHIVE
        if not archive.is_file():
            return self.env.get("MEE_DATA_DIR")
        root = self.work / "data"
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        self.env["MEE_DATA_DIR"] = os.environ["MEE_DATA_DIR"] = str(root)  # subprocesses and in-process steps
        return str(root)

    # Steps: each returns the outputs it wrote (relative to the work dir or out dir) and its facts.

    def correctness(self, budget: float) -> dict:
        junit = self.work / "correctness.xml"
        selection = ["-k", "cpu"] if self.dry_run else ["-m", "cuda"]
        self.call(
            "correctness",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/engine/test_decoding.py",
                *selection,
                f"--junitxml={junit}",
            ],
            budget,
        )
        import xml.etree.ElementTree as ElementTree

        suite = ElementTree.parse(junit).getroot().find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        if counts["tests"] - counts["skipped"] == 0:
            raise RuntimeError("correctness: no test ran on the device")
        return {"outputs": ["logs/correctness.xml"], **counts}

    def decode_speed(self, budget: float) -> dict:
        out = self.out / "decode_speed_gpu.json"
        sizes = (
            ["--tiny", "--batches", "1,2"]
            if self.dry_run
            else ["--shapes", "t5-small,t5-large", "--dtypes", "bfloat16", "--batches", "1,8,32", "--repeats", "3"]
        )
        self.call(
            "decode_speed",
            [sys.executable, "benchmarks/decode_speed.py", "--device", self.device, *sizes, "--out", str(out)],
            budget,
        )
        return {"outputs": [out.name]}

    def policy_speed(self, budget: float) -> dict:
        out = self.out / "policy_speed_gpu.json"
        sizes = ["--quick"] if self.dry_run else ["--sentences", "64", "--batches", "1", "16", "--dtype", "bfloat16"]
        self.call(
            "policy_speed",
            [sys.executable, "benchmarks/policy_speed.py", "--device", self.device, *sizes, "--out", str(out)],
            budget,
        )
        return {"outputs": [out.name]}

    def training(self, budget: float) -> dict:
        """Base -> weighted-CE fine-tune -> exit heads -> package; then the vanilla and FREE fine-tunes."""
        started, runs = time.monotonic(), self.work / "runs"
        tiny = TINY_MODEL if self.dry_run else []

        def stage(preset: str, share: float, *extra: str) -> Path:
            output = runs / preset.removeprefix("gpu-")
            minutes = [] if self.dry_run else [f"budget.minutes={share * budget / 60:.3f}"]
            self.call(
                preset,
                [
                    sys.executable,
                    "-m",
                    "mee_bench.cli",
                    "train",
                    preset,
                    f"output_dir={output}",
                    *minutes,
                    *tiny,
                    *extra,
                ],
                share * budget + 120,
            )
            return output

        stage("gpu-base", BASE_SHARE)
        init = f"model.init={runs / 'base'}"
        shipped = stage("gpu-weighted-ce", FINE_TUNES["gpu-weighted-ce"], init)
        heads = (
            ["--steps", "5", "--batch-tokens", "600", "--validation-examples", "16"]
            if self.dry_run
            else ["--steps", "300", "--batch-tokens", "16384", "--validation-examples", "500"]
        )
        self.call(
            "train-heads",
            [
                sys.executable,
                "-m",
                "mee_bench.cli",
                "train-heads",
                str(shipped),
                "--device",
                self.device,
                "--threads",
                "4",
                *heads,
            ],
            HEADS_SHARE * budget + 60,
        )
        facts = {
            "shipped_candidate": card_summary(shipped),
            "agreement": layer_agreement(shipped, 200 if not self.dry_run else 8),
        }
        comparisons = {}
        for preset in ("gpu-final", "gpu-free"):
            left = budget - (time.monotonic() - started)
            if left < FINE_TUNES[preset] * budget + 30:
                comparisons[preset] = f"skipped: {left:.0f} s of the training budget left"
                continue
            comparisons[preset] = card_summary(stage(preset, FINE_TUNES[preset], init))
        records = self.work / "training"
        records.mkdir(exist_ok=True)
        for run in sorted(runs.iterdir()):
            for name in ("training.json", "metrics.jsonl"):
                if (run / name).is_file():
                    shutil.copy(run / name, records / f"gpu-{run.name}.{name}")
        pieces = package_model(shipped, records, self.out, self.work)
        return {"outputs": pieces, "stages": comparisons, **facts}

    def energy(self, budget: float) -> dict:
        if self.dry_run:
            return {"status": "skipped: no CUDA device in a dry run (NVML's energy counter needs a GPU)", "outputs": []}
        out = self.work / "energy.json"
        self.call(
            "energy", [sys.executable, __file__, "energy-step", "--out", str(out), "--build", str(self.build)], budget
        )
        facts = json.loads(out.read_text())
        return {"outputs": ["logs/energy.json"], **facts}


def card_summary(run: Path) -> dict:
    """A stage's model card in brief: steps, tokens, minutes and its last validation (BLEU, per-layer CE)."""
    card = json.loads((run / "training.json").read_text())
    last = card["evaluations"][-1] if card["evaluations"] else {}
    return {
        "run": run.name,
        "status": card["status"],
        "steps": card["steps"],
        "tokens": card["tokens_seen"],
        "minutes": card["wall_time_minutes"],
        "bleu_validation": last.get("bleu"),
        "val_ce": last.get("val_ce"),
    }


def layer_agreement(model_dir: Path, limit: int) -> dict:
    """Teacher-forced per-layer agreement with the last layer on Tatoeba (model-report's own table)."""
    from mee_bench.study.model_report import layer_agreement as agreement

    table = agreement(str(model_dir), limit)
    return {
        "sequences": table["sequences"],
        "tokens": table["tokens"],
        "no_change_after_layer": [round(row["no_change"], 4) for row in table["layers"]],
        "matches_final": [round(row["matches_final"], 4) for row in table["layers"]],
    }


def package_model(model_dir: Path, records: Path, out: Path, scratch: Path) -> list[str]:
    """The shipped candidate and every stage's records as one tar.gz, cut into pieces that come back from $OUT."""
    archive = scratch / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(model_dir.iterdir()):
            if item.is_file():
                tar.add(item, arcname=f"mee-t5-gpu/{item.name}")
        tar.add(records, arcname="mee-t5-gpu/training")
    pieces, data = [], archive.read_bytes()
    for index, start in enumerate(range(0, len(data), PIECE_BYTES)):
        piece = out / f"model.tar.gz.part{index:02d}"
        piece.write_bytes(data[start : start + PIECE_BYTES])
        pieces.append(piece.name)
    archive.unlink()
    return pieces


def energy_prompts(count: int) -> list[str]:
    """The energy step's workload: the first `count` distinct held-out Tatoeba prompts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from policy_speed import task_prompts

    return task_prompts(count)


def gpu_energy(args: argparse.Namespace) -> int:
    """One evaluation (the lstm policy on 200 Tatoeba sentences, batch 16) with the GPU's energy counted."""
    import torch

    from mee_bench.engine.loading import load_generator
    from mee_bench.engine.policy import ExitPolicy
    from mee_bench.paths import DEFAULT_MODEL_DIR

    generator = load_generator(DEFAULT_MODEL_DIR, "bfloat16", "cuda", require_heads=True)
    prompts = energy_prompts(200)
    policy = ExitPolicy("lstm", threshold=0.5, min_exit_layer=2)

    def evaluation() -> int:
        tokens = 0
        for start in range(0, len(prompts), 16):
            tokens += generator.generate(*generator.tokenize(prompts[start : start + 16]), policy, 64).stats.tokens
        torch.cuda.synchronize()
        return tokens

    evaluation()  # warm-up
    manifest_file = args.build / MANIFEST
    codecarbon = (
        json.loads(manifest_file.read_text())["codecarbon"]
        if manifest_file.is_file()
        else {"carried": False, "reason": "no build/gpu/manifest.json: run `gpu_suite.py prepare` first"}
    )
    result: dict = {
        "evaluation": "lstm 0.5 from layer 2, 200 Tatoeba sentences, batch 16, bf16, embedded default",
        "gpu": torch.cuda.get_device_name(),
        "codecarbon_carried": codecarbon["carried"],
        "codecarbon_reason": codecarbon.get("reason"),
    }
    if codecarbon["carried"]:
        from mee_bench.sweep.config import CarbonConfig
        from mee_bench.sweep.energy import EnergyMeter

        meter = EnergyMeter(CarbonConfig(country_iso_code="FRA", offline=True, tracking_mode="machine"))
        with meter.measure() as measurement:
            result["tokens"] = evaluation()
        reading = measurement.reading
        result.update(
            tool="codecarbon",
            power_source=reading.power_source,
            power_detail=reading.power_detail,
            gpu_energy_j=reading.gpu_energy_kwh * 3.6e6,
            energy_j=reading.energy_kwh * 3.6e6,
            duration_s=reading.duration_s,
        )
    else:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        before, start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()
        result["tokens"] = evaluation()
        seconds = time.perf_counter() - start
        joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - before) / 1000.0  # the counter is in mJ
        result.update(
            tool="nvml",
            power_source="measured",
            power_detail="NVML total energy counter (GPU board only)",
            gpu_energy_j=joules,
            duration_s=seconds,
            mean_gpu_power_w=joules / seconds,
        )
    result["gpu_energy_mj_per_token"] = 1000.0 * result["gpu_energy_j"] / result["tokens"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "omegaconf", "codecarbon", "nvidia-ml-py", "sacrebleu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    return info


def draft_report(summary: dict) -> str:
    """gpu.md: what ran, on what, and what each step gave (a draft to check before committing)."""

    def listed(facts: dict) -> str:
        return ", ".join(f"{key} {value}" for key, value in facts.items() if value is not None)

    lines = [
        "# mee-bench on a GPU",
        "",
        f"Machine: {listed(summary['machine'])}.",
        f"Versions: {listed(summary['versions'])}.",
        f"Suite: `benchmarks/gpu_suite.py run` ({'dry run, tiny sizes' if summary['dry_run'] else 'full sizes'}), "
        f"{summary['seconds']:.0f} s in all.",
        "",
        "| step | status | seconds | budget |",
        "|---|---|---:|---:|",
    ]
    for name, step in summary["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.0f} | {step['budget_s']:.0f} |")
    training = summary["steps"].get("training", {})
    if "shipped_candidate" in training:
        candidate = training["shipped_candidate"]
        lines += [
            "",
            f"Shipped candidate (gpu-weighted-ce): {candidate['steps']} steps, {candidate['tokens']} tokens, "
            f"validation BLEU {candidate['bleu_validation']} (trainer's greedy BLEU on its validation slice; "
            f"the official figure is `mee-bench model-report` on tatoeba_enfr_mee).",
            f"Top-1 unchanged after each layer: {training['agreement']['no_change_after_layer']}.",
        ]
    energy = summary["steps"].get("energy", {})
    if "gpu_energy_j" in energy:
        lines += [
            "",
            f"Energy ({energy['tool']}, {energy['power_source']}: {energy['power_detail']}): "
            f"{energy['gpu_energy_j']:.1f} J for {energy['tokens']} tokens of {energy['evaluation']}.",
        ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mee-gpu-suite-"))
    budget_s = args.budget_s or (DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    suite = Suite(out, work, args.build.resolve(), args.dry_run, budget_s)
    summary: dict = {"dry_run": args.dry_run, "budget_s": budget_s, "machine": machine(), "steps": {}}
    setup = {"wheels": suite.install_wheels(), "data_root": suite.unpack_data()}
    summary["setup"] = setup
    summary["versions"] = versions()
    for name in args.steps or STEPS:
        budget = suite.budgets[name]
        step_started = time.monotonic()
        try:
            facts = getattr(suite, name)(budget)
            status = facts.pop("status", "ok")
        except Exception as err:  # a step's failure is recorded and the next step still runs
            facts, status = {"outputs": []}, f"failed: {err}"
        summary["steps"][name] = {
            "status": status,
            "seconds": round(time.monotonic() - step_started, 1),
            "budget_s": budget,
            **facts,
        }
        print(f"[gpu-suite] {name}: {status} ({summary['steps'][name]['seconds']} s)", flush=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        for extra in ("correctness.xml", "energy.json", "training"):
            if (work / extra).exists():
                tar.add(work / extra, arcname=f"logs/{extra}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu.md").write_text(draft_report(summary))
    shutil.rmtree(work, ignore_errors=True)
    failed = [
        name
        for name, step in summary["steps"].items()
        if not (step["status"] == "ok" or step["status"].startswith("skipped"))
    ]
    print(f"[gpu-suite] {summary['seconds']:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else "all steps ok"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="pack data and wheels into build/gpu/ (on the CPU, with a network)")
    prep.add_argument("--build", type=Path, default=BUILD)
    prep.add_argument("--no-codecarbon", action="store_true", help="do not try to carry CodeCarbon")
    go = commands.add_parser("run", help="run the suite's steps, writing everything under --out")
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--build", type=Path, default=BUILD)
    go.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU: every step's code path in about a minute"
    )
    go.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"wall budget of the whole suite, shared out among the steps ({GPU_BUDGET_S} on a GPU, "
        f"{DRY_RUN_BUDGET_S} in a dry run)",
    )
    go.add_argument("--steps", type=lambda text: text.split(","), default=None, help=f"a subset of {','.join(STEPS)}")
    energy = commands.add_parser("energy-step", help=argparse.SUPPRESS)
    energy.add_argument("--out", type=Path, required=True)
    energy.add_argument("--build", type=Path, default=BUILD)
    args = parser.parse_args(argv)
    if args.command == "run" and args.steps and set(args.steps) - set(STEPS):
        parser.error(f"unknown step(s) {', '.join(set(args.steps) - set(STEPS))}; use some of {', '.join(STEPS)}")
    return {"prepare": prepare, "run": run, "energy-step": gpu_energy}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
