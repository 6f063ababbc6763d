"""The CE table: mean token CE of each document under any key (or none), with the frozen
prefix cached once; and the document x key CE matrix built from it (eval/ce_matrix.json)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import wikitext
from docmem.batching import Batch, make_batches
from docmem.engines import NO_MEMORY, FastEngine, KeySet
from docmem.evaluation.options import EvalOptions
from docmem.run_folder import LoadedRun


class CETable:
    """Mean token CE of a document's segments under given key sets, with the prefix cached once."""

    def __init__(self, run: LoadedRun, documents: Sequence[wikitext.Document], options: EvalOptions) -> None:
        self.memory = run.memory
        self.per_pass = options.key_sets_per_pass
        batches = make_batches(list(documents), run.foundation.tokenizer, run.config.batch_size,
                               run.config.max_length)
        self.by_doc: list[list[Batch]] = [[] for _ in documents]
        for batch in batches:
            self.by_doc[int(batch.doc_ids[0])].append(batch)
        self.engine = FastEngine(run.foundation, run.memory, run.config.hook_memory_layer, run.dtype,
                                 cache_budget_bytes=int(run.config.cache_budget_gb * (1 << 30)))

    def tokens(self, doc: int) -> int:
        """Tokens the document was trained on (padding excluded)."""
        return int(sum(int(b.attention_mask.sum()) for b in self.by_doc[doc]))

    @torch.no_grad()
    def ce(self, doc: int, columns: Sequence[KeySet]) -> list[float]:
        """One CE per column: a (key_dim,) key, None (memory, no key) or engines.NO_MEMORY."""
        sums = np.zeros(len(columns))
        total = 0
        for batch in self.by_doc[doc]:
            rows = batch.input_ids.shape[0]
            tokens = int((batch.labels[:, 1:] != -100).sum())
            for start in range(0, len(columns), self.per_pass):
                chunk = columns[start: start + self.per_pass]
                key_sets = [c.to(self.memory.doc_keys).expand(rows, -1) if isinstance(c, torch.Tensor) else c
                            for c in chunk]
                values = self.engine.losses(batch, key_sets)
                sums[start: start + len(chunk)] += np.array([v.item() for v in values]) * tokens
            total += tokens
        return (sums / max(total, 1)).tolist()


def evaluate_ce_matrix(table: CETable, run: LoadedRun, documents: Sequence[wikitext.Document]) -> dict[str, Any]:
    n = len(documents)
    titles = [d.title for d in documents]
    if not run.config.uses_keys:
        rows = [table.ce(d, [None, NO_MEMORY]) for d in range(n)]
        return {"titles": titles, "matrix": None, "shared_memory": True,
                "memory": [r[0] for r in rows], "no_memory": [r[1] for r in rows],
                "note": "a shared memory has no keys: one CE per document with the memory and without it"}
    keys = run.memory.doc_keys.detach()[:n]
    rows = [table.ce(d, [keys[j] for j in range(n)] + [None, NO_MEMORY]) for d in range(n)]
    matrix = np.array([r[:n] for r in rows])
    off = matrix[~np.eye(n, dtype=bool)]
    argmins = [int(np.argmin(matrix[i])) for i in range(n)]
    return {
        "titles": titles, "matrix": matrix.tolist(), "rows": "documents", "columns": "keys (same order)",
        "no_key": [r[n] for r in rows], "no_memory": [r[n + 1] for r in rows],
        "diagonal_mean": float(np.diag(matrix).mean()), "off_diagonal_mean": float(off.mean()) if off.size else None,
        "row_argmin": argmins, "diagonal_lowest_rows": sum(a == i for i, a in enumerate(argmins)),
        "diagonal_lowest_every_row": all(a == i for i, a in enumerate(argmins)),
    }
