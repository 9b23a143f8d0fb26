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

.PHONY: venv demo test clean

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
