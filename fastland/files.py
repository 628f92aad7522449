"""Output files: checked before the work starts, locked while they are written, written atomically.

- ``WriteLock``: one writer per output (a surface file, a run folder). A second fastland
  process is told that another one is writing it, with that process's id; the lock is an
  ``flock`` on a hidden sidecar file, so it goes away with its process, even after ``kill -9``.
- ``check_output_file`` / ``check_output_dir``: the path can be written (not a folder where a
  file is expected, not under ``/proc``, permissions) and the disk has room for the final size,
  before hours of work.
- ``check_memory``: an allocation estimate against the free memory, with the limit in the message.
- ``check_writable``: a probe file is created where the output goes (``os.access`` says yes to root
  even on a read-only file system).
- ``replacing`` / ``write_bytes`` / ``write_text_atomic``: a temporary file beside the target that
  replaces it only once complete, so a crash or a full disk never leaves half a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastland.device import free_memory
from fastland.errors import UserError, os_error

DISK_MARGIN = 1.05  # free space wanted, as a multiple of the file's final size
# The folder checks below say this for a path the kernel refuses without a clearer errno.
_WHY = {errno.ENOENT: "this folder does not accept new files", errno.ENOTDIR: "a part of the path is a file, not a folder"}


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


class WriteLock:
    """An exclusive, non-blocking lock on ``target`` (a file or a folder) for one writer."""

    def __init__(self, target: str | Path, what: str = "file") -> None:
        self.target, self.what = Path(target), what
        self._fd: int | None = None

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        path = _lock_path(self.target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise os_error(err, str(path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise os_error(err, str(path)) from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another fastland process (pid {holder}) is writing {self.target}; wait for it to finish, "
                            f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the sidecar stays (unlinking it would race)
            self._fd = None


def is_locked(target: str | Path) -> bool:
    """Whether a fastland process is writing ``target`` right now."""
    path = _lock_path(Path(target))
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, option: str, shown: str | None = None) -> None:
    """Fail now, in one line, if ``path`` could not be written later (``shown``: how the user wrote it).

    Creates the missing folders above it (the render would create them anyway) and a probe
    file in its folder, so a read-only or special file system (``/proc``) is found out too.
    """
    shown = shown or str(path)
    if path.is_dir():
        raise UserError(f"{option} {shown} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {shown} exists and is not a regular file; choose another path")
    folder = path.parent
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{option} {shown}: {above} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastland-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = _WHY.get(err.errno or -1, (err.strerror or str(err)).lower())
        raise UserError(f"{option} {shown} cannot be written: {why}; choose another path") from None


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it when the block succeeds.

    On any failure the temporary file is removed and ``path`` is left as it was; a
    file-system error (a full disk...) becomes one line naming ``path``.
    """
    path = Path(os.path.realpath(path))  # through a link, replace the file it points to, not the link
    if path.exists() and not path.is_file():  # never swap a device, pipe or folder for a picture
        raise UserError(f"{path} exists and is not a regular file; choose another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, str(path)) from None
    finally:
        discard(tmp)


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; never fail (a read-only file system refuses even
    to unlink a file that does not exist, and the error being reported is the one that matters)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def discard_stale(folder: Path, name: str = "*") -> None:
    """Remove the temporary files (``.NAME.PID.tmp``, see ``replacing``) that a killed process left in
    ``folder``: only those whose process is gone, so a live writer's file is never touched."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            discard(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def write_bytes(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see ``replacing``)."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    write_bytes(path, text)


def check_output_file(path: str | Path, size: int = 0, option: str = "--out") -> Path:
    """Check that a file can be written at ``path`` with ``size`` bytes free; make its folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path such as {path / 'surface.h5'}")
    check_writable(path, option)
    check_disk(path.parent, size, option, path)
    return path


def check_output_dir(path: str | Path, size: int = 0, option: str = "--out") -> Path:
    """Check that ``path`` is (or can be made) a writable folder with ``size`` bytes free; make it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; give a folder path")
    check_writable(path / ".fastland-probe", option, shown=str(path))
    check_disk(path, size, option, path)
    return path


def check_disk(folder: Path, size: int, option: str, path: Path) -> None:
    """Refuse before the work when the disk cannot hold ``size`` more bytes."""
    if size <= 0:
        return
    free = shutil.disk_usage(_existing_parent(folder)).free
    if free < size * DISK_MARGIN:
        raise UserError(f"{option} {path}: needs about {_human(size)} but only {_human(free)} is free there; "
                        "free some space or choose another place")


def check_memory(nbytes: int, what: str, advice: str, device: object = None) -> None:
    """Refuse an allocation of ``nbytes`` that cannot fit in the free memory (the host's by default)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    free = free_memory(dev)
    if nbytes > 0.8 * free:
        raise UserError(f"{what} needs about {_human(nbytes)} of memory, but only {_human(free)} is free "
                        f"(the limit is 80% of that); {advice}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
