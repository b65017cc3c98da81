"""The lm-eval hook: lets the stock `lm_eval` command find `--model mee` and the `*_mee` tasks.

lm-eval 0.4.13 loads no model plugins (newer versions load `--model mee` from the
`lm_eval.models` entry point pyproject.toml declares, but not the tasks, nor what follows).
`mee_bench_lm_eval.pth` in site-packages (see
`install_lm_eval_hook`) therefore puts a trigger finder on `sys.meta_path` whenever Python
starts, unless `MEE_BENCH_NO_LM_EVAL_HOOK=1`. The trigger imports nothing; it only checks
each imported name against `WATCHED` and, for those lm-eval modules, calls `find_spec`
here, which wraps the real loader so that `patch` runs right after lm-eval executed the module:

- `lm_eval.models`: registers `mee` as a lazy placeholder, so nothing of mee-bench (torch
  included) is imported until someone asks for that model;
- `lm_eval.tasks.manager`: `TaskManager` also indexes `mee_bench/tasks`, before any user
  `include_path` (a user's own task of the same name still wins); `include_defaults=False`
  leaves it out, like lm-eval's built-in tasks;
- `lm_eval.evaluator`: when the model is the `mee` adapter, every evaluation starts with
  fresh efficiency counters and its results get `results["mee"][task]`, which
  `lm_eval --output_path` writes into the results JSON;
- `lm_eval.utils`: `make_table` appends the efficiency table after lm-eval's last table
  (the CLI prints the task table, then the group table when there is one);
- `lm_eval._cli.harness`: whatever mee-bench refuses while lm-eval runs a subcommand (a bad
  `--model_args` value, task data without records or fields, generation kwargs that ask for
  sampling: see `refusal_line`) ends the `lm_eval` command in one line and exit status 2
  instead of a traceback (`MEE_BENCH_DEBUG=1` shows it). The CLI class, not `cli_evaluate`, is
  wrapped: `python -m lm_eval` runs `lm_eval/__main__.py` as `__main__`, which no import hook sees.

A patch that fails (say, a future lm-eval moved something) warns instead of breaking lm-eval.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

DISABLE_ENV = "MEE_BENCH_NO_LM_EVAL_HOOK"
MODEL_NAME = "mee"
MODEL_TARGET = "mee_bench.harness.lm_eval_model:MEELM"
ADAPTER_MODULE = "mee_bench.harness.lm_eval_model"
TRIGGER_NAME = "MeeBenchLmEvalTrigger"
DEBUG_ENV = "MEE_BENCH_DEBUG"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # mee_bench/: where a refusal's raise must be


def register_model(module: ModuleType) -> None:
    """`--model mee` resolves to the adapter, imported only when that model is asked for."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def index_package_tasks(module: ModuleType) -> None:
    """Every `TaskManager` with lm-eval's default tasks also gets ours (once)."""
    from mee_bench.harness.catalogue import TASKS_DIR

    init = module.TaskManager.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments["include_path"]
        paths = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        if bound.arguments["include_defaults"] and TASKS_DIR not in {Path(p).resolve() for p in paths}:
            bound.arguments["include_path"] = [TASKS_DIR, *paths]
        init(*bound.args, **bound.kwargs)

    module.TaskManager.__init__ = __init__


def mee_adapter(lm: Any) -> Any:
    """The `MEELM` behind `lm` (lm-eval's `CachingLM` keeps it as `.lm`), or None."""
    adapter_module = sys.modules.get(ADAPTER_MODULE)
    if adapter_module is None:
        return None
    for candidate in (lm, getattr(lm, "__dict__", {}).get("lm")):
        if isinstance(candidate, adapter_module.MEELM):
            return candidate
    return None


def attach_efficiency(module: ModuleType) -> None:
    """`evaluate` of a `mee` model resets its efficiency counters and returns them as `results["mee"]`."""
    evaluate = module.evaluate

    @functools.wraps(evaluate)
    def evaluate_with_efficiency(*args: Any, **kwargs: Any):
        adapter = mee_adapter(kwargs["lm"] if "lm" in kwargs else args[0] if args else None)
        if adapter is None:
            return evaluate(*args, **kwargs)
        adapter.reset_efficiency()
        results = evaluate(*args, **kwargs)
        if results is not None:
            sys.modules[ADAPTER_MODULE].attach_efficiency(results, adapter)
        return results

    module.evaluate = evaluate_with_efficiency


