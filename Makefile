# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAMFACE := $(VENV)/bin/camface
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: setup demo test models detectors bench clean

setup: $(STAMP)

# One environment with everything: the live loop, TensorFlow for export/guided/train, and the
# test tools. Re-installs when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[keras,batch,torch,serve,dev]'
	touch $(STAMP) $(BASE_STAMP)

# The live loop and bench need the base install only (no TensorFlow, torch or Ray: gigabytes a
# first `make demo` need not download); an environment that has everything serves them too.
$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE_STAMP)

demo: $(BASE_STAMP)
	mkdir -p demo-out
	$(CAMFACE) live --source sample --no-show --record demo-out/demo.mp4 --overwrite --snapshot-every 60 --snapshot-dir demo-out/snapshots

# ruff (pyproject's small rule set), then the tests; tests/test_api_typing.py runs mypy on the public API.
# Two worker processes, each taking whole test files (module fixtures are built once; the 2 cores
# stay busy while one test waits on a subprocess, Ray or a browser): the suite took 23 min in one.
# The 20 slowest tests are listed at the end, to keep CI's time in view.
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

# Regenerate the bundled CAM graph from the bundled Keras model. Its methods are ranked on all
# 116 face crops of the sample (--rank-seconds 0: no time budget, so the ranking does not depend
# on the machine's speed); `camface evaluate` reproduces it.
models: setup
	$(CAMFACE) export models/emotion/emotion_mini_xception_fer2013.hdf5 \
		-o models/emotion/emotion.onnx --labels models/emotion/labels.txt \
		--preset emotion --target-layer add_3 --rank-seconds 0

# Regenerate the bundled face detectors' ONNX conversions from their .tflite files (TensorFlow's
# TFLite interpreter densifies the full-range model's sparse weights; tf2onnx converts; the
# outputs are checked against TFLite's).
detectors: setup
	$(PY) -m camface.export.detectors

bench: $(BASE_STAMP)
	$(CAMFACE) bench --source sample

clean:
	rm -rf $(VENV) demo-out build *.egg-info
