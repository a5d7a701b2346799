"""Writing results safely: atomic files, one run per results folder, sealed cache entries.

Every writer of a result goes through :func:`atomic_path`: it writes a temp file beside the
final one, named for its writer, which replaces the final path only once the write has
succeeded (and reached the disk); on any failure the temp file is removed. A full disk is
reported as such, naming the file, even where the writing library hides the cause (torch's zip
writer says only ``unexpected pos ...``). A workflow holds :func:`lock_results` on its results
folder for the whole run, and records which config each experiment folder was made with.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import socket
import stat
import time
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
    # Named for its writer (host, process, call): two writers of one file never share a temp
    # file. One that a killed writer left on this host is removed by the next writer.
    stem = f"{final_path.name}.{socket.gethostname()}-"
    tmp = folder / f"{stem}{os.getpid()}-{next(_WRITES)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder, stem)
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


_WRITES = itertools.count()


def _remove_orphans(folder: Path, stem: str) -> None:
    for old in folder.glob(f"{glob_escape(stem)}*.tmp"):
        pid = old.name[len(stem) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | Path, value) -> None:
    """``value`` as indented JSON at ``path``, atomically; NaN and infinity are refused (they
    are not JSON)."""
    text = json.dumps(value, indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def seal(path: str | Path) -> None:
    """Make the file a link points to (a between-workflow cache entry) read-only for all.

    Snakemake creates cache entries writable by everyone; whoever could write one could change
    every audit that uses it. Entries of other owners are left as they are (only their owner
    may change the mode).
    """
    if not os.path.islink(path):
        return
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        if st.st_uid == os.getuid() and st.st_mode & 0o222:
            os.chmod(real, stat.S_IMODE(st.st_mode) & ~0o222)
    except OSError:
        pass  # a dangling link: the job that reads it says so


def seal_links(folder: str | Path) -> int:
    """:func:`seal` every link under ``folder``; how many there were."""
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                seal(path)
                count += 1
    return count


# -- one run per results folder -----------------------------------------------------------------
LOCK = ".mimia-run.lock"
CONFIG_RECORD = ".mimia-config.json"
_HELD: dict[str, int] = {}  # results folder -> the open, locked file (held until exit)


class ResultsInUseError(RuntimeError):
    """Another run holds the results folder, or made it with another config."""


def lock_results(results: str | Path) -> None:
    """Hold the results folder's lock until this process ends (a killed run releases it).

    A second workflow on the same folder (from any working directory, on this machine or,
    where the filesystem supports ``flock``, another) is refused, naming the run that holds it.
    """
    folder = Path(results).absolute()
    if str(folder) in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 1 << 16).decode(errors="replace")
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        try:
            info = json.loads(holder)
            who = (
                f"a run from working directory {info['workdir']} (pid {info['pid']} on "
                f"{info['host']}, started {info['started']})"
            )
        except (ValueError, KeyError, TypeError):
            who = "another run"
        raise ResultsInUseError(
            f"results folder {folder} is in use by {who}; wait for it to finish, or give this "
            f"run another folder (--config results=...)"
        ) from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = {"workdir": os.getcwd(), "pid": os.getpid(), "host": socket.gethostname()}
    os.write(fd, json.dumps({**info, "started": started}).encode())
    _HELD[str(folder)] = fd


def claim_experiments(results: str | Path, identities: dict[str, str], record: bool = True) -> None:
    """Record which config made each experiment folder (unless ``record`` is false: a check
    only); refuse one made by another working directory with another config.

    Snakemake reruns what a changed param affects only from its own working directory's
    records: a run from elsewhere with another config would find the folder's results
    complete and finish into it, silently keeping the other config's models.
    """
    for name, identity in identities.items():
        path = Path(results) / name / CONFIG_RECORD
        here = os.getcwd()
        try:
            old = json.loads(path.read_text())
        except FileNotFoundError:
            old = None
        except ValueError:
            old = None  # damaged: this run's record replaces it
        if old and old.get("config_sha256") != identity and old.get("workdir") != here:
            raise ResultsInUseError(
                f"{path.parent} holds results of experiment {name!r} made with another config "
                f"(config {str(old.get('config_sha256'))[:12]}, this run's {identity[:12]}) from "
                f"working directory {old.get('workdir')}; run it from there, give this run "
                f"another results folder (--config results=...), or delete {path.parent}"
            )
        if record and old != {"config_sha256": identity, "workdir": here}:
            write_json(path, {"config_sha256": identity, "workdir": here})
