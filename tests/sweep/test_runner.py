"""The sweep without Ray: trial ids, the model checks, the result store, bad addresses, the task index."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from omegaconf import OmegaConf

from mee_bench.engine.heads import ExitHeads
from mee_bench.harness.catalogue import TASK_NAMES
from mee_bench.sweep.backend import LMEvalBackend, task_metrics
from mee_bench.sweep.config import ConfigError, Trial, check_model, expand_grid, resolve_model, to_config
from mee_bench.sweep.runner import check_reachable, cli, run_sweep
from mee_bench.sweep.store import ResultStore, SweepError, load_records, result_settings, trial_id


def make_config(model_dir, tmp_path, **overrides):
    values = {
        "name": "unit",
        "model": {"pretrained": str(model_dir)},
        "tasks": ["tatoeba_enfr_mee"],
        "measures": ["softmax"],
        "thresholds": {"softmax": [0.5, 0.9]},
        "min_exit_layers": [2],
        "limit": 4,
        "output_dir": str(tmp_path / "out"),
        "carbon": {"country_iso_code": "FRA"},
    }
    values.update(overrides)
    return to_config(values)


def test_trial_ids_are_stable_distinct_and_follow_result_settings(tiny_model_dir, tmp_path):
    config = resolve_model(make_config(tiny_model_dir, tmp_path))
    settings = result_settings(config)
    trials = expand_grid(config)
    ids = [trial_id(t, settings) for t in trials]
    assert len(set(ids)) == len(ids) == 3
    assert ids == [trial_id(t, result_settings(resolve_model(make_config(tiny_model_dir, tmp_path)))) for t in trials]
    assert all(i.startswith("tatoeba_enfr_mee__") for i in ids)
    changed = result_settings(resolve_model(make_config(tiny_model_dir, tmp_path, limit=5)))
    assert not set(ids) & {trial_id(t, changed) for t in trials}
    # a different output dir or Ray setting is the same trial
    moved = result_settings(
        resolve_model(make_config(tiny_model_dir, tmp_path, output_dir="elsewhere", ray={"max_concurrent": 1}))
    )
    assert ids == [trial_id(t, moved) for t in trials]


def test_model_fingerprint_changes_when_the_weights_change(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = result_settings(resolve_model(make_config(copy, tmp_path)))["model_fingerprint"]
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert result_settings(resolve_model(make_config(copy, tmp_path)))["model_fingerprint"] != before


def test_policy_of_a_trial_carries_the_sweep_settings(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, threshold_schedule="decaying", kv_strategy="deferred")
    policy = Trial("t", "softmax", 0.7, 3).policy(config)
    assert (policy.measure, policy.threshold, policy.min_exit_layer) == ("softmax", 0.7, 3)
    assert (policy.threshold_schedule, policy.kv_strategy) == ("decaying", "deferred")
    assert Trial("t", "full", None, None).policy(config).measure == "full"


def test_learned_measure_without_heads_is_refused_before_anything_runs(tiny_model_dir, tmp_path):
    config = resolve_model(make_config(tiny_model_dir, tmp_path, measures=["lstm"], thresholds={"lstm": [0.5]}))
    with pytest.raises(ConfigError, match="lstm need trained exit heads and none exist"):
        check_model(config)
    with pytest.raises(ConfigError, match="lstm need trained exit heads"):
        run_sweep(make_config(tiny_model_dir, tmp_path, measures=["lstm"], thresholds={"lstm": [0.5]}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="model.heads: exit heads not found"):
        resolve_model(
            make_config(
                tiny_model_dir,
                tmp_path,
                model={"pretrained": str(tiny_model_dir), "heads": str(tmp_path / "no.safetensors")},
            )
        )


def test_heads_of_another_model_size_are_refused(tiny_model_dir, tmp_path):
    wrong = ExitHeads(d_model=48)
    wrong.save(tmp_path)
    config = resolve_model(
        make_config(
            tiny_model_dir,
            tmp_path,
            model={"pretrained": str(tiny_model_dir), "heads": str(tmp_path)},
            measures=["classifier"],
            thresholds={"classifier": [0.5]},
        )
    )
    with pytest.raises(ConfigError, match="d_model=48"):
        check_model(config)
    ExitHeads(d_model=32).save(tmp_path)
    assert check_model(config) == 4


def test_min_exit_layer_beyond_the_model_and_missing_model_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="has 4 decoder layers"):
        check_model(resolve_model(make_config(tiny_model_dir, tmp_path, min_exit_layers=[2, 9])))
    with pytest.raises(ConfigError, match="cannot be read"):
        check_model(resolve_model(make_config(tmp_path / "missing-model", tmp_path)))


@pytest.mark.slow
def test_unanswered_ray_address_fails_fast_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SweepError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ConfigError, match="not host:port"):
        check_reachable("localhost", timeout_s=2)


@pytest.mark.slow
def test_run_sweep_with_a_dead_address_writes_no_records(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(tiny_model_dir, tmp_path, ray={"address": f"127.0.0.1:{port}", "connect_timeout_s": 2})
    with pytest.raises(SweepError, match="no Ray cluster answers"):
        run_sweep(config, progress=False)
    assert load_records(tmp_path / "out") == []


def _record(trial_id: str, status: str = "ok") -> dict:
    return {"trial_id": trial_id, "status": status, "trial": {"task": "t"}}


def test_store_writes_atomically_and_resumes_the_same_config(tmp_path):
    store = ResultStore(tmp_path / "sweep")
    store.open("fp-1", {"limit": 4}, ["a", "b"], force=False)
    store.write(_record("a"))
    store.write(_record("b", "failed"))
    assert sorted(p.name for p in (tmp_path / "sweep" / "records").iterdir()) == ["a.json", "b.json"]
    assert store.finished() == {"a"}  # failed trials are not finished: a rerun retries them
    store.close()
    (tmp_path / "sweep" / "records" / ".c.123.tmp").write_text("{partial")  # left by a SIGKILL
    again = ResultStore(tmp_path / "sweep")
    again.open("fp-1", {"limit": 4}, ["a", "b"], force=False)
    assert again.finished() == {"a"}
    assert not list((tmp_path / "sweep" / "records").glob(".*.tmp"))
    again.close()


def test_store_refuses_a_different_config_and_overwrites_nothing(tmp_path):
    store = ResultStore(tmp_path / "sweep")
    store.open("fp-1", {"limit": 4, "tasks": ["t"]}, ["a"], force=False)
    store.write(_record("a"))
    store.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()}
    other = ResultStore(tmp_path / "sweep")
    with pytest.raises(SweepError, match=r"different sweep config \(differs in: limit\).*--force"):
        other.open("fp-2", {"limit": 50, "tasks": ["t"]}, ["a2"], force=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()} == before
    resumed = ResultStore(tmp_path / "sweep")  # the refusal released the lock
    resumed.open("fp-1", {"limit": 4, "tasks": ["t"]}, ["a"], force=False)
    assert resumed.finished() == {"a"}
    resumed.close()


def test_force_keeps_trials_still_in_the_grid_and_moves_the_rest_aside(tmp_path):
    store = ResultStore(tmp_path / "sweep")
    store.open("fp-1", {"limit": 4}, ["a", "b"], force=False)
    store.write(_record("a"))
    store.write(_record("b"))
    store.close()
    forced = ResultStore(tmp_path / "sweep")
    forced.open("fp-2", {"limit": 4, "tasks": ["u"]}, ["a", "c"], force=True)
    forced.close()
    assert [r["trial_id"] for r in load_records(tmp_path / "sweep")] == ["a"]
    [aside] = list((tmp_path / "sweep" / "superseded").iterdir())
    assert sorted(p.name for p in aside.iterdir()) == ["b.json", "sweep.json"]  # with the manifest it belonged to
    assert json.loads((aside / "sweep.json").read_text())["fingerprint"] == "fp-1"
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["fingerprint"] == "fp-2"


def test_a_sweep_that_wrote_no_record_does_not_claim_the_directory(tmp_path):
    first = ResultStore(tmp_path / "sweep")
    first.open("fp-1", {"tasks": ["typo"]}, ["a"], force=False)  # e.g. stopped by an unknown task
    first.close()
    second = ResultStore(tmp_path / "sweep")
    second.open("fp-2", {"tasks": ["fixed"]}, ["b"], force=False)
    second.close()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["fingerprint"] == "fp-2"


def test_records_without_a_manifest_are_not_adopted_silently(tmp_path):
    (tmp_path / "sweep" / "records").mkdir(parents=True)
    (tmp_path / "sweep" / "records" / "x.json").write_text(json.dumps(_record("x")))
    with pytest.raises(SweepError, match="no sweep.json"):
        ResultStore(tmp_path / "sweep").open("fp", {}, ["x"], force=False)


def test_two_drivers_cannot_write_the_same_directory(tmp_path):
    first = ResultStore(tmp_path / "sweep")
    first.open("fp", {}, [], force=False)
    with pytest.raises(SweepError, match="another sweep is writing"):
        ResultStore(tmp_path / "sweep").open("fp", {}, [], force=False)
    first.close()


def test_task_metrics_keeps_values_and_drops_stderr_and_alias():
    results = {
        "alias": "x",
        "bleu,none": 12.5,
        "bleu_stderr,none": "N/A",
        "chrf,none": 40.0,
        "exact_match,strict": 1.0,
        "f1,none": float("nan"),
    }
    assert task_metrics(results) == {"bleu": 12.5, "chrf": 40.0, "exact_match,strict": 1.0, "f1": None}


@pytest.mark.parametrize(
    ("tasks", "include_defaults"),
    [
        (list(TASK_NAMES), False),
        (["mee"], False),
        (["tatoeba_enfr_mee", "hellaswag"], True),
        (["sqaud_mee"], True),  # a typo gets its suggestion from the full index
    ],
)
def test_workers_index_lm_evals_builtin_tasks_only_for_a_task_that_is_not_ours(
    tiny_model_dir, tmp_path, monkeypatch, tasks, include_defaults
):
    import mee_bench.harness.lm_eval_model as adapter

    calls = []
    monkeypatch.setattr(adapter, "MEELM", lambda **kwargs: None)
    monkeypatch.setattr(adapter, "task_manager", lambda **kwargs: calls.append(kwargs))
    LMEvalBackend(make_config(tiny_model_dir, tmp_path, tasks=tasks))
    assert calls == [{"include_defaults": include_defaults}]


def test_cli_dry_run_lists_trials_and_reports_config_errors(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"model: {{pretrained: {tiny_model_dir}}}\ntasks: [tatoeba_enfr_mee, squad_mee]\nmeasures: [softmax, oracle]\n"
        "thresholds: {softmax: [0.5]}\nmin_exit_layers: [2, 3]\ncarbon: {country_iso_code: FRA}\n"
    )
    assert cli([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 trials:") and out.count(" full ") == 2
    assert cli([str(path), "limits=3"]) == 2
    assert "closest valid key is 'limit'" in capsys.readouterr().err
    assert cli([str(path), "tasks=[tatoeba_enfr_me]", "--dry-run"]) == 2
    assert "unknown task 'tatoeba_enfr_me' in `tasks`; did you mean 'tatoeba_enfr_mee'?" in capsys.readouterr().err


def test_dry_run_and_a_real_run_refuse_bad_task_data_before_ray_starts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from mee_bench.paths import DATA_DIR_ENV

    data = tmp_path / "data" / "tatoeba_fra_eng" / "validation.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(
        json.dumps({"translation": {"en": "Hi.", "fr": "Salut."}})
        + "\n"
        + json.dumps({"translation": {"fr": "Va !"}})
        + "\n"
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    path = tmp_path / "s.yaml"
    path.write_text(
        f"model: {{pretrained: {tiny_model_dir}}}\ntasks: [tatoeba_enfr_mee]\nmeasures: [softmax]\n"
        f"thresholds: {{softmax: [0.5]}}\noutput_dir: {tmp_path / 'out'}\ncarbon: {{country_iso_code: FRA}}\n"
    )
    expected = (
        f"{data.resolve()}:2: not a tatoeba_enfr_mee record (translation[en] is missing); fix or remove that record"
    )
    assert cli([str(path), "--dry-run"]) == 2
    assert expected in capsys.readouterr().err
    assert cli([str(path), "--no-progress"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the store, before Ray


def test_record_json_round_trips_dataclasses(tmp_path):
    store = ResultStore(tmp_path / "s")
    store.open("fp", {}, [], force=False)
    trial = Trial("t", "softmax", 0.5, 2)
    store.write({"trial_id": "x", "status": "ok", "trial": dataclasses.asdict(trial), "when": time.time()})
    store.close()
    [record] = load_records(tmp_path / "s")
    assert Trial(**record["trial"]) == trial


def test_missing_embedded_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    import mee_bench.sweep.config as sweep_config

    monkeypatch.setattr(sweep_config, "DEFAULT_MODEL_DIR", tmp_path / "mee-t5-default")
    config = resolve_model(make_config(None, tmp_path, model={"pretrained": None}))
    with pytest.raises(ConfigError, match="embedded default model is not at .* yet"):
        check_model(config)


def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_resume_refuses_when_the_model_or_the_task_data_changed_in_the_middle(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Provenance decides resume: the same config over changed files is a different sweep."""
    import shutil

    from mee_bench.harness.catalogue import TATOEBA_ENFR
    from mee_bench.harness.data import local_split_path
    from mee_bench.paths import DATA_DIR_ENV
    from mee_bench.sweep.config import config_dict
    from mee_bench.sweep.store import provenance, sweep_fingerprint

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "data" / TATOEBA_ENFR.dataset / f"{TATOEBA_ENFR.split}.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(
        "".join(json.dumps({"translation": {"en": f"Hi {i}.", "fr": f"Salut {i}."}}) + "\n" for i in range(50))
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    assert local_split_path(TATOEBA_ENFR.dataset, TATOEBA_ENFR.split) == data.resolve()
    config = resolve_model(make_config(model, tmp_path))
    settings = result_settings(config)
    ids = [trial_id(t, settings) for t in expand_grid(config)]
    store = ResultStore(config.results_dir)  # a finished sweep, as run_sweep leaves it
    store.open(
        sweep_fingerprint(config, settings), {**config_dict(config), "provenance": provenance(settings)}, ids, False
    )
    for trial in ids:
        store.write({"trial_id": trial, "status": "ok", "trial": {"task": TATOEBA_ENFR.name}})
    store.close()
    assert run_sweep(make_config(model, tmp_path), progress=False).skipped == len(ids)  # resumes: nothing to run

    original = data.read_bytes()
    data.write_bytes(original.replace(b"Salut 25.", b"Salut 25!"))  # one reference in the middle of the file
    with pytest.raises(
        SweepError, match=r"differs in: provenance\.tasks\.tatoeba_enfr_mee\.data\).*content of the model"
    ):
        run_sweep(make_config(model, tmp_path), progress=False)
    config_file = tmp_path / "sweep.yaml"
    OmegaConf.save(OmegaConf.structured(make_config(model, tmp_path)), config_file)
    assert cli([str(config_file), "--dry-run"]) == 2  # the dry run refuses what the real run refuses
    assert "provenance.tasks.tatoeba_enfr_mee.data" in capsys.readouterr().err
    data.write_bytes(original)
    flip_middle_byte(model / "model.safetensors")
    with pytest.raises(SweepError, match=r"differs in: provenance\.model_fingerprint\)"):
        run_sweep(make_config(model, tmp_path), progress=False)
    assert sorted(p.stem for p in (config.results_dir / "records").glob("*.json")) == sorted(ids)  # nothing touched


