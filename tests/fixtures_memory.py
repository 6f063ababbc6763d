"""A tiny trained run (3 documents, tiny GPT-NeoX) shared by the trained-memory tests, built once
per session: `from fixtures_memory import tiny_lm_dir, tiny_run`."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures_tiny import run_training, tiny_argv, tiny_lm_dir  # noqa: F401

_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tiny_lm_dir, tmp_path_factory) -> Path:  # noqa: F811
    """save_dir/run_0 of a finished 4-epoch tiny training (read-only: copy it before changing it)."""
    if "run" not in _RUNS:
        save_dir = tmp_path_factory.mktemp("trained") / "runs"
        # fp32 whatever the CPU (auto would pick bf16_head where it has native bf16): the tests that
        # compare scorers need the same numerics on every machine
        done = run_training(tiny_argv(tiny_lm_dir, save_dir, "--lr", "3e-2", "--precision", "fp32",
                                      num_epochs=4, save_freq=4))
        assert done.returncode == 0, done.stderr[-3000:]
        _RUNS["run"] = save_dir / "run_0"
    return _RUNS["run"]


def copy_run(run: Path, where: Path) -> Path:
    target = where / "run_0"
    shutil.copytree(run, target)
    return target


def exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit code, whether main() returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)
