"""lm-eval task YAMLs for the project's tasks (`*_mee`, group `mee`) and their glue code (`utils.py`).

They live inside the package so that a plain `pip install` ships them; what each task reads,
prompts and scores is written down in `mee_bench.harness.catalogue`.
"""
