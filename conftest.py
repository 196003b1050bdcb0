# Shared by tests/ and benchmarks/.
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

# Triton kernels run through the interpreter when there is no GPU. The variable must be set
# before triton is imported anywhere, so it is set here, at collection time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's kernel cache, one per ATen CPU capability: a kernel cached under
# ATEN_CPU_CAPABILITY=avx2 (the EPYC approximation) and reused without it, or the other way
# round, gave NaN gradients and crashes here. And one per version of the cpp ops' fake kernels
# (fastsr.csrc.backend, installed or not): a compiled graph asserts the strides a fake promised,
# and a graph cached before conv2d_weight_grad's result followed x's memory format failed on the
# new strides. Kept between runs otherwise (compiling is slow).
_FAKES = hashlib.sha256(Path(importlib.util.find_spec("fastsr.csrc.backend").origin).read_bytes()).hexdigest()[:12]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-fastsr-{os.environ.get('ATEN_CPU_CAPABILITY', 'native').lower()}-{_FAKES}"))

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster than two on a busy machine (no OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
