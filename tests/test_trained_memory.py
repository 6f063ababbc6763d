"""The self-describing memory/ and load_memory_run: provenance and checksum written by training,
an older memory/ without them still loads, and the loaded object selects and generates."""
from __future__ import annotations

import json

import pytest
import torch

import wikitext
from docmem.errors import MemoryFileError
from docmem.trained_memory import MemoryRunError, UnknownDocumentError, load_memory_run
from document_memories import CONFIG_NAME, load_memory
from fixtures_memory import copy_run, tiny_lm_dir, tiny_run  # noqa: F401


def test_training_writes_provenance_and_checksum(tiny_run):  # noqa: F811
    data = json.loads((tiny_run / "memory" / CONFIG_NAME).read_text())
    prov = data["provenance"]
    assert prov["hook_memory_layer"] == 2 and prov["precision"] == "fp32" and prov["dtype"] == "float32"
    assert prov["model"]["lm_path"].endswith(tiny_run.parents[2].name) or prov["model"]["lm_path"]
    assert prov["model"]["num_blocks"] == 3 and prov["model"]["hidden_size"] == 32
    assert prov["docmem_version"]
    assert [d["index"] for d in prov["documents"]] == [0, 1, 2]
    assert all(d["title"] and isinstance(d["source_row"], int) and d["segments"] == 2 for d in prov["documents"])
    assert len(data["weights_sha256"]) == 64


def test_load_from_run_folder_memory_folder_and_save_dir(tiny_run):  # noqa: F811
    for path in (tiny_run, tiny_run / "memory", tiny_run.parent):
        tm = load_memory_run(path, device="cpu")
        assert tm.layer == 2 and len(tm.titles) == 3 and tm.memory.config.num_docs == 3
        assert not tm.memory.training and not any(p.requires_grad for p in tm.foundation.model.parameters())


def test_older_memory_without_provenance_still_loads(tiny_run, tmp_path):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    path = run / "memory" / CONFIG_NAME
    data = json.loads(path.read_text())
    data.pop("provenance"), data.pop("weights_sha256"), data.pop("forgotten_directions")
    path.write_text(json.dumps(data))
    tm = load_memory_run(run, device="cpu")
    assert tm.titles == load_memory_run(tiny_run, device="cpu").titles
    assert tm.provenance["hook_memory_layer"] == 2  # filled in from config.yaml
    # without the run's config.yaml beside it, an old memory/ cannot say what it belongs to
    lone = tmp_path / "lone"
    (run / "memory").rename(lone)
    with pytest.raises(MemoryRunError, match="config.yaml"):
        load_memory_run(lone, device="cpu")


def test_checksum_mismatch_is_refused(tiny_run, tmp_path):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    data = json.loads((run / "memory" / CONFIG_NAME).read_text())
    data["weights_sha256"] = "0" * 64
    (run / "memory" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(MemoryFileError, match="SHA-256"):
        load_memory(run / "memory")
    with pytest.raises(MemoryRunError, match="SHA-256"):
        load_memory_run(run, device="cpu")


def test_bad_paths(tmp_path):
    with pytest.raises(MemoryRunError, match="no such folder"):
        load_memory_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemoryRunError):
        load_memory_run(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemoryRunError, match="not a folder"):
        load_memory_run(tmp_path / "file")


def test_select_by_index_or_title_and_conditions(tiny_run):  # noqa: F811
    tm = load_memory_run(tiny_run, device="cpu")
    title = tm.titles[1]
    assert tm.doc_index(1) == tm.doc_index("1") == tm.doc_index(title) == 1
    for bad in (3, -1, "No Such Title"):
        with pytest.raises(UnknownDocumentError):
            tm.doc_index(bad)
    assert torch.equal(tm.select(title).condition, tm.memory.doc_keys[1:2])
    block = tm.foundation.block(tm.layer)
    doc0 = tm.select(0)
    keyed = doc0.generate(max_new_tokens=6)  # default prompt: the title as it opens the document
    assert not block._forward_hooks  # the hook is gone after generate
    assert tm.openings[0] == f"= {tm.titles[0]} ="
    assert keyed == doc0.generate(tm.openings[0], max_new_tokens=6)
    plain = tm.plain_lm().generate(tm.titles[0], max_new_tokens=6)
    # the plain LM is the model without any hook
    ids = tm.foundation.tokenizer(tm.titles[0], return_tensors="pt")
    expected = tm.foundation.model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert plain == tm.foundation.tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(ValueError, match="no prompt"):
        tm.no_key().generate()
    sampled = [tm.select(0).generate(max_new_tokens=6, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # seeded


def test_opening_is_the_heading_as_trained_and_the_title_without_one(tiny_run):  # noqa: F811
    assert wikitext.opening("= Abc Def = The Abc Def is", "Abc Def") == "= Abc Def ="
    assert wikitext.opening("Some words that open it", "Some words") == "Some words"
    tm = load_memory_run(tiny_run, device="cpu")
    for entry in tm.documents:  # an older memory/ without `opening` prompts with the bare title
        entry.pop("opening")
    assert tm.openings == tm.titles


def test_views_are_independent_and_share_the_weights(tiny_run):  # noqa: F811
    """The issue's sequence: `a = tm.select(0); b = tm.plain_lm(); a.generate(...)` generates
    document 0 with `a` and the plain LM with `b`, in either order."""
    alone = load_memory_run(tiny_run, device="cpu")  # what each condition gives on a fresh load
    prompt, n = alone.openings[0], 8
    expected_doc = alone.select(0).generate(prompt, max_new_tokens=n)
    expected_plain = alone.plain_lm().generate(prompt, max_new_tokens=n)
    expected_no_key = alone.no_key().generate(prompt, max_new_tokens=n)
    assert expected_doc != expected_plain  # the memory changes what is generated, so a mix-up would show

    tm = load_memory_run(tiny_run, device="cpu")
    a = tm.select(0)
    b = tm.plain_lm()
    assert a is not b and a is not tm
    assert a.generate(prompt, max_new_tokens=n) == expected_doc
    assert b.generate(prompt, max_new_tokens=n) == expected_plain
    a, b = tm.plain_lm(), tm.select(0)  # the other order, each generated after the other was made
    assert b.generate(prompt, max_new_tokens=n) == expected_doc
    assert a.generate(prompt, max_new_tokens=n) == expected_plain
    c = tm.no_key()
    assert tm.select(1).selected == 1 and c.generate(prompt, max_new_tokens=n) == expected_no_key
    # the load itself stays as loaded: the plain LM, nothing selected
    assert tm.label == "no_memory" and tm.selected is None
    assert tm.generate(prompt, max_new_tokens=n) == expected_plain
    # views share the loaded LM and memory: no copy of any weight
    assert a.memory is tm.memory and b.foundation is tm.foundation
    assert b.memory.doc_keys.data_ptr() == tm.memory.doc_keys.data_ptr()
    with pytest.raises(AttributeError):
        a.selected = 2  # a view cannot be changed behind another's back
