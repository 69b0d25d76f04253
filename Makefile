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

DEMO_PROMPTS := "a photo of a red circle" "a photo of a blue square" "a photo of a yellow star" \
	"a photo of a red circle above a blue square" "a photo of a green triangle and a purple hexagon" \
	"a photo of three circles" "a photo of a white diamond" "grinning face" "red apple"

demo: $(STAMP)
	$(BIN)/vargen generate $(DEMO_PROMPTS) -o outputs/demo.png --cfg 4.0 --seed 0 --stats outputs/demo_stats.json
	@echo "demo grid (3 x 3, one image per prompt, row by row): outputs/demo.png   stats: outputs/demo_stats.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
