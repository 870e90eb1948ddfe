# privfed: `make demo` runs the main job, `make test` runs the suite.
# Both create .venv and install the pinned stack on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel by default. A GPU site sets e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.privfed-installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench bench-utility bench-dp bench-secagg bench-proxy install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, on its own, so no dependency resolution can pull a CUDA build.
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/privfed simulate gan-digits-demo $(ARGS)

# Lint and types first (seconds), then the suite; CI fails on any of them.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Benchmarks (ratios measured side by side; see README "Performance").
# bench: DP step, privfed round vs bare Flower, scale -> bench-results/bench.json (~11 min)
bench: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(PY) -m simulations.bench $(ARGS)

# utility against epsilon, full federated runs -> bench-results/bench_utility.json (20-35 min)
bench-utility: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(PY) -m simulations.bench --utility $(ARGS)

bench-dp: $(STAMP)
	$(PY) -m simulations.bench_dp

bench-secagg: $(STAMP)
	$(PY) -m simulations.bench_secagg

# the sites' proxy (Debian's nginx) against the SuperLink without it (~90 s; needs nginx)
bench-proxy: $(STAMP)
	$(PY) -m simulations.bench_proxy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
