"""Taking one document out of a trained memory, without retraining, and measuring what is left.

Two ways (both keep every other document's key and weights):

- `drop_key`: the document's key row is removed; it can no longer be selected by name. The
  weights are untouched, so its content is still there for whoever finds a key near the old one.
- `edit`: the key is dropped *and* the memory is edited so that no key can select the document's
  content any more. A document's content is read through its selection s_i (one number per
  entry). We split s_doc into the part that lies in the span of the other documents' selections
  and the rest u (orthogonal to all of them), and project u out of every selection the memory
  computes from then on (`forget_basis`, one unit vector per forgotten document). Every other
  document's selection is unchanged exactly (it has no component along u); under any key,
  the direction that only this document used is gone. Removing whole entries (the entries its
  selection uses and the others' do not) is the special case where u lies along entry axes; with
  tanh selections every document uses every entry, so there are none to remove.

`measure_forgetting` (evaluate_memory.py --forget DOC): before and after each way, the
document's ROUGE-L recall and CE under its old key, under every remaining key and under the best
key of a grid search over the key plane (the landscape grid, key_dim 2), next to the plain LM;
and every other document's right-key recall and CE.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docmem.atomic import write_atomic
from docmem.engines import NO_MEMORY
from docmem.errors import UnknownDocumentError, UsageError
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.generation import generate_greedy, no_prompt_reason, rouge_scores, segment_prompts
from docmem.evaluation.landscape import grid_keys, landscape_axis
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.run_folder import LoadedRun, load_run, resolve_run_dir
from docmem.sharding import ShardedMemory
from docmem.trained_memory import document_index
from document_memories import DocumentMemory
from utils import table_cell

FORGET_METHODS = ("drop_key", "edit")
MIN_UNIQUE_NORM = 1e-6  # below this the document's selection is a combination of the others'
RECALL_TOLERANCE = 0.05  # the others' right-key ROUGE-L recall may move at most this much


def _checked(memory: DocumentMemory, doc: int) -> None:
    if not memory.config.use_keys:
        raise UsageError("a shared memory (trained without keys) has no document to take out: the baseline must be "
                         "retrained without the document")
    n = memory.config.num_docs
    if not 0 <= doc < n:
        raise UsageError(f"document {doc}: no such document (0..{n - 1})")
    if n < 2:
        raise UsageError("the memory holds one document: forgetting it leaves nothing (train without it)")


@torch.no_grad()
def unique_part(memory: DocumentMemory, doc: int) -> tuple[torch.Tensor, float]:
    """(u, |u| / |s_doc|): s_doc minus its projection on the span of the other documents' selections."""
    _checked(memory, doc)
    selections = memory.selection(memory.doc_keys).double()
    mine = selections[doc]
    others = torch.cat([selections[:doc], selections[doc + 1:]])
    basis = torch.linalg.svd(others, full_matrices=False).Vh  # rows span the others' selections
    rank = int((torch.linalg.svdvals(others) > 1e-9 * max(1.0, float(others.abs().max()))).sum())
    unique = mine - basis[:rank].T @ (basis[:rank] @ mine)
    return unique, float(unique.norm()) / max(float(mine.norm()), 1e-30)


@torch.no_grad()
def forget_direction(memory: DocumentMemory, doc: int) -> torch.Tensor:
    """The unit vector of selection space that only `doc` uses."""
    unique, fraction = unique_part(memory, doc)
    if fraction < MIN_UNIQUE_NORM:
        raise UsageError(f"document {doc}'s selection is a combination of the others': no direction is its own, "
                         "so no edit can remove it without changing them (use drop_key, or retrain)")
    return (unique / unique.norm()).to(memory.doc_keys.dtype)


@torch.no_grad()
def forget(memory: DocumentMemory | ShardedMemory, doc: int, method: str) -> DocumentMemory | ShardedMemory:
    """A new memory without document `doc` (its key row removed; `edit` also projects out its direction).
    In a sharded memory the edit is made in the document's shard, and a shard left empty is dropped."""
    if method not in FORGET_METHODS:
        raise UsageError(f"--method {method!r}: allowed: {', '.join(FORGET_METHODS)}")
    if isinstance(memory, ShardedMemory):
        if not 0 <= doc < memory.config.num_docs:
            raise UsageError(f"document {doc}: no such document (0..{memory.config.num_docs - 1})")
        return memory.without(doc, lambda shard, row: forget(shard, row, method))
    _checked(memory, doc)
    direction = forget_direction(memory, doc) if method == "edit" else None
    config = replace(memory.config, num_docs=memory.config.num_docs - 1,
                     forgotten_directions=memory.config.forgotten_directions + (direction is not None))
    state = {k: v.detach().clone() for k, v in memory.state_dict().items()}
    state["doc_keys"] = torch.cat([state["doc_keys"][:doc], state["doc_keys"][doc + 1:]])
    if direction is not None:
        previous = state.get("forget_basis", torch.zeros(0, direction.shape[0], device=direction.device))
        state["forget_basis"] = torch.cat([previous, direction.unsqueeze(0).to(previous)])
    edited = DocumentMemory(config).to(memory.doc_keys.device)
    edited.load_state_dict(state)
    return edited.eval()


