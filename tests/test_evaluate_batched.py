"""The batched evaluation gives what one key at a time gives: the CE table (every column of a pass
above the cached prefix, each (row, column) scored once) against full passes of the hooked LM one
key at a time, and greedy continuations of every condition in shared batches against each row
generated alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from docmem.engines import NO_MEMORY, ReferenceEngine
from docmem.evaluation.ce_table import CETable, column_id
from docmem.evaluation.generation import generate_greedy, greedy_rows, segment_prompts
from docmem.evaluation.landscape import grid_keys, landscape_axis
from docmem.evaluation.options import EvalOptions
from docmem.run_folder import load_run
from fixtures_memory import tiny_lm_dir, tiny_run  # noqa: F401


@pytest.fixture(scope="module")
def run(tiny_run):  # noqa: F811
    loaded = load_run(tiny_run, EvalOptions(device="cpu"))
    assert loaded.dtype == torch.float32
    return loaded


def _columns(run) -> list:
    keys = run.memory.doc_keys.detach()
    grid = grid_keys(landscape_axis(keys.numpy(), 3))
    return [keys[j] for j in range(keys.shape[0])] + [None, NO_MEMORY] + list(grid)


@torch.no_grad()
def test_ce_table_equals_one_key_at_a_time(run):
    table = CETable(run, run.documents, EvalOptions(key_sets_per_pass=5))
    reference = ReferenceEngine(run.foundation, run.memory, run.config.hook_memory_layer, run.dtype)
    columns = _columns(run)
    for doc in range(len(run.documents)):
        got = table.ce(doc, columns)
        expected = []
        for column in columns:  # one full pass of the hooked LM per key and batch, token-weighted
            sums = tokens = 0.0
            for batch in table.by_doc[doc]:
                key_set = column.expand(batch.input_ids.shape[0], -1) if isinstance(column, torch.Tensor) else column
                (mean,) = reference.losses(batch, [key_set])
                n = float((batch.labels[:, 1:] != -100).sum())
                sums, tokens = sums + float(mean) * n, tokens + n
            expected.append(sums / tokens)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # each row's CE, weighted by its tokens, is the document's
        rows = table.row_ce(doc, columns)
        weights = np.array([t for t, _ in rows])
        pooled = np.array([c for _, c in rows]).T @ weights / weights.sum()
        np.testing.assert_allclose(pooled, got, rtol=0, atol=1e-9)


def test_each_row_and_column_is_scored_once(run):
    table = CETable(run, run.documents, EvalOptions(key_sets_per_pass=4))
    calls: list[int] = []
    losses = table.engine.losses

    def counted(batch, key_sets, per_document=False):
        calls.append(len(key_sets))
        return losses(batch, key_sets, per_document)

    table.engine.losses = counted
    columns = _columns(run)
    first = table.ce(0, columns)
    scored = sum(calls)
    assert scored == len(columns) * len(table.by_doc[0])  # every column once per batch, 4 per pass
    assert max(calls) == 4
    # asked again, in another order and with a copy of a key: nothing more is computed
    again = table.ce(0, [columns[2].clone(), *columns[::-1]])
    assert sum(calls) == scored
    assert again[0] == first[2] and again[1:] == first[::-1]
    assert column_id(columns[0]) == column_id(columns[0].clone()) != column_id(columns[1])
    assert column_id(None) == "no_key" and column_id(NO_MEMORY) == NO_MEMORY
    assert table.pending(0, columns) == 0 and table.pending(1, columns[:3]) == 3 * len(table.by_doc[1])


def test_conditions_share_batches_and_give_each_row_its_own_tokens(run):
    foundation, memory, layer = run.foundation, run.memory, run.config.hook_memory_layer
    prompts, _ = segment_prompts(foundation.tokenizer, run.documents, 8, 12, run.config.max_length)
    keys = memory.doc_keys.detach()
    rows, conditions, wanted = [], [], []
    for i, p in enumerate(prompts):  # the right key, another key, no key, no memory: as evaluate_recall
        for c in (keys[p.doc], keys[(p.doc + 1) % len(keys)], None, NO_MEMORY):
            rows.append(p.ids)
            conditions.append(c)
            wanted.append(len(p.reference_ids) - i % 3)  # ragged lengths: batches ordered by them
    batched = generate_greedy(foundation, memory, layer, rows, conditions, wanted, batch_size=5)
    alone = [generate_greedy(foundation, memory, layer, [r], c.unsqueeze(0) if isinstance(c, torch.Tensor) else c,
                             n, batch_size=1)[0] for r, c, n in zip(rows, conditions, wanted)]
    assert batched == alone
    assert all(len(b) <= n for b, n in zip(batched, wanted))
    # the conditions differ: the memory is on in the keyed rows and off in the plain ones
    assert any(batched[k] != batched[k + 3] for k in range(0, len(rows), 4))
    with pytest.raises(ValueError, match="keys for"):
        generate_greedy(foundation, memory, layer, rows[:2], conditions[:1], 4)


class _Bar:  # what greedy_rows reads of a tqdm bar
    def __init__(self) -> None:
        self.n, self.updates = 0, []

    def update(self, k: int) -> None:
        self.n += k
        self.updates.append(k)


def test_the_generation_bar_counts_every_wanted_token_batch_by_batch(run):
    """The bar advances as the caller decodes, and each batch tops it up to what its rows wanted (rows
    ended early by an end-of-text token), so it ends full whatever the stops."""
    foundation = run.foundation
    prompts, _ = segment_prompts(foundation.tokenizer, run.documents, 8, 12, run.config.max_length)
    rows = [p.ids for p in prompts]
    wanted = [3 + i % 4 for i in range(len(rows))]
    bar, seen = _Bar(), []

    def generate_batch(batch_rows, kwargs):
        seen.append(bar.n)
        bar.update(1)  # as if one token had been decoded, then the rows stopped
        return [[foundation.tokenizer.eos_token_id] for _ in batch_rows]

    out = greedy_rows(foundation, rows, wanted, 4, generate_batch, bar)
    assert out == [[] for _ in rows]  # cut at the end-of-text token
    assert bar.n == sum(wanted)
    firsts = sorted(wanted, reverse=True)
    assert seen == [sum(firsts[:k]) for k in range(0, len(rows), 4)]  # each batch started where the last one filled it
