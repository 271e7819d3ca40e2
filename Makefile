# lorajobs — the two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch, installed before the project so pip never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv services-up services-down clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorajobs demo

# Starts PostgreSQL (installing it if missing) and SeaweedFS for the integration tests, runs
# the whole suite, and stops both by PID whatever the outcome.
test: $(STAMP)
	bash infra/local/run-tests.sh $(BIN) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
