# The two commands of the README. Each makes its own virtualenv (.venv) and installs what it needs.
#   make test    the test suite
#   make bench   the CPU (or GPU, if present) memory and speed benchmark
# On a machine without a GPU, torch==2.13.0 is a CPU build; override with TORCH="torch==..." for CUDA.

PYTHON ?= python3
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(shell find python -name "*.py")

.PHONY: test bench clean

test: $(VENV)/.flashcl
	FLASHCL_REQUIRE_PEERS=1 $(PY) -m pytest -q

bench: $(VENV)/.flashcl
	$(PY) benchmarks/bench_clip_loss.py

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "numpy<3" "pytest>=7" tqdm matplotlib "$(TRITON)"
	# open_clip is the peer the tests compare with; its dependencies would pull a CUDA torch.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

# A real (non-editable) install, so the tests exercise the package as users get it.
$(VENV)/.flashcl: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	touch $@

clean:
	rm -rf $(VENV) build python/*.egg-info
