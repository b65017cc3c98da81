"""Which errors the lm-eval hook ends in one line: mee-bench's refusals only (the CLI itself:
`test_lm_eval_cli_errors.py`)."""

from __future__ import annotations

import json
import types
import warnings

import pytest

from mee_bench.harness import lm_eval_hook
from mee_bench.harness.catalogue import WMT15_ENFR
from mee_bench.harness.data import load_split
from mee_bench.harness.lm_eval_hook import DEBUG_ENV, exit_on_refusals, refusal_line


def raised(call) -> BaseException:
    try:
        call()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("the call raised nothing")


def bad_task_data():
    WMT15_ENFR.check_records([("data.jsonl:2", {"translation": {"fr": "Salut."}})], "data.jsonl")


def own_value_error():
    raise ValueError("raised by a test, not by mee-bench")


def test_errors_mee_bench_raises_on_bad_input_are_refusals(tmp_path, monkeypatch):
    assert refusal_line(raised(bad_task_data)) == (
        "data.jsonl:2: not a wmt15_enfr_mee record (translation[en] is missing); fix or remove that record"
    )
    monkeypatch.setenv("MEE_DATA_DIR", str(tmp_path))
    missing = refusal_line(raised(lambda: load_split("tatoeba_fra_eng", "validation")))
    assert missing is not None and missing.startswith("tatoeba_fra_eng/validation is only available locally")


def test_the_same_error_types_raised_elsewhere_keep_their_traceback():
    assert refusal_line(raised(own_value_error)) is None  # raised in a test module
    assert refusal_line(raised(lambda: json.loads("{"))) is None  # raised inside the standard library
    # mee-bench's own `RecordError` is a TypeError: only `check_records` turns it into a refusal (naming file and line)
    assert refusal_line(raised(lambda: WMT15_ENFR.prompt(None))) is None


def fake_cli(error: BaseException) -> types.ModuleType:
    """A stand-in for `lm_eval._cli.harness` whose `HarnessCLI.execute` raises `error`, wrapped by the hook."""
    module = types.ModuleType("lm_eval._cli.harness")

    class HarnessCLI:
        def execute(self, args):
            raise error

    module.HarnessCLI = HarnessCLI
    exit_on_refusals(module)
    return module


def test_the_cli_ends_a_refusal_in_one_line_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as ended:
        fake_cli(raised(bad_task_data)).HarnessCLI().execute(None)
    assert ended.value.code == 2
    assert capsys.readouterr().err == (
        "lm_eval: error: data.jsonl:2: not a wmt15_enfr_mee record (translation[en] is missing); "
        "fix or remove that record\n"
    )
    with pytest.raises(ValueError, match="raised by a test"):  # not a refusal: untouched
        fake_cli(raised(own_value_error)).HarnessCLI().execute(None)


def test_mee_bench_debug_lets_a_refusal_through_with_its_traceback(monkeypatch):
    from mee_bench.harness.catalogue import TaskDataError

    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(TaskDataError):
        fake_cli(raised(bad_task_data)).HarnessCLI().execute(None)


def test_a_module_an_older_trigger_watches_is_left_alone():
    module = types.ModuleType("lm_eval.__main__")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm_eval_hook.patch(module)
    assert caught == []
    assert set(vars(module)) == {"__name__", "__doc__", "__package__", "__loader__", "__spec__"}
