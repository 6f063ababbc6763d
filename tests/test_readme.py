"""The README says what the code does: its flag table, its entry points, its commands (scripts, presets and
flags that exist), and its generation snippet runs."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import tomllib

from conftest import ROOT
from docmem.config import build_parser, flags_markdown
from fixtures_tiny import run_training, tiny_argv, tiny_lm_dir  # noqa: F401

README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
USAGE = DOCS["usage.md"]


def test_flag_table_is_current():
    assert flags_markdown() in USAGE, "regenerate docs/usage.md's flag table with config.flags_markdown()"


def test_generation_snippet_works(tiny_lm_dir, tmp_path):
    done = run_training(tiny_argv(tiny_lm_dir, tmp_path / "runs", num_epochs=2, save_freq=2))
    assert done.returncode == 0, done.stderr[-2000:]
    snippet = re.search(r"## Using a trained memory.*?```python\n(.*?)```", README, re.S).group(1)
    assert '"outputs/demo/run_0"' in snippet and len(snippet.strip().splitlines()) == 3
    snippet = snippet.replace('"outputs/demo/run_0"', repr(str(tmp_path / "runs" / "run_0")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    text = out.getvalue().strip()
    import yaml

    title = yaml.safe_load((tmp_path / "runs" / "run_0" / "config.yaml").read_text())["documents"][0]["title"]
    assert text.startswith(f"= {title} =") and len(text) > len(title) + 4  # prompted with its heading


def test_readme_lists_every_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(f"`{name}`" in README for name in scripts), "list every [project.scripts] name"


def readme_commands(text: str = README) -> list[list[str]]:
    """Every shell command a page shows: the lines of its bash and plain code blocks, the `$ ` lines of
    its text blocks, and inline code that starts with python, bash run.sh or torchrun; split at && and ;."""
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("bash", "", "text"):
            body = body.replace("\\\n", " ")
            lines += [line[2:] for line in body.splitlines() if line.startswith("$ ")] if lang == "text" else \
                body.splitlines()
    lines += re.findall(r"`((?:python3? |bash run\.sh|torchrun )[^`]*)`", text)
    commands = []
    for line in lines:
        command: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", ";", "|"):
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    return [c for c in commands if c]


def option_strings(script: str) -> set[str]:
    """The flags a script accepts: from its argparse parser (the top-level scripts), else as they are
    spelled in its source (benchmarks/)."""
    if script == "train_guidance.py":
        return set(build_parser()._option_string_actions)
    if "/" not in script:
        return set(importlib.import_module(script.removesuffix(".py")).build_parser()._option_string_actions)
    return set(re.findall(r"[\"'](--[\w-]+)[\"']", (ROOT / script).read_text()))


def test_readme_commands_name_real_scripts_presets_and_flags():
    """The README and docs/ check: each `python X.py`, `python -m benchmarks.X` and `bash run.sh PRESET` they
    show names a script or preset that exists, with flags its parser accepts."""
    presets = set(re.findall(r"^  (\w+)\)$", (ROOT / "run.sh").read_text(), re.M))
    checked = set()
    # docs/results.md is generated: its commands are the result files' provenance (benchmarks/results.py)
    pages = [README, *(text for name, text in DOCS.items() if name != "results.md")]
    for command in [c for text in pages for c in readme_commands(text)]:
        while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
            command = command[1:]  # VAR=value before the command
        script, rest = None, []
        if command[:2] == ["bash", "run.sh"]:
            preset = command[2] if len(command) > 2 and not command[2].startswith("-") else "paper"
            assert preset in presets, f"run.sh has no preset {preset!r}: {command}"
            script, rest = "train_guidance.py", command[2:]
        elif command[0] in ("python", "python3") and command[1:2] == ["-m"] and command[2].startswith("benchmarks."):
            script = command[2].replace(".", "/") + ".py"
            rest = command[3:]
        elif command[0] in ("python", "python3", "torchrun"):
            at = next((i for i, t in enumerate(command) if t.endswith(".py")), None)
            if at is not None:
                script, rest = command[at], command[at + 1:]
        elif command[0] == "pip" and "-r" in command:
            assert (ROOT / command[command.index("-r") + 1]).is_file(), command
        elif command[:2] == ["git", "clone"]:
            assert command[-1] != "docmem", "a clone folder named docmem shadows the package"
        if script is None:
            continue
        assert (ROOT / script).is_file(), f"no script {script}: {command}"
        accepted = option_strings(script)
        flags = {t.split("=")[0] for t in rest if t.startswith("--") and len(t) > 2}
        assert flags <= accepted, f"{script} does not accept {sorted(flags - accepted)}: {' '.join(command)}"
        checked.add(script)
    assert {"train_guidance.py", "evaluate_memory.py", "generate.py", "attribute.py", "forget.py"} <= checked
    assert "python -m pytest -q -rs tests" in README


def test_readme_reads_in_one_sitting():
    lines = len(README.splitlines())
    assert lines <= 250, f"README.md has {lines} lines (at most 250): move the detail into docs/"


def test_links_between_the_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (anchors aside)."""
    pages = {ROOT / "README.md": README, **{ROOT / "docs" / name: text for name, text in DOCS.items()}}
    broken = []
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_the_file_table_names_every_module():
    """docs/design.md holds the only file table: every docmem/ module is in it, under its room."""
    design = DOCS["design.md"]
    missing = []
    for path in sorted((ROOT / "docmem").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue
        if f"`{rel.as_posix()}`" not in design:
            missing.append(rel.as_posix())
    assert not missing, "add to docs/design.md's file table: " + ", ".join(missing)
