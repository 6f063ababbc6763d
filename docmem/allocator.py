"""How a command's process keeps its memory: freed C memory kept for reuse, and the objects made by
its imports left out of Python's garbage collection.

PyTorch on a CPU allocates its tensors with malloc. glibc serves a large request with a fresh mmap and
returns it on free (and trims the top of its heap past a threshold), so the next tensor of that size is
new memory again, and the operating system zeroes every page of it on first touch. An evaluation makes
thousands of equal-sized tensors (one decoding step's activations, one landscape pass's blocks), each
of which would pay that zeroing. Raising the two thresholds keeps the freed memory in the process,
where the next tensor of the size reuses it. Peak memory does not grow: the same tensors are alive at
once; only what is freed stays mapped until exit.

Importing torch and transformers makes hundreds of thousands of objects (modules, classes, functions)
that live until the process ends. Python's cyclic collector walks all of them in every full collection,
and again at exit. Frozen (gc.freeze), they are never walked; what a command makes afterwards is
collected as usual.
"""
from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 4 << 30
TOP_PAD = 256 << 20


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (requests up to 32 MiB from its heap, no trim
    below 4 GiB, 256 MiB of headroom per heap growth). Returns False, changing nothing, where the C
    library is not glibc (macOS, musl, Windows)."""
    try:  # the process's own symbols, libc's among them: no search for the library (find_library runs ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such symbol; Windows has no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not applied:
        log.debug("mallopt refused a setting; the allocator keeps its defaults for it")
    return applied


def freeze_imported_objects() -> int:
    """Move every object alive now (what the imports made) out of the collector's reach, once per process
    (a later call, e.g. a test running a second command in the same process, changes nothing: what died
    since would never be collected); returns how many objects are frozen."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
    return gc.get_freeze_count()
