"""What a wheel ships, and that it runs installed, with no repository on the path.

The wheel is built once per session from a copy of the files the build reads (a build in the
repository itself would leave `build/` there, whose stale files a later wheel could pick up).
It is installed with no download into a fresh virtualenv that sees this environment's
third-party packages through a `.pth` line, but not mee-bench: Python processes a `.pth`
file only in site directories, so the editable finder and the hook listed in the project
environment's own `.pth` files stay inactive, and `mee_bench` can only come from the wheel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mee_bench.harness.catalogue import GROUP_NAME, TASK_NAMES, TASKS_DIR
from mee_bench.harness.install_hook import PTH_NAME
from mee_bench.paths import DEFAULT_MODEL_DIR, PACKAGE_DIR
from tests.helpers import DATA_DIR, REPO, subprocess_env

pytestmark = pytest.mark.slow  # builds a wheel, makes a virtualenv, runs the CLIs in it

BUILD_INPUTS = ("pyproject.toml", "README.md", PTH_NAME)
TIMEOUT_S = 480
PROBE = """
import json, sysconfig
from importlib.metadata import entry_points
import mee_bench, mee_bench.paths as paths
import lm_eval.models
from lm_eval.api.registry import get_model
print(json.dumps({
    "entry_point_is_the_registered_model": entry_points(group="lm_eval.models")["mee"].load() is get_model("mee"),
    "site_packages": sysconfig.get_paths()["purelib"],
    "package": mee_bench.__file__,
    "default_model": str(paths.DEFAULT_MODEL_DIR),
    "default_model_files": sorted(p.name for p in paths.DEFAULT_MODEL_DIR.iterdir()),
}))
"""


def in_wheel(path: Path) -> str:
    """The name a file of the package has inside the wheel."""
    return f"{PACKAGE_DIR.name}/{path.relative_to(PACKAGE_DIR).as_posix()}"


@dataclass(frozen=True)
class Built:
    wheel: Path
    log: str  # what pip and setuptools printed while building it


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """`pip wheel . --no-deps`, offline (setuptools from this environment, no build isolation)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(PACKAGE_DIR, source / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        shutil.copy(REPO / name, source / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    (wheel,) = (root / "dist").glob("*.whl")
    return Built(wheel, build.stdout + build.stderr)


@pytest.fixture(scope="session")
def wheel(built) -> Path:
    return built.wheel


@dataclass(frozen=True)
class Virtualenv:
    python: Path
    site_packages: Path
    install_log: str  # what pip printed while installing the wheel

    def installed(self, path: Path) -> Path:
        """Where a file of the repository's package lies in this virtualenv."""
        return self.site_packages / in_wheel(path)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Virtualenv:
    """A fresh virtualenv with the wheel installed and this environment's dependencies visible."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=TIMEOUT_S)
    python = root / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT_S,
        ).stdout.strip()
    )
    dependencies = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "project_dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    return Virtualenv(python, site_packages, install.stdout + install.stderr)


@pytest.fixture(scope="module")
def installed_runs(venv, tmp_path_factory):
    """The probe, `lm_eval --model mee` on tatoeba and `mee-bench demo`, side by side in the
    virtualenv, from a directory outside the repository and with no PYTHONPATH."""
    work = tmp_path_factory.mktemp("installed-run")
    env = subprocess_env(MEE_DATA_DIR=str(DATA_DIR))
    env.pop("PYTHONPATH", None)
    commands = {
        "probe": [str(venv.python), "-c", PROBE],
        "lm_eval": [
            str(venv.python),
            "-m",
            "lm_eval",
            "--model",
            "mee",
            "--tasks",
            "tatoeba_enfr_mee",
            "--limit",
            "4",
            "--output_path",
            str(work / "results"),
        ],
        "demo": [
            str(venv.python.parent / "mee-bench"),
            "demo",
            "--sentences",
            "2",
            "--repeats",
            "1",
            "--max-new-tokens",
            "16",
        ],
    }
    processes = {
        name: subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, command in commands.items()
    }
    outputs = {
        name: (process.communicate(timeout=TIMEOUT_S)[0], process.returncode) for name, process in processes.items()
    }
    return work, outputs


def test_the_wheel_carries_the_default_model_the_task_files_and_the_hook_at_its_root(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PTH_NAME in names
    tasks = {TASKS_DIR / f"{name}.yaml" for name in (*TASK_NAMES, GROUP_NAME)} | {TASKS_DIR / "utils.py"}
    tasks.add(PACKAGE_DIR / "harness" / "catalogue.py")
    assert {in_wheel(path) for path in tasks} <= names
    model_files = {path for path in DEFAULT_MODEL_DIR.rglob("*") if path.is_file()}
    assert {DEFAULT_MODEL_DIR / "model.safetensors", DEFAULT_MODEL_DIR / "exit_heads.safetensors"} <= model_files
    assert {in_wheel(path) for path in model_files} <= names


def test_mee_bench_and_its_default_model_resolve_inside_the_virtualenv(installed_runs, venv):
    _, outputs = installed_runs
    output, returncode = outputs["probe"]
    assert returncode == 0, output[-4000:]
    found = json.loads(output.strip().splitlines()[-1])
    assert Path(found["site_packages"]) == venv.site_packages
    assert Path(found["package"]) == venv.installed(PACKAGE_DIR / "__init__.py")
    assert Path(found["default_model"]) == venv.installed(DEFAULT_MODEL_DIR)
    expected = {"config.json", "model.safetensors", "exit_heads.safetensors", "tokenizer.json"}
    assert expected <= set(found["default_model_files"])
    assert found["entry_point_is_the_registered_model"]


WARNING = re.compile(r"warn|deprecat", re.IGNORECASE)


def test_an_offline_build_and_install_print_no_warning(built, venv):
    """Neither setuptools (it warned on every build while `project.license` was a TOML table) nor pip
    has anything to warn about or call deprecated."""
    for what, log in (("build", built.log), ("install", venv.install_log)):
        assert not [line for line in log.splitlines() if WARNING.search(line)], f"{what}:\n{log[-4000:]}"


def test_lm_eval_runs_the_installed_task_on_the_installed_default_model(installed_runs, venv):
    work, outputs = installed_runs
    log, returncode = outputs["lm_eval"]
    assert returncode == 0, log[-4000:]
    task_yaml = re.search(r"Task: tatoeba_enfr_mee \((.+)\)", log)
    assert task_yaml and Path(task_yaml.group(1)) == venv.installed(TASKS_DIR / "tatoeba_enfr_mee.yaml"), log[-4000:]
    table_row = re.compile(r"^\|(tatoeba_enfr_mee)?\s*\|\s*\d*\|none")
    rows = [line.split("|") for line in log.splitlines() if table_row.match(line)]
    printed = {row[5].strip(): float(row[7]) for row in rows}
    assert {"bleu", "chrf", "bleu_multiref"} <= set(printed), log[-4000:]
    (results_file,) = (work / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert printed["chrf"] == pytest.approx(results["results"]["tatoeba_enfr_mee"]["chrf,none"], abs=1e-4)
    assert results["mee"]["tatoeba_enfr_mee"]["requests"] == 4


def test_mee_bench_demo_runs_on_the_installed_default_model(installed_runs, venv):
    _, outputs = installed_runs
    output, returncode = outputs["demo"]
    assert returncode == 0, output[-4000:]
    model = re.search(r"^model: (\S+)", output, re.MULTILINE)
    assert model and Path(model.group(1)) == venv.installed(DEFAULT_MODEL_DIR), output[-4000:]
    assert re.search(r"average exit layer \d\.\d\d of \d", output), output[-4000:]
