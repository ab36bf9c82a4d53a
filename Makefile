# Two entry points (see README): `make run` (main job on the embedded world) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup data lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel; an unpinned torch resolves to a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

setup: $(BIN)/python

data: setup
	$(BIN)/python -m more_lightning.world.benchmark --out data/embedded --model models/tiny_llava --if-missing

run: data
	$(BIN)/python cli.py fit --config configs/tiny_llava_eic.yaml

test: setup
	$(BIN)/ruff check more_lightning callbacks cli.py tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check more_lightning callbacks cli.py tests benchmarks
	$(BIN)/ruff format --check more_lightning callbacks cli.py tests benchmarks
