# Entry points: `make reproduce` (the main job), `make verify` (check the book's numbers from the
# kept checkpoints, without retraining) and `make test` (every test).
# Both create or refresh the project's own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SEEDS ?= 4   # the book's seeds 0..SEEDS-1
JOBS ?= 2    # rows trained at a time (fmpaper reproduce --jobs)

.PHONY: reproduce verify test venv bench

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/fmpaper reproduce --profile quick --dataset ml-100k --seeds $(SEEDS) --jobs $(JOBS)

verify: $(STAMP)
	$(VENV)/bin/fmpaper verify --dataset ml-100k --profile quick

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
