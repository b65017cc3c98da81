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

.PHONY: setup run demo lint test test-fast bench campaign ship-campaign quickstart-busy gpu-suite-prepare gpu-suite gpu-suite-dry-run quickstart-leaderboard results-page default-model monotonicity

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -m mee_bench.harness.install_hook  # editable installs do not carry the .pth that registers `--model mee`
	touch $@

# The main job: the quickstart sweep on the embedded default model (resumes if interrupted).
run: setup
	$(BIN)/mee-bench sweep configs/quickstart.yaml output_dir=runs/quickstart
	cat runs/quickstart/leaderboard.md

demo: setup
	$(BIN)/mee-bench demo

# Maintainers: regenerate the reference leaderboard committed in results/quickstart (its summary is
# the README's table, the whole of it is in docs/RESULTS.md).
quickstart-leaderboard: setup
	$(BIN)/mee-bench sweep configs/quickstart.yaml
	$(BIN)/mee-bench leaderboard results/quickstart
	$(BIN)/mee-bench results-page

# docs/RESULTS.md and the README's summary table, generated from results/ (every target that writes
# results/ ends with it; `mee-bench results-page --check` says whether they are up to date).
results-page: setup
	$(BIN)/mee-bench results-page

# Maintainers: the same quickstart while a CPU-bound process holds one of the cores for the whole
# run (results/quickstart-busy), then its agreement with the idle run (`benchmarks/compare_speedups.py`);
# `benchmarks/busy_check.py` takes the hog alone, in one process.
quickstart-busy: setup
	$(BIN)/python benchmarks/cpu_hog.py --seconds 1800 & hog=$$!; \
	$(BIN)/mee-bench sweep configs/quickstart.yaml name=quickstart-busy; status=$$?; kill $$hog; exit $$status
	$(BIN)/python benchmarks/compare_speedups.py results/quickstart results/quickstart-busy
	$(BIN)/mee-bench results-page

lint: setup
	$(BIN)/ruff check mee_bench benchmarks tests
	$(BIN)/ruff format --check mee_bench benchmarks tests

test: setup lint
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests that start Ray, subprocesses or the lm-eval CLI.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/decode_speed.py
	$(BIN)/python benchmarks/policy_speed.py
	$(BIN)/python benchmarks/pruned_checks.py
	$(BIN)/python benchmarks/token_profile.py
	$(BIN)/python benchmarks/first_read.py
	$(BIN)/python benchmarks/pairing_check.py
	$(BIN)/python benchmarks/busy_check.py
	$(BIN)/mee-bench results-page

# The GPU suite (docs/GPU.md): prepare here (data + wheels into build/gpu/, prints the run line),
# run on the GPU machine under its own python3, or dry-run here at tiny sizes.
gpu-suite-prepare: setup
	$(BIN)/python benchmarks/gpu_suite.py prepare

gpu-suite:
	benchmarks/gpu_suite.sh $${OUT:-runs/gpu-suite}

gpu-suite-dry-run: setup
	PYTHON=$(BIN)/python benchmarks/gpu_suite.sh runs/gpu-suite-dry-run --dry-run

# Maintainers: rebuild the embedded default model from nothing with the project's own recipe
# (about 3 hours on 2 CPU cores; every stage resumes from its last checkpoint if interrupted):
# base -> continued base -> weighted-CE fine-tune (shipped) with its exit heads and report;
# the vanilla and FREE fine-tunes and the scratch weighted-CE run are the comparisons.
DEFAULT_MODEL := mee_bench/models/mee-t5-default
TRAIN_RUNS := default-base default-extend default-weighted-ce default-final default-free default-scratch-weighted-ce
MODEL_FILES := config.json generation_config.json model.safetensors spiece.model tokenizer.json tokenizer_config.json training.json
default-model: setup
	for preset in default default-extend default-weighted-ce default-final default-free default-scratch-weighted-ce; do \
		$(BIN)/mee-bench train $$preset || exit 1; done
	mkdir -p $(DEFAULT_MODEL)/training
	for file in $(MODEL_FILES); do cp runs/default-weighted-ce/$$file $(DEFAULT_MODEL)/ || exit 1; done
	for run in $(TRAIN_RUNS); do cp runs/$$run/training.json $(DEFAULT_MODEL)/training/$$run.json || exit 1; done
	$(BIN)/mee-bench train-heads $(DEFAULT_MODEL) --force
	$(BIN)/mee-bench model-report $(DEFAULT_MODEL) --out results/default_model.md --force
	$(BIN)/mee-bench results-page

# Maintainers: the monotonicity study of the three fine-tunes (needs `make default-model`'s runs/).
MONOTONICITY_MODELS := --model runs/default-final --label vanilla --model $(DEFAULT_MODEL) --label weighted-ce \
	--model runs/default-free --label free
MONOTONICITY_TASKS = $(shell $(BIN)/python -c "from mee_bench.harness.catalogue import TASK_NAMES; print(*TASK_NAMES)")
monotonicity: setup
	for task in $(MONOTONICITY_TASKS); do \
		$(BIN)/mee-bench analyze $(MONOTONICITY_MODELS) --task $$task --limit 200 --out results/monotonicity/$$task || exit 1; done
	$(BIN)/mee-bench analyze $(MONOTONICITY_MODELS) --task tatoeba_enfr_mee --limit 200 --mode free_running \
		--out results/monotonicity/tatoeba_enfr_mee-free-running
	$(BIN)/mee-bench results-page

# Maintainers: the default-model campaign (configs/train/campaign.yaml), one run per session, each
# started from the newest shipped default. `campaign` starts or resumes this session's run in the
# background; `ship-campaign` ships it when it leads by 2 BLEU and rebuilds what depends on the weights.
CAMPAIGN_RUN = runs/campaign-$(shell echo $$(( $$(ls $(DEFAULT_MODEL)/training/campaign-*.json 2>/dev/null | wc -l) + 1 )))
# The run uses a frozen copy of the code (a detached worktree of HEAD in runs/campaign-code): training
# imports modules lazily, so code edited in this checkout while it runs would break it.
CAMPAIGN_CODE = runs/campaign-code
MEE_DATA_DIR ?= $(abspath ../shared/data)
campaign: setup
	mkdir -p runs
	git worktree remove --force $(CAMPAIGN_CODE) 2>/dev/null || rm -rf $(CAMPAIGN_CODE)
	git worktree add --detach $(CAMPAIGN_CODE) HEAD
	cd $(CAMPAIGN_CODE) && MEE_DATA_DIR=$(MEE_DATA_DIR) PYTHONPATH=. nohup $(abspath $(BIN))/python -m mee_bench.cli \
		train campaign output_dir=$(abspath $(CAMPAIGN_RUN)) > $(abspath $(CAMPAIGN_RUN)).log 2>&1 &
	@echo "training $(CAMPAIGN_RUN) in the background from $(CAMPAIGN_CODE); log in $(CAMPAIGN_RUN).log"

ship-campaign: setup
	$(BIN)/mee-bench ship $(CAMPAIGN_RUN)
	$(BIN)/mee-bench train-heads $(DEFAULT_MODEL) --force
	OMP_NUM_THREADS=1 $(BIN)/mee-bench calibrate configs/calibrate_quickstart.yaml --save-to $(DEFAULT_MODEL) --force
	$(BIN)/mee-bench model-report $(DEFAULT_MODEL) --out results/default_model.md --force
	$(BIN)/mee-bench results-page
