"""Approximate forgetting (forget.py --method unlearn), the key-search attack, and evaluate_memory.py
--forget's attack table against a reference run trained without the document."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

import evaluate_memory as em
import forget as forget_cli
from docmem.batching import make_batches
from docmem.engines import FastEngine
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.options import EvalOptions
from docmem.forgetting.key_attack import AttackSettings, attack, attack_starts
from docmem.forgetting.unlearning import unlearn_batch
from docmem.run_folder import load_run
from fixtures_memory import copy_run, exit_code, tiny_lm_dir, tiny_run  # noqa: F401
from fixtures_tiny import run_training, tiny_argv


def test_the_attack_descends_and_never_ends_above_its_starts(tiny_run):  # noqa: F811
    run = load_run(tiny_run)
    table = CETable(run, run.documents, EvalOptions())
    keys = run.memory.doc_keys.detach()
    settings = AttackSettings(steps=4, lr=0.2, random_starts=2, grid=2)
    starts, labels = attack_starts(keys[0], keys, settings)
    assert labels[0] == "old_key" and starts.shape == (1 + 3 + 2 + 4, keys.shape[1])
    found = attack(table.engine, table.by_doc[0], starts, labels, settings)
    assert found.best_ce <= min(found.start_ce) + 1e-6
    assert abs(found.start_ce[0] - table.ce(0, [keys[0]])[0]) < 1e-4  # the old key's start is its CE
    assert found.best_ce < min(found.start_ce[4:])  # descent improves on the random starts


def test_past_max_key_starts_the_lowest_ce_keys_start_the_descent():
    keys = torch.arange(20.0).reshape(10, 2)
    key_ce = torch.tensor([5.0, 1.0, 9.0, 0.5, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0])
    settings = AttackSettings(random_starts=1, grid=0, max_key_starts=3)
    starts, labels = attack_starts(keys[0], keys, settings, key_ce)
    assert labels[:4] == ["old_key", "key_1", "key_3", "key_7"] and len(labels) == 5  # + one random start
    assert torch.equal(starts[1:4], keys[[1, 3, 7]])
    with pytest.raises(ValueError, match="max_key_starts"):
        attack_starts(keys[0], keys, settings)  # past the cap the starts need the document's CE under each key
    everything, _ = attack_starts(keys[0], keys, AttackSettings(random_starts=1, grid=0, max_key_starts=10))
    assert torch.equal(everything[1:11], keys)  # up to the cap every key starts, as before


def test_unlearn_then_the_attack_table(tiny_run, tiny_lm_dir, tmp_path):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    out = tmp_path / "unlearned"
    assert forget_cli.main(["--run_dir", str(run), "--doc", "0", "--method", "unlearn", "--steps", "3",
                            "--out", str(out), "--device", "cpu"]) == 0
    config = json.loads((out / "memory_config.json").read_text())
    assert config["num_docs"] == 2 and config["provenance"]["forgotten"][-1]["method"] == "unlearn"
    ref = run_training(tiny_argv(tiny_lm_dir, tmp_path / "ref", "--lr", "3e-2", "--exclude_docs", "0",
                                 num_epochs=4, save_freq=4))
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert em.main(["--run_dir", str(run), "--forget", "0", "--reference", str(tmp_path / "ref" / "run_0"),
                    "--forgotten", str(out), str(out), "--grid", "3", "--new_tokens", "8", "--prompt_tokens", "8"]) == 0
    report = json.loads((run / "eval" / "forget_attack_doc_00.json").read_text())
    # two memories forgotten the same way: a row each (the second once overwrote the first)
    assert set(report["rows"]) == {"before", "unlearn", "unlearn (unlearned)"} and "attack_ce" in report["reference"]
    assert abs(report["rows"]["unlearn"]["attack_ce"] - report["rows"]["unlearn (unlearned)"]["attack_ce"]) < 1e-5
    before = report["rows"]["before"]
    assert before["attack_ce"] <= before["old_key_ce"] + 1e-6
    assert report["rows"]["unlearn"]["old_key_ce"] > before["old_key_ce"]
    assert (run / "eval" / "forget_attack_doc_00.md").read_text().count("\n| ") == 5  # header, rule, 3 rows
    assert exit_code(forget_cli.main, ["--run_dir", str(run), "--doc", "7", "--method", "unlearn"]) == 2


def _per_document_ce(engine: FastEngine, batches: list, key: torch.Tensor) -> torch.Tensor:
    """The computation one pass replaced: a document's token-mean CE over its own batches, one key."""
    total, tokens = 0, 0
    for batch in batches:
        n = int((batch.labels[:, 1:] != -100).sum())
        total = total + engine.losses(batch, [key.expand(batch.input_ids.shape[0], -1)])[0] * n
        tokens += n
    return total / tokens


@pytest.mark.parametrize("batch_size", [16, 1])  # one chunk a document; one chunk a segment (weighted means)
def test_one_pass_equals_the_per_document_losses(tiny_run, batch_size):  # noqa: F811
    """Each other document under its own key and D under its old key and every attacker key, in one
    batch and one engine pass: the same retain and forget terms, and gradients, as separate passes."""
    run = load_run(tiny_run)
    # segments of unequal lengths: padding inside a document's batch, chunks of unequal weight
    documents = [replace(d, segments=[d.segments[0], d.segments[1][:len(d.segments[1]) // (2 + i)]])
                 for i, d in enumerate(run.documents)]
    run = replace(run, config=replace(run.config, batch_size=batch_size), documents=documents)
    doc, others = 1, [0, 2]
    memory = copy.deepcopy(run.memory)
    keys = memory.doc_keys.detach()
    attackers = torch.cat([keys[others], torch.randn(2, keys.shape[1], generator=torch.Generator().manual_seed(0))])
    by_doc: list[list] = [[] for _ in run.documents]
    for batch in make_batches(run.documents, run.foundation.tokenizer, batch_size, run.config.max_length):
        by_doc[int(batch.doc_ids[0])].append(batch)
    assert all(len(b) == (1 if batch_size == 16 else 2) for b in by_doc)

    engine = FastEngine(run.foundation, memory, run.config.hook_memory_layer, torch.float32)
    ce_alone = torch.stack([_per_document_ce(engine, by_doc[j], keys[j]) for j in others]
                           + [_per_document_ce(engine, by_doc[doc], k) for k in [keys[doc], *attackers]])
    target = float(ce_alone[len(others):].detach().median())  # the hinge live for some keys, not all

    def terms(ce_of_docs: torch.Tensor) -> torch.Tensor:
        return torch.stack([ce_of_docs[:len(others)].mean(), torch.relu(target - ce_of_docs[len(others):]).mean()])

    alone = terms(ce_alone)
    alone_grad = torch.autograd.grad(alone.sum(), list(memory.trainable_parameters()))
    rows = unlearn_batch(run, doc, 1 + len(attackers))
    assert rows.order == [*others, *[doc] * 5] and rows.retained == len(others)
    one = FastEngine(run.foundation, memory, run.config.hook_memory_layer, torch.float32)
    joint = terms(rows.document_ce(one, rows.keys_of_rows(torch.cat([keys[others], keys[doc:doc + 1], attackers]))))
    joint_grad = torch.autograd.grad(joint.sum(), list(memory.trainable_parameters()))
    torch.testing.assert_close(joint, alone, rtol=1e-5, atol=1e-6)
    for a, b in zip(joint_grad, alone_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert alone[1] > 0
