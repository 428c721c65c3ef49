# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
# Both create .venv and install the project into it; the CPU build of torch is installed first
# unless the venv already has a torch (install your CUDA build there first on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUTPUT_DIR ?= outputs/demo

.PHONY: install demo test lint benchmark gpu-check clean space browser-deps docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) training_scripts/demo.py --output_dir $(OUTPUT_DIR)

lint: install
	$(VENV)/bin/ruff check .

test: install browser-deps lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The Space (spaces_app/app.py) on http://127.0.0.1:7860, showing the main job's two pipelines.
space: install
	$(PY) spaces_app/app.py

# Debian's Chromium, which the Space's browser test drives (installed once, as root or with passwordless sudo).
browser-deps:
	@[ "$(SKIP_BROWSER_TESTS)" = 1 ] || command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "browser-deps: chromium is missing and this is no root shell: run 'apt-get install -y chromium' as root" >&2; exit 0; fi; \
	  echo "browser-deps: installing Debian's chromium (for tests/test_space_app.py) ..."; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Numbers in README.md, docs/ and training_scripts/README.md, regenerated from the committed results files.
docs: install
	$(PY) tools/at_a_glance.py
	$(PY) tools/docs_sync.py

benchmark: install
	$(PY) benchmarks/assignment.py --output_dir benchmarks/results

# On a CUDA machine (<= 8 min on one H200): training scripts, assignment and step share, written to
# benchmarks/results/gpu/. `make gpu-check ARGS=--dry-run` runs every code path on the CPU with tiny sizes.
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) outputs
