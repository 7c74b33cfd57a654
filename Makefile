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

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest

test: lint typecheck pytest

# requirements.lock, what the Docker image installs (with --require-hashes): every dependency
# of setup.cfg's install_requires and of the build backend, pinned with its sha256 hashes.
# Run after changing install_requires; tests/unit/test_packaging.py checks the lock covers it.
lock: $(VENV)/.installed-dev
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--build-deps-for wheel --no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock setup.cfg

# Every benchmark, one after the other (they share the machine); JSON reports in var/bench,
# figures in docs/img. About 50 minutes on 2 cores (47 on 2026-12-06; the catalog benchmark
# alone about 25).
# The catalog benchmark's baseline arm runs the code before the line, exported from git.
BENCH_OUT ?= var/bench
BASELINE_COMMIT ?= 535494f
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/intake.py --database sqlite --json-out $(BENCH_OUT)/intake-sqlite.json
	$(BIN)/python bench/intake.py --database postgresql --json-out $(BENCH_OUT)/intake-postgresql.json
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