def forgotten_provenance(provenance: dict[str, Any], doc: int, method: str) -> dict[str, Any]:
    """The provenance of the memory after forgetting: documents renumbered, the forgotten one listed."""
    out = copy.deepcopy(provenance)
    documents = out.get("documents") or []
    gone = documents[doc] if doc < len(documents) else {"index": doc}
    out["documents"] = [dict(d, index=i) for i, d in enumerate(documents[:doc] + documents[doc + 1:])]
    out.setdefault("forgotten", []).append({"title": gone.get("title"), "source_row": gone.get("source_row"),
                                            "index_before": doc, "method": method})
    return out


# ---- measuring it ------------------------------------------------------------------------------

def _recalls(run: LoadedRun, memory: DocumentMemory, prompts: Sequence, plan: Sequence[tuple[str, int, Any]], options: EvalOptions
             ) -> dict[str, float]:
    """Mean ROUGE-L recall of greedy continuations per label; plan: (label, document, key or NO_MEMORY)."""
    rows = [(label, p, key) for label, doc, key in plan for p in prompts if p.doc == doc]
    if not rows:
        return {}
    keyed = [r for r in rows if isinstance(r[2], torch.Tensor)]
    plain = [r for r in rows if not isinstance(r[2], torch.Tensor)]
    texts: dict[int, list[int]] = {}
    layer = run.config.hook_memory_layer
    for group, keys in ((keyed, torch.stack([r[2] for r in keyed]) if keyed else None), (plain, NO_MEMORY)):
        if group:
            out = generate_greedy(run.foundation, memory, layer, [r[1].ids for r in group], keys,
                                  [len(r[1].reference_ids) for r in group], options.gen_batch_size)
            texts.update({id(r): ids for r, ids in zip(group, out)})
    decoded = [run.foundation.tokenizer.decode(texts[id(r)], skip_special_tokens=True) for r in rows]
    scores = rouge_scores(decoded, [r[1].reference for r in rows])
    by_label: dict[str, list[float]] = {}
    for (label, _, _), s in zip(rows, scores):
        by_label.setdefault(label, []).append(s["rougeL"]["recall"])
    return {label: float(np.mean(v)) for label, v in by_label.items()}


@dataclass
class _Probe:
    """What stays the same across the memories measured: the run, the document and its old key,
    the key grid searched, the prompts and the options."""
    run: LoadedRun
    doc: int
    old_key: torch.Tensor
    axis: np.ndarray
    prompts: Sequence
    options: EvalOptions


def _state(probe: _Probe, memory: DocumentMemory, remaining: dict[int, torch.Tensor]) -> dict[str, Any]:
    """One memory's numbers: the document under its old key, the remaining keys and the best grid key;
    every other document under its own key."""
    run, doc, old_key, axis, prompts, options = (probe.run, probe.doc, probe.old_key, probe.axis, probe.prompts,
                                                 probe.options)
    documents = run.documents
    table = CETable(replace(run, memory=memory), documents, options)
    candidates = grid_keys(axis).to(old_key)
    grid_ce = np.asarray(table.ce(doc, list(candidates)))
    best = candidates[int(np.argmin(grid_ce))]
    plan = [("old_key", doc, old_key), ("best_key", doc, best)]
    plan += [(f"key_of_{j}", doc, k) for j, k in remaining.items()]
    plan += [(f"right_key_{j}", j, k) for j, k in remaining.items()]
    recall = _recalls(run, memory, prompts, plan, options)
    doc_ce = table.ce(doc, [old_key, best, *remaining.values()])
    titles = [d.title for d in documents]

    def entry(label: str, of_doc: int, ce: float, **extra: Any) -> dict[str, Any]:
        return {**extra, **recall_entry(recall, label, of_doc, prompts, options, run.config.max_length), "ce": ce}

    return {
        "document": {
            "old_key": entry("old_key", doc, doc_ce[0]),
            "best_key": {**entry("best_key", doc, doc_ce[1], key=best.tolist()), "grid_ce_min": float(grid_ce.min())},
            "remaining_keys": {titles[j]: entry(f"key_of_{j}", doc, c) for j, c in zip(remaining, doc_ce[2:])},
        },
        "others_right_key": {titles[j]: entry(f"right_key_{j}", j, table.ce(j, [k])[0]) for j, k in remaining.items()},
    }


def recall_entry(recall: dict[str, float], label: str, doc: int, prompts: Sequence, options: EvalOptions,
                 max_length: int) -> dict[str, Any]:
    """{"rougeL_recall": value}; None and the reason where the document has no prompt to recall from."""
    if label in recall:
        return {"rougeL_recall": recall[label]}
    assert not any(p.doc == doc for p in prompts), f"{label}: document {doc} has prompts but no recall"
    return {"rougeL_recall": None, "rougeL_recall_missing": no_prompt_reason(options.prompt_tokens, max_length)}


