"""The CE table: mean token CE of each document under any key (or none), with the frozen
prefix cached once; and the document x key CE matrix built from it (eval/ce_matrix.json).

Every (segment, key) is scored at most once: the table keeps each training row's CE sum under
every column it has scored, so the CE matrix, the landscape and attribution's training segments
(which score the same rows under keys) share one scoring."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import wikitext
from docmem.batching import Batch, make_batches
from docmem.engines import NO_MEMORY, FastEngine, KeySet, LossEngine
from docmem.evaluation.options import EvalOptions
from docmem.other_documents import drawn_other_documents
from docmem.run_folder import LoadedRun

Column = tuple[float, ...] | str  # a key's values, "no_key" or NO_MEMORY: what a score is cached under


def column_id(column: KeySet) -> Column:
    """The cache's name of a column: equal keys (same float values) share their scores."""
    if isinstance(column, torch.Tensor):
        return tuple(float(v) for v in column.detach().reshape(-1).cpu().tolist())
    return "no_key" if column is None else str(column)


class CETable:
    """Mean token CE of a document's segments under given key sets, with the prefix cached once
    and each (row, column) scored once."""

    def __init__(self, run: LoadedRun, documents: Sequence[wikitext.Document], options: EvalOptions,
                 engine: LossEngine | None = None) -> None:
        """engine: how a column is scored (default: the run's memory above its cached prefix; a baseline
        gives its own, whose columns are adapter names or documents in the prompt)."""
        self.memory = run.memory
        self.per_pass = options.key_sets_per_pass
        batches = make_batches(list(documents), run.foundation.tokenizer, run.config.batch_size,
                               run.config.max_length)
        self.by_doc: list[list[Batch]] = [[] for _ in documents]
        for batch in batches:
            # per_document means per row (the engine groups by chunk_of_row): one CE per segment
            rows = torch.arange(batch.input_ids.shape[0])
            self.by_doc[int(batch.doc_ids[0])].append(replace(batch, chunk_of_row=rows))
        self.engine = engine or FastEngine(run.foundation, run.memory, run.config.hook_memory_layer, run.dtype,
                                           cache_budget_bytes=int(run.config.cache_budget_gb * (1 << 30)),
                                           head_dtype=run.head_dtype)
        # batch index -> column -> each row's CE sum (float64) ; batch index -> each row's scored tokens
        self.sums: dict[int, dict[Column, np.ndarray]] = {}
        self.row_tokens: dict[int, np.ndarray] = {
            b.index: (b.labels[:, 1:] != -100).sum(dim=1).numpy().astype(np.float64)
            for doc in self.by_doc for b in doc}

    def tokens(self, doc: int) -> int:
        """Tokens the document was trained on (padding excluded)."""
        return int(sum(int(b.attention_mask.sum()) for b in self.by_doc[doc]))

    def scored_tokens(self, doc: int) -> int:
        """Tokens whose CE the document's mean is taken over (each row's targets: its tokens after the first)."""
        return int(sum(float(self.row_tokens[b.index].sum()) for b in self.by_doc[doc]))

    @torch.no_grad()
    def score(self, doc: int, columns: Sequence[KeySet], progress: tqdm | None = None) -> None:
        """Score every row of the document under each column not scored yet, key_sets_per_pass
        columns per pass above the cached prefix; progress (a bar) advances by passes."""
        for batch in self.by_doc[doc]:
            done = self.sums.setdefault(batch.index, {})
            todo: dict[Column, KeySet] = {}
            for c in columns:
                todo.setdefault(column_id(c), c)
            missing = [(name, c) for name, c in todo.items() if name not in done]
            rows = batch.input_ids.shape[0]
            for start in range(0, len(missing), self.per_pass):
                chunk = missing[start: start + self.per_pass]
                key_sets = [c.to(self.memory.doc_keys).expand(rows, -1) if isinstance(c, torch.Tensor) else c
                            for _, c in chunk]
                means = self.engine.losses(batch, key_sets, per_document=True)  # (rows,) per key set
                tokens = self.row_tokens[batch.index]
                for (name, _), row_means in zip(chunk, means):  # a row without targets adds nothing
                    done[name] = np.where(tokens > 0, row_means.double().cpu().numpy() * tokens, 0.0)
                if progress is not None:
                    progress.update(len(chunk))

    def pending(self, doc: int, columns: Sequence[KeySet]) -> int:
        """How many columns score() would still run for this document (a bar's total)."""
        names = {column_id(c) for c in columns}
        return sum(len(names - set(self.sums.get(b.index, {}))) for b in self.by_doc[doc])

    def row_ce(self, doc: int, columns: Sequence[KeySet]) -> list[tuple[float, list[float]]]:
        """Each of the document's rows (segments, in order): its scored tokens and its mean CE per column."""
        self.score(doc, columns)
        names = [column_id(c) for c in columns]
        out = []
        for batch in self.by_doc[doc]:
            tokens, sums = self.row_tokens[batch.index], self.sums[batch.index]
            for r in range(len(tokens)):
                out.append((float(tokens[r]), [float(sums[n][r] / max(tokens[r], 1.0)) for n in names]))
        return out

    def ce(self, doc: int, columns: Sequence[KeySet], progress: tqdm | None = None) -> list[float]:
        """One CE per column: a (key_dim,) key, None (memory, no key) or engines.NO_MEMORY."""
        self.score(doc, columns, progress)
        names = [column_id(c) for c in columns]
        total = self.scored_tokens(doc)
        sums = [sum(float(self.sums[b.index][n].sum()) for b in self.by_doc[doc]) for n in names]
        return [s / max(total, 1.0) for s in sums]


