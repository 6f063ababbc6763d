"""The console entry points in pyproject.toml name real `main(argv) -> int` functions, and each
answers --help with exit 0 and a usage line that names the command as it was run: `docmem-train`
as the entry point (what `pip install -e .` puts on PATH), `train_guidance.py` as a script."""
from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = {"docmem-train": "train_guidance", "docmem-evaluate": "evaluate_memory", "docmem-generate": "generate",
            "docmem-attribute": "attribute", "docmem-forget": "forget"}


def test_every_command_has_an_entry_point():
    assert {name: target.split(":")[0] for name, target in SCRIPTS.items()} == COMMANDS


def help_text(name: str, argv0: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `<argv0> --help` prints, sys.argv[0] being what the launcher sets it to."""
    module, func = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--" in out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_help_names_itself(name: str, monkeypatch: pytest.MonkeyPatch):
    # pip's wrapper is a file named after the entry point: sys.argv[0] is its path
    assert help_text(name, f"/venv/bin/{name}", monkeypatch).startswith(f"usage: {name} ")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_help_names_the_script(name: str, monkeypatch: pytest.MonkeyPatch):
    script = f"{COMMANDS[name]}.py"
    assert help_text(name, script, monkeypatch).startswith(f"usage: {script} ")
    assert help_text(name, str(ROOT / script), monkeypatch).startswith(f"usage: {script} ")  # python -m, a path


def test_wrapper_script_as_pip_writes_it(tmp_path: Path):
    """The console script pip writes for docmem-forget, run as a program: its usage and its error line."""
    module, func = SCRIPTS["docmem-forget"].split(":")
    wrapper = tmp_path / "docmem-forget"
    wrapper.write_text(f"import re, sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                       f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                       f"    sys.exit({func}())\n")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(wrapper), "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: docmem-forget "), done.stderr[-2000:]
    done = subprocess.run([sys.executable, str(wrapper), "--run_dir", str(tmp_path / "nothing"), "--doc", "0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("docmem-forget: error: "), done.stderr[-2000:]
