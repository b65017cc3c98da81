"""The sweep on a real Ray: a local one started by the sweep, and a `ray start --head` node on
loopback that resumes it, serves a driver killed by SIGKILL mid-sweep, and runs the real adapter.

Ray starts cost seconds, so there are few tests here and each checks several properties.
The fake backends are pickled by value, so Ray workers need not import this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from mee_bench.sweep.backend import Outcome
from mee_bench.sweep.config import load_config, to_config
from mee_bench.sweep.leaderboard import build_leaderboard
from mee_bench.sweep.runner import run_sweep
from mee_bench.sweep.store import load_records
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # starts Ray or subprocesses: `make test-fast` skips it

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeBackend:
    """A deterministic stand-in for lm-eval: lower thresholds are faster and worse.

    A file `<marker_dir>/<measure>-<threshold>` makes that trial raise: every time if it
    says `always`, once (the file is then removed) if it says `once`; if it says `kill`, the
    worker process dies by SIGKILL in the middle of the trial, once.
    """

    marker_dir: Path | None = None
    delay_s = 0.0

    def __init__(self, config) -> None:
        self.config = config

    def unknown_tasks(self, tasks):
        return {task: "fake_task" for task in tasks if not task.startswith("fake")}

    def warm_up(self, task):
        self.warmed = task

    def evaluate(self, trial, policy):
        marker = self.marker_dir / f"{trial.measure}-{trial.threshold}" if self.marker_dir else None
        if marker is not None and marker.exists():
            if marker.read_text() == "kill":
                marker.unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            if marker.read_text() == "once":
                marker.unlink()
            raise RuntimeError(f"injected failure for {trial.measure} {trial.threshold}")
        time.sleep(self.delay_s)
        depth = 1.0 if trial.measure == "full" else 0.4 + 0.6 * trial.threshold
        quality = 30.0 - 10 * (1 - depth)
        efficiency = {"decode_ms_per_token": 20.0 * depth, "avg_exit_layer": 6 * depth, "num_layers": 6, "tokens": 40}
        return Outcome({"bleu": quality, "chrf": quality + 25}, efficiency)


def backend_with(marker_dir: Path | None = None, delay_s: float = 0.0) -> type:
    return type("ConfiguredFakeBackend", (FakeBackend,), {"marker_dir": marker_dir, "delay_s": delay_s})


@contextmanager
def short_temp_dir():
    """Ray's session dir: short (Unix socket paths) and outside the repository."""
    path = tempfile.mkdtemp(prefix="meeray", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_config(tmp_path: Path, **overrides):
    values = {
        "name": "fake",
        "model": {"pretrained": overrides.pop("pretrained")},
        "tasks": ["fake_task"],
        "measures": ["softmax", "saturation"],
        "thresholds": {"softmax": [0.5, 0.7, 0.9], "saturation": [0.9]},
        "min_exit_layers": [2],
        "output_dir": str(tmp_path / "out"),
        "carbon": {"country_iso_code": "FRA"},
    }
    values.update(overrides)
    return to_config(values)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.json"))}


def test_local_ray_sweep_retries_records_failures_and_resumes_on_a_cluster(tiny_model_dir, tmp_path, ray_head):
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "softmax-0.7").write_text("once")
    (markers / "saturation-0.9").write_text("always")
    with short_temp_dir() as temp_dir:
        config = sweep_config(tmp_path, pretrained=str(tiny_model_dir), ray={"num_cpus": 2, "temp_dir": temp_dir})
        result = run_sweep(config, backend=backend_with(markers), progress=False)
        assert not ray.is_initialized()  # the sweep started Ray, so it stopped it
    assert (result.total, result.skipped, result.ran, result.workers) == (5, 0, 5, 2)
    records = {(r["trial"]["measure"], r["trial"]["threshold"]): r for r in load_records(tmp_path / "out")}
    assert len(records) == 5
    flaky = records[("softmax", 0.7)]
    assert (flaky["status"], flaky["attempts"]) == ("ok", 2) and "injected failure" in flaky["errors"][0]
    broken = records[("saturation", 0.9)]
    assert (broken["status"], broken["attempts"], len(broken["errors"])) == ("failed", 2, 2)
    assert result.failed == [broken["trial_id"]]
    for rec in records.values():
        if rec["status"] == "ok":
            assert rec["metrics"]["bleu"] > 0 and rec["efficiency"]["num_layers"] == 6
            assert rec["energy"]["energy_kwh"] > 0 and rec["energy"]["power_source"] in {
                "measured",
                "partly measured",
                "estimated",
            }
        assert rec["hardware"]["torch_threads"] == 1 and rec["versions"]["ray"] == ray.__version__
        assert "commit" in rec["git"] and rec["config"]["policy"]["measure"] == rec["trial"]["measure"]
        assert rec["measure_facts"] == {"analysis_only": False, "takes_threshold": rec["trial"]["measure"] != "full"}
    # two workers, each loaded once and ran several trials
    by_pid: dict[int, list[dict]] = {}
    for rec in records.values():
        by_pid.setdefault(rec["worker"]["pid"], []).append(rec["worker"])
    assert len(by_pid) == 2 and max(w["trials_run"] for ws in by_pid.values() for w in ws) >= 2
    assert all(len({w["load_s"] for w in ws}) == 1 for ws in by_pid.values())
    assert any(line.startswith("| softmax") for line in _leaderboard_lines(tmp_path / "out"))

    (markers / "saturation-0.9").unlink()
    finished = {
        name: data
        for name, data in file_bytes(tmp_path / "out" / "records").items()
        if json.loads(data)["status"] == "ok"
    }
    # the same sweep resumed on the head node: Ray settings are not part of a sweep's identity
    config = sweep_config(tmp_path, pretrained=str(tiny_model_dir), ray={"address": ray_head})
    again = run_sweep(config, backend=backend_with(markers), progress=False)
    assert (again.skipped, again.ran, again.failed) == (4, 1, [])
    after = file_bytes(tmp_path / "out" / "records")
    assert len(after) == 5 and all(after[name] == data for name, data in finished.items())
    assert all(json.loads(data)["status"] == "ok" for data in after.values())


