# One command each: `make demo` sets up and trains the default (Siamese) model on Caltech101,
# `make test` sets up and runs the test suite (about 10 minutes on 2 cores), `make docs` builds the
# documentation site. Other commands run inside the venv: `source .venv/bin/activate` first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint docs bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,docs,milvus]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python train.py --config configs/siamese.yaml
	$(BIN)/python evaluate.py --checkpoint "$$(ls -td experiments/siamese/*/ | head -1)checkpoints/best.pt"

test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

docs: setup
	$(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/ann.py
	$(BIN)/python benchmarks/export.py
	$(BIN)/python benchmarks/onnx_backend.py
	$(BIN)/python benchmarks/onnx_batches.py
	$(BIN)/python benchmarks/second_domain.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) .pytest_cache
