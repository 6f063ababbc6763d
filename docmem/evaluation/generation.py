"""Recall in generation: each segment's first tokens as a prompt, a greedy continuation under
each condition (the right key, other documents' keys, the memory without a key, no memory),
scored by ROUGE recall against the segment's true next tokens (eval/recall.json)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm

import wikitext
from docmem.batching import left_pad
from docmem.engines import NO_MEMORY, KeySet
from docmem.errors import EvalError
from docmem.evaluation.options import EvalOptions
from docmem.greedy import DecodeHooks, decode_greedy, prompt_pass_once_per_prompt
from docmem.run_folder import LoadedRun
from document_memories import DocumentMemory
from foundations import Foundation
from hook_lm import attach_memory

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MEASURES = ("recall", "precision", "f1")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, dict[str, float]]]:
    """ROUGE-1/2/L of each prediction against its reference: [{rouge: {recall, precision, f1}}]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    out = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # score(target, prediction)
        out.append({r: {"recall": scores[r].recall, "precision": scores[r].precision, "f1": scores[r].fmeasure}
                    for r in ROUGE_TYPES})
    return out


def mean_scores(scores: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]] | None:
    """Element-wise mean of rouge_scores() entries; None for an empty list."""
    if not scores:
        return None
    return {r: {m: float(np.mean([s[r][m] for s in scores])) for m in MEASURES} for r in ROUGE_TYPES}


def other_documents(doc: int, num_docs: int, limit: int) -> list[int]:
    """Up to `limit` other documents, deterministic and spread evenly over the rest, starting
    with the next one (so every key serves as a wrong key about equally often)."""
    others = [(doc + step) % num_docs for step in range(1, num_docs)]
    if len(others) <= limit:
        return others
    picks = np.linspace(0, len(others) - 1, limit).round().astype(int)
    return [others[i] for i in picks]


@dataclass
class Prompt:
    doc: int
    segment: int
    ids: list[int]  # the first prompt_tokens tokens of the segment
    reference_ids: list[int]  # the segment's next (up to new_tokens) tokens
    reference: str  # reference_ids decoded


def segment_prompts(tokenizer, documents: Sequence, prompt_tokens: int, new_tokens: int, max_length: int
                    ) -> tuple[list[Prompt], int]:
    """Every segment split into prompt and reference, tokenized as in training (same special
    tokens, truncated to max_length: the memory saw only those tokens). Segments of fewer than
    prompt_tokens + 1 tokens have nothing to recall: skipped and counted."""
    prompts, skipped = [], 0
    for d, doc in enumerate(documents):
        for s, segment in enumerate(doc.segments):
            ids = tokenizer(segment, truncation=True, max_length=max_length)["input_ids"]
            if len(ids) < prompt_tokens + 1:
                skipped += 1
                continue
            reference_ids = ids[prompt_tokens: prompt_tokens + new_tokens]
            prompts.append(Prompt(d, s, ids[:prompt_tokens], reference_ids,
                                  tokenizer.decode(reference_ids, skip_special_tokens=True)))
    return prompts, skipped


def no_prompt_reason(prompt_tokens: int, max_length: int) -> str:
    """Why a document has no recall: none of its segments is long enough to be split into a prompt and a reference."""
    return (f"no segment of the document has more than --prompt_tokens {prompt_tokens} tokens (after truncation to "
            f"--max_length {max_length}): nothing to recall")


def prompt_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of token rows, padded on the left so every row's last token is real."""
    width = max(len(r) for r in rows)
    ids = [left_pad(torch.tensor(list(r), dtype=torch.long).view(1, -1), width, pad_id) for r in rows]
    mask = [left_pad(torch.ones(1, len(r), dtype=torch.long), width, 0) for r in rows]
    return torch.cat(ids), torch.cat(mask)


def _stop_ids(foundation: Foundation) -> set[int]:
    found = {foundation.tokenizer.eos_token_id}
    generation = getattr(foundation.model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    found.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in found if i is not None}


