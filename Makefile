# Every target bootstraps .venv itself: torch first (the CPU build this machine has on
# disk; a plain `pip install torch` would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install test test-fast demo proto lint fuzz bench bench-sim bench-soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The main job on embedded defaults: the real daemon on loopback (SQLite), 20 real SDK
# clients over gRPC, FedAvg on the digits app; prints the round table and the plot path.
demo: $(STAMP)
	$(BIN)/leptonfl sim --app examples/digits --backend grpc --clients 20 --rounds 10 --seed 0 --out demo-out

fuzz: $(STAMP)
	LEPTONFL_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/integration/test_fuzz.py -p no:cacheprovider -o timeout=3600

# Simulation backends vs a bare PyTorch loop (W1-W3): a table of ratios from one invocation;
# always exits 0. e.g. make bench-sim BENCH_ARGS="--quick --only W1"
bench-sim: $(STAMP)
	$(BIN)/python benchmarks/sim_bench.py $(BENCH_ARGS)

# Daemon memory over a long run: 500 digits rounds x 20 real clients against the real daemon;
# RSS after round 500 vs after round 50 (<= 1.10). ~5 min on 2 cores; always exits 0.
# e.g. make bench-soak SOAK_ARGS="--rounds 60"
bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS)

bench: bench-sim

proto: $(STAMP)
	$(BIN)/python -m protos.generate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf demo-out sim-out .pytest_cache .mypy_cache .ruff_cache
