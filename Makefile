# Two commands do all the set-up on a fresh machine (Python 3.11 and pip): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean reference

# The CPU build of torch, pinned: a plain `pip install torch` may pull a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The tests also run the Ray engine of `prepare` (an optional extra for users), and the book's own
# package on our drop-in loader: --no-deps, which a pip extra cannot say (its deps pull tensorflow).
$(BIN)/.installed-ray: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,ray]'
	$(BIN)/python -m pip install -q --no-deps llms-from-scratch==1.0.19
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m pipeline run examples/demo.yaml

test: $(BIN)/.installed-ray
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile
	# the tiktoken path alone, as where gigatoken is not installed
	TEXTPIPE_GIGATOKEN=0 $(BIN)/python -m pytest -q tests/stages/test_bpe_encode.py

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/first_batch.py --sizes 10MB 100MB

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis

reference: $(BIN)/.installed
	$(BIN)/python -c "from pipeline.cli.reference import write_reference; write_reference('README.md')"
