# One command per habit; CI (.ci/run) runs the same targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast fmt lint bench gpu-check gpu-check-dry gpu-quality clean

# torch is installed first and pinned: its CPU build lies on local disk, and an unpinned
# torch (or any range admitting newer releases) pulls a multi-GB CUDA build.
# torch-fidelity (the FID Inception, gan_core/inception.py) is installed without its declared
# torchvision, which would replace the pinned torch with a CUDA build and whose PyPI wheels do
# not import beside it; nothing imports torchvision. So `pip check` reports "torch-fidelity
# 0.4.0 requires torchvision, which is not installed": expected.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $(STAMP)

setup: $(STAMP)

# No usage-stats or telemetry reporting from Ray or Prefect's embedded server: the machine
# may have no internet, and a failed telemetry call is logged as an error.
run: setup
	RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/ganflow run

# Two xdist workers, a test file at a time (a file's Ray cluster, servers and trained models
# are built once), in tests/conftest.py's order, longest files first (xdist's own reorder, by
# number of tests, would start the few-test end-to-end files last). In-process training
# uses one thread (conftest), so one core trains while the other starts processes, imports or
# waits on a server. pytest's exit code 5 (no tests collected) still fails the target.
# The 60 slowest tests are listed at the end: where the suite's time goes.
test: setup
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=60

# The inner loop: every test not marked slow (no Ray cluster, no server start, no training
# past a few steps), on the same two workers.
test-fast: setup
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/ganflow bench

# The prepared GPU check (flows/bench/gpu_check.py): nvidia-smi, the CUDA bench, a 1-worker
# Ray Train job in bf16, plain-loop steps/s, bf16-vs-fp32 losses; JSON + Markdown in the
# folder. Under 5 minutes on one H100, no downloads. The dry run is its CPU rehearsal (CI).
gpu-check: setup
	$(PY) -m flows.bench.gpu_check --out gpu-check-out

gpu-check-dry: setup
	$(PY) -m flows.bench.gpu_check --out gpu-check-out --dry

# The quality benchmark (flows/bench/quality.py) on one GPU, sized as the CPU cannot: three
# seeds, 6,000 steps, the shapes sets and their 10% subset, ganflow's defaults, with and
# without augmentation, against the plain DCGAN at equal steps and equal time.
gpu-quality: setup
	$(PY) -m flows.bench.quality --device cuda --datasets shapes,shapes-10 \
		--variants anchor,defaults,cutout,no-mismatch,no-aug --time-variants anchor --steps 6000 \
		--batch 64 --seeds 0,1,2 --out gpu-quality-out

clean:
	rm -rf $(VENV) .ganflow .pytest_cache .ruff_cache
