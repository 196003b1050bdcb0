"""The errors of image reading and writing, each a :class:`fastsr.errors.UserError` (one line, exit 2),
and :func:`is_disk_full`, which tells a full disk from other write failures."""

from __future__ import annotations

import errno

from ..errors import UserError


class ImageReadError(UserError):
    """The input image is missing, unreadable, empty or corrupt."""


class UnsupportedImageError(UserError):
    """The input image has a mode, dtype or layout fastsr does not handle."""


class MultiFrameError(UnsupportedImageError):
    """The input holds several frames or pages (an animation, a stack): fastsr upscales one image."""


class ImageTooLargeError(UserError):
    """The image is too large for the requested whole-image format."""


class ImageWriteError(UserError):
    """The output cannot be written (directory, format, disk space)."""


class DiskFullError(ImageWriteError):
    """The disk (or the user's quota) cannot hold the rest of a run. The run stopped with its
    finished tiles kept for a resume, unlike other user errors, which discard the work folder."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space: a full disk or a full quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
