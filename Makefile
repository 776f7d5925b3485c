# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qla-installed

.PHONY: install demo test test-portable gpu-quick gpu-check aot-check clean

$(STAMP): requirements-dev.txt setup.py $(wildcard csrc/*) $(wildcard csrc/cpu/*)
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

# The suite as other machines run it: one thread; and the floating-point-sensitive files on an
# AVX2-only CPU (ATen, MKL and oneDNN limited to AVX2, as on an AMD EPYC without AVX-512) and
# without oneDNN. Not in CI (its time budget); run it before changing numerics or claims. The
# AVX2 run gets its own Inductor cache: Inductor's graph cache does not key on
# ATEN_CPU_CAPABILITY, and code generated for AVX-512 (16-wide steps) compiled for AVX2 (8-wide
# vectors) overruns its vectors (NaN outputs from torch.compile), which no real AVX2 CPU sees.
FP_SENSITIVE := tests/models/test_fusion.py tests/models/test_architectures.py tests/nn/test_weight_reads.py \
	tests/nn/test_compile.py tests/methods tests/test_minilm.py
test-portable: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q $(FP_SENSITIVE)
	QLA_TEST_MKLDNN=0 $(PY) -m pytest -q $(FP_SENSITIVE)

# On a GPU machine whose python3 already has torch/triton/timm/transformers (the lent H100/H200).
# gpu-quick first: one device call of <= 8 minutes, three result files in $$OUT.
gpu-quick:
	bash scripts/gpu_check.sh quick

gpu-check:
	bash scripts/gpu_check.sh all

# Ahead-of-time compile of every launch of the launch table (real model calls) for sm_90/sm_80,
# no GPU needed; writes benchmarks/results/aot_launch_table.json when every launch passes.
aot-check: $(STAMP)
	$(PY) -m qla_kernels.launch_table --write-table

clean:
	rm -rf $(VENV) build *.egg-info qla_kernels/_C*.so qla_kernels/_build_info.json