def _leaderboard_lines(output_dir: Path) -> list[str]:
    build_leaderboard(output_dir)
    return (output_dir / "leaderboard.md").read_text().splitlines()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def ray_head():
    """A head node from `ray start --head --block` on loopback; its whole process group is stopped after."""
    gcs, client, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    ray_cli = Path(sys.executable).with_name("ray")
    with short_temp_dir() as temp_dir:
        log = open(Path(temp_dir) / "head.log", "w")
        head = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--num-cpus=2",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--metrics-export-port={metrics}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while "Ray runtime started" not in (Path(temp_dir) / "head.log").read_text():
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ray start --head did not come up: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}"
                    )
                time.sleep(0.25)
            yield f"127.0.0.1:{gcs}"
        finally:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # stragglers of that session only
            log.close()


DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import tests.sweep.test_ray as here
from mee_bench.sweep.runner import run_sweep
from mee_bench.sweep.config import load_config
run_sweep(load_config({config!r}), backend=here.backend_with(delay_s=0.5), progress=False)
"""


def test_head_node_sweep_survives_sigkill_of_the_driver(tiny_model_dir, tmp_path, ray_head):
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(
        f"name: killed\nmodel: {{pretrained: {tiny_model_dir}}}\ntasks: [fake_task]\nmeasures: [softmax]\n"
        f"thresholds: {{softmax: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}}\nmin_exit_layers: [2]\n"
        f"output_dir: {tmp_path / 'out'}\nray: {{address: '{ray_head}', connect_timeout_s: 5}}\n"
        "carbon: {country_iso_code: FRA}\n"
    )
    records_dir = tmp_path / "out" / "records"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), config=str(config_path))])
    try:
        deadline = time.monotonic() + 120
        while len(list(records_dir.glob("*.json"))) < 3:
            assert driver.poll() is None, "the driver exited before it could be killed"
            assert time.monotonic() < deadline, "no records appeared"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    before = file_bytes(records_dir)
    assert 3 <= len(before) < 10

    result = run_sweep(load_config(config_path), backend=backend_with(), progress=False)
    assert not ray.is_initialized()
    assert (result.total, result.skipped, result.ran) == (10, len(before), 10 - len(before))
    records = load_records(tmp_path / "out")
    ids = [r["trial_id"] for r in records]
    assert len(ids) == len(set(ids)) == 10 and all(r["status"] == "ok" for r in records)
    assert sorted(r["trial"]["threshold"] or 0 for r in records) == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    after = file_bytes(records_dir)
    assert all(after[name] == data for name, data in before.items())
    assert not list(records_dir.glob(".*.tmp"))


def test_real_adapter_sweep_on_the_head_node(tiny_model_dir, tmp_path, ray_head):
    config = sweep_config(
        tmp_path,
        pretrained=str(tiny_model_dir),
        tasks=["tatoeba_enfr_mee"],
        measures=["softmax"],
        thresholds={"softmax": [0.0]},
        min_exit_layers=[1],
        limit=3,
        max_gen_toks=6,
        batch_size=3,
        ray={"address": ray_head},
    )
    result = run_sweep(config, progress=False)
    assert (result.ran, result.failed) == (2, [])
    records = {r["trial"]["measure"]: r for r in load_records(tmp_path / "out")}
    for rec in records.values():
        assert rec["status"] == "ok", rec.get("errors")
        assert {"bleu", "chrf"} <= set(rec["metrics"]) and rec["efficiency"]["tokens"] > 0
    assert records["full"]["efficiency"]["avg_exit_layer"] == 4.0
    assert records["softmax"]["efficiency"]["avg_exit_layer"] == 1.0  # threshold 0 exits at the first allowed layer
    assert any(line.startswith("| softmax") for line in _leaderboard_lines(tmp_path / "out"))
    rerun = run_sweep(config, progress=False)
    assert (rerun.skipped, rerun.ran) == (2, 0)


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_recorded_once(tiny_model_dir, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "softmax-0.7").write_text("kill")
    with short_temp_dir() as temp_dir:
        config = sweep_config(tmp_path, pretrained=str(tiny_model_dir), ray={"num_cpus": 2, "temp_dir": temp_dir})
        result = run_sweep(config, backend=backend_with(markers), progress=False)
    assert (result.total, result.ran, result.failed) == (5, 5, [])
    records = load_records(tmp_path / "out")
    assert len({r["trial_id"] for r in records}) == len(records) == 5 and all(r["status"] == "ok" for r in records)
    killed = next(r for r in records if r["trial"]["threshold"] == 0.7)
    assert killed["attempts"] == 2 and "the worker died during the trial" in killed["errors"][0]


LOCAL_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import tests.sweep.test_ray as here
from mee_bench.sweep.runner import run_sweep
from mee_bench.sweep.config import load_config
run_sweep(load_config({config!r}), backend=here.backend_with(delay_s=1.0), progress=False)
"""


