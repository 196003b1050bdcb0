# fastsr developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch, from PyTorch's CPU wheel index (the package index's `torch`
# is the multi-GB CUDA build). GPU machines that already have torch: the venv sees it and keeps it.
TORCH_PIN ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# OFFLINE=1 (the GPU check on a machine without a package index): install fastsr without resolving
# dependencies, plus the wheels carried in .whl/. Every other install resolves them from the index.
OFFLINE ?=
# The default suite leaves out tests marked slow (pyproject's addopts); `make test-slow` runs them.
# TEST_WORKERS xdist processes of one intra-op thread each: a 2-thread process waits at every OpenMP
# barrier for a thread that another process has pushed off its core (a 2-thread forward ran 2.5-3x
# slower here beside a busy loop), one thread never does; and on an idle 2-core machine two workers
# beat one 2-thread process (the suite in 5.7-6.2 instead of 9.1-9.7 minutes on a Zen 4).
# --dist loadgroup: the GPU-memory-heavy CUDA tests (tests/cases.py) run one at a time. A test
# still running after TEST_TIMEOUT seconds fails with its stack, naming itself (pytest-timeout;
# TEST_TIMEOUT= leaves the option out, for a venv without the plugin such as the GPU image's).
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 900
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadgroup $(if $(TEST_TIMEOUT),--timeout=$(TEST_TIMEOUT))
PYTEST_FAST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15 $(PYTEST_PARALLEL)
FASTSR_RESULTS ?= benchmarks/results

.PHONY: venv demo test test-slow check-wheel bench gpu-check gpu-wheels lint clean default-model wallpaper-photos

