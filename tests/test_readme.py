"""The README says what the code does: its flag table, and its generation snippet runs."""
from __future__ import annotations

import contextlib
import io
import re

from conftest import ROOT
from docmem.config import flags_markdown
from fixtures_tiny import run_training, tiny_argv, tiny_lm_dir  # noqa: F401

README = (ROOT / "README.md").read_text()


def test_flag_table_is_current():
    assert flags_markdown() in README, "regenerate the README's flag table with config.flags_markdown()"


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