class RowConditions(nn.Module):
    """The memory under a condition of each row's own: a (key_dim,) key, None (the memory without a
    key) or NO_MEMORY (the block's output passes unchanged), so one batch can hold every condition."""

    def __init__(self, memory: DocumentMemory, conditions: Sequence[KeySet]) -> None:
        super().__init__()
        self.memory = memory
        keyed = [i for i, c in enumerate(conditions) if isinstance(c, torch.Tensor)]
        self.keyed = torch.tensor(keyed, dtype=torch.long)
        self.keyless = torch.tensor([i for i, c in enumerate(conditions) if c is None], dtype=torch.long)
        self.rows = len(conditions)
        self.keys = torch.stack([conditions[i] for i in keyed]) if keyed else None

    def forward(self, hidden: torch.Tensor, _keys: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.keyed) == self.rows:  # every row keyed: the memory on the whole batch
            return self.memory(hidden, self.keys)
        if len(self.keyless) == self.rows:
            return self.memory(hidden, None)
        out = hidden.clone()  # rows of the plain LM keep the block's output
        if len(self.keyed):
            out[self.keyed] = self.memory(hidden[self.keyed], self.keys).to(out.dtype)
        if len(self.keyless):
            out[self.keyless] = self.memory(hidden[self.keyless], None).to(out.dtype)
        return out


def row_conditions(keys: KeySet | Sequence[KeySet], rows: int) -> list[KeySet]:
    """One condition per row: a (rows, key_dim) tensor split into its rows, None or NO_MEMORY
    repeated, or a list of per-row conditions checked for length."""
    if isinstance(keys, torch.Tensor):
        if keys.shape[0] != rows:
            raise ValueError(f"{keys.shape[0]} keys for {rows} prompts")
        return list(keys)
    if keys is None or isinstance(keys, str):
        return [keys] * rows
    conditions = list(keys)
    if len(conditions) != rows:
        raise ValueError(f"{len(conditions)} keys for {rows} prompts")
    return conditions


GenerateBatch = Callable[[list[int], dict[str, Any]], "torch.Tensor | list[list[int]]"]
# (rows, generate()'s kwargs) -> generate()'s token ids (prompt and continuation), or each row's new tokens


@torch.no_grad()
def greedy_rows(foundation: Foundation, prompts: Sequence[Sequence[int]], wanted: Sequence[int], batch_size: int,
                generate_batch: GenerateBatch, bar: tqdm | None = None) -> list[list[int]]:
    """Greedy continuations of token rows (new ids, cut at the first end-of-text and at each row's wanted
    length). Rows are batched longest-wanted first, so each batch generates only as far as its longest
    row needs; generate_batch(rows, kwargs) runs one batch (setting up that batch's conditions first).
    A progress bar counts the tokens wanted (bar: one the caller advances as it decodes; else one that
    advances by whole batches); each batch tops it up by what its rows did not need."""
    pad_id = foundation.tokenizer.pad_token_id
    stop = _stop_ids(foundation)
    order = sorted(range(len(prompts)), key=lambda i: -wanted[i])  # stable: ties keep prompt order
    out: list[list[int]] = [[] for _ in prompts]
    progress = bar if bar is not None else generation_bar(wanted)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        ids, mask = prompt_batch([prompts[i] for i in rows], pad_id)
        device = foundation.input_device
        goal = progress.n + sum(max(1, wanted[i]) for i in rows)
        generated = generate_batch(rows, {
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "do_sample": False,
            "max_new_tokens": max(1, max(wanted[i] for i in rows)), "min_new_tokens": 0, "pad_token_id": pad_id,
            "num_beams": 1, "temperature": None, "top_p": None, "top_k": None})
        progress.update(max(0, goal - progress.n))
        new = generated[:, ids.shape[1]:].tolist() if isinstance(generated, torch.Tensor) else generated
        for i, row in zip(rows, new):
            cut = next((t for t, token in enumerate(row) if token in stop), len(row))
            out[i] = row[:min(cut, wanted[i])]
    if bar is None:
        progress.close()
    return out


def generation_bar(wanted: Sequence[int]) -> tqdm:
    return tqdm(total=sum(max(1, w) for w in wanted), desc="generating", unit="token", dynamic_ncols=True,
                leave=False)


