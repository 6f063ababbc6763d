"""The console entry points in pyproject.toml name real `main(argv) -> int` functions, and each
answers --help with exit 0 (what `pip install -e .` puts on PATH as docmem-train, ...)."""
from __future__ import annotations

import contextlib
import importlib
import io
import tomllib

import pytest

from conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_an_entry_point():
    assert set(SCRIPTS) >= {"docmem-train", "docmem-evaluate", "docmem-generate", "docmem-attribute"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_runs_help(name):
    module, func = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), func)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--" in out.getvalue()
