"""The documentation cannot drift from the code: every `mee-bench ...` and `lm_eval ...` line in a
fenced code block of README.md or docs/*.md parses with the command's own argument parser (and its
config files, overrides, model args and task names are ones the code accepts), and every relative
link between the documents resolves to a file and, where it names one, a heading."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from mee_bench.study.results_page import anchor
from tests.helpers import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
PROGRAMS = ("mee-bench", "lm_eval")
SEPARATORS = {"&&", "||", ";", "|", "&"}
MENTION = re.compile(r"(^|[\s/;&|])(mee-bench|lm_eval)(\s|$)")


class CommandError(ValueError):
    """A documented command the code would refuse."""


class Parsed(Exception):
    """Raised in place of running a command, once its parser has accepted the arguments."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


# ----------------------------------------------------------------------------- reading the documents


def code_lines(markdown: str) -> list[str]:
    """The lines of every fenced code block, a line continued with a trailing backslash joined to the next."""
    lines = []
    for block in FENCE.findall(markdown):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def documented_commands(markdown: str) -> list[list[str]]:
    """Every `mee-bench` or `lm_eval` command in the code blocks as argv (program first), after an
    optional `$ ` prompt, a `.venv/bin/` prefix or `VAR=value` settings, one per `&&` / `;` segment."""
    commands = []
    for line in code_lines(markdown):
        if not MENTION.search(line):  # diagrams, Python, other tools: not shell lines of ours
            continue
        lexer = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens, segment = list(lexer), []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
                segment.pop(0)
            if segment and Path(segment[0]).name in PROGRAMS:
                commands.append([Path(segment[0]).name, *segment[1:]])
            segment = []
    return commands


# ----------------------------------------------------------------------------- checking a command


def parse_only(cli, argv: list[str]) -> argparse.Namespace:
    """What `cli(argv)`'s argparse parser makes of argv, without running the command: a parse
    error becomes a CommandError, an accepted parse stops the command before it does anything."""

    def parse_args(parser, args=None, namespace=None):
        namespace, unknown = parser.parse_known_args(args, namespace)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        raise Parsed(namespace)

    def error(parser, message):
        raise CommandError(f"{parser.prog}: {message}")

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch.object(argparse.ArgumentParser, "error", error),
    ):
        try:
            cli(argv)
        except Parsed as parsed:
            return parsed.namespace
    raise CommandError(f"{argv}: the command returned without parsing its arguments")


def check_config(name: str, namespace: argparse.Namespace) -> None:
    """A config-taking command's YAML file (or training preset) and its key=value overrides load."""
    loaders = {
        "sweep": "mee_bench.sweep.config",
        "calibrate": "mee_bench.calibrate.config",
        "train": "mee_bench.train.config",
    }
    if name not in loaders:
        return
    load_config = importlib.import_module(loaders[name]).load_config
    try:
        load_config(namespace.config, namespace.overrides)
    except ValueError as err:  # ConfigError is a ValueError
        raise CommandError(f"mee-bench {name} {namespace.config}: {err}") from None


def check_mee_bench(argv: list[str]) -> None:
    from mee_bench.cli import COMMANDS

    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise CommandError(f"mee-bench has no command {name!r} (commands: {', '.join(COMMANDS)})")
    namespace = parse_only(importlib.import_module(COMMANDS[name][0]).cli, rest)
    for token in rest:
        value = token.split("=", 1)[-1]
        if value.endswith((".yaml", ".yml")) and not (REPO / value).is_file():
            raise CommandError(f"mee-bench {name}: config file {value} does not exist")
    check_config(name, namespace)


def lm_eval_task_known(name: str) -> bool:
    from mee_bench.harness.catalogue import GROUP_NAME, TASK_NAMES

    if name in TASK_NAMES or name == GROUP_NAME:
        return True
    if name.endswith("_mee"):  # our naming: a misspelt task of ours, no need to ask lm-eval
        return False
    from lm_eval.tasks import TaskManager  # indexing lm-eval's own tasks is slow: only for a name not ours

    return bool(TaskManager().match_tasks([name]))


def check_lm_eval(args: list[str]) -> None:
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    harness = HarnessCLI()
    if args and args[0] not in harness._subparsers.choices:
        args = ["run", *args]  # lm-eval's own rule: no subcommand means `run`
    namespace = parse_only(lambda a: harness._parser.parse_args(a), args)
    if namespace.command != "run":
        return
    try:
        EvaluatorConfig.from_cli(namespace)
    except (ValueError, TypeError) as err:
        raise CommandError(f"lm_eval: {err}") from None
    tasks = [task for entry in namespace.tasks or [] for task in str(entry).split(",") if task]
    unknown = [task for task in tasks if not lm_eval_task_known(task)]
    if unknown:
        raise CommandError(f"lm_eval: unknown task(s) {', '.join(unknown)}")
    if namespace.model == "mee":
        check_mee_model_args(namespace.model_args or {})


