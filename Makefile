# The two commands of the README. Each makes its own virtualenv (.venv) and installs what it needs.
#   make test    the test suite
#   make bench   the CPU (or GPU, if present) memory and speed benchmark
#   make docs    the documentation site (mkdocs.yml, docs/) into build/site; make docs-serve to browse it
# On a machine without a GPU, torch==2.13.0 is a CPU build; override with TORCH="torch==..." for CUDA.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(shell find python triton_kernels csrc -type f -not -path "*/__pycache__/*")

# The CUDA extension is compiled (not run) in CI against a CUDA build of torch: no GPU needed.
CUDA_TORCH ?= torch==2.14.1
CUDA_VENV ?= .venv-cuda
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0+PTX

# The requirements of an extra of pyproject.toml, shell-quoted: dependencies are declared there, once.
extra = $(shell $(PYTHON) -c "import shlex, tomllib; print(' '.join(map(shlex.quote, tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['$(1)'])))")

.PHONY: test test-fast bench tables docs docs-serve cuda-build-check clean

test: $(VENV)/.flashcl
	FLASHCL_REQUIRE_PEERS=1 $(PY) -m pytest -q

# A developer's loop: everything but the slow, distributed and script tests.
test-fast: $(VENV)/.flashcl
	$(PY) -m pytest -q -m "not slow and not distributed and not scripts"

bench: $(VENV)/.flashcl
	$(PY) benchmarks/bench_clip_loss.py

# Every results table in README.md and docs/ refilled from the results files (--check: fail if one is stale).
tables: $(VENV)/.flashcl
	$(PY) tools/generate_tables.py

# The documentation site: strict, so a broken link or a docstring warning fails the build. The API
# reference reads the docstrings from python/ (no install needed); the plots come from the results folders.
# NO_MKDOCS_2_WARNING silences mkdocs-material's banner about MkDocs 2.0 (a notice, not a build warning).
docs: $(VENV)/.docs $(VENV)/.flashcl
	$(PY) tools/generate_tables.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

docs-serve: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(call extra,test) $(call extra,bench)
	$(PY) -m pip install -q --no-deps $(call extra,peers)
	touch $@

$(VENV)/.docs: $(VENV)/.deps
	$(PY) -m pip install -q $(call extra,docs)
	touch $@

# A real (non-editable) install, so the tests exercise the package as users get it.
$(VENV)/.flashcl: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	touch $@

# Builds flashcl._C and checks its operators register, so a C++ error can never land; then runs
# open_clip's training script with and without flashcl.integrations.open_clip.
cuda-build-check: $(CUDA_VENV)/.deps
	@test -x "$(CUDA_HOME)/bin/nvcc" || { echo "no nvcc at $(CUDA_HOME)/bin/nvcc; set CUDA_HOME"; exit 1; }
	rm -rf build
	FLASHCL_BUILD_CUDA=1 CUDA_HOME="$(CUDA_HOME)" TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
		$(CUDA_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	FLASHCL_REQUIRE_CUDA_EXTENSION=1 $(CUDA_VENV)/bin/python -m pytest -q tests/test_cuda_backend.py tests/test_dispatch.py
	# open_clip's training script with and without flashcl (it needs torchvision, which the CPU venv cannot load)
	FLASHCL_REQUIRE_PEERS=1 FLASHCL_REQUIRE_OPEN_CLIP_TRAIN=1 $(CUDA_VENV)/bin/python -m pytest -q tests/test_integration_open_clip.py

$(CUDA_VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(CUDA_VENV)
	# ninja (in the extra): without it torch's BuildExtension falls back to a slow serial build.
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" $(call extra,cuda-build) $(call extra,open-clip-train)
	touch $@

clean:
	rm -rf $(VENV) $(CUDA_VENV) build python/*.egg-info
