# The README's commands are the truth: `make test` is what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/chatrex demo --out $(or $(OUT),.)

bench: $(VENV)/.installed
	$(PY) benchmarks/upn_bench.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
