# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
LOOP_ARGS ?=

.PHONY: install demo test quick-test install-test fuzz bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build; the package itself asks for torch>=2.4.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/quickstart.py

# What CI runs: the whole suite, the long fault runs (marker `slow`) and the install test (marker `install`,
# alone: `make install-test`) included; the long fuzz run is `make fuzz`.
# Both suites end with the 15 slowest tests (--durations=15), so a test that grows slow shows up.
# The tests fork their training runs from one process that imported torch once (tests/scripts/childproc.py);
# LIGHTNING_CKPT_TEST_FRESH_PYTHON=1 makes each a fresh interpreter (slower), to rule that out when one fails.
test: install
	$(BIN)/python -m pytest -q -m "not fuzz" --durations=15 $(PYTEST_ARGS)

# The wheel built from this tree, installed into a fresh venv with torch and no dev extras (~3 min on 2 cores:
# pip installs torch and the dependencies from the package index): `lightning-ckpt --version`, `list`, `verify` and a save/load round trip.
install-test: install
	$(BIN)/python -m pytest -q -m install tests/test_install.py $(PYTEST_ARGS)

# The suite without the long fault runs and the install test (what a bare `pytest` runs).
quick-test: install
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

fuzz: install
	$(BIN)/python -m pytest -q -m fuzz tests/faults/test_fuzz_reader.py tests/faults/test_fuzz_header_differential.py $(PYTEST_ARGS)

# bench.py: save and load alone (BENCH_ARGS), writes benchmarks/RESULTS.md; bench_loop.py: what checkpointing adds
# to `trainer.fit` (LOOP_ARGS, e.g. "--json loop.json"), appends its table to that RESULTS.md; bench_remote.py: a
# restore from S3 (moto on 127.0.0.1) against s3fs reading the files plainly, appended too; bench_incremental.py:
# incremental saves (frozen layers hard-linked) against full ones of the same states, and their mirror's uploads to S3
# (moto on 127.0.0.1), appended too.
bench: install
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_loop.py --append benchmarks/RESULTS.md $(LOOP_ARGS)
	$(BIN)/python benchmarks/bench_remote.py --append benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_incremental.py --append benchmarks/RESULTS.md

# On a machine with an NVIDIA GPU (under 5 minutes): exact resume, async blocking and step inflation on CUDA.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check.json

clean:
	rm -rf $(VENV) demo_runs .pytest_cache .hypothesis
