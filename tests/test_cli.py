"""`mee-bench`: a bad value ends in one line and exit 2, anything else in one line and exit 1; --debug shows the
traceback."""

from __future__ import annotations

import sys
import types

import pytest

from mee_bench import cli


@pytest.fixture
def command(monkeypatch):
    """Registers a throwaway subcommand whose `cli` raises the exception it is given."""

    def register(error: BaseException) -> str:
        module = types.ModuleType("mee_bench_test_command")

        def run(argv: list[str]) -> int:
            raise error

        module.cli = run
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.COMMANDS, "boom", (module.__name__, "raises"))
        return "boom"

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return register


def test_a_usage_error_is_one_line_with_exit_status_2(command, capsys):
    name = command(ValueError("threshold=7 is outside [0, 1];\n  pick a value in that range"))
    assert cli.main([name]) == 2
    err = capsys.readouterr().err
    assert err == "mee-bench boom: error: threshold=7 is outside [0, 1]; pick a value in that range\n"


def test_a_missing_file_names_the_file(command, capsys):
    name = command(FileNotFoundError(2, "No such file or directory", "/nowhere/model.safetensors"))
    assert cli.main([name]) == 2
    assert "/nowhere/model.safetensors" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_that_says_how_to_see_the_traceback(command, capsys):
    name = command(RuntimeError("kaboom"))
    assert cli.main([name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: kaboom" in err and "--debug" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_lets_the_traceback_through(command, monkeypatch, how):
    name = command(ValueError("bad"))
    argv = [name, "--debug"] if how == "flag" else [name]
    if how == "env":
        monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="bad"):
        cli.main(argv)


def test_a_real_command_with_a_bad_value_ends_before_loading_anything(capsys):
    assert cli.main(["demo", "--threshold", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mee-bench demo: error: threshold=7.0 is outside") and err.count("\n") == 1


def test_an_unknown_command_lists_the_commands(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
