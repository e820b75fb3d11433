# Two commands do all set-up on a fresh machine:
#   make run    - run the node on the embedded default config
#   make test   - run the test suite
# Everything is installed into .venv.  On a machine without an NVIDIA GPU the CPU build of
# torch is installed first, so the project's torch range does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no GPU: installing the CPU build of torch first ($(TORCH_CPU))"; \
		$(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/dicom-node serve

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