def test_a_full_disk_on_record_write_keeps_the_old_record_and_leaves_no_half_written_file(tmp_path, monkeypatch):
    import errno

    store = ResultStore(tmp_path / "sweep")
    store.open("fp", {}, ["a"], force=False)
    store.write(_record("a", "failed"))
    before = (tmp_path / "sweep" / "records" / "a.json").read_bytes()
    real_dump = json.dump

    def dump_then_disk_full(payload, handle, **kwargs):
        handle.write(json.dumps(payload)[:10])  # part of the record reaches the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_then_disk_full)
    with pytest.raises(SweepError, match=r"cannot write the record .*a\.json .*No space left on device.*resume"):
        store.write(_record("a"))
    monkeypatch.setattr(json, "dump", real_dump)
    assert sorted(p.name for p in (tmp_path / "sweep" / "records").iterdir()) == ["a.json"]
    assert (tmp_path / "sweep" / "records" / "a.json").read_bytes() == before
    assert store.finished() == set()  # the failed record stands, so a rerun runs the trial again
    store.close()


def test_sigterm_ends_a_sweep_like_ctrl_c_and_the_handler_is_put_back(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import mee_bench.sweep.runner as runner

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the sweep")

    monkeypatch.setattr(runner, "run_sweep", terminated)
    path = tmp_path / "s.yaml"
    path.write_text(
        f"model: {{pretrained: {tiny_model_dir}}}\ntasks: [tatoeba_enfr_mee]\nmeasures: [softmax]\n"
        "thresholds: {softmax: [0.5]}\ncarbon: {country_iso_code: FRA}\n"
    )
    before = signal.getsignal(signal.SIGTERM)
    assert cli([str(path)]) == 130
    assert "interrupted; finished trials are saved, run the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
