"""lm-eval task YAMLs for the paper's tasks (`*_mee`, group `mee`) and their metric code.

They live inside the package so that a plain `pip install` ships them; `TASKS_DIR` is what
lm-eval's `TaskManager` indexes (the lm-eval hook adds it for the stock CLI).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("squad_mee", "cnndm_mee", "wmt15_enfr_mee", "bigpatent_mee", "tatoeba_enfr_mee")
GROUP_NAME = "mee"
