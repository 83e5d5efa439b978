# make demo : set up .venv and run the main job (the demo model, 2 ranks, DuCa vs uncached)
# make test : set up .venv, lint (make lint) and run the test suite
# make lint : ruff check . (settings in pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): setup.py requirements-test.txt requirements-vbench.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	# --no-deps: torchvision/vbench/colossalai metadata would pull another torch (see requirements-vbench.txt)
	$(BIN)/pip install -q --no-deps torchvision==0.28.0 vbench==0.1.5 colossalai==0.5.0 openai-clip==1.0.1 timm==1.0.12 pyiqa==0.1.13 huggingface-hub==0.36.2 transformers==4.33.2 tokenizers==0.13.3 fairscale==0.4.13
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 tools/demo.py configs/demo/inference.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) samples outputs
