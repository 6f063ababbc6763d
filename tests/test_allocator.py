"""docmem/allocator.py: after keep_freed_memory() glibc serves a 30 MiB request from its heap (kept for
reuse) instead of a fresh mmap; without it, the same request in a fresh process is a fresh mmap."""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from docmem.allocator import keep_freed_memory

PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields; hblkhd = bytes in mmapped blocks
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from docmem.allocator import keep_freed_memory
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(30 << 20)
print(libc.mallinfo2().hblkhd - before)
"""

ROOT = Path(__file__).resolve().parents[1]


def _has_mallinfo2() -> bool:  # glibc 2.33 and later
    return hasattr(ctypes.CDLL(None), "mallinfo2")


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
                           reason="glibc's malloc only (2.33 or later, for mallinfo2)")


def _mmapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip())


@glibc
def test_a_large_request_comes_from_the_kept_heap():
    assert _mmapped_bytes("default") >= 30 << 20  # glibc's default: a fresh mmap
    assert _mmapped_bytes("keep") == 0


@glibc
def test_it_can_be_applied_twice():
    assert keep_freed_memory() and keep_freed_memory()



FREEZE_PROBE = """
import gc
import torch  # what a command's imports make
from docmem.allocator import freeze_imported_objects
frozen = freeze_imported_objects()
again = freeze_imported_objects()
made_after = [[]]
made_after[0].append(made_after)  # a cycle made after the freeze: garbage the collector still finds
del made_after
print(frozen, again, gc.get_freeze_count(), gc.collect())
"""


def test_the_imports_objects_are_frozen_once_and_later_garbage_is_still_collected():
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE], capture_output=True, text=True, check=True, cwd=ROOT)
    frozen, again, count, collected = (int(v) for v in out.stdout.split())
    assert frozen > 100_000  # torch alone makes more objects than that
    assert again == frozen == count  # the second call froze nothing more
    assert collected >= 2  # the two lists of the cycle
