# dqtool developer commands. Everything installs into a project-local virtual environment (.venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/default
RUN ?= runs/demo

.PHONY: install demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default data: synthetic domains -> patch cache -> summary -> MAE features
# -> DQ selection at rate 0.1 -> a small bank of Cellpose models (tiny CPU budget:
# bsize 64, 40 epochs of 16 patches) -> label-free ranking of the bank on the fluo test split, validated against its labels.
TRAIN := --epochs 40 --bsize 64 --nimg-per-epoch 16 --min-train-masks 3 --save-every 20 --quiet
demo: install
	$(BIN)/dqtool data $(DATA)
	mkdir -p $(RUN)/models
	$(BIN)/dqtool patches $(DATA)/fluo/train $(DATA)/histo/train $(DATA)/multi/train --out $(RUN)/train.h5
	$(BIN)/dqtool info $(RUN)/train.h5
	$(BIN)/dqtool embed $(RUN)/train.h5
	$(BIN)/dqtool select $(RUN)/train.h5 --rate 0.1 --out $(RUN)/subset.json --plot $(RUN)/select
	$(BIN)/dqtool patches $(DATA)/fluo --out $(RUN)/fluo.h5 --quiet
	$(BIN)/dqtool patches $(DATA)/histo --out $(RUN)/histo.h5 --quiet
	$(BIN)/dqtool train $(RUN)/fluo.h5 --out $(RUN)/models/fluo $(TRAIN)
	$(BIN)/dqtool train $(RUN)/histo.h5 --out $(RUN)/models/histo $(TRAIN)
	$(BIN)/dqtool train $(RUN)/train.h5 --subset $(RUN)/subset.json --out $(RUN)/models/dq10 $(TRAIN)
	$(BIN)/dqtool rank $(RUN)/models --images $(DATA)/fluo/test --labels $(DATA)/fluo/test --out $(RUN)/rank --quiet

# The whole test suite, as CI runs it (slow end-to-end runs excluded; `make test-all` includes them).
test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

# Benchmarks (pytest-benchmark), kept out of the test run; JSON lands in .benchmarks/.
bench: install
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-autosave --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) runs .benchmarks .pytest_cache
