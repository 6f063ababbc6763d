"""The fast path (prefix cache + batched suffix + chunked CE) equals the literal reference loop."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from docmem.batching import Batch
from docmem.chunked_ce import Workspace, linear_cross_entropy
from docmem.engines import NO_MEMORY, FastEngine, ReferenceEngine
from document_memories import DocumentMemory, MemoryConfig
from foundations import from_model
from utils import guidance_term, negative_keys


class _Tok:  # the engines never tokenize; from_model only needs pad/eos and padding side
    eos_token = "<eos>"
    pad_token = "<eos>"
    eos_token_id = 0
    pad_token_id = 0
    padding_side = "left"


def make_batches(padded: bool, n_docs: int = 3, vocab: int = 128) -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for doc in range(n_docs):
        ids = torch.randint(1, vocab, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, :3] = 0  # left padding on the first row
            ids[0, :3] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append(Batch(doc, torch.full((2,), doc), ids, mask, labels))
    return batches


def setup(arch: str, layer: int):
    model = tiny_model(arch, num_layers=4)
    foundation = from_model(model, _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=8),
                            generator=torch.Generator().manual_seed(1))
    return foundation, memory


def train(engine_cls, foundation, memory, batches, neg_type, steps=3):
    memory = copy.deepcopy(memory)
    engine = engine_cls(foundation, memory, LAYER[0], torch.float32)
    opt = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        pos = memory.keys_for(batch.doc_ids)
        neg = negative_keys(neg_type, batch.doc_ids, memory.doc_keys, gen, 0.5)
        ce_pos, ce_neg = engine.losses(batch, [pos, neg])
        loss = ce_pos + 0.5 * guidance_term(ce_pos, ce_neg, 3.0, "clamped_mse")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(torch.stack([ce_pos, ce_neg]).detach())
    return torch.stack(losses), memory


LAYER = [0]


@pytest.mark.parametrize("where", ["middle", "last"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("neg_type", ["other", "random", "zero", "perturb"])
def test_fast_equals_reference(arch, where, padded, neg_type):
    LAYER[0] = 1 if where == "middle" else 3
    foundation, memory = setup(arch, LAYER[0])
    batches = make_batches(padded)
    ref_losses, ref_mem = train(ReferenceEngine, foundation, memory, batches, neg_type)
    fast_losses, fast_mem = train(FastEngine, foundation, memory, batches, neg_type)
    rel = ((ref_losses - fast_losses).abs() / ref_losses.abs()).max().item()
    assert rel <= 1e-5, rel
    for (name, a), b in zip(ref_mem.state_dict().items(), fast_mem.state_dict().values()):
        # relative to the tensor's norm: Adam turns round-off in near-zero gradients into
        # element-wise differences that a per-element tolerance would flag
        assert ((a - b).norm() / a.norm()).item() <= 1e-5, name
    # the parameters moved: the comparison is not between two untouched copies
    assert not torch.equal(ref_mem.up.weight, memory.up.weight)


def test_no_memory_and_no_key_conditions(arch):
    LAYER[0] = 2
    foundation, memory = setup(arch, 2)
    batch = make_batches(True)[0]
    ref = ReferenceEngine(foundation, memory, 2, torch.float32)
    fast = FastEngine(foundation, memory, 2, torch.float32)
    with torch.no_grad():
        sets = [NO_MEMORY, None, memory.keys_for(batch.doc_ids)]
        r, f = ref.losses(batch, sets), fast.losses(batch, sets)
        plain = foundation.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 labels=batch.labels).loss
    for a, b in zip(r, f):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.testing.assert_close(r[0], plain)
    assert len({round(x.item(), 6) for x in r}) == 3


def test_prefix_cache_reused_and_budget_respected(arch):
    foundation, memory = setup(arch, 1)
    batches = make_batches(False)
    calls = []
    block0 = foundation.block(0)
    handle = block0.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = FastEngine(foundation, memory, 1, torch.float32)
        for _ in range(3):
            for b in batches:
                fast.losses(b, [memory.keys_for(b.doc_ids)])
        assert len(calls) == len(batches)  # the prefix ran once per batch
        calls.clear()
        nocache = FastEngine(foundation, memory, 1, torch.float32, cache_budget_bytes=0)
        for _ in range(2):
            nocache.losses(batches[0], [memory.keys_for(batches[0].doc_ids)])
        assert len(calls) == 2 and nocache.cached_bytes == 0
    finally:
        handle.remove()


def test_chunked_linear_cross_entropy_matches_plain():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    bias = torch.randn(50)
    targets = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=8)
    (g1,) = torch.autograd.grad((ours * torch.arange(37.0)).sum(), hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    (g2,) = torch.autograd.grad((plain * torch.arange(37.0)).sum(), hidden)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(hidden, weight.requires_grad_(), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kept_workspace_changes_no_bit(dtype: torch.dtype):
    """The head's buffers reused between calls (and between calls of other sizes) give exactly the
    losses and gradients of fresh buffers."""
    torch.manual_seed(0)
    weight = torch.randn(50, 16).to(dtype)
    workspace = Workspace()
    pointers = set()
    for rows in (37, 5, 37, 20):
        hidden = torch.randn(rows, 16, requires_grad=True)
        targets = torch.randint(0, 50, (rows,))
        fresh = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
        (g_fresh,) = torch.autograd.grad(fresh.sum(), hidden)
        kept = linear_cross_entropy(hidden, weight, targets, chunk_size=8, workspace=workspace)
        (g_kept,) = torch.autograd.grad(kept.sum(), hidden)
        assert torch.equal(fresh, kept) and torch.equal(g_fresh, g_kept)
        pointers.add(workspace.logits.data_ptr())
    assert len(pointers) == 1  # allocated once (8 rows), reused by every later chunk


def test_per_document_means_of_a_mixed_batch(arch):
    """Rows of several documents in one batch, each with its own key: the per-document means
    equal separate per-document passes (what --docs_per_step relies on)."""
    foundation, memory = setup(arch, 2)
    parts = make_batches(True)
    mixed = Batch(9, torch.cat([b.doc_ids for b in parts]), torch.cat([b.input_ids for b in parts]),
                  torch.cat([b.attention_mask for b in parts]), torch.cat([b.labels for b in parts]))
    gen = torch.Generator().manual_seed(0)
    neg = negative_keys("other", mixed.doc_ids, memory.doc_keys, gen)
    for engine in (ReferenceEngine(foundation, memory, 2, torch.float32), FastEngine(foundation, memory, 2, torch.float32)):
        with torch.no_grad():
            pos_means, neg_means = engine.losses(mixed, [memory.keys_for(mixed.doc_ids), neg], per_document=True)
            assert pos_means.shape == (3,)
            for i, part in enumerate(parts):
                rows = slice(2 * i, 2 * i + 2)
                alone_pos, alone_neg = engine.losses(part, [memory.keys_for(part.doc_ids), neg[rows]])
                torch.testing.assert_close(pos_means[i], alone_pos, rtol=1e-5, atol=0)
                torch.testing.assert_close(neg_means[i], alone_neg, rtol=1e-5, atol=0)
            # the scalar form is the token-weighted mean over the whole batch
            whole = engine.losses(mixed, [memory.keys_for(mixed.doc_ids)])[0]
            tokens = torch.tensor([(p.labels[:, 1:] != -100).sum().item() for p in parts], dtype=torch.float32)
            torch.testing.assert_close(whole, (pos_means * tokens).sum() / tokens.sum(), rtol=1e-5, atol=0)


def test_a_repeated_row_runs_the_prefix_once(arch):
    """A batch repeating rows (unlearning scores one document under several keys) runs the LM below
    the hook on its distinct rows only, and every row gets the prefix it would get alone."""
    foundation, memory = setup(arch, 2)
    parts = make_batches(True)
    rows = [0, 1, 2, 3, 0, 1, 0, 1, 4]
    ids, mask, labels = (torch.cat([getattr(b, f) for b in parts])[rows] for f in ("input_ids", "attention_mask",
                                                                                      "labels"))
    repeated = Batch(0, torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 2]), ids, mask, labels)
    distinct = Batch(1, repeated.doc_ids[[0, 1, 2, 3, 8]], ids[[0, 1, 2, 3, 8]], mask[[0, 1, 2, 3, 8]],
                     labels[[0, 1, 2, 3, 8]])
    engine = FastEngine(foundation, memory, 2, torch.float32)
    seen: list[int] = []
    hook = foundation.blocks[0].register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        shared = engine.prefix(repeated)
    finally:
        hook.remove()
    assert seen == [5]  # the 5 distinct rows of 9
    torch.testing.assert_close(shared, engine.prefix(distinct)[[0, 1, 2, 3, 0, 1, 0, 1, 4]], rtol=0, atol=0)
