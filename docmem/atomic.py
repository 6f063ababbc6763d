"""Files and folders that appear whole or not at all, whatever kills the process and when.

- `write_atomic(path, data)`: the bytes go to a hidden temporary beside `path`, are fsync'd, and are
  renamed over it: a reader sees the old file or the new one.
- `whole_folder(final)`: a context manager that yields a hidden temporary folder beside `final`;
  when the block ends without an exception, the folder is fsync'd and takes `final`'s place in one
  rename (an existing `final` is swapped out with renameat2's RENAME_EXCHANGE where the file
  system has it). On an exception, or a kill, the temporary is left for `remove_leftovers`, and
  `final` is as it was.
- A full disk (ENOSPC, EDQUOT) becomes `DiskFullError`: one line naming the file; the previous file
  or folder is untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from docmem.errors import DiskFullError

TMP_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temporary_name(path: Path) -> Path:
    """The hidden temporary of `path`: .NAME.PID.tmp beside it (remove_leftovers finds it)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def disk_full_as_error(path: Path) -> Iterator[None]:
    """ENOSPC/EDQUOT while writing `path` -> DiskFullError naming it (other OSErrors pass)."""
    try:
        yield
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise DiskFullError(f"{path}: no space left on the device while writing it; the previous version "
                                "is kept (free some space and run the command again)") from err
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Replace `path` whole: written to a hidden temporary beside it, fsync'd, renamed over it."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with disk_full_as_error(path):
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def publish_folder(tmp: Path, final: Path) -> Path:
    """Put the finished folder `tmp` at `final` in one step (see the module docstring)."""
    _fsync_tree(tmp)
    if final.is_dir() and any(final.iterdir()):
        if _exchange(tmp, final):
            shutil.rmtree(tmp)  # what was at final before
        else:  # no atomic swap here: the old folder steps aside for a moment, and is then removed
            old = final.with_name(f".{final.name}.{os.getpid()}.old{TMP_SUFFIX}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
    else:
        os.replace(tmp, final)  # onto nothing, or onto an empty folder
    fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def whole_folder(final: str | Path) -> Iterator[Path]:
    """with whole_folder(out) as tmp: write into tmp; out appears whole when the block ends."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with disk_full_as_error(final):
            yield tmp
            publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """Remove the hidden temporaries (files and folders) that a killed process left in `folder`."""
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
