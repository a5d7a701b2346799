"""Atomic file writes: a result file is either complete or absent, never half-written.

Every writer of a result goes through :func:`atomic_path`: it writes a temp file beside the
final one, which replaces the final path only once the write has succeeded (and reached the
disk); on any failure the temp file is removed. A full disk is reported as such, naming the
file, even where the writing library hides the cause (torch's zip writer says only
``unexpected pos ...``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
# How libraries spell a full disk when they drop the errno (safetensors: "... (os error 28)").
_FULL_TEXT = (*_FULL.values(), *(f"os error {n}" for n in _FULL), *(f"errno {n}]" for n in _FULL))
# A failed write that leaves less than this free is taken to be the full disk's doing.
_NEARLY_FULL_BYTES = 1 << 20


class NoSpaceError(OSError):
    """A write failed because its filesystem is full (or the user's quota is spent)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path} ({detail})")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(err: BaseException, folder: Path) -> str | None:
    """Why ``err`` looks like a full disk (a detail for the message), or None."""
    if isinstance(err, OSError) and err.errno in _FULL:
        return _FULL[err.errno]
    # An OSError's text names the temp file it failed on: the message names the final path.
    text = (
        f"[Errno {err.errno}] {err.strerror}"
        if isinstance(err, OSError) and err.strerror
        else str(err)
    )
    if any(t in text for t in _FULL_TEXT):
        return f"{type(err).__name__}: {text}"
    free = _free_bytes(folder)
    if isinstance(err, OSError | RuntimeError) and free is not None and free < _NEARLY_FULL_BYTES:
        return f"{free} bytes left on its filesystem; the writer said {type(err).__name__}: {text}"
    return None


@contextlib.contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; it becomes ``final_path`` only if the block succeeds.

    On any exception (or interrupt) the temp file is removed and the error re-raised; one that
    a full disk caused becomes :class:`NoSpaceError` naming ``final_path``.
    """
    final_path = Path(final_path)
    folder = final_path.parent
    # A fixed name: a run killed mid-write leaves one temp file, which the rerun overwrites.
    tmp = folder / f"{final_path.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield tmp
        # Data must be on disk before the rename makes it look complete; a quota or network
        # filesystem may only report a failed write here.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final_path)
    except BaseException as err:
        full = None
        # A NoSpaceError already names the file it failed on (an inner atomic_path's); free
        # space is measured before deleting the temp file frees it again.
        if isinstance(err, Exception) and not isinstance(err, NoSpaceError):
            full = _disk_full(err, folder)
        tmp.unlink(missing_ok=True)
        if full:
            raise NoSpaceError(final_path, full) from err
        raise


def write_json(path: str | Path, value) -> None:
    """``value`` as indented JSON at ``path``, atomically; NaN and infinity are refused (they
    are not JSON)."""
    text = json.dumps(value, indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
