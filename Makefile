# lorajobs — the two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch, installed before the project so pip never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# Exact versions of every dependency for CI, the demo and the worker image: reproducible
# adapters depend on exact library versions. `make lock` regenerates it.
CONSTRAINTS := infra/constraints.txt
STAMP := $(VENV)/.installed
# The tests' MLflow tracking server lives in its own venv: its pins (SQLAlchemy, Alembic, pandas)
# are its own business, not the project's.
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

.PHONY: demo test test-fast lint lock venv clean bench

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $(STAMP)

$(MLFLOW_STAMP): infra/mlflow-constraints.txt
	@test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q -c infra/mlflow-constraints.txt mlflow
	@touch $(MLFLOW_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorajobs demo

# Lint (ruff), formatting and the import contracts first, then the whole suite: infra/local/
# run-tests.sh starts nothing itself; the tests start PostgreSQL and SeaweedFS and stop them by PID.
test: $(STAMP) $(MLFLOW_STAMP) lint
	bash infra/local/run-tests.sh $(BIN) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Resolve the newest versions pyproject.toml allows in a fresh venv and pin them all.
lock:
	bash infra/lock.sh $(PYTHON) "$(TORCH_CPU)" $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) .pytest_cache
