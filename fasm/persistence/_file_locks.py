"""The file store's locks: ``flock`` on lock files, a key's hold, the store-wide all-lock.

Every lock is an ``fcntl.flock`` on an open file, so the kernel drops it when the process dies.
:mod:`._file` says which lock is taken when (see its notes); :mod:`._sqlite` uses the same
helpers for its writer lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreConflict, StoreUnavailable

__all__ = ("ALL_LOCK", "Hold", "check_hold", "take", "take_shared", "try_flock", "unflock")

ALL_LOCK = "FASM-STORE-ALL"  # flock'd exclusive by acquire_all, shared by holders of keys
_TAKE_ATTEMPTS = 5


def try_flock(path: Path, *, shared: bool = False) -> int | None:
    """Open ``path`` (creating it) and take an exclusive (or ``shared``), non-blocking ``flock``
    on it.

    Returns the file descriptor holding the lock, or None when another open file (in this process
    or another) holds it. The kernel releases the lock when the descriptor is closed, including
    when the process dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unflock(fd: int) -> None:
    """Release a lock taken by :func:`try_flock` and close its descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Hold:
    """A key this store object holds: its flock'd lock file and its directory, kept open."""

    lock_fd: int
    dir_fd: int

    def close(self) -> None:
        try:
            os.close(self.dir_fd)
        except OSError:
            pass
        try:
            unflock(self.lock_fd)
        except OSError:
            pass  # the descriptor is closed either way, and with it the lock


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def take(kdir: Path) -> Hold | None:
    """Lock the key's lock file, or None when another open file holds it."""
    path = kdir / "lock"
    for _ in range(_TAKE_ATTEMPTS):
        fd = try_flock(path)
        if fd is None:
            return None
        try:
            lock_id = _file_id(os.fstat(fd))
            if _file_id(os.stat(path)) == lock_id:  # not deleted while we locked it
                dir_fd = os.open(kdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                return Hold(fd, dir_fd)
        except FileNotFoundError:
            pass
        except BaseException:
            unflock(fd)
            raise
        unflock(fd)
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(path))


def check_hold(store: str, key: str, hold: Hold, seq: int) -> None:
    """Under the directory lock: raise StoreConflict unless our lock file is still linked.

    Deleting ``lock``, renaming another file over it or deleting the key's directory all
    unlink the file we hold, and a second writer can then lock a new one; one ``fstat`` of
    our descriptor tells (its link count drops to 0), cheaper than looking the name up."""
    if os.fstat(hold.lock_fd).st_nlink == 0:
        raise StoreConflict(
            "the key's lock file was deleted or replaced while this store object held it, "
            "so another writer may have taken the key; nothing written (acquire the key "
            "again once no other writer runs)", store=store, key=key, seq=seq)


def take_shared(root: Path, store: str, key: str | None) -> int:
    """A shared flock on the all-lock: refused while another object holds acquire_all."""
    try:
        fd = try_flock(root / ALL_LOCK, shared=True)
    except OSError as e:
        raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                               store=store, key=key) from e
    if fd is None:
        raise StoreConflict("the whole store is held by another store object or process "
                            "(acquire_all)", store=store, key=key)
    return fd
