# The two commands a user needs: `make demo` and `make test`. Each does the whole set-up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build where no CUDA is present; GPU machines keep the pyproject range.
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test lint bench clean gpu-wheelhouse gpu-check

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
		PIP_CONSTRAINT=constraints-cpu.txt DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]' && \
		echo ">> building DeepSpeed's CPU shared-memory comm op once (every CPU job loads it; ~1 min)" && \
		DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions $(BIN)/python -c \
			"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"; \
	fi
	@touch $(STAMP)

demo: setup
	MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/motus pipeline run

# The suite on TEST_WORKERS xdist workers (0: one process). Tests sharing an expensive fixture stay on one
# worker (tests/conftest.py derives the groups), so each trained chain or project is built once.
TEST_WORKERS ?= 4
test: setup
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

lint: setup
	$(BIN)/ruff check motus tests benchmarks

bench: setup
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/encoder_cache.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/lineage.py
	$(BIN)/python benchmarks/tier_scale.py --episodes 100000
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/mot_flops.py --preset full

# The offline bundle for air-gapped GPU nodes (CPython 3.12): $(GPU_CHECK)/{wheels,run.sh,gpu_check.py,...}.
# Downloads once into .cache/gpu-check/; later builds are offline and take seconds.
GPU_CHECK ?= build/gpu-check
CHECK_PYTHON ?= $(BIN)/python
gpu-wheelhouse: setup
	$(BIN)/python infra/gpu-check/build_wheelhouse.py --out $(GPU_CHECK)

# `make gpu-check`: prepares the bundle; on a machine with CUDA it runs the check, without CUDA its dry mode
# (small preset, bf16 autocast on the CPU, 3 steps) so CI proves the script. On a bare GPU node run the
# bundle instead: copy $(GPU_CHECK)/ there, then `bash run.sh --out gpu-check.json` (README: GPU node).
gpu-check: gpu-wheelhouse
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(CHECK_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK)/result.json; \
	else \
		echo ">> no CUDA here: dry mode of the GPU check"; \
		$(CHECK_PYTHON) benchmarks/gpu_check.py --dry --out $(GPU_CHECK)/result.json; \
	fi
	@echo ">> result: $(GPU_CHECK)/result.json; on a GPU node: copy $(GPU_CHECK)/ there and run bash run.sh"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
