# `make demo` and `make test` each set up .venv from scratch if needed, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CUDA_HOME ?= /usr/local/cuda
# kernels build into the checkout (ignored by git), so a clean clone compiles them from scratch
EXT_ENV := TORCH_EXTENSIONS_DIR=$(CURDIR)/build/torch_extensions
METHODS := ar,sjd,sjd+coupling,sjd+lantern,zipar,zipar-adaptive

.PHONY: demo test install cpu-ext ext gpu-bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

DEMO_PROMPTS := "a photo of a red circle" "a photo of a blue square" "a photo of a yellow star" \
	"a photo of a red circle above a blue square" "a photo of a green triangle and a purple hexagon" \
	"a photo of three circles" "a photo of a white diamond" "grinning face" "red apple"

demo: cpu-ext
	$(EXT_ENV) $(BIN)/vargen generate $(DEMO_PROMPTS) -o outputs/demo.png --cfg 4.0 --seed 0 --stats outputs/demo_stats.json
	@echo "demo grid (3 x 3, one image per prompt, row by row): outputs/demo.png   stats: outputs/demo_stats.json"

# the vargen/csrc/cpu/ kernels: host compiler only, always built; a compile error fails
cpu-ext: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(EXT_ENV) $(BIN)/python -m vargen.ops.build --cpu -q

# the vargen/csrc/ CUDA kernels: compiled and imported wherever nvcc is (no GPU needed); a compile error fails
ext: cpu-ext
	@if [ -x "$(CUDA_HOME)/bin/nvcc" ]; then \
		PATH="$(CURDIR)/$(BIN):$$PATH" CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
		$(EXT_ENV) $(BIN)/python -m vargen.ops.build -q; \
	else echo "no nvcc at $(CUDA_HOME): CUDA kernels not built (the PyTorch fallbacks run)"; fi

test: ext
	$(EXT_ENV) $(BIN)/python -m pytest -q

# on a GPU machine: kernel and CUDA-graph tests, then the latency tables (eager and compiled)
gpu-bench: ext
	mkdir -p outputs/gpu
	$(EXT_ENV) $(BIN)/python -m pytest -q tests/test_ops.py tests/test_compiled.py
	$(EXT_ENV) $(BIN)/vargen bench speed --device cuda --model cifar10-c2i --methods $(METHODS) -n 32 --batch-size 8 \
		--seed 0 --json outputs/gpu/speed_cifar10.json
	$(EXT_ENV) $(BIN)/vargen bench speed --device cuda --sizes GPT-B,GPT-XL --tokens 256,1024 --batch-sizes 1,8 \
		--methods $(METHODS) --compression-json outputs/gpu/speed_cifar10.json --json outputs/gpu/latency_eager.json
	$(EXT_ENV) $(BIN)/vargen bench speed --device cuda --sizes GPT-B,GPT-XL --tokens 256,1024 --batch-sizes 1,8 \
		--methods $(METHODS) --compression-json outputs/gpu/speed_cifar10.json --compile \
		--json outputs/gpu/latency_compiled.json

clean:
	rm -rf $(VENV) outputs build .pytest_cache
