# dqtool developer commands. Everything installs into a project-local virtual environment (.venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/default
RUN ?= runs/demo

.PHONY: install demo demo-run demo-timed test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default data (issue 14: the whole method in at most five minutes of a 2-core CPU),
# on the fluo domain: its train split -> patch cache -> summary -> MAE features (2 epochs) -> DQ selection at
# rate 0.3 (with pictures) and its random baseline of the same size -> a bank of 4 Cellpose models that differ
# in data and budget, trained two at a time -> label-free ranking of the bank on the fluo test split (2 Dask
# workers), validated against its labels -> one report page.
# Budgets (measured, see README "The demo"): bsize 64, one batch of 8 patches per epoch, so an epoch is one SGD
# step and the warm-up is 10 steps; SGD at learning rate 0.2 (Cellpose's CLI default): at 0.1, 60 steps on all
# fluo patches learnt nothing on one run (F1 0 on fluo test) and 0.87 on another machine; at 0.2, 60 steps gave
# F1 0.90 (seed 0) and 0.86 (seed 1), 40 steps 0.04. Subsets of the three domains (10 % or 30 %) learnt
# nothing on fluo in 60 steps (F1 0.00-0.28), so the subsets are of the fluo patches. One torch thread per
# process: on a busy 2-core machine two threads cost 6.3 CPU s per training step against 0.8 s for one.
# --onednn: torch's oneDNN convolutions, 1.41 s -> 0.87 s a step on one thread (the weights depend on the thread
# count, fixed at one here by OMP_NUM_THREADS=1, so the demo repeats to the byte).
DEMO_TRAIN := --bsize 64 --batch-size 8 --nimg-per-epoch 8 --min-train-masks 3 --save-every 1000 --learning-rate 0.2 --onednn
DEMO_MODELS := $(RUN)/models/fluo_s80 $(RUN)/models/fluo_s60 $(RUN)/models/dq30_s60 $(RUN)/models/random30_s60

demo: install
	$(MAKE) --no-print-directory demo-run

# Two jobs at a time from the patch cache on: the 80-step model (it needs no features) trains while the MAE and the
# selections are made; then the other three. `train` reads its patches at its start and lets the cache go, and a
# write to the cache (embed, select) waits while another process reads it (libhdf5's lock), so they can overlap.
demo-run: export OMP_NUM_THREADS := 1
demo-run:
	$(BIN)/dqtool data $(DATA)
	mkdir -p $(RUN)/models
	$(BIN)/dqtool patches $(DATA)/fluo/train --out $(RUN)/fluo.h5
	$(BIN)/dqtool info $(RUN)/fluo.h5
	@echo "MAE features and DQ selection beside the first of $(words $(DEMO_MODELS)) Cellpose trainings, then the" \
	  "other three, two jobs at a time (each prints its lines when done)"
	$(MAKE) --no-print-directory -j2 --output-sync=target $(RUN)/models/fluo_s80 $(RUN)/.selected \
	  $(filter-out $(RUN)/models/fluo_s80,$(DEMO_MODELS))
	$(BIN)/dqtool rank $(RUN)/models --images $(DATA)/fluo/test --labels $(DATA)/fluo/test --out $(RUN)/rank \
	  --workers 2
	$(BIN)/dqtool report $(RUN) --images $(DATA)/fluo/test

$(RUN)/.selected:
	$(BIN)/dqtool embed $(RUN)/fluo.h5 --epochs 2
	$(BIN)/dqtool select $(RUN)/fluo.h5 --rate 0.3 --out $(RUN)/dq30.json --plot $(RUN)/select
	$(BIN)/dqtool select $(RUN)/fluo.h5 --rate 0.3 --method random --out $(RUN)/random30.json --quiet
	touch $@
$(RUN)/models/fluo_s80:
	$(BIN)/dqtool train $(RUN)/fluo.h5 --out $@ --epochs 80 $(DEMO_TRAIN)
$(RUN)/models/fluo_s60:
	$(BIN)/dqtool train $(RUN)/fluo.h5 --out $@ --epochs 60 $(DEMO_TRAIN)
$(RUN)/models/dq30_s60: $(RUN)/.selected
	$(BIN)/dqtool train $(RUN)/fluo.h5 --subset $(RUN)/dq30.json --out $@ --epochs 60 $(DEMO_TRAIN)
$(RUN)/models/random30_s60: $(RUN)/.selected
	$(BIN)/dqtool train $(RUN)/fluo.h5 --subset $(RUN)/random30.json --out $@ --epochs 60 $(DEMO_TRAIN)

# The demo from scratch (after `make install`), timed: wall and CPU seconds (user + sys, less sensitive to other
# jobs on a shared machine) and the load average go to $(RUN).time.
demo-timed: install
	rm -rf $(RUN) && mkdir -p $(dir $(RUN))
	/usr/bin/time -v -o $(RUN).time.raw $(MAKE) --no-print-directory demo-run
	@wall=$$(grep 'Elapsed (wall' $(RUN).time.raw | awk '{print $$NF}'); \
	user=$$(grep 'User time' $(RUN).time.raw | awk '{print $$NF}'); \
	sys=$$(grep 'System time' $(RUN).time.raw | awk '{print $$NF}'); \
	printf 'wall %s\nuser+sys %s s\nload %s\n' "$$wall" "$$(echo "$$user + $$sys" | bc)" "$$(cut -d' ' -f1-3 /proc/loadavg)" \
	  | tee $(RUN).time

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
