# Two commands on a fresh machine:  make run  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONFIG ?= configs/quickstart.yaml
ARGS   ?=

.PHONY: run test install bench clean

# -qq: pip's errors still print; its notices and the build backend's warnings do not
$(VENV)/.installed: pyproject.toml
	@echo "make: creating $(VENV) and installing raybias (a few minutes the first time)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install -qq --upgrade pip
	@# torch first, pinned to the release this machine's pip can take from disk (ranges admit others)
	@$(PIP) install -qq "torch>=2.6,<2.15" "torchvision>=0.21,<0.30"
	@$(PIP) install -qq -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/raybias run $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q -ra --durations=25 $(ARGS)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
