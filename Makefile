# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qla-installed

.PHONY: install demo test gpu-check aot-check clean

$(STAMP): requirements-dev.txt setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qla demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# On a GPU machine whose python3 already has torch/triton/timm/transformers (the lent H100):
# builds _C there, runs every test (GPU-marked ones included) and the GEMM benchmark.
gpu-check:
	bash scripts/gpu_check.sh all

# Ahead-of-time compile of every shipped Triton configuration for sm_90/sm_80 (no GPU needed).
aot-check: $(STAMP)
	$(PY) -m qla_kernels.ops.triton.aot

clean:
	rm -rf $(VENV) build *.egg-info qla_kernels/_C*.so qla_kernels/_build_info.json
