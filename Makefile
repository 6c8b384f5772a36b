# The two commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# On these machines torch==2.13.0 is a CPU build on local disk; elsewhere set TORCH_SPEC="torch>=2.4"
# (or leave your own CUDA build in place) -- the package itself only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
# FID tests: torch-fidelity without its declared torchvision, which would replace the torch above
# (ddpm imports only its Inception modules, which need no torchvision; docs/FID.md).
	$(PY) -m pip install -q --no-deps "torch-fidelity>=0.4,<0.5"
# Streaming tests: LitData without its declared torchvision, for the same reason (docs/DATA.md).
	$(PY) -m pip install -q --no-deps "litdata>=0.2.76,<0.3"
	$(PY) -m pip install -q "boto3>=1.26" "filelock>=3.8" "lightning-utilities>=0.10" "requests>=2.28"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ddpm demo --out runs/demo

# Two workers on two cores: many tests wait on subprocesses (a killed and resumed training, torchrun),
# so the suite takes ~170 s instead of ~290 s there (measured 2026-12-01, a clean clone). One OpenMP
# thread per worker (and per subprocess): two threads each would spin-wait on the core the other
# worker holds; 263 s instead of 310-327 s for the same suite on a 2-core Zen 4 (2026-12-04). Work
# stealing: a worker that runs out takes tests queued for the other, so a batch of long tests at the
# end does not run on one worker alone (221 s instead of 263 s, the same machine and day).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses=4 --dist worksteal

clean:
	rm -rf $(VENV) runs
