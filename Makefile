# Two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cannon-bridge demo --output demo_output

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

results: $(STAMP)
	$(PY) benchmarks/bench_bridge.py --all-snr --output docs
	$(PY) benchmarks/bench_learning_curve.py
	$(PY) benchmarks/report_bridge.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
