# Two commands: `make run` (set up + the main job on the embedded default model), `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, so pip never resolves a bare `torch` to a multi-GB build it
# does not need; on a GPU machine the same pin pulls the CUDA wheel. Override to taste:
# make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run demo test bench readme-leaderboard

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -m mee_bench.install_lm_eval_hook  # editable installs do not carry the .pth that registers `--model mee`
	touch $@

# The main job: the quickstart sweep on the embedded default model (resumes if interrupted).
run: setup
	$(BIN)/mee-bench sweep configs/quickstart.yaml output_dir=runs/quickstart
	cat runs/quickstart/leaderboard.md

demo: setup
	$(BIN)/mee-bench demo

# Maintainers: regenerate the reference leaderboard committed in results/ and shown in README.md.
readme-leaderboard: setup
	$(BIN)/mee-bench sweep configs/quickstart.yaml
	$(BIN)/mee-bench leaderboard results/quickstart --readme README.md

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/decode_speed.py