@torch.no_grad()
def generate_greedy(foundation: Foundation, memory: DocumentMemory, layer: int, prompts: Sequence[Sequence[int]],
                    keys: KeySet | Sequence[KeySet],
                    new_tokens: int | Sequence[int], batch_size: int = 128) -> list[list[int]]:
    """Greedy continuations (new token ids, cut at the first end-of-text) with the memory on `layer`.

    keys: a (rows, key_dim) tensor (one key per prompt), None (memory without a key),
    engines.NO_MEMORY (the plain LM), or a list with one of those per row (a (key_dim,) key, None
    or NO_MEMORY): every condition then shares the batches. new_tokens: one count for all rows,
    or one per row. Rows are batched longest-wanted first (greedy_rows) and decoded by
    greedy.decode_greedy, which drops each row from its batch when it has its tokens; rows that share a
    prompt run the blocks up to the memory's once (greedy.prompt_pass_once_per_prompt). The result is
    in prompt order; a progress bar counts the tokens."""
    conditions = row_conditions(keys, len(prompts))
    wanted = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens)
    if len(wanted) != len(prompts):
        raise ValueError(f"{len(wanted)} token counts for {len(prompts)} prompts")
    stop = _stop_ids(foundation)
    with attach_memory(foundation.block(layer), memory) as hook, generation_bar(wanted) as bar:
        prompt_pass = prompt_pass_once_per_prompt(foundation, layer, hook)

        def generate_batch(rows: list[int], kwargs: dict[str, Any]) -> list[list[int]]:
            def condition_rows(alive: list[int]) -> None:  # the memory's per-row conditions, narrowed with the batch
                batch_conditions = [conditions[rows[a]] for a in alive]
                hook.enabled = any(not (isinstance(c, str) and c == NO_MEMORY) for c in batch_conditions)
                hook.memory = RowConditions(memory, batch_conditions)

            condition_rows(list(range(len(rows))))
            return decode_greedy(foundation.model, kwargs["input_ids"], kwargs["attention_mask"],
                                 [max(1, wanted[i]) for i in rows], stop,
                                 DecodeHooks(on_rows=condition_rows, on_tokens=bar.update, prefill=prompt_pass))

        return greedy_rows(foundation, prompts, wanted, batch_size, generate_batch, bar)


Plans = dict[str, list[tuple[int, int | None]]]  # condition -> rows of (prompt index, condition's document or None)


def prompts_of(tokenizer: Any, documents: Sequence[wikitext.Document], options: EvalOptions, max_length: int
               ) -> tuple[list[Prompt], int]:
    """segment_prompts, refusing when every segment is too short to have anything to recall."""
    prompts, skipped = segment_prompts(tokenizer, documents, options.prompt_tokens, options.new_tokens, max_length)
    if not prompts:
        raise EvalError(f"every segment is shorter than --prompt_tokens {options.prompt_tokens} + 1 tokens: "
                        "lower --prompt_tokens")
    return prompts, skipped


def plan_conditions(prompts: Sequence[Prompt], num_docs: int, kind: str, max_other_keys: int) -> Plans:
    """The conditions of a recall evaluation: kind keyed (right_key, other_keys, no_key, no_memory),
    per_document (a method with one condition per document and no 'no key': right_key, other_keys,
    no_memory) or shared (memory, no_memory)."""
    every = [(i, None) for i in range(len(prompts))]
    plans: Plans = {}
    if kind in ("keyed", "per_document"):
        plans["right_key"] = [(i, p.doc) for i, p in enumerate(prompts)]
        others = [(i, j) for i, p in enumerate(prompts) for j in other_documents(p.doc, num_docs, max_other_keys)]
        if others:
            plans["other_keys"] = others
        if kind == "keyed":
            plans["no_key"] = list(every)
    else:
        plans["memory"] = list(every)
    plans["no_memory"] = list(every)
    return plans


