# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
#
# make install   lean install into $(VENV): torch (CPU build) and cmad's run-time dependencies
# make demo      the lean install, then the synthetic demo in minutes (writes $(DEMO_DIR)/)
# make bench     the full comparison: six methods on the default synthetic data ($(BENCH_DIR)/)
# make test      the lean install plus the extras the tests need ($(TEST_EXTRAS)), then pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# torch's CPU build comes from this index when it answers within TORCH_PROBE_S seconds, else
# from pip's configured indexes (a find-links folder with the CPU wheel, say).
# `make TORCH_INDEX=` skips the index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PROBE_S ?= 5
TEST_EXTRAS ?= dev,onnx,open3d,ray
DEMO_DIR ?= demo_out
BENCH_DIR ?= bench_out
# the comparison of the README's results table: cmad, its single branches and BTF
BENCH_METHODS ?= cmad,cmad-scaled-banks,cmad-plain-banks,cmad-v1,btf,mapping,joint-bank,rgb-bank,geom-bank,xyz-bank,align
BASE_STAMP := $(VENV)/.cmad-base
TEST_STAMP := $(VENV)/.cmad-test

# Python that exits 0 when the index (argv 1) serves /torch/ within argv 2 seconds. The request
# runs in a daemon thread, so that a slow name lookup cannot hold it past the limit either.
PROBE_INDEX := import sys, threading, urllib.request as u; ok = []; \
	t = threading.Thread(daemon=True, target=lambda: ok.append(u.urlopen( \
	sys.argv[1].rstrip('/') + '/torch/', timeout=float(sys.argv[2])).status == 200)); \
	t.start(); t.join(float(sys.argv[2])); sys.exit(0 if ok and ok[0] else 1)

.PHONY: install install-test test demo bench check-report lint clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
		echo "error: cmad needs Python >= 3.10; '$(PYTHON)' is $$($(PYTHON) -V 2>&1)." \
			"Run make with PYTHON=python3.X." >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		echo "error: '$(PYTHON)' cannot create a virtual environment: its venv/ensurepip" \
			"modules are missing." >&2; \
		echo "       On Debian/Ubuntu install them with:" \
			"sudo apt-get install -y python3-venv   (for Python $$v: python$$v-venv)" >&2; \
		exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: sudo apt-get install -y python3-venv" >&2; \
		exit 1; }
	$(PIP) install --quiet --upgrade pip

# Torch first, the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
$(BASE_STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif [ -n "$(TORCH_INDEX)" ] && $(PY) -c "$(PROBE_INDEX)" '$(TORCH_INDEX)' '$(TORCH_PROBE_S)' 2>/dev/null; then \
		echo "installing torch==$(TORCH_VERSION) from $(TORCH_INDEX)"; \
		$(PIP) install --quiet --index-url '$(TORCH_INDEX)' torch==$(TORCH_VERSION); \
	else \
		[ -z "$(TORCH_INDEX)" ] || echo "$(TORCH_INDEX) not reachable (probe limit $(TORCH_PROBE_S) s)"; \
		echo "installing torch==$(TORCH_VERSION) from pip's configured indexes"; \
		$(PIP) install --quiet torch==$(TORCH_VERSION); \
	fi
	$(PIP) install --quiet -e .
	@$(PY) -c "import torch; torch.version.cuda is None or print('note: this torch is a CUDA build' \
		' (torch.version.cuda = %s); cmad runs on the CPU' % torch.version.cuda)"
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	$(PIP) install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $@

install: $(BASE_STAMP)

install-test: $(TEST_STAMP)

test: $(TEST_STAMP)
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit code 5)" >&2; fi; \
	exit $$rc

demo: $(BASE_STAMP)
	$(VENV)/bin/cmad demo --out $(DEMO_DIR)

bench: $(BASE_STAMP)
	$(VENV)/bin/cmad demo --out $(BENCH_DIR) --preset default --methods $(BENCH_METHODS)

# the demo's latest report in headless Chromium at 1400 and 800 px (needs chromium)
check-report: $(BASE_STAMP)
	$(PY) -m cmad.report.check $(DEMO_DIR)/report

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(BENCH_DIR) .pytest_cache src/cmad.egg-info
