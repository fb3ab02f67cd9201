# Every target builds the virtual environment first, so each is one command on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
# The CPU build of torch; pinned so that pip never pulls a multi-GB CUDA build on a CPU machine.
TORCH   ?= torch==2.13.0

.PHONY: quickstart test test-all lint format bench clean browser tcmalloc

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

quickstart: .venv/.installed tcmalloc
	.venv/bin/tunesmith quickstart

test: .venv/.installed browser tcmalloc
	.venv/bin/ruff check src tests bench
	OMP_NUM_THREADS=1 .venv/bin/pytest

# The feedback page's browser test drives headless Chromium. Install it (with apt, as root) only
# when it is missing; a failure here never fails the tests: that test skips and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver for the browser test (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	      || echo "note: could not install chromium; the browser test will be skipped"; \
	  else \
	    echo "note: chromium is not installed (apt-get install chromium chromium-driver as root); the browser test will be skipped"; \
	  fi; \
	fi

# train.cpu_memory: fast runs CPU training under tcmalloc where the system has it (less memory
# than glibc's heap, same speed or better; training/memory.py). Install it (with apt, as root)
# only when it is missing; without it training uses glibc's malloc and nothing fails.
tcmalloc:
	@if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libtcmalloc-minimal4 for CPU training (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4) >/dev/null 2>&1 \
	      || echo "note: could not install tcmalloc; CPU training uses glibc's malloc"; \
	  else \
	    echo "note: no tcmalloc (apt-get install libtcmalloc-minimal4 as root); CPU training uses glibc's malloc"; \
	  fi; \
	fi

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