def evaluate_recall(run: LoadedRun, documents: Sequence[wikitext.Document], options: EvalOptions) -> dict[str, Any]:
    """ROUGE of greedy continuations under every condition, per document and averaged."""
    foundation, memory, config = run.foundation, run.memory, run.config
    prompts, skipped = prompts_of(foundation.tokenizer, documents, options, config.max_length)
    doc_keys = memory.doc_keys.detach()[:len(documents)]
    plans = plan_conditions(prompts, len(documents), "keyed" if config.uses_keys else "shared", options.max_other_keys)

    def key_of(condition: str, key_doc: int | None) -> KeySet:
        if condition == "no_memory":
            return NO_MEMORY
        return doc_keys[key_doc] if key_doc is not None else None

    everything = [(c, i, d) for c, rows in plans.items() for i, d in rows]
    # every condition's rows in one call: they share the batches (and each batch's decoding steps);
    # generate (and score) as many tokens as the reference has: a segment near its end has fewer
    # than new_tokens left, and a longer continuation would only dilute precision
    started = time.time()
    continuations = generate_greedy(foundation, memory, config.hook_memory_layer, [prompts[i].ids for _, i, _ in everything],
                                    [key_of(c, d) for c, _, d in everything],
                                    [len(prompts[i].reference_ids) for _, i, _ in everything], options.gen_batch_size)
    log.info(f"recall: {len(everything)} generations ({', '.join(f'{c} {len(r)}' for c, r in plans.items())}) "
             f"in {time.time() - started:.1f}s")
    return recall_report(RecallInputs(foundation.tokenizer, documents, prompts, skipped, options, config.max_length), plans,
                         continuations)


@dataclass
class RecallInputs:
    tokenizer: Any
    documents: Sequence[wikitext.Document]
    prompts: list[Prompt]
    skipped: int
    options: EvalOptions
    max_length: int  # the run's --max_length (segments were truncated to it)


def recall_report(inputs: RecallInputs, plans: Plans, continuations: list[list[int]]) -> dict[str, Any]:
    """recall.json's content from every condition's continuations (in plan order, condition by condition)."""
    tokenizer, documents, prompts, options = inputs.tokenizer, inputs.documents, inputs.prompts, inputs.options
    n_docs = len(documents)
    per_document: list[dict[str, Any]] = [
        {"title": doc.title, "segments": len(doc.segments), "scored_segments": 0, "conditions": {}}
        for doc in documents]
    for p in prompts:
        per_document[p.doc]["scored_segments"] += 1
    for doc in per_document:  # its conditions stay None
        if not doc["scored_segments"]:
            doc["recall_missing"] = no_prompt_reason(options.prompt_tokens, inputs.max_length)
    examples: dict[int, dict[str, Any]] = {}
    decoded_all = iter([tokenizer.decode(c, skip_special_tokens=True) for c in continuations])
    for condition, rows in plans.items():
        decoded = [next(decoded_all) for _ in rows]
        scores = rouge_scores(decoded, [prompts[i].reference for i, _ in rows])
        for d in range(n_docs):
            mine = [s for s, (i, _) in zip(scores, rows) if prompts[i].doc == d]
            per_document[d]["conditions"][condition] = mean_scores(mine)
        for text, (i, key_doc) in zip(decoded, rows):
            p = prompts[i]
            if p.doc not in examples:
                examples[p.doc] = {"title": documents[p.doc].title, "segment": p.segment,
                                   "prompt": tokenizer.decode(p.ids, skip_special_tokens=True),
                                   "reference": p.reference, "continuations": {}}
            if p.segment == examples[p.doc]["segment"] and condition not in examples[p.doc]["continuations"]:
                label = condition if key_doc is None or condition == "right_key" else f"{condition} (key of {key_doc})"
                examples[p.doc]["continuations"][condition] = {"key_of": key_doc, "label": label, "text": text}

    mean: dict[str, Any] = {}
    for condition in plans:
        rows_ = [doc["conditions"][condition] for doc in per_document if doc["conditions"].get(condition)]
        mean[condition] = mean_scores(rows_)
    return {
        "settings": {"prompt_tokens": options.prompt_tokens, "new_tokens": options.new_tokens,
                     "max_other_keys": options.max_other_keys, "decoding": "greedy",
                     "scored_tokens": "each continuation is as many tokens as its reference (up to new_tokens)",
                     "rouge": "rouge-score RougeScorer(rouge1, rouge2, rougeL), no stemming"},
        "conditions": list(plans),
        "segments_scored": len(prompts), "segments_skipped_too_short": inputs.skipped,
        "mean": mean, "per_document": per_document,
        "examples": [examples[d] for d in sorted(examples)],
    }
