# Two commands do all set-up on a fresh machine (Python 3.10+):
#   make demo   build the embedded corpus, train, evaluate, print a report
#               (DEMO_ARGS='--skip-source bible' leaves out a source this machine cannot build)
#   make test   run the test suite (what .ci/run calls)
# Both create .venv and install the project on first use. The CPU path pins torch==2.13.0;
# GPU users install their CUDA torch into .venv first and run with TORCH_SPEC= (see README).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python venv failed; installing Debian's python3-venv"; \
	  command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)" 2>&1 | sed '/^WARNING: Location/d'; fi
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | sed '/^WARNING: Location/d'
	$(BIN)/python -c "import torch, ebt; print('torch', torch.__version__, '| ebt', ebt.__version__)"
	@touch $@

demo: $(STAMP)
	$(BIN)/ebt demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
