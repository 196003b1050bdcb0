"""Writing outputs safely: a reader never sees a file half-written, and fastsr deletes or replaces
only what it wrote itself (docs/safety.md). Depends only on :mod:`fastsr.errors`.

Every command that writes a file goes through the two functions here:

* :func:`check_destination`, before any work: the destination must not be, lie inside, or
  contain one of the inputs; an existing destination is refused unless ``overwrite``; a
  directory is replaced only if it is a zarr array (or OME-Zarr image) fastsr wrote;
* :func:`commit` (or :func:`atomic_path`, which uses it), at the end: the finished temporary
  output renamed onto the destination, the same rule checked again (the destination may have
  appeared while the run worked).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DestinationError

# The attribute fastsr writes into the zarr.json of every zarr array or group it creates; with the
# entries it writes (below) it is how a later run knows a directory is fastsr's to replace.
ZARR_MARK = "fastsr"
# What a zarr written by fastsr holds: an array (chunks under "c") or an OME-Zarr group (array "0").
_ZARR_ENTRIES = ({"zarr.json", "c"}, {"zarr.json", "0"})

PathLike = str | os.PathLike


def is_fastsr_zarr(path: PathLike) -> bool:
    """Whether ``path`` is a directory fastsr may remove: a zarr array or OME-Zarr image that carries
    fastsr's mark and holds nothing but what fastsr wrote (a group a user added arrays to is not)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        meta = json.loads((path / "zarr.json").read_text())
        entries = {p.name for p in path.iterdir()}
    except (OSError, ValueError):
        return False
    marked = isinstance(meta, dict) and isinstance(meta.get("attributes"), dict) and ZARR_MARK in meta["attributes"]
    return marked and any(entries <= allowed for allowed in _ZARR_ENTRIES)


def _overlap(src: Path, dst: Path) -> str | None:
    """How the input ``src`` and the destination ``dst`` overlap, in words, or None. Resolved
    paths (symlinks followed), and the same file under two names (a hard link) counts too."""
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd:
        return "is the input file"
    with contextlib.suppress(OSError):
        if rs.exists() and rd.exists() and os.path.samefile(rs, rd):
            return "is the input file (under another name)"
    if rd in rs.parents:
        return f"contains the input {src}"
    if rs in rd.parents:
        return f"lies inside the input {src}"
    return None


def check_destination(dst: PathLike, *, sources: Iterable[PathLike] = (), overwrite: bool = False,
                      what: str = "output") -> Path:
    """Raise :class:`DestinationError` (one line) unless fastsr may write ``dst``; returns it as a Path.

    Refused: ``dst`` is, lies inside or contains one of ``sources``; its folder does not exist or is
    not writable; it exists and ``overwrite`` is false; it is a directory that is not a zarr fastsr
    wrote (never removed, even with ``overwrite``). ``what`` names the destination in the message
    (e.g. "--json")."""
    dst = Path(dst)
    for src in sources:
        how = _overlap(Path(src), dst)
        if how is not None:
            raise DestinationError(f"{what} {dst} {how}; fastsr never writes over or into its inputs: choose "
                                   "another name")
    parent = dst.resolve().parent
    if not parent.is_dir():
        raise DestinationError(f"{what} {dst}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"{what} {dst}: folder {parent} is not writable")
    _check_replaceable(dst, overwrite, what)
    return dst


def _check_replaceable(dst: Path, overwrite: bool, what: str) -> None:
    """The part of the rule about what is at ``dst`` already (nothing is fine)."""
    if not os.path.lexists(dst):
        return
    if dst.is_dir() and not dst.is_symlink() and not is_fastsr_zarr(dst):
        raise DestinationError(f"{what} {dst} is an existing folder that fastsr did not write; fastsr never "
                               "removes it (not even with --overwrite): choose another name")
    if not overwrite:
        raise DestinationError(f"{what} {dst} exists; pass --overwrite to replace it, or choose another name")


def commit(tmp: PathLike, dst: PathLike, *, overwrite: bool = False, what: str = "output") -> None:
    """Move the finished temporary output ``tmp`` (a file, or a zarr directory) onto ``dst``: an
    atomic rename for a file. What is at ``dst`` now is checked by the same rule as
    :func:`check_destination`; only a zarr fastsr wrote is removed to make room for a directory."""
    tmp, dst = Path(tmp), Path(dst)
    _check_replaceable(dst, overwrite, what)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)  # os.replace cannot replace a directory; is_fastsr_zarr(dst) was checked
    elif tmp.is_dir() and os.path.lexists(dst):
        dst.unlink()  # a file (or symlink) where a zarr folder goes: os.replace cannot put a folder there
    os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = True, what: str = "output") -> Iterator[Path]:
    """A temporary name beside ``path`` to write the file to. When the block ends without an
    error it is renamed onto ``path`` (atomic on one filesystem) by :func:`commit`; otherwise it is
    removed. A crash mid-write leaves the previous file at ``path`` intact. ``overwrite=True`` (the
    default, for files a run rewrites, such as its checkpoint) replaces an existing file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would: some writers create 0600 files
        commit(tmp, path, overwrite=overwrite, what=what)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o22)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def one_writer(dst: PathLike) -> Iterator[None]:
    """One fastsr run per destination (an upscaled file, a folder run's output folder, a training
    run folder): an exclusive lock (flock) on the hidden file ``.NAME.fastsr-lock`` beside ``dst``,
    held for the whole run and released by the OS if the process dies. A second run refuses in one
    line naming the process that holds it."""
    dst = Path(dst)
    path = dst.with_name(f".{dst.name}.fastsr-lock")
    fd = _acquire(path, dst)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting run then finds a new file
        os.close(fd)


def _acquire(path: Path, dst: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DestinationError(f"{dst}: another fastsr run (pid {holder}) is writing this output; wait for it "
                                   "to finish or choose another output name") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd  # the file we locked is still the lock file (not one unlinked meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
