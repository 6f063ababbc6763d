"""Forgetting: the two edits (exact properties), forget.py end to end and its errors, and
evaluate_memory.py --forget's report on a tiny run."""
from __future__ import annotations

import json

import pytest
import torch

import evaluate_memory as em
import forget as forget_cli
from docmem.forgetting.edits import (
    FORGET_METHODS,
    forget,
    forget_direction,
    forgotten_provenance,
)
from docmem.trained_memory import load_memory_run
from document_memories import DocumentMemory, MemoryConfig, load_memory
from fixtures_memory import copy_run, exit_code, tiny_lm_dir, tiny_run  # noqa: F401


def random_memory(num_docs: int = 4, seed: int = 0, **kw) -> DocumentMemory:
    memory = DocumentMemory(MemoryConfig(hidden_size=8, num_docs=num_docs, memory_dim=6, **kw),
                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # trained-looking weights: not the orthogonal init's special structure
        for p in memory.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return memory.eval()


def test_drop_key_removes_the_row_and_keeps_the_weights():
    memory = random_memory()
    dropped = forget(memory, 1, "drop_key")
    assert dropped.config.num_docs == 3 and dropped.config.forgotten_directions == 0
    assert torch.equal(dropped.doc_keys, memory.doc_keys[[0, 2, 3]])
    x = torch.randn(2, 5, 8)
    old_key = memory.doc_keys[1]
    assert torch.equal(dropped(x, old_key), memory(x, old_key))  # the content is one (old) key away


def test_edit_keeps_the_others_and_removes_the_documents_own_direction():
    memory = random_memory()
    edited = forget(memory, 2, "edit")
    assert edited.config.num_docs == 3 and edited.config.forgotten_directions == 1
    u = edited.forget_basis[0]
    before = memory.selection(memory.doc_keys).detach()
    after = edited.selection(edited.doc_keys).detach()
    assert torch.allclose(after, before[[0, 1, 3]], atol=1e-5)  # the others' selections are unchanged
    x = torch.randn(2, 5, 8)
    for j, k in zip((0, 1, 3), edited.doc_keys):
        assert torch.allclose(edited(x, k), memory(x, memory.doc_keys[j]), atol=1e-5)
    old = edited.selection(memory.doc_keys[2]).detach()
    assert abs(float(old @ u)) < 1e-5 and abs(float(before[2] @ u)) > 1e-3  # its own part is gone
    grid = torch.rand(50, 2) * 4 - 2  # and no key reaches that direction any more
    assert edited.selection(grid).detach().matmul(u).abs().max() < 1e-5
    # forgetting a second document stacks an orthonormal direction
    twice = forget(edited, 0, "edit")
    basis = twice.forget_basis
    assert basis.shape == (2, 6) and torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)


def test_edit_refuses_a_selection_the_others_span():
    memory = random_memory(num_docs=3, key_dim=2)
    with torch.no_grad():  # document 2's key = document 0's: its selection is one of the others'
        memory.doc_keys[2] = memory.doc_keys[0]
    with pytest.raises(ValueError, match="combination of the others"):
        forget_direction(memory, 2)
    with pytest.raises(ValueError, match="one document"):
        forget(random_memory(num_docs=1), 0, "drop_key")
    with pytest.raises(ValueError, match="shared memory"):
        forget(random_memory(use_keys=False), 0, "edit")
    with pytest.raises(ValueError, match="--method"):
        forget(random_memory(), 0, "erase")


def test_edited_memory_saves_and_loads(tmp_path):
    memory = random_memory()
    edited = forget(memory, 0, "edit")
    edited.save(tmp_path / "m", provenance={"documents": []})
    loaded = load_memory(tmp_path / "m")
    assert torch.equal(loaded.forget_basis, edited.forget_basis)
    k = memory.doc_keys[0]
    assert torch.equal(loaded.selection(k), edited.selection(k))


def test_provenance_renumbers_and_lists_the_forgotten():
    prov = {"documents": [{"index": i, "title": t, "source_row": 10 + i} for i, t in enumerate("ABC")]}
    out = forgotten_provenance(prov, 1, "edit")
    assert [(d["index"], d["title"]) for d in out["documents"]] == [(0, "A"), (1, "C")]
    assert out["forgotten"] == [{"title": "B", "source_row": 11, "index_before": 1, "method": "edit"}]
    assert len(prov["documents"]) == 3  # the input is not changed


@pytest.mark.parametrize("method", FORGET_METHODS)
def test_cli_writes_a_loadable_memory(tiny_run, tmp_path, capsys, method):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    title = load_memory_run(run, device="cpu").titles[1]
    assert forget_cli.main(["--run_dir", str(run), "--doc", title, "--method", method, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    out = run / f"memory_forget_1_{method}"
    assert result["out"] == str(out) and result["documents_left"] == 2
    tm = load_memory_run(out, device="cpu")
    assert title not in tm.titles and len(tm.titles) == 2
    assert tm.provenance["forgotten"][0]["title"] == title
    assert exit_code(forget_cli.main, ["--run_dir", str(run), "--doc", "1", "--method", method]) == 2  # out exists
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--doc", "5"], "--doc 5: no such document index"),
    (["--doc", "Nobody"], "no document has this title"),
    (["--doc", "0", "--method", "erase"], "invalid choice"),
])
def test_cli_errors(tiny_run, capsys, argv, message):  # noqa: F811
    code = exit_code(forget_cli.main, ["--run_dir", str(tiny_run), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("forget.py: error: ") and message in err[0], err


def test_cli_bad_run_folder(tmp_path, capsys):
    assert forget_cli.main(["--run_dir", str(tmp_path / "nope"), "--doc", "0"]) == 2
    assert capsys.readouterr().err.startswith("forget.py: error: ")


def test_evaluate_forget_report(tiny_run, tmp_path, capsys):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    argv = ["--run_dir", str(run), "--forget", "1", "--grid", "3", "--prompt_tokens", "8", "--new_tokens", "6"]
    assert em.main(argv) == 0
    assert "| old key |" in capsys.readouterr().out
    report = json.loads((run / "eval" / "forget_doc_01.json").read_text())
    assert set(report["after"]) == {"drop_key", "edit"} and report["grid"] == 3
    titles = load_memory_run(run, device="cpu").titles
    for state in [report["before"], *report["after"].values()]:
        assert set(state["document"]["remaining_keys"]) == {titles[0], titles[2]}
        assert set(state["others_right_key"]) == {titles[0], titles[2]}
    # drop_key leaves the weights: the old key and the others give what they gave before
    assert report["after"]["drop_key"]["document"]["old_key"] == report["before"]["document"]["old_key"]
    assert report["others_recall_change_max"]["drop_key"] == 0.0
    for method in FORGET_METHODS:  # the others' CE moves by rounding only
        for t, v in report["before"]["others_right_key"].items():
            assert report["after"][method]["others_right_key"][t]["ce"] == pytest.approx(v["ce"], abs=1e-4)
    assert em.main(["--run_dir", str(run), "--forget", "Nobody"]) == 2
    assert "--forget 'Nobody'" in capsys.readouterr().err
