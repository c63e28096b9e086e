# The README's commands are the truth: `make test` is what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install browser test demo bench tiny-model clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The UI tests drive Debian's Chromium. As root with apt (CI, fresh machines) install it; elsewhere the
# browser tests skip with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "could not install chromium: browser tests will skip"; \
	  else echo "chromium not found (install it for the browser tests; they skip otherwise)"; fi; }

test: $(VENV)/.installed browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/chatrex demo --out $(or $(OUT),.)

# Re-train both embedded tiny models from scratch (2 CPU threads each; see configs/) and install them as
# package data with held-out scores (chatrex.train.ship). Runs the two trainings one after the other.
tiny-model: $(VENV)/.installed
	$(VENV)/bin/chatrex train upn --config configs/train_upn_tiny.json --out build/tiny_upn --threads 2
	$(VENV)/bin/chatrex train chatrex --config configs/train_chatrex_tiny.json --out build/tiny_chatrex --threads 2
	$(PY) -m chatrex.train.ship --upn build/tiny_upn --chatrex build/tiny_chatrex

bench: $(VENV)/.installed
	$(PY) benchmarks/upn_bench.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
