"""fastsr: fast SRGAN super-resolution for PyTorch.

Importing fastsr is light: the Triton kernels and the C++ extension load on first use.
"""

from __future__ import annotations

import sys

from . import metrics, nn
from .errors import BackendUnavailableError, UserError
from .fusion import fuse, optimize  # fuse: any model (a copy); optimize: fastsr models, in place
from .models import (
    SPAN,
    Discriminator,
    MSRResNet,
    PeerSRResNet,
    RRDBNet,
    SRResNet,
    SRVGGNetCompact,
    load_model,
    save_model,
)
from .ops import dispatch as backend  # fastsr.backend: the registry (availability, set_backend, ...)
from .ops import functional  # fastsr.functional: the fused ops
from .ops.dispatch import available_backends, get_backend, set_backend, use_backend
from .pipeline import UpscaleOptions, upscale_file, upscale_folder

# `import fastsr.functional as F` and `from fastsr.functional import conv2d_prelu` (torch.nn.functional's
# idiom), and the same for fastsr.backend: the public names are these modules themselves, registered
# under their public paths as os.path is (not copies, so module state such as the backend choice is one).
sys.modules[f"{__name__}.functional"] = functional
sys.modules[f"{__name__}.backend"] = backend

__version__ = "0.1.0"


def upscale(image, model=None, options: UpscaleOptions | None = None, **changes):
    """Upscale a PIL image, an (H, W, C) uint8/uint16 array or an (N, C, H, W) float tensor;
    returns the same kind. See :func:`fastsr.pipeline.upscale_image` and :class:`UpscaleOptions`."""
    from .pipeline import upscale_image

    return upscale_image(image, model, options, **changes)


__all__ = [
    "BackendUnavailableError", "Discriminator", "MSRResNet", "PeerSRResNet", "RRDBNet", "SPAN", "SRResNet",
    "SRVGGNetCompact", "UpscaleOptions", "UserError", "available_backends", "backend", "functional", "fuse",
    "get_backend", "load_model", "metrics", "nn", "optimize", "save_model", "set_backend", "upscale", "upscale_file",
    "upscale_folder", "use_backend",
    "__version__",
]
