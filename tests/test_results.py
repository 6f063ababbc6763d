"""docs/results.md and the marked blocks are generated from docs/results/*.json, and --check says when
they are stale; result files without provenance are refused; the record helper stamps provenance."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import bench_evaluate, results
from benchmarks.record import table_cells, write_record
from benchmarks.results import PROVENANCE

ROOT = Path(__file__).resolve().parents[1]


def docs_copy(tmp_path: Path) -> Path:
    """The generated texts and their result files, copied into a temporary repository root."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("img"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def edit_record(root: Path, name: str, change) -> None:
    path = root / results.RESULTS_DIR / f"{name}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_committed_results_are_up_to_date(capsys):
    assert results.main(["--check"]) == 0, capsys.readouterr().out


def test_a_number_edited_by_hand_fails_the_check(tmp_path, capsys):
    root = docs_copy(tmp_path)
    md = root / results.RESULTS_MD
    text = md.read_text()
    assert "| 1.000 |" in text
    md.write_text(text.replace("| 1.000 |", "| 0.999 |", 1))
    assert results.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "-" in out and "+" in out and "0.999" in out
    assert out.strip().splitlines()[-1].endswith(results.RERUN)
    assert results.main(["--root", str(root)]) == 0  # rendering again repairs it
    assert results.main(["--check", "--root", str(root)]) == 0


def test_a_number_changed_in_a_result_file_changes_the_table(tmp_path, capsys):
    root = docs_copy(tmp_path)
    before = results.render_results(root)
    edit_record(root, "precision", lambda r: r["figures"]["rows"][0].__setitem__(1, "123.4 s"))
    edit_record(root, "scaling", lambda r: r["figures"].__setitem__("growth_exponent", 7.654))
    after = results.render_results(root)
    assert "123.4 s" in after and "123.4 s" not in before
    assert "**7.654**" in after and "**7.654**" not in before
    assert results.main(["--check", "--root", str(root)]) == 1


def test_a_marked_block_is_rendered_then_checked(tmp_path, capsys):
    root = docs_copy(tmp_path)
    page = root / "docs" / "page.md"
    page.write_text("# A page\n\nBefore.\n\n<!-- results: quickstart -->\nstale text\n<!-- /results -->\n\nAfter.\n")
    assert results.main(["--check", "--root", str(root)]) == 1
    assert "docs/page.md" in capsys.readouterr().out
    assert results.main(["--root", str(root)]) == 0
    text = page.read_text()
    assert text.startswith("# A page\n\nBefore.\n\n<!-- results: quickstart -->\n| command | wall time |")
    assert text.endswith("<!-- /results -->\n\nAfter.\n") and "stale text" not in text
    source = json.loads((root / "docs" / "results" / "quickstart.json").read_text())["source"]
    assert f"From `docs/results/quickstart.json` ({source}, commit `" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(results.QUICKSTART)
    assert results.main(["--check", "--root", str(root)]) == 0
    page.write_text(text.replace(rows[0], rows[0].replace(" s |", " s (edited) |")))
    assert results.main(["--check", "--root", str(root)]) == 1


def test_an_unknown_block_name_is_refused(tmp_path, capsys):
    root = docs_copy(tmp_path)
    (root / "docs" / "page.md").write_text("<!-- results: nosuch -->\n<!-- /results -->\n")
    assert results.main(["--check", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "docs/page.md" in err and "nosuch" in err


@pytest.mark.parametrize("field", [*PROVENANCE, "figures"])
def test_a_result_file_without_its_provenance_is_refused(tmp_path, capsys, field):
    root = docs_copy(tmp_path)
    edit_record(root, "compare", lambda r: r.pop(field))
    assert results.main(["--check", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("error: docs/results/compare.json: missing ") and field in err


def test_record_helper_writes_provenance(tmp_path):
    path = write_record(tmp_path / "docs" / "results" / "thing.json", {"rows": [1, 2]}, "benchmarks.bench_scaling",
                        ["--docs", "10", "100", "--record", "docs/results/thing.json"])
    record = json.loads(path.read_text())
    assert all(record[k] for k in PROVENANCE)
    assert record["source"] == "measured" and record["figures"] == {"rows": [1, 2]}
    assert record["command"] == "python -m benchmarks.bench_scaling --docs 10 100 --record docs/results/thing.json"
    assert len(record["date"]) == 10 and record["commit"] != "unknown"
    assert results.load(tmp_path, "thing")["figures"] == {"rows": [1, 2]}


def test_a_result_file_of_unknown_source_is_refused(tmp_path, capsys):
    root = docs_copy(tmp_path)
    edit_record(root, "compare", lambda r: r.__setitem__("source", "from memory"))
    assert results.main(["--check", "--root", str(root)]) == 2
    assert "source 'from memory'" in capsys.readouterr().err


def test_a_benchmark_records_a_file_its_section_renders(tmp_path, monkeypatch, capsys):
    pair = {"demo_s": 40.0, "evaluate_s": 30.0, "ratio": 0.75, "stages": {"recall_generation_s": 8.0}, "forget_s": 31.0}
    monkeypatch.setattr(bench_evaluate, "one_pair", lambda args, keep: pair)  # the subprocesses' timing aside
    target = tmp_path / results.RESULTS_DIR / "evaluation_cost.json"
    assert bench_evaluate.main(["--forget", "0", "--record", str(target)]) == 0
    record = json.loads(target.read_text())
    assert record["command"] == f"python -m benchmarks.bench_evaluate --forget 0 --record {target}"
    section = next(s for s in results.SECTIONS if s.name == "evaluation_cost")
    text = results.render_table(tmp_path, section.name, section.table)
    assert "| 1 | 40.0 s | 30.0 s | **0.75** | 8.0 s | – | – | – | – | 31.0 s |" in text
    assert "Measured on " in text and record["commit"] in text


def test_a_benchmarks_markdown_table_is_recorded_as_its_cells():
    table = "a line before\n| method | recall |\n| --- | ---: |\n| keyed | 1.000 |\n| shared | – |\n\nnotes after\n"
    assert table_cells(table) == {"columns": ["method", "recall"], "rows": [["keyed", "1.000"], ["shared", "–"]]}
    with pytest.raises(ValueError):
        table_cells("no table here\n")
