# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
# Both create .venv and install the project into it; the CPU build of torch is installed first
# unless the venv already has a torch (install your CUDA build there first on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUTPUT_DIR ?= outputs/demo

.PHONY: install demo test benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) training_scripts/demo.py --output_dir $(OUTPUT_DIR)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

benchmark: install
	$(PY) benchmarks/assignment.py --output_dir benchmarks/results

clean:
	rm -rf $(VENV) outputs
