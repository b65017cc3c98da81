"""`python -m mee_bench.harness.install_hook [--uninstall]`: put the lm-eval hook's `.pth`
file into this interpreter's site-packages, or take it out.

A wheel install (`pip install .`) ships `mee_bench_lm_eval.pth`; an editable install
(`pip install -e .`) does not, because setuptools' editable wheels carry only their own
path finder. Run this once after an editable install; before uninstalling such an install,
run it with `--uninstall`.

The `.pth` line runs in every Python start of the environment, so it imports nothing: it
defines `TRIGGER_SOURCE`'s finder, which compares each imported module name with the
lm-eval names and only for those imports `mee_bench.harness.lm_eval_hook` (or does nothing when
mee-bench is gone). Python 3.11 venvs run every `.pth` file twice, so it installs only once.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from mee_bench.harness.lm_eval_hook import DISABLE_ENV, TRIGGER_NAME, WATCHED
from mee_bench.paths import REPO_ROOT

PTH_NAME = "mee_bench_lm_eval.pth"
SHIPPED_PTH = REPO_ROOT / PTH_NAME
TRIGGER_SOURCE = f"""\
class {TRIGGER_NAME}:
    watched = frozenset({sorted(WATCHED)!r})

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in cls.watched:
            return None
        try:
            from mee_bench.harness.lm_eval_hook import find_spec
        except ModuleNotFoundError:
            return None
        return find_spec(fullname, path, target)


sys.meta_path.insert(0, {TRIGGER_NAME})
"""
PTH_LINE = (
    f"import os, sys; exec({TRIGGER_SOURCE!r}) "
    f"if os.environ.get({DISABLE_ENV!r}, '0') in ('', '0') "
    f"and not any(getattr(finder, '__name__', '') == {TRIGGER_NAME!r} for finder in sys.meta_path) else None\n"
)


def site_packages_pth() -> Path:
    """Where this interpreter's site-packages keeps the hook's `.pth` file."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    """Write (or with `--uninstall` remove) the `.pth` file; 0 on success."""
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--uninstall"]):
        print("usage: python -m mee_bench.harness.install_hook [--uninstall]", file=sys.stderr)
        return 2
    target = site_packages_pth()
    if argv:
        target.unlink(missing_ok=True)
        print(f"removed {target}")
    else:
        target.write_text(PTH_LINE, encoding="utf-8")
        print(f"installed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
