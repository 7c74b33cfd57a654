# The README's commands. `make run`: the dev stack. `make test`: lint, types, the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: reinstall when the package metadata changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/genrelay dev

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The suite in three runs, every test in exactly one of them (by the `e2e` and `serial`
# markers): the unit and integration tests spread over PYTEST_WORKERS processes (pytest-xdist;
# each process has its own PostgreSQL database, SQLite files, simulator and fake-gcs-server),
# then the end-to-end tests (real processes) over E2E_WORKERS, then the end-to-end tests that
# time what they see (`serial`) one at a time. Every run goes on even if an earlier one failed;
# any failing fails the target. The tests mostly wait (on processes, timeouts, the network), so
# more processes than cores pay: on 2 cores, on 2026-12-07, the first run took 5m17s with 4
# processes and 8m28s with 2 (the machine about 80 % and 45 % busy), the end-to-end tests 5m34s
# with 2 processes and 7m04s with one.
PYTEST_WORKERS ?= 4
E2E_WORKERS ?= 2
pytest: $(VENV)/.installed-dev
	status=0; \
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m "not e2e" || status=$$?; \
	$(BIN)/pytest -n $(E2E_WORKERS) -m "e2e and not serial" || status=$$?; \
	$(BIN)/pytest -m "e2e and serial" || status=$$?; \
	exit $$status

test: lint typecheck pytest

# requirements.lock, what the Docker image installs (with --require-hashes): every dependency
# of setup.cfg's install_requires and of the build backend, pinned with its sha256 hashes.
# Run after changing install_requires; tests/unit/test_packaging.py checks the lock covers it.
lock: $(VENV)/.installed-dev
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--build-deps-for wheel --no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock setup.cfg

# Every benchmark, one after the other (they share the machine); JSON reports in var/bench,
# figures in docs/img. About an hour on 2 cores (49 minutes on 2026-12-07 at 1e0ec54; the
# catalog benchmark alone about 25).
# The catalog benchmark's baseline arm runs the code before the line, exported from git.
BENCH_OUT ?= var/bench
BASELINE_COMMIT ?= 535494f
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/intake.py --database sqlite --json-out $(BENCH_OUT)/intake-sqlite.json
	$(BIN)/python bench/intake.py --database postgresql --json-out $(BENCH_OUT)/intake-postgresql.json
	$(BIN)/python bench/intake_cost.py --json-out $(BENCH_OUT)/intake-cost.json
	$(BIN)/python bench/completion.py --json-out $(BENCH_OUT)/completion.json
	$(BIN)/python bench/deliveries.py --database sqlite --json-out $(BENCH_OUT)/deliveries-sqlite.json
	$(BIN)/python bench/deliveries.py --database postgresql --json-out $(BENCH_OUT)/deliveries-postgresql.json
	$(BIN)/python bench/scale.py --json-out $(BENCH_OUT)/scale.json
	# Each worker in a CPU quota of its own (a cgroup: needs root); skipped where refused.
	-$(BIN)/python bench/scale.py --worker-cpu 0.2 --json-out $(BENCH_OUT)/scale-capped.json
	$(BIN)/python bench/large_table.py --json-out $(BENCH_OUT)/large-table.json
	$(BIN)/python bench/soak.py --database postgresql --crash --json-out $(BENCH_OUT)/soak.json
	rm -rf $(BENCH_OUT)/baseline && mkdir -p $(BENCH_OUT)/baseline
	git archive $(BASELINE_COMMIT) | tar -x -C $(BENCH_OUT)/baseline
	$(BIN)/python bench/catalog.py --database postgresql --baseline-path $(BENCH_OUT)/baseline --json-out $(BENCH_OUT)/catalog.json
	$(BIN)/python bench/plots.py $(BENCH_OUT) docs/img

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