def evaluate_ce_matrix(table: CETable, run: LoadedRun, documents: Sequence[wikitext.Document],
                       other_keys: int = 0) -> dict[str, Any]:
    """The keyed memory's document x key CE matrix (a shared memory: memory and no_memory per document);
    other_keys: 0 for every key, K for the own key and K drawn others per document (`ce_matrix`)."""
    titles = [d.title for d in documents]
    if not run.config.uses_keys:
        return shared_ce(table, titles, None)
    keys = run.memory.doc_keys.detach()[:len(documents)]
    return ce_matrix(table, titles, [keys[j] for j in range(len(documents))], {"no_key": None, "no_memory": NO_MEMORY},
                     other_keys)


def shared_ce(table: CETable, titles: list[str], memory_column: KeySet) -> dict[str, Any]:
    """One CE per document with the (shared) memory and without it, and the tokens each mean is over."""
    rows = [table.ce(d, [memory_column, NO_MEMORY]) for d in range(len(titles))]
    return {"titles": titles, "matrix": None, "shared_memory": True,
            "memory": [r[0] for r in rows], "no_memory": [r[1] for r in rows],
            "scored_tokens": [table.scored_tokens(d) for d in range(len(titles))],
            "note": "a shared memory has no keys: one CE per document with the memory and without it"}


def ce_matrix(table: CETable, titles: list[str], doc_columns: Sequence[KeySet], extra: dict[str, KeySet],
              other_keys: int = 0) -> dict[str, Any]:
    """Documents x conditions: doc_columns[j] is document j's condition (its key, adapter, text in the
    prompt); `extra` adds named columns (no_key, no_memory) as one list each; scored_tokens: the tokens each
    document's means are over (a row's CE times its tokens is the nats it costs); `diagonal`: each document's
    CE under its own condition.

    other_keys K > 0 with K < documents - 1 scores each document under its own condition and K other
    documents' only, drawn uniformly for each document from a fixed generator (key_ce.drawn_other_documents),
    so the cost is linear in the documents: `matrix` is then null, `sampled_columns` and `sampled_ce` hold
    each document's drawn documents and its CE under them, and the off-diagonal mean, the row argmin and
    `diagonal_lowest_rows` are over the drawn columns."""
    n = len(titles)
    if other_keys < 0:
        raise ValueError(f"other_keys {other_keys}: must be >= 0 (0: every document's condition)")
    sampled = 0 < other_keys < n - 1
    drawn = drawn_other_documents(n, other_keys).tolist() if sampled else None
    extras = list(extra.values())

    def columns_of(d: int) -> list[KeySet]:
        if drawn is None:
            return list(doc_columns) + extras
        return [doc_columns[d]] + [doc_columns[j] for j in drawn[d]] + extras

    with tqdm(total=sum(table.pending(d, columns_of(d)) for d in range(n)), desc="CE matrix", unit="key",
              dynamic_ncols=True) as bar:
        rows = [table.ce(d, columns_of(d), bar) for d in range(n)]
    width = len(rows[0]) - len(extras) if rows else 0
    named = {name: [r[width + k] for r in rows] for k, name in enumerate(extra)}
    common = {"titles": titles, **named, "scored_tokens": [table.scored_tokens(d) for d in range(n)]}
    if drawn is None:
        matrix = np.array([r[:n] for r in rows])
        off = matrix[~np.eye(n, dtype=bool)]
        argmins = [int(np.argmin(matrix[i])) for i in range(n)]
        return {**common, "matrix": matrix.tolist(), "rows": "documents", "columns": "keys (same order)",
                "diagonal": np.diag(matrix).tolist(),
                "diagonal_mean": float(np.diag(matrix).mean()), "off_diagonal_mean": float(off.mean()) if off.size else None,
                "row_argmin": argmins, "diagonal_lowest_rows": sum(a == i for i, a in enumerate(argmins)),
                "diagonal_lowest_every_row": all(a == i for i, a in enumerate(argmins))}
    own = np.array([r[0] for r in rows])
    others = np.array([r[1:width] for r in rows])  # (n, K)
    candidates = [[d] + drawn[d] for d in range(n)]
    argmins = [candidates[d][int(np.argmin([own[d], *others[d]]))] for d in range(n)]
    return {**common, "matrix": None, "rows": "documents",
            "columns": f"sampled: each document's own key and {other_keys} drawn other documents' keys",
            "other_keys_per_document": other_keys, "sampled_columns": drawn, "sampled_ce": others.tolist(),
            "diagonal": own.tolist(), "diagonal_mean": float(own.mean()), "off_diagonal_mean": float(others.mean()),
            "row_argmin": argmins, "diagonal_lowest_rows": sum(a == i for i, a in enumerate(argmins)),
            "diagonal_lowest_every_row": all(a == i for i, a in enumerate(argmins))}


def own_ce(ce: dict[str, Any]) -> list[float]:
    """Each document's CE under its own condition, from a ce_matrix.json (sampled or full; an older file
    has only the matrix)."""
    if ce.get("diagonal") is not None:
        return list(ce["diagonal"])
    return [row[d] for d, row in enumerate(ce["matrix"])]
