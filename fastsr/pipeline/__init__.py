"""Upscaling images of any size, in parts with one job each (docs/architecture.md, "How a tile flows"):

* :mod:`.options` - :class:`UpscaleOptions`: every upscaling option, declared once
* :mod:`.engine` - :class:`Upscaler`: a model prepared for inference on a batch of tiles (device,
  dtype, CUDA stream, the step to uint8/uint16)
* :mod:`.memory` - :func:`upscale_image`: PIL images, arrays and tensors in memory
* :mod:`.resume` - :class:`~.resume.WorkDir`: the resumable state (header, tile store, manifests)
* :mod:`.stream` - the reader thread -> model -> writer threads of a file run
* :mod:`.assemble` - the output file from the tile store, under a temporary name, then renamed
* :mod:`.files` - :func:`upscale_file`: the composition
* :mod:`.folder` - :func:`upscale_folder`: every image of a folder, one file after another

Planning (tiles, halos, batches, pasting a tile's centre) is :mod:`fastsr.tiling`; sources and
sinks are :mod:`fastsr.imageio`; the torchrun process group is :mod:`fastsr.distributed`.
"""

from .engine import UpscaleError, Upscaler, model_digest, resolve_device, resolve_dtype
from .files import upscale_file
from .folder import FolderSummary, upscale_folder
from .memory import upscale_image
from .options import UpscaleOptions

__all__ = ["FolderSummary", "UpscaleError", "UpscaleOptions", "Upscaler", "model_digest", "resolve_device",
           "resolve_dtype", "upscale_file", "upscale_folder", "upscale_image"]
