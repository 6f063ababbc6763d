"""The forgetting table an attacker cannot easily beat (evaluate_memory.py --forget DOC --reference RUN
--forgotten MEM ...): the document's CE under its old key, the other keys, the best grid key, the
key-search attack (docmem/forgetting/key_attack.py) and the reference's attack (a memory trained with the same
settings and seed without the document: what "never trained on it" looks like), next to the plain LM;
the verbatim tokens greedy generation reproduces under the attack's best key; every other document's
right-key ROUGE-L recall. One row per memory: before, and each forgotten memory given.
Writes RUN/eval/forget_attack_doc_NN.json and .md.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from docmem.atomic import write_atomic
from docmem.engines import NO_MEMORY
from docmem.errors import EvalError
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.generation import Prompt, no_prompt_reason, segment_prompts
from docmem.evaluation.landscape import grid_keys, landscape_axis
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.forgetting.edits import _recalls
from docmem.forgetting.key_attack import AttackSettings, attack, attack_starts, verbatim_tokens
from docmem.run_folder import LoadedRun, load_run, resolve_run_dir
from docmem.sharding import load_any_memory
from docmem.trained_memory import document_index, locate_memory, read_provenance
from utils import table_cell


def _memory_row(run: LoadedRun, memory: Any, titles: list[str], doc: int, options: EvalOptions,
                settings: AttackSettings) -> dict[str, Any]:
    """One memory's numbers for document `doc` of `run` (titles: the memory's documents, in key order)."""
    documents = run.documents
    table = CETable(replace(run, memory=memory), documents, options)
    keys = memory.doc_keys.detach()
    rows = {t: i for i, t in enumerate(titles)}
    old_key = run.memory.doc_keys.detach()[doc].to(keys)
    others = [rows[d.title] for j, d in enumerate(documents) if j != doc and d.title in rows]
    out: dict[str, Any] = {"old_key_ce": table.ce(doc, [old_key])[0]}
    key_ce = torch.tensor(table.ce(doc, [keys[j] for j in range(keys.shape[0])]))  # every key of this memory
    out["other_keys_ce_min"] = float(key_ce[others].min()) if others else None
    if keys.shape[1] == 2 and options.grid:
        axis = landscape_axis(run.memory.doc_keys.detach().float().cpu().numpy(), options.grid)
        out["grid_ce_min"] = min(table.ce(doc, list(grid_keys(axis).to(keys))))
    starts, labels = attack_starts(old_key, keys, settings, key_ce)
    found = attack(table.engine, table.by_doc[doc], starts, labels, settings)
    out.update(attack_ce=found.best_ce, attack_key=found.best_key.tolist(),
               attack_ce_at_old_key_start=found.start_ce[0])
    prompts, _ = segment_prompts(run.foundation.tokenizer, documents, options.prompt_tokens, options.new_tokens,
                                 run.config.max_length)
    out.update(_verbatim(run, memory, prompts, doc, options, found.best_key, "attack_verbatim_tokens"))
    plan = [(d.title, j, keys[rows[d.title]]) for j, d in enumerate(documents) if j != doc and d.title in rows]
    recall = _recalls(run, memory, prompts, plan, options)  # None: a document without a prompt
    out["others_right_key_recall"] = {title: recall.get(title) for title, _, _ in plan}
    return out


def _verbatim(run: LoadedRun, memory: Any, prompts: list[Prompt], doc: int, options: EvalOptions, key: Any,
              name: str) -> dict[str, Any]:
    """{name: the verbatim tokens of the document's first prompt under `key`}; None and the reason where the
    document has no prompt."""
    first = next((p for p in prompts if p.doc == doc), None)
    if first is None:
        return {name: None, f"{name}_missing": no_prompt_reason(options.prompt_tokens, run.config.max_length)}
    return {name: verbatim_tokens(run.foundation, memory, run.config.hook_memory_layer, first.ids, first.reference_ids,
                                  key)}


def _reference_row(report: dict[str, Any], run: LoadedRun, reference: str | None, which: tuple[list[str], int],
                   how: tuple[EvalOptions, AttackSettings]) -> None:
    """report["reference"]: the reference run's memory (trained without the document), attacked the same way."""
    if reference is None:
        return
    (titles, doc), (options, settings) = which, how
    ref = load_run(resolve_run_dir(reference), options)
    ref_titles = [d.title for d in ref.documents]
    if titles[doc] in ref_titles:
        raise EvalError(f"--reference {reference}: it was trained on {titles[doc]!r}; train it with --exclude_docs")
    report["reference"] = _memory_row(run, ref.memory, ref_titles, doc, options, settings)


def attack_report(run_dir: str, doc_arg: str, options: EvalOptions, reference: str | None,
                  forgotten: list[str]) -> dict[str, Any]:
    """The table's numbers: before, each forgotten memory, the reference, the plain LM."""
    run = load_run(resolve_run_dir(run_dir), options)
    titles = [d.title for d in run.documents]
    doc = document_index([{"index": i, "title": t} for i, t in enumerate(titles)], doc_arg)
    settings = AttackSettings(per_pass=options.key_sets_per_pass)
    report: dict[str, Any] = {"document": {"index": doc, "title": titles[doc]}, "settings": asdict(settings),
                              "rows": {"before": _memory_row(run, run.memory, titles, doc, options, settings)}}
    table = CETable(run, run.documents, options)
    prompts, _ = segment_prompts(run.foundation.tokenizer, run.documents, options.prompt_tokens, options.new_tokens,
                                 run.config.max_length)
    report["plain_lm"] = {"ce": table.ce(doc, [NO_MEMORY])[0],
                          **_verbatim(run, run.memory, prompts, doc, options, NO_MEMORY, "verbatim_tokens")}
    folder = run.run_dir / EVAL_DIR
    folder.mkdir(exist_ok=True)
    out = folder / f"forget_attack_doc_{doc:02d}.json"
    write_json(out, report)  # after every row: a long measurement keeps what it has
    for i, path in enumerate(forgotten):
        memory_dir, mem_run = locate_memory(path)
        provenance = read_provenance(memory_dir, mem_run)
        method = ((provenance.get("forgotten") or [{}])[-1]).get("method") or Path(path).name
        if method in report["rows"]:  # two memories forgotten the same way: one row each, named by folder
            method = f"{method} ({Path(path).name})"
        mem_titles = [d["title"] for d in provenance.get("documents") or []]
        memory = load_any_memory(memory_dir, device=run.memory.doc_keys.device).eval()
        report["rows"][method] = _memory_row(run, memory, mem_titles, doc, options, settings)
        write_json(out, report)
        if i == 0:  # the reference next to the first method, before the others
            _reference_row(report, run, reference, (titles, doc), (options, settings))
            write_json(out, report)
    if not forgotten:
        _reference_row(report, run, reference, (titles, doc), (options, settings))
    write_json(out, report)
    write_atomic(folder / f"forget_attack_doc_{doc:02d}.md", attack_table(report) + "\n")
    return report


def attack_table(report: dict[str, Any]) -> str:
    """Markdown: one row per memory; the reference's attack best and the plain LM in every row."""
    ref = report.get("reference") or {}
    plain = report["plain_lm"]
    _f = partial(table_cell, none="-")  # this table marks a missing value with a hyphen
    lines = [f"Document {report['document']['index']} ({report['document']['title']!r}): mean token CE (lower = "
             "better recalled); verbatim = tokens greedy generation reproduces under the attack's best key",
             "", "| memory | old key | other keys (min) | grid best | attack best | verbatim | reference attack best | "
             "reference verbatim | plain LM | plain verbatim | others' right-key recall (mean) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in report["rows"].items():
        recalls = [r for r in row["others_right_key_recall"].values() if r is not None]
        lines.append(f"| {name} | {_f(row['old_key_ce'])} | {_f(row['other_keys_ce_min'])} | {_f(row.get('grid_ce_min'))} "
                     f"| {_f(row['attack_ce'])} | {_f(row['attack_verbatim_tokens'])} | {_f(ref.get('attack_ce'))} | "
                     f"{_f(ref.get('attack_verbatim_tokens'))} | {_f(plain['ce'])} | {_f(plain['verbatim_tokens'])} | "
                     f"{_f(sum(recalls) / len(recalls) if recalls else None)} |")
    return "\n".join(lines)

