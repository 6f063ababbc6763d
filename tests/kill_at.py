"""Run a script and SIGKILL it at its N-th file-system event, or make that event fail with ENOSPC.

    python tests/kill_at.py MODE N COUNT_FILE script.py [args...]

MODE kill: the process kills itself (SIGKILL, no clean-up of any kind) at event N: just before an
os.replace / os.rename / os.fsync / shutil.rmtree, just before a safetensors file is written, or
halfway through a Path.write_text (half the text is on disk). MODE enospc: the N-th write (an
fsync, a safetensors file, a Path.write_text) raises OSError(ENOSPC) instead, as a full disk would. N = 0 runs the script untouched. Either way the
number of events seen is written to COUNT_FILE when the process ends normally (so a test can
first count a command's events, then kill it at each of them).
"""
from __future__ import annotations

import atexit
import errno
import os
import runpy
import shutil
import signal
import stat
import sys
from pathlib import Path

WRITES = ("fsync", "save_file")  # and Path.write_text


def main() -> None:
    mode, target, count_file, script, *args = sys.argv[1:]
    target_n = int(target)
    seen = [0]

    def event(what: str) -> bool:
        """Count an event and act on the N-th. A full disk fails writes only (fsync, a safetensors file)."""
        if mode == "enospc" and what not in WRITES:
            return False
        seen[0] += 1
        if seen[0] != target_n:
            return False
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (simulated at {what})")

    def wrap(owner, name: str):
        original = getattr(owner, name)

        def wrapped(*a, **kw):
            event(f"{name}")
            return original(*a, **kw)

        setattr(owner, name, wrapped)

    for owner, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
        wrap(owner, name)
    original_fsync = os.fsync

    def fsync(fd):
        event("fsync" if not stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync of a folder")  # a folder's: no write
        return original_fsync(fd)

    os.fsync = fsync
    import safetensors.torch

    for name in ("save_file", "save"):
        wrap(safetensors.torch, name)
    original_write_text = Path.write_text

    def write_text(self, data, *a, **kw):
        seen[0] += 1
        if seen[0] == target_n:
            if mode == "kill":
                original_write_text(self, data[: len(data) // 2], *a, **kw)
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device (simulated at write_text)")
        return original_write_text(self, data, *a, **kw)

    Path.write_text = write_text
    atexit.register(lambda: Path(count_file).write_bytes(str(seen[0]).encode()))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