def check_mee_model_args(model_args: dict) -> None:
    from mee_bench.engine.measures import MEASURES
    from mee_bench.harness.lm_eval_model import MODEL_ARGS

    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise CommandError(
            f"--model mee does not accept model_args {', '.join(unknown)} (it accepts {', '.join(MODEL_ARGS)})"
        )
    if "measure" in model_args and str(model_args["measure"]) not in MEASURES:
        raise CommandError(f"--model mee: no measure {model_args['measure']!r} (measures: {', '.join(MEASURES)})")
    calibration = model_args.get("calibration")
    if calibration and not (REPO / str(calibration)).is_file():
        raise CommandError(f"--model mee: calibration record {calibration} does not exist")


def check_command(argv: list[str]) -> None:
    """`argv` (program first) is a command the code accepts, else a CommandError says why not."""
    program, *args = argv
    (check_mee_bench if program == "mee-bench" else check_lm_eval)(args)


# ----------------------------------------------------------------------------- the documents' commands

COMMANDS = [(path, argv) for path in DOCUMENTS for argv in documented_commands(path.read_text())]


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    monkeypatch.chdir(REPO)  # documented paths are relative to the repository


@pytest.mark.parametrize("path, argv", COMMANDS, ids=[f"{p.name}: {shlex.join(a)[:70]}" for p, a in COMMANDS])
def test_every_documented_command_parses(path, argv):
    check_command(argv)


def test_the_readme_documents_its_first_commands_and_the_mission_command():
    documented = {shlex.join(argv) for argv in documented_commands((REPO / "README.md").read_text())}
    for expected in (
        "mee-bench demo",
        "mee-bench sweep configs/quickstart.yaml",
        "lm_eval --model mee --tasks cnndm_mee",
    ):
        assert any(command.startswith(expected) for command in documented), expected


def test_the_readme_shows_install_first_commands_and_the_headline_table_before_anything_else():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 160
    first_screen = "\n".join(lines[:60])
    for part in ("make run", "mee-bench demo", "lm_eval --model mee", "mee-bench sweep", "<!-- leaderboard:start -->"):
        assert part in first_screen, part
    block = text.split("<!-- leaderboard:start -->")[1].split("<!-- leaderboard:end -->")[0]
    assert "| task " in block and "speedup vs full" in block  # the generated summary, not an empty block


@pytest.mark.parametrize(
    "line, problem",
    [
        ("mee-bench sweeep configs/quickstart.yaml", "no command 'sweeep'"),
        ("mee-bench sweep configs/quickstart.yaml --dry-runn", "unrecognized arguments: --dry-runn"),
        ("mee-bench sweep configs/no_such_sweep.yaml", "no_such_sweep.yaml does not exist"),
        ("mee-bench sweep configs/quickstart.yaml limmit=5", "limmit"),
        ("mee-bench train no-such-preset", "unknown preset"),
        ("mee-bench demo --threshold high", "invalid float value"),
        ("lm_eval --model mee --model_args pretrained=x,measur=lstm --tasks cnndm_mee", "measur"),
        ("lm_eval --model mee --model_args measure=softmaks --tasks cnndm_mee", "softmaks"),
        ("lm_eval --model mee --tasks cnndm_me", "cnndm_me"),
        ("lm_eval --model mee --tasks cnndm_mee --batchsize 8", "unrecognized arguments"),
    ],
)
def test_a_command_that_stops_parsing_fails_the_check(line, problem):
    [argv] = documented_commands(f"```bash\n{line}\n```\n")
    with pytest.raises(CommandError, match=re.escape(problem)):
        check_command(argv)


def test_commands_are_read_from_code_blocks_only_with_prompts_prefixes_continuations_and_chains():
    markdown = (
        "Run `mee-bench nothing` inline: not a code block.\n\n```bash\n"
        "$ .venv/bin/mee-bench train quick-decoder && OMP_NUM_THREADS=1 mee-bench train-heads runs/x   # heads\n"
        "lm_eval --model mee \\\n    --tasks squad_mee\nmake test\n```\n"
    )
    assert documented_commands(markdown) == [
        ["mee-bench", "train", "quick-decoder"],
        ["mee-bench", "train-heads", "runs/x"],
        ["lm_eval", "--model", "mee", "--tasks", "squad_mee"],
    ]


# ----------------------------------------------------------------------------- links between documents

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def headings(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {anchor(match) for match in re.findall(r"^#+ (.+?)\s*$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))  # code is not a link
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+:", target)]


LINKS = [(path, target) for path in DOCUMENTS for target in links(path)]


@pytest.mark.parametrize("path, target", LINKS, ids=[f"{p.name} -> {t}" for p, t in LINKS])
def test_every_relative_link_resolves(path, target):
    file, _, fragment = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f"{path.name} links to {file}, which does not exist"
    if fragment and linked.suffix == ".md":
        assert fragment in headings(linked), f"{path.name} links to #{fragment}, which {linked.name} has no heading for"


def test_the_link_check_sees_a_broken_link_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n\nSee [x](missing.md), [y](#a-section), [z](#no-such), `[q](code.md)`.\n")
    assert links(page) == ["missing.md", "#a-section", "#no-such"]
    assert headings(page) == {"title", "a-section"}
