"""generate.py end to end on a tiny run: one block per condition, --json, sampling, and one-line
errors (exit 2) for a bad run folder, an unknown document and an empty prompt."""
from __future__ import annotations

import json

import pytest

import generate
from docmem.trained_memory import load_memory_run
from fixtures_memory import exit_code, tiny_lm_dir, tiny_run  # noqa: F401


def test_blocks_per_condition(tiny_run, capsys):  # noqa: F811
    tm = load_memory_run(tiny_run, device="cpu")
    assert generate.main(["--run_dir", str(tiny_run), "--doc", "0", "--doc", tm.titles[2], "--no_key", "--no_memory",
                          "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== ")]
    first, third = tm.openings[0], tm.openings[2]  # the default prompt: each title as it opens its document
    assert first == f"= {tm.titles[0]} ="  # the synthetic articles open with a WikiText heading
    assert headers == [f"=== doc 0: {tm.titles[0]} | prompt: {first!r}",
                       f"=== doc 2: {tm.titles[2]} | prompt: {third!r}",
                       f"=== no_key | prompt: {first!r}", f"=== no_memory | prompt: {first!r}",
                       f"=== no_key | prompt: {third!r}", f"=== no_memory | prompt: {third!r}"]
    # the text printed is the one the library generates
    assert f"{first}{tm.select(0).generate(max_new_tokens=5)}" in out.splitlines()


def test_json_all_and_prompt(tiny_run, capsys):  # noqa: F811
    assert generate.main(["--run_dir", str(tiny_run), "--doc", "all", "--prompt", "The town", "--json",
                          "--max_new_tokens", "4", "--temperature", "0.9", "--top_p", "0.8", "--seed", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["doc"] for r in rows] == [0, 1, 2] and {r["prompt"] for r in rows} == {"The town"}
    assert all(isinstance(r["continuation"], str) and r["title"] for r in rows)
    assert generate.main(["--run_dir", str(tiny_run), "--no_memory", "--prompt", "The town", "--json",
                          "--max_new_tokens", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["condition"] == "no_memory" and row["doc"] is None


@pytest.mark.parametrize("argv, message", [
    (["--doc", "3"], "--doc 3: no such document index"),
    (["--doc", "Not A Title"], "no document has this title"),
    (["--doc", "0", "--prompt", "   "], "--prompt is empty"),
    (["--no_key"], "need --prompt"),
    ([], "nothing to generate"),
    (["--doc", "0", "--max_new_tokens", "0"], "--max_new_tokens 0"),
    (["--doc", "0", "--bogus"], "unrecognized arguments"),
])
def test_errors_are_one_line_exit_2(tiny_run, capsys, argv, message):  # noqa: F811
    code = exit_code(generate.main, ["--run_dir", str(tiny_run), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("generate.py: error: ") and message in err[0], err


def test_bad_run_folder(tmp_path, capsys):
    for path in (tmp_path / "missing", tmp_path):
        assert generate.main(["--run_dir", str(path), "--doc", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("generate.py: error: ")
