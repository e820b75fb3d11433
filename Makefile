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

# The bundled style model dicom_node/models/default.safetensors (README "The bundled model"):
# demo data (24 training + 6 held-out 1024^2 pairs, seed 0); `dicom-node train` (paired L1 x100 +
# CycleGAN, residual ngf 16 / 4 blocks, one CPU thread) in two phases: 500 steps of 4 patches of
# 96^2 at a constant lr, then --resume with whole-image-like statistics: patches of 256^2 (the
# InstanceNorm statistics of small patches differ from whole images; phase 1 alone peaks at
# 24.8 dB), lr decaying to zero at step 1100; the step-700 checkpoint (best validation) is
# exported as "default", then `dicom-node evaluate` on the held-out pairs and docs/preview.png.
# About 15 min on one busy CPU core.  Everything lands in runs/default-model/ (git-ignored).
DEFAULT_MODEL_DIR ?= runs/default-model
DEFAULT_MODEL_STEPS ?= 500
DEFAULT_MODEL_EXPORT_STEP ?= 700
.PHONY: default-model
default-model: install
	$(VENV)/bin/dicom-node demo-data $(DEFAULT_MODEL_DIR)/data --count 24 --test-count 6 --size 1024 --seed 0
	mkdir -p $(DEFAULT_MODEL_DIR)/val/A $(DEFAULT_MODEL_DIR)/val/B
	for s in A B; do cp $(DEFAULT_MODEL_DIR)/data/test/$$s/0024_chest.dcm $(DEFAULT_MODEL_DIR)/data/test/$$s/0026_knee.dcm $(DEFAULT_MODEL_DIR)/val/$$s/; done
	printf '%s\n' \
	  'data: {a: data/A, b: data/B, val: val}' \
	  'model: {ngf: 16, n_blocks: 4, ndf: 16, residual: true}' \
	  'train: {patch_size: 96, batch_size: 4, steps: $(DEFAULT_MODEL_STEPS), decay_from: 1200, lr: 0.0003, lambda_identity: 0, paired: "on", lambda_paired: 100, seed: 0, device: cpu, threads: 1, channels_last: false}' \
	  'output: {dir: run, name: default, sample_every: 1000, checkpoint_every: 250, log_every: 50}' \
	  > $(DEFAULT_MODEL_DIR)/train.yaml
	cd $(DEFAULT_MODEL_DIR) && $(abspath $(VENV))/bin/dicom-node train --config train.yaml --no-progress
	cd $(DEFAULT_MODEL_DIR) && $(abspath $(VENV))/bin/dicom-node train --config train.yaml --resume --no-progress \
	  --patch-size 256 --batch-size 1 --steps 1100 --decay-from 500 --set train.pool_size=0 \
	  --set output.checkpoint_every=$(DEFAULT_MODEL_EXPORT_STEP)
	$(VENV)/bin/dicom-node train export $(DEFAULT_MODEL_DIR)/run \
	  --checkpoint $(DEFAULT_MODEL_DIR)/run/checkpoints/step_00000$(DEFAULT_MODEL_EXPORT_STEP).pt
	$(PY) -c "import sys; from dicom_node.engine import load_style_model, save_style_model; \
	  m = load_style_model(sys.argv[1]); \
	  save_style_model(m.generator, 'dicom_node/models/default.safetensors', name='default', version='2', \
	    direction=m.metadata['direction'], normalization=m.normalization, provenance=m.metadata['provenance'], \
	    description='bundled default: demo style A (Alpha soft) -> style B (Beta crisp); make default-model')" \
	  $(DEFAULT_MODEL_DIR)/run/models/default_A2B.safetensors
	OMP_NUM_THREADS=1 $(VENV)/bin/dicom-node evaluate --model default $(DEFAULT_MODEL_DIR)/data --out $(DEFAULT_MODEL_DIR)/evaluation --preview docs/preview.png