def test_a_local_ray_left_by_a_sigkilled_driver_is_ended_by_cleanup(tiny_model_dir, tmp_path):
    import psutil

    from mee_bench.sweep.ray_session import PROCESSES_FILE
    from mee_bench.sweep.runner import cli

    with short_temp_dir() as temp_dir:
        config_path = tmp_path / "sweep.yaml"
        config_path.write_text(
            f"name: local\nmodel: {{pretrained: {tiny_model_dir}}}\ntasks: [fake_task]\nmeasures: [softmax]\n"
            f"thresholds: {{softmax: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}}\nmin_exit_layers: [2]\n"
            f"output_dir: {tmp_path / 'out'}\nray: {{num_cpus: 1, temp_dir: {temp_dir}}}\ncarbon: "
            f"{{country_iso_code: FRA}}\n"
        )
        records_dir = tmp_path / "out" / "records"
        driver = subprocess.Popen([sys.executable, "-c", LOCAL_DRIVER.format(repo=str(REPO), config=str(config_path))])
        try:
            deadline = time.monotonic() + 180
            while not list(records_dir.glob("*.json")):
                assert driver.poll() is None, "the driver exited before it could be killed"
                assert time.monotonic() < deadline, "no records appeared"
                time.sleep(0.1)
            ray_processes = psutil.Process(driver.pid).children(recursive=True)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        time.sleep(1.0)
        left = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        recorded = json.loads((tmp_path / "out" / PROCESSES_FILE).read_text())["processes"]
        assert left and {p.pid for p in left} <= {pid for pid, _ in recorded}, "the sweep wrote down what it started"
        assert cli([str(config_path), "--cleanup"]) == 0
        assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not (tmp_path / "out" / PROCESSES_FILE).exists()
        assert cli([str(config_path), "--cleanup"]) == 0  # nothing left: says so
