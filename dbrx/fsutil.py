"""Safe writes to the file system: directories replaced whole and atomically, and exclusive locks.

- `atomic_dir(target)`: everything is written into a fresh temporary directory beside `target` (created with
  `mkdtemp`: an unpredictable name, mode 0700, never a followed symlink), every file and the directory are
  fsynced, and the result is moved into place by one rename. An existing `target` is swapped with the new one
  in a single `renameat2(RENAME_EXCHANGE)` where the kernel has it (else two renames, the old directory kept
  under a hidden name until the new one is in place) and deleted only afterwards. A failure, or a process that
  dies, leaves `target` as it was; temporary directories of dead writers are removed by the next writer.
- `DirLock` / `lock_dir(path)`: an exclusive `flock` on a lock file, released by the kernel when the process
  dies. A second writer gets `LockedError` (a ValueError) naming the holder's process id. Readers take no lock.

Imports: the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TMP = ".tmp-"  # temporary directories are named .{target}.tmp-{pid}-{random}


class LockedError(ValueError):
    """Another process holds the lock."""


# ---- fsync ----------------------------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or directory (its entries, for a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root`, then `root` itself."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


# ---- atomic directories ---------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str | None = None) -> None:
    """Delete the temporary directories in `parent` (of target `name` only, if given) whose writer process is gone
    (killed mid-write)."""
    with contextlib.suppress(FileNotFoundError):
        for p in parent.iterdir():
            if not is_temporary(p) or (name is not None and not p.name.startswith(f".{name}{_TMP}")):
                continue
            pid = p.name.rsplit(_TMP, 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, replacing an existing `target` (deleted afterwards)."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old directory
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}{os.getpid()}-old-", dir=target.parent))
        os.rename(target, old / "old")
        os.rename(new, target)
        shutil.rmtree(old)
    fsync_path(target.parent)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on a clean exit it replaces `target` whole, on an error it vanishes.

    `target` may exist (a directory: it stays intact until the new one is complete) or not (its parent is
    created). The caller writes only into the yielded directory.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the hidden temporary directories of `atomic_dir` (readers skip them)."""
    name = Path(path).name
    return name.startswith(".") and _TMP in name


# ---- locks ----------------------------------------------------------------------------------------------------
class DirLock:
    """An exclusive, non-blocking `flock` on `lock_file`, holding this process's id. Use as a context manager
    or call `release()`; the kernel releases it when the process dies."""

    def __init__(self, lock_file: str | os.PathLike, what: str) -> None:
        self.path = Path(lock_file)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        self.fd = -1
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{self.path}: lock file is a symbolic link; refusing to follow it") from None
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = -1  # so that __del__ never closes a descriptor number reused since
            raise LockedError(f"{what} is in use by another process (pid {holder}, lock {self.path}); "
                              f"wait for it to finish or use another directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def lock_dir(path: str | os.PathLike, what: str | None = None, inside: bool = False) -> DirLock:
    """Lock directory `path` for writing: the lock file is `path/.lock` (`inside`, for a directory that is
    written in place, such as a run directory) or `.{name}.lock` beside it (for one replaced whole)."""
    path = Path(os.path.abspath(path))
    lock_file = path / ".lock" if inside else path.parent / f".{path.name}.lock"
    return DirLock(lock_file, what or str(path))


__all__ = ["atomic_dir", "replace_dir", "remove_stale_temporaries", "is_temporary", "fsync_path", "fsync_tree",
           "DirLock", "LockedError", "lock_dir"]
