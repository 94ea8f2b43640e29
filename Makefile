# Two commands set everything up on a fresh machine:  make demo  and  make test.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo-data

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Simulate a small two-camera night and reduce it end to end (SQLite catalog, no server).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mascara simulate $(DEMO) --night 20260301 --site LP --camera E+S --size small --frames 260 --seed 1
	$(BIN)/mascprocess $(DEMO) --night 20260301 --camera E+S --site LP
	$(BIN)/mascara status $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
