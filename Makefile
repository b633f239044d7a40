# Two commands do everything on a fresh machine: `make serve` and `make test`.
# Both bootstrap .venv first (`make install`, idempotent: it reruns only when
# pyproject.toml or requirements.lock change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test lint typecheck pytest lock bench bench-learning bench-evaluation clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,report,export]'
	@touch $@

serve: install
	$(BIN)/oo-serving serve

test: lint typecheck pytest

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

# Re-pin every dependency to what is installed now (after changing pyproject.toml); the
# bench and report extras are installed first so that their pins stay in the lock.
lock: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,bench,report,export]'
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check \
		| grep -v '^oo-serving' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info

# Measure against the prototype and write docs/benchmarks.md (about 20 minutes; never part of test).
bench: install
	$(BIN)/python bench/run.py

# Regret over real HTTP, ours (linucb-v2) against the prototype, on the task-app simulator;
# writes docs/learning-http.md (about half an hour; never part of test).
bench-learning: install
	$(BIN)/python bench/learning.py --out docs/learning-http.md

# Off-policy evaluation on logs the service writes for the simulator, against the known
# true values (2 scenarios × 20 seeds; about 15 minutes; never part of test).
bench-evaluation: install
	$(BIN)/python bench/evaluation.py --out docs/evaluation-sim.md


# The system Chromium that tests/browser drives (Debian's chromium package). Nothing to do
# when it is there (/usr/bin/chromium, on PATH, or OO_CHROMIUM); as root it is installed
# with apt-get; otherwise this says how, and the browser tests skip (on CI they fail).
.PHONY: browser
browser:
	@if [ -n "$${OO_CHROMIUM:-}" ] && [ -x "$${OO_CHROMIUM}" ]; then :; \
	elif [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && \
		apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; \
	else \
		echo "the browser tests need Chromium: 'sudo apt-get install chromium'" \
			"(Debian's package), or OO_CHROMIUM=/path/to/chromium; until then they skip"; \
	fi
