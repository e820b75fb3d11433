# Two commands do all set-up on a fresh machine:
#   make run    - run the node on the embedded default config (PORT=11113 WEB_PORT=8081: other ports)
#   make test   - run the test suite
#   make lint   - ruff and mypy (CI runs it before the tests)
# Everything is installed into .venv.  On a machine without an NVIDIA GPU the CPU build of
# torch is installed first, so the project's torch range does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no GPU: installing the CPU build of torch first ($(TORCH_CPU))"; \
		$(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# make run PORT=11113 WEB_PORT=8081: other ports for the DICOM listener and the console
run: install
	$(VENV)/bin/dicom-node serve $(if $(PORT),--port $(PORT)) $(if $(WEB_PORT),--web-port $(WEB_PORT))

# Two test processes (pytest-xdist), each test file in one of them so a file's fixtures are built
# once: most tests wait on sockets and child processes, so two overlap well even on 2 cores
# (11 min 56 s serial against 7 min 33 s, the same quiet machine).  TEST_WORKERS=0: one process.
# Each process keeps to its share of the cores (OMP_NUM_THREADS, tests/conftest.py): 9 min 6 s
# in a fresh clone's .ci/run, against 10 min 46 s to 11 min 16 s with torch on every core in both.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff on everything Python; mypy --strict on dicom_node/, engine/ and train/ (pyproject.toml [tool.mypy]).
LINT_PATHS ?= dicom_node engine train tests bench
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The bundled style model engine/models/default.safetensors (docs/training.md "The bundled model").
# Data: demo data seed 0 (24 training + 6 held-out 1024^2 pairs), a validation set (seed 2,
# 3 pairs: they pick the exported checkpoint, below) and an unseen set (seed 1, 6 pairs).
# `dicom-node train` (paired L1 x100 + CycleGAN, residual ngf 16 / 4 blocks) in three phases,
# each --resume of the same run, coarse to fine in what the network sees:
#   1. steps 0-500:   4 patches of 96^2, lr 3e-4 constant (local texture, fast; one thread)
#   2. steps 500-900: one 512^2 patch, lr 3e-4 decaying to 0
#   3. steps 900-1000: the whole 1024^2 image, lr 1e-4 decaying to 0.  InstanceNorm normalises
#      with the statistics of what the network sees; only whole images have the statistics of
#      inference, and this phase fixes the global tone (knees +3 dB).
# Per-image windows (data.normalization: image), as the recorded bundled model was trained.
# The export is the run's best checkpoint on the validation set (train/selection.py; the
# recorded model, made before checkpoint selection, was the final step) as "default", then
# `dicom-node evaluate` on both held-out sets and docs/preview.png.  About 35 min on a quiet
# 2-core CPU.  Everything lands in runs/default-model/ (git-ignored).
DEFAULT_MODEL_DIR ?= runs/default-model
DEFAULT_MODEL_OUT ?= engine/models/default.safetensors
DEFAULT_MODEL_PREVIEW ?= docs/preview.png
DM_TRAIN = cd $(DEFAULT_MODEL_DIR) && $(abspath $(VENV))/bin/dicom-node train --config train.yaml --no-progress
.PHONY: default-model
default-model: install
	rm -rf $(DEFAULT_MODEL_DIR) && mkdir -p $(DEFAULT_MODEL_DIR)
	$(VENV)/bin/dicom-node demo-data $(DEFAULT_MODEL_DIR)/data --count 24 --test-count 6 --size 1024 --seed 0
	$(VENV)/bin/dicom-node demo-data $(DEFAULT_MODEL_DIR)/val --count 0 --test-count 3 --size 1024 --seed 2
	$(VENV)/bin/dicom-node demo-data $(DEFAULT_MODEL_DIR)/unseen --count 0 --test-count 6 --size 1024 --seed 1
	printf '%s\n' \
	  'data: {a: data/A, b: data/B, val: val/test, normalization: image}' \
	  'model: {ngf: 16, n_blocks: 4, ndf: 16, residual: true, tone_filter: false}' \
	  'train: {patch_size: 96, batch_size: 4, steps: 500, decay_from: 500, lr: 0.0003, lambda_identity: 0, paired: "on", lambda_paired: 100, seed: 0, device: cpu, threads: 1, channels_last: false}' \
	  'output: {dir: run, name: default, sample_every: 100, checkpoint_every: 100, log_every: 50}' \
	  > $(DEFAULT_MODEL_DIR)/train.yaml
	$(DM_TRAIN)
	$(DM_TRAIN) --resume --patch-size 512 --batch-size 1 --steps 900 --decay-from 500 \
	  --set train.pool_size=0 --set train.threads=2
	$(DM_TRAIN) --resume --patch-size 1024 --batch-size 1 --steps 1000 --decay-from 900 \
	  --set train.lr=0.0001 --set train.pool_size=0 --set train.threads=2 \
	  --set output.checkpoint_every=25 --set output.sample_every=25 --set output.log_every=10
	$(PY) -c "import sys; from dicom_node.engine import load_style_model, save_style_model; \
	  m = load_style_model(sys.argv[1]); \
	  save_style_model(m.generator, sys.argv[2], name='default', version='3', \
	    direction=m.metadata['direction'], normalization=m.normalization, output=m.metadata.get('output'), provenance=m.metadata['provenance'], \
	    description='bundled default: demo style A (Alpha soft) -> style B (Beta crisp); make default-model')" \
	  $(DEFAULT_MODEL_DIR)/run/models/default_A2B.safetensors $(DEFAULT_MODEL_OUT)
	@$(PY) -c "import sys; from dicom_node.engine.model_file import pin_weights_digest; \
	  print('weights sha256', pin_weights_digest(sys.argv[1]), sys.argv[1], '(pinned in digests.json beside it)')" \
	  $(DEFAULT_MODEL_OUT)
	$(VENV)/bin/dicom-node evaluate --model $(DEFAULT_MODEL_OUT) $(DEFAULT_MODEL_DIR)/data \
	  --out $(DEFAULT_MODEL_DIR)/evaluation --preview $(DEFAULT_MODEL_PREVIEW)
	$(VENV)/bin/dicom-node evaluate --model $(DEFAULT_MODEL_OUT) $(DEFAULT_MODEL_DIR)/unseen \
	  --out $(DEFAULT_MODEL_DIR)/evaluation-unseen
