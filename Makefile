# make demo : set up .venv (if missing) and run the whole chain on the embedded synthetic data
# make test : set up .venv (if missing) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned here (not in pyproject) so users on GPU clusters keep their own CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test pretrain clean

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

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf runs datasets