# A PYTHON with a CUDA torch (or USE_SYSTEM_TORCH=1: the gpu-check rehearsal on a CPU) keeps its torch. That
# PYTHON may itself be a venv (the GPU image's /opt/torch/.venv), whose packages --system-site-packages would
# not show (only its base interpreter's): a .pth file lists PYTHON's site-packages folders in the new venv.
# The setuptools that ensurepip puts in a new venv (Python <= 3.11; too old for pyproject's SPDX license)
# is removed, so PYTHON's (or the carried one in .whl/) serves the offline editable install.
$(BIN)/python:
	@if [ "$(USE_SYSTEM_TORCH)" = 1 ] || $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv $(VENV) && \
		$(PYTHON) -c "import site; print(*site.getsitepackages(), sep=chr(10))" | $(BIN)/python -c \
			"import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], '_system_torch.pth').write_text(sys.stdin.read())" && \
		{ $(BIN)/pip uninstall -q -y setuptools 2>/dev/null || true; } && \
		$(BIN)/python -c "import torch; print('torch', torch.__version__, 'from', torch.__file__)" && touch $(VENV)/.system-torch; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && TORCH_PIN="$(TORCH_PIN)" TORCH_INDEX="$(TORCH_INDEX)" \
			bash .ci/install_torch.sh $(BIN)/pip; \
	fi

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py
	@if [ -n "$(OFFLINE)" ]; then \
		if [ -d .whl ]; then $(BIN)/pip install -q --no-index --no-deps .whl/*.whl; fi; \
		$(BIN)/pip install -q --no-index --no-deps --no-build-isolation -e .; \
	else \
		$(BIN)/pip install -q -e ".[dev]"; \
	fi
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/fastsr demo --out out/demo

# The suite (slow tests left out) on the widest C++ build this CPU runs, then the cpp suites again
# against every other ISA variant it can execute (AVX2, the portable DEFAULT build): each variant is
# a separate build of the extension, loaded in its own pytest process. The 15 slowest tests are listed.
test: venv
	$(PYTEST_FAST)
	@for isa in $$($(BIN)/python -c "from fastsr.csrc.build import *; print(*[i for i in runnable_isas() if i != cpu_isa()])"); do \
		echo "== the cpp backend's tests against its $$isa build"; \
		FASTSR_CPU_CAPABILITY=$$isa $(PYTEST_FAST) tests/test_cpp*.py tests/test_conformance.py -k cpp || exit 1; \
	done

# The long cases only (16k x 16k upscale, every tile size's seams, the sm_90 compile, the long fuzz profile).
# No time limit a test here: these cases are long by design (the 16k -> 64k upscale writes 12.9 GB).
test-slow: TEST_TIMEOUT =
test-slow: venv
	FASTSR_FUZZ_PROFILE=long $(PYTEST_FAST) -m slow

# What a user installs: the sdist, a wheel built from it, installed into a fresh venv from the index,
# used from outside the checkout with a PATH that lacks the venv (see .ci/check_wheel.sh).
check-wheel: venv
	TORCH_PIN="$(TORCH_PIN)" TORCH_INDEX="$(TORCH_INDEX)" PYTEST_PARALLEL="$(PYTEST_PARALLEL)" bash .ci/check_wheel.sh

bench: venv
	$(BIN)/python -m pytest benchmarks --benchmark-only

# On a lent GPU machine (`make gpu-check OFFLINE=1 FASTSR_RESULTS=$OUT`), planned for 6 minutes from a bare
# machine, every step time-boxed and writing as it goes; at most 8 files in FASTSR_RESULTS (docs/gpu-check.md).
# Its CPU rehearsal (CI): $(BIN)/python benchmarks/gpu_check.py --dry-run --results DIR.
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py --results $(FASTSR_RESULTS)

# The wheels the GPU image lacks, into .whl/ (not committed), carried to the GPU machine, where `make venv
# OFFLINE=1` installs them: zarr and its pure dependencies (the tiled pipeline's store), setuptools >= 77
# (the SPDX license field; the image's may predate it). Its Python is 3.12 and it has torch, triton, numpy,
# pillow, tifffile, safetensors, tqdm, ninja, scikit-image, pytest(-xdist, -benchmark). Not carried:
# imagecodecs (27 MiB; only 16-bit PNG needs it, no GPU step does), the Real-ESRGAN weights (41 MiB; the
# zoo benchmarks time the same architectures with random weights), ncnn (an oracle for CPU tests).
GPU_WHEELS ?= zarr==3.1.6 numcodecs==0.16.6 donfig pyyaml google-crc32c "setuptools>=77"
gpu-wheels: venv
	rm -rf .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
	@du -sh .whl

# The default model's photographs: five Debian wallpaper packages -> data/wallpapers/{train,val}
# + manifest.csv (fastsr.training.wallpapers: the selection rule, licences, hold-out).
data/wallpapers/manifest.csv: | venv
	$(BIN)/python -m fastsr.training.wallpapers data/wallpapers

wallpaper-photos: data/wallpapers/manifest.csv

# Retrain the embedded default model (hours of CPU; resumable: rerun `make default-model` after an
# interruption). Training set: the wallpaper photos + scikit-image's TRAIN_PHOTOS; validation at each
# checkpoint: scikit-image's HELD_OUT_PHOTOS. It fine-tunes the previous default weights (trained on
# scikit-image photos alone, the two stages in the README), taken from git at commit c65eddf so a rerun
# starts from the same place after the new weights replace them: 3,500 steps of 96-pixel crops, then
# 4,000 of 128-pixel crops at a lower learning rate, both L1; then 1,200 steps of MSE (the loss PSNR
# measures) from the fp16 export of the second stage, 3,000 more with crops sampled in proportion to each
# photo's area, and 900 with batches of 32 at a lower rate (each stage resumes on its own).
BASE_COMMIT := c65eddf
runs/default-base.safetensors:
	mkdir -p runs && git show $(BASE_COMMIT):fastsr/models/weights/srresnet_x4_default.safetensors > $@.tmp && mv $@.tmp $@

# $(call default_stage,NAME,INIT,OPTIONS): one stage, `fastsr train` from INIT on the default model's
# folders into runs/NAME, resumed when its checkpoint exists. $(call fp16_copy,SRC,DST): SRC saved in fp16.
default_stage = $(BIN)/fastsr train --init $(2) --data data/default-train --val data/default-val --out runs/$(1) \
	$(3) $(if $(wildcard runs/$(1)/checkpoint.pt),--resume)
fp16_copy = $(BIN)/python -c "import fastsr, torch; fastsr.save_model(fastsr.load_model('$(1)'), '$(2)', dtype=torch.float16)"

default-model: data/wallpapers/manifest.csv runs/default-base.safetensors
	mkdir -p data/default-train/wallpapers data/default-val
	cp data/wallpapers/train/*.png data/default-train/wallpapers/
	$(BIN)/python -c "from fastsr.data import *; export_skimage_photos('data/default-train/skimage'); \
		export_skimage_photos('data/default-val', HELD_OUT_PHOTOS)"
	$(call default_stage,default-photos,runs/default-base.safetensors,--steps 3500 --batch-size 16 --crop 96 \
		--lr 1e-4 --warmup-steps 100 --loss l1 --amp auto --save-every 250 --seed 2)
	$(call default_stage,default-photos2,runs/default-photos/model.safetensors,--steps 4000 --batch-size 16 \
		--crop 128 --lr 5e-5 --min-lr 1e-6 --warmup-steps 50 --loss l1 --amp auto --save-every 250 --seed 3)
	$(call fp16_copy,runs/default-photos2/model.safetensors,runs/default-photos2-fp16.safetensors)
	$(call default_stage,default-mse,runs/default-photos2-fp16.safetensors,--steps 1200 --batch-size 16 \
		--crop 128 --lr 2e-5 --min-lr 1e-6 --warmup-steps 50 --loss mse --amp auto --save-every 200 --seed 4)
	$(call default_stage,default-area,runs/default-mse/model.safetensors,--steps 3000 --batch-size 16 \
		--crop 128 --lr 5e-5 --min-lr 1e-6 --warmup-steps 50 --loss mse --amp off --sampling area \
		--save-every 250 --seed 5)
	$(call default_stage,default-b32,runs/default-area/model.safetensors,--steps 900 --batch-size 32 \
		--crop 128 --lr 3e-5 --min-lr 1e-6 --warmup-steps 50 --loss mse --amp off --sampling area \
		--ema-decay 0.998 --save-every 150 --seed 7)
	$(call fp16_copy,runs/default-b32/model.safetensors,fastsr/models/weights/srresnet_x4_default.safetensors)

# ruff, and the import contracts of pyproject.toml (import-linter, on the installed layout; also in `make test`).
lint: venv
	$(BIN)/ruff check fastsr kernels csrc tests benchmarks
	$(BIN)/python -m pytest -q tests/test_imports.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks out
