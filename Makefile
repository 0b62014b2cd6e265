# The two commands the README promises: `make run` and `make test`.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint setup bench stress clean

run: $(STAMP)
	$(BIN)/elemta serve

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap
	VENV=$(VENV) ./scripts/bootstrap

# The resilience suites at full size (20 kills, thousands of messages); not part of CI.
stress: $(STAMP)
	ELEMTA_STRESS=1 $(BIN)/pytest -q -s tests/resilience

# elemta beside aiosmtpd, Postfix and smtp-sink, then the governor figures (bench/governor.py);
# one table. make bench BENCH_ARGS=--quick for a rough one.
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info var
