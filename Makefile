# make demo : set up .venv (if missing) and run the whole chain on the embedded synthetic data
# make test : set up .venv (if missing) and run the test suite
# make test-capabilities : the suite under each CPU code path PyTorch can take (machines differ)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned here (not in pyproject) so users on GPU clusters keep their own CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-capabilities pretrain clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(PY) tools/demo.py

pretrain: venv
	$(PY) tools/pretrain_backbone.py

# The suite in parallel processes (pytest-xdist), one per core up to 8; `make test JOBS=0` runs it in one. Much of
# its time goes to starting the tools it runs (about 4.5 s each to import torch and torchvision, on one core),
# which overlaps with another worker's arithmetic. Tests that share one trained run stay on one worker (loadgroup).
JOBS ?= $(shell n=$$(nproc); [ $$n -gt 8 ] && n=8; echo $$n)
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadgroup

test: venv
	$(PYTEST)

# ATEN_CPU_CAPABILITY caps the vector code PyTorch dispatches to (a machine without AVX-512 runs avx512
# as avx2): one run per setting shows a test that holds only on this machine's arithmetic. It caps PyTorch's
# own kernels only; oneDNN (the convolutions) and MKL pick theirs from the CPU, so the avx2 pass holds them
# to AVX2 as well: what an AVX2-only machine runs.
test-capabilities: venv
	for cap in default avx2 avx512; do \
		libs=; if [ $$cap = avx2 ]; then libs="ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"; fi; \
		echo "== ATEN_CPU_CAPABILITY=$$cap $$libs"; \
		env ATEN_CPU_CAPABILITY=$$cap $$libs $(PYTEST) -p no:cacheprovider || exit 1; done

clean:
	rm -rf runs datasets