def _largest_change(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> float | None:
    """The largest change of right-key recall over the documents recalled both times (None: none was)."""
    changes = [abs(after[t]["rougeL_recall"] - v["rougeL_recall"]) for t, v in before.items()
               if v["rougeL_recall"] is not None and after[t]["rougeL_recall"] is not None]
    return max(changes) if changes else None


def measure_forgetting(run: LoadedRun, doc: int, options: EvalOptions, methods: Sequence[str] = FORGET_METHODS
                       ) -> dict[str, Any]:
    """Before and after forgetting `doc` each way (key_dim 2 for the grid)."""
    memory, documents = run.memory, run.documents
    _checked(memory, doc)
    if memory.config.key_dim != 2:
        raise UsageError(f"the key search runs over the landscape grid, which needs key_dim 2 (this run: "
                         f"{memory.config.key_dim})")
    grid = options.grid or 10
    keys = memory.doc_keys.detach()
    axis = landscape_axis(keys.float().cpu().numpy(), grid)
    prompts, _ = segment_prompts(run.foundation.tokenizer, documents, options.prompt_tokens, options.new_tokens,
                                 run.config.max_length)
    old_key = keys[doc]
    before_remaining = {j: keys[j] for j in range(len(documents)) if j != doc}
    probe = _Probe(run, doc, old_key, axis, prompts, options)
    plain = recall_entry(_recalls(run, memory, prompts, [("plain", doc, NO_MEMORY)], options), "plain", doc, prompts,
                         options, run.config.max_length)
    plain_ce = CETable(run, documents, options).ce(doc, [NO_MEMORY])[0]
    report: dict[str, Any] = {
        "document": {"index": doc, "title": documents[doc].title, "old_key": old_key.tolist(),
                     # how much of its selection lies outside the span of the others' (what `edit` removes)
                     "selection_unique_fraction": unique_part(memory, doc)[1]},
        "grid": grid, "axis": [float(axis[0]), float(axis[-1])],
        "plain_lm": {**plain, "ce": plain_ce},
        "before": _state(probe, memory, before_remaining),
        "after": {}, "others_recall_change_max": {}, "others_within_tolerance": {},
        "tolerance": RECALL_TOLERANCE,
    }
    for method in methods:
        edited = forget(memory, doc, method)
        new_keys = edited.doc_keys.detach()
        remaining = {j: new_keys[j if j < doc else j - 1] for j in before_remaining}
        after = _state(probe, edited, remaining)
        report["after"][method] = after
        change = _largest_change(report["before"]["others_right_key"], after["others_right_key"])
        report["others_recall_change_max"][method] = change
        report["others_within_tolerance"][method] = None if change is None else change <= RECALL_TOLERANCE
    return report


def forgetting_table(report: dict[str, Any]) -> str:
    """A markdown table of the document's recall (and CE) under each condition, before and after."""
    states = [("before", report["before"])] + list(report["after"].items())
    header = "| condition | " + " | ".join(name for name, _ in states) + " |"
    lines = [header, "|" + "---|" * (len(states) + 1)]

    def cell(entry: dict[str, Any]) -> str:
        return f"{table_cell(entry['rougeL_recall'])} (CE {entry['ce']:.2f})"

    lines.append("| old key | " + " | ".join(cell(s["document"]["old_key"]) for _, s in states) + " |")
    for title in report["before"]["document"]["remaining_keys"]:
        lines.append(f"| key of {title} | " + " | ".join(cell(s["document"]["remaining_keys"][title])
                                                         for _, s in states) + " |")
    lines.append("| best key of the grid search | " + " | ".join(
        f"{cell(s['document']['best_key'])} at ({s['document']['best_key']['key'][0]:.2f}, "
        f"{s['document']['best_key']['key'][1]:.2f})" for _, s in states) + " |")
    plain = report["plain_lm"]
    lines.append("| plain LM | " + " | ".join(cell(plain) for _ in states) + " |")
    lines.append("| others' right key, max change of recall | – | " + " | ".join(
        table_cell(report["others_recall_change_max"][m]) for m in report["after"]) + " |")
    missing = report["before"]["document"]["old_key"].get("rougeL_recall_missing")
    if missing:
        lines.append(f"\nRecall –: {missing}.")
    return "\n".join(lines)


def evaluate_forgetting(run_dir: str | Path, doc: str, options: EvalOptions) -> dict[str, Any]:
    """evaluate_memory.py --forget DOC: measure, write RUN/eval/forget_doc_NN.{json,md}, return the report."""
    try:
        run = load_run(resolve_run_dir(run_dir), options.validate())
        index = document_index([{"index": i, "title": d.title} for i, d in enumerate(run.documents)], doc)
        report = measure_forgetting(run, index, options)
    except UnknownDocumentError as err:  # the flag here is --forget
        raise UnknownDocumentError(str(err).replace("--doc", "--forget")) from err
    out = run.run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"forget_doc_{index:02d}.json", report)
    write_atomic(out / f"forget_doc_{index:02d}.md",
        f"Forgetting document {index} ({report['document']['title']}): its ROUGE-L recall (and CE) before and "
        f"after each way\n\n{forgetting_table(report)}\n")
    return report
