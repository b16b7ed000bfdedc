# Quick start on a fresh Linux machine with Python 3.10+ (and optionally a
# CUDA toolkit): `make demo` or `make test` set everything up and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEV_DEPS := numpy pytest hypothesis expecttest ninja pybind11 tqdm matplotlib pillow pycocotools onnx onnxscript onnxruntime openvino

# Without a visible GPU, compile the CUDA kernels for Hopper only (keeps the
# build short); with one, torch targets the GPUs it sees.
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: demo test test-numerics bench bench-quick build clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) $(DEV_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "^ *maskrcnn_ops:|error" || true
	$(PY) -c "import maskrcnn_ops; print('maskrcnn_ops', maskrcnn_ops.build_info())"
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

# The floating-point tests again under the CPU instruction sets below this
# machine's best (`make test` ran that one), since tolerances must hold on
# any x86 CPU: portable code on one thread, and AVX2 on two threads where
# the CPU has AVX-512. Each run gets its own inductor cache: inductor's does
# not key on ATEN_CPU_CAPABILITY, and reusing code compiled under another
# one fails to compile ('at::vec' has not been declared).
NUMERIC_ISAS := default $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo avx2)
test-numerics: build
	@for isa in $(NUMERIC_ISAS); do \
	  threads=$$([ $$isa = default ] && echo 1 || nproc); \
	  echo "== ATEN_CPU_CAPABILITY=$$isa, $$threads thread(s)"; \
	  cache=$$(mktemp -d); \
	  ATEN_CPU_CAPABILITY=$$isa OMP_NUM_THREADS=$$threads TORCHINDUCTOR_CACHE_DIR=$$cache \
	    $(PY) -m pytest -q -m numerics tests || exit 1; \
	  rm -rf $$cache; \
	done

demo: build
	$(PY) -m maskrcnn demo

bench: build
	$(PY) -m benchmarks

bench-quick: build
	$(PY) -m benchmarks --quick --out "$$(mktemp -d)"

clean:
	rm -rf build *.egg-info maskrcnn_ops/*.so $(VENV)/.built
