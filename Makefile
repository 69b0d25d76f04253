# `make demo` and `make test` each set up .venv from scratch if needed, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vargen generate class1 class3 class5 class7 -o outputs/demo.png --stats outputs/demo_stats.json
	@echo "demo image: outputs/demo.png   stats: outputs/demo_stats.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
