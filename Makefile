# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 CPU is the build this project is tested with; pinning it keeps pip from pulling a
# multi-GB CUDA build on machines that have none. Set TORCH_SPEC= to keep a torch you already have.
TORCH_SPEC ?= torch==2.13.0
UNET_DIST_ISBI_DIR ?= data/isbi2012
DEMO_DIR ?= runs/demo
export UNET_DIST_ISBI_DIR

.PHONY: venv demo test clean gpu-check gpu-check-dry

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[dev,bench,view]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh $(DEMO_DIR)

test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# The prepared device check for a GPU machine (no venv: the Python that has torch with CUDA, see
# scripts/gpu_check.sh); `make gpu-check-dry` runs its steps on the CPU at tiny sizes, as CI does.
GPU_CHECK_DIR ?= gpu-check
gpu-check:
	UNET_DIST_PYTHON=$(PYTHON) bash scripts/gpu_check.sh $(GPU_CHECK_DIR)

gpu-check-dry: venv
	UNET_DIST_PYTHON=$(abspath $(PY)) bash scripts/gpu_check.sh --dry-run $(GPU_CHECK_DIR)-dry
