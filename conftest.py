# Shared by tests/ and benchmarks/.
import os
import tempfile

import torch

# Triton kernels run through the interpreter when there is no GPU. The variable must be set
# before triton is imported anywhere, so it is set here, at collection time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's kernel cache, one per ATen CPU capability: a kernel cached under
# ATEN_CPU_CAPABILITY=avx2 (the EPYC approximation) and reused without it, or the other way
# round, gave NaN gradients and crashes here. Kept between runs otherwise (compiling is slow).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-fastsr-{os.environ.get('ATEN_CPU_CAPABILITY', 'native').lower()}"))

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
