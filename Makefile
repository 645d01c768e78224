PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1

.PHONY: test test-slow demo bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench,text]"
	touch $@

test: venv
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: venv
	$(PY) -m pytest -m "slow or gpu" -q

demo: venv
	$(PY) -m zoo.mdeq.train +experiment=digits
	$(PY) -m zoo.mdeq.demo
	$(PY) scripts/compare_tables.py --table table3 $${ZOO_OUTPUTS:-outputs}/mdeq

bench: venv
	$(PY) benchmarks/solver_race.py

clean:
	rm -rf $(VENV) outputs multirun
