# Two entry points: `make demo` (the embedded default end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: demo test setup clean

$(BIN)/lsmfm: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,test]"
	touch $(BIN)/lsmfm

setup: $(BIN)/lsmfm

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lsmfm demo --out $(DEMO) --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
