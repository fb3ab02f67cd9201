# Every target builds the virtual environment first, so each is one command on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
# The CPU build of torch; pinned so that pip never pulls a multi-GB CUDA build on a CPU machine.
TORCH   ?= torch==2.13.0

.PHONY: quickstart test test-all lint format bench clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

quickstart: .venv/.installed
	.venv/bin/tunesmith quickstart

test: .venv/.installed
	.venv/bin/ruff check src tests bench
	OMP_NUM_THREADS=1 .venv/bin/pytest

test-all: .venv/.installed
	.venv/bin/pytest -m ""

lint: .venv/.installed
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

format: .venv/.installed
	.venv/bin/ruff format src tests bench
	.venv/bin/ruff check --fix src tests bench

bench: .venv/.installed
	$(PY) bench/sft_vs_trl.py

clean:
	rm -rf .venv runs .pytest_cache
