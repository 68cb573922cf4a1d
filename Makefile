# Two commands for a new user: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MODEL := models/SmolLM2-135M-Instruct
STAMP := $(VENV)/.installed
# torch is pinned here (a CPU build this platform ships); pyproject keeps a loose floor.
TORCH := torch==2.13.0

.PHONY: run test install demo-model lint bench clean proto

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/clsctl models fetch-demo --out $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

run: install demo-model
	$(BIN)/clsctl local up --config configs/local.yaml --ask "What is the capital of France?"

test: install demo-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install demo-model
	$(BIN)/python benchmarks/engine_bench.py --model $(DEMO_MODEL)

# Regenerate the gRPC modules from proto/*.proto (a test fails when they are stale).
proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