def append_efficiency_table(module: ModuleType) -> None:
    """`make_table` (the CLI's printer) adds the efficiency table after lm-eval's last table."""
    make_table = module.make_table

    @functools.wraps(make_table)
    def make_table_with_efficiency(result_dict: dict, column: str = "results", sort_results: bool = False) -> str:
        table = make_table(result_dict, column, sort_results)
        is_last_table = column == "groups" or "groups" not in result_dict
        if is_last_table and result_dict.get(MODEL_NAME):
            from mee_bench.harness.lm_eval_model import efficiency_table

            table = f"{table}\n{efficiency_table(result_dict[MODEL_NAME])}\n"
        return table

    module.make_table = make_table_with_efficiency


def refusal_line(err: BaseException) -> str | None:
    """The one line to end `lm_eval` with when `err` is mee-bench refusing bad input, else None.

    A refusal is a usage error (as `mee-bench` itself counts them: a bad value, a missing or
    unreadable file) raised by mee-bench's own code, wherever lm-eval called it from: a bad
    model arg, task data without records or fields, a task's local data missing, generation
    kwargs that ask for sampling. The same types raised inside lm-eval or a library are not
    ours to shorten and keep their traceback.
    """
    from mee_bench.cli import USAGE_ERRORS, one_line

    if not isinstance(err, USAGE_ERRORS) or err.__traceback__ is None:
        return None
    frame = err.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    try:
        Path(frame.tb_frame.f_code.co_filename).resolve().relative_to(PACKAGE_DIR)
    except ValueError:
        return None
    return one_line(err)


def exit_on_refusals(module: ModuleType) -> None:
    """`HarnessCLI.execute` (every `lm_eval` subcommand, as the console script or `python -m lm_eval`)
    ends on a mee-bench refusal (`refusal_line`) with `lm_eval: error: <the line>` and exit status 2;
    `MEE_BENCH_DEBUG=1` keeps the traceback."""
    execute = module.HarnessCLI.execute

    @functools.wraps(execute)
    def execute_with_clear_errors(*args: Any, **kwargs: Any) -> Any:
        try:
            return execute(*args, **kwargs)
        except Exception as err:
            line = None if os.environ.get(DEBUG_ENV, "0") not in ("", "0") else refusal_line(err)
            if line is None:
                raise
            print(f"lm_eval: error: {line}", file=sys.stderr)
            raise SystemExit(2) from None

    module.HarnessCLI.execute = execute_with_clear_errors


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "lm_eval.models": register_model,
    "lm_eval.tasks.manager": index_package_tasks,
    "lm_eval.evaluator": attach_efficiency,
    "lm_eval.utils": append_efficiency_table,
    "lm_eval._cli.harness": exit_on_refusals,
}


def patch(module: ModuleType) -> None:
    """Apply the patch for `module`; a failure becomes a warning naming the way out. A module with no
    patch (watched by the `.pth` trigger of an older mee-bench) is left as it is."""
    if module.__name__ not in PATCHES:
        return
    try:
        PATCHES[module.__name__](module)
    except Exception as err:  # a changed lm-eval must not stop lm-eval itself from working
        warnings.warn(
            f"mee-bench could not hook into {module.__name__} ({type(err).__name__}: {err}); "
            f"`--model mee` or the *_mee tasks may be missing. Set {DISABLE_ENV}=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


WATCHED = frozenset(PATCHES)


def find_spec(fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
    """The spec the other finders give for a watched module, its loader made to run `patch`
    after executing the module. Start-up triggers (there may be two: Python 3.11 venvs run
    each `.pth` file twice) are skipped."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None) if getattr(finder, "__name__", "") != TRIGGER_NAME else None
        spec = find(fullname, path, target) if find is not None else None
        if spec is not None:
            break
    else:
        return None
    loader = spec.loader
    if loader is None or not hasattr(loader, "exec_module"):
        return spec
    exec_module = loader.exec_module

    def exec_then_patch(module: ModuleType) -> None:
        exec_module(module)
        patch(module)

    loader.exec_module = exec_then_patch
    return spec
