# The two commands a user needs: `make demo` and `make test`. Each does the whole set-up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build where no CUDA is present; GPU machines keep the pyproject range.
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo ">> upgrading pip (old resolvers backtrack for minutes over the boto3/aiobotocore pins)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo ">> CUDA present: torch comes from the pyproject range"; \
		DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]'; \
	else \
		echo ">> no CUDA: installing $(TORCH_CPU) first, then the package with torch pinned"; \
		$(BIN)/pip install --quiet $(TORCH_CPU) && \
		PIP_CONSTRAINT=constraints-cpu.txt DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]'; \
	fi
	@touch $(STAMP)

demo: setup
	MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/motus pipeline run

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check motus tests benchmarks

bench: setup
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/lineage.py
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
