"""A fast training step waits for the GPU at most once (one read of its loss parts and gradient
norm), with the same numbers as the loop that read every part on its own: the sync count, bitwise
equal losses and weights on CPU fp32, the deferred non-finite check, and the norm-only top."""
from __future__ import annotations

import argparse
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import train_guidance
from benchmarks import bench_train_step as bench
from benchmarks.host_syncs import HostSyncCounter
from docmem.batching import Batch
from docmem.chunked_ce import linear_cross_entropy
from docmem.decoder_slices import DecoderSlices
from docmem.engines import FastEngine, _reduce, _targets
from docmem.errors import NonFiniteLoss
from docmem.training.run_state import LOSS_PARTS, Progress
from foundations import from_model


def small_args(*extra: str) -> argparse.Namespace:
    return bench.parse_args(["--count_syncs", "--batch", "3", "--seq", "16", "--num_batches", "3", *extra])


# ---- the count ---------------------------------------------------------------------------------

def test_the_counter_sees_reads_and_boolean_masks_not_host_work():
    x, ids = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with HostSyncCounter(host=[ids]) as counter:
        x.sum().item()
        _ = x[x > 0]
        x.sum(0).tolist()
        bool(torch.isfinite(x.sum()))
        torch.unique_consecutive(ids)  # on the host in a GPU run too
        int(ids.max())
        _ = x[torch.tensor([0, 2])]  # integer indices: no sync
    assert dict(counter.counts) == {"aten._local_scalar_dense": 2, "aten.index (boolean mask)": 1,
                                    "Tensor.tolist": 1}


@pytest.mark.parametrize("layer", ["0", "1"])  # blocks above the hook, and none
def test_a_fast_step_syncs_at_most_once(layer, capsys):
    report = bench.main(["--count_syncs", "--batch", "2", "--seq", "16", "--layer", layer])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"host syncs per step: {report['host_syncs_per_step']:g}"
    if layer == "1":
        assert report["host_syncs_per_step"] <= 1, report["counts"]
        assert report["counts"] == {"Tensor.tolist": 1}
    else:  # the library's attention mask reads the padding on the host; the rest is as above
        assert report["counts"].pop("Tensor.tolist") == 1
        assert not {k for k in report["counts"] if "boolean" in k}


# ---- the same numbers as the old loop ----------------------------------------------------------

class OldFastEngine:
    """FastEngine's losses as they were: boolean masks every step, the decoder (and its attention
    mask) run even with no block above the hook."""

    def __init__(self, engine: FastEngine) -> None:
        self.engine = engine

    def losses(self, batch: Batch, key_sets: list, per_document: bool = False) -> list[torch.Tensor]:
        e = self.engine
        hidden = e.prefix(batch)
        n = len(key_sets)
        mixed = e.memory(hidden.repeat(n, 1, 1), torch.cat(key_sets))
        with e.slices.blocks(e.layer + 1, e.foundation.num_blocks, final_norm=True) as decoder:
            final = decoder(inputs_embeds=mixed, attention_mask=batch.attention_mask.repeat(n, 1),
                            use_cache=False).last_hidden_state
        targets, valid, row_of_token = _targets(batch.labels, n)
        per_token = linear_cross_entropy(final[:, :-1][valid], e.head_weight, targets[valid], bias=e.head_bias,
                                         chunk_size=e.chunk_size, workspace=e.head_workspace)
        return _reduce(per_token, row_of_token, batch.group_ids, n, per_document)


def old_epoch(state: SimpleNamespace) -> None:
    """train_epoch as it was: every loss part read with .item() per batch, torch.isfinite(norm) per step."""
    acc = state.config.num_accumulation_steps
    for i, batch in enumerate(state.batches):
        loss, parts = train_guidance.train_step_losses(state.engine, state.memory, batch, state.config,
                                                       state.generator)
        for key in LOSS_PARTS:
            value = getattr(parts, key)
            state.progress.sums[key] += value.item() if value is not None else float("nan")
        (loss / acc).backward()
        if (i + 1) % acc == 0 or i + 1 == len(state.batches):
            norm = torch.nn.utils.clip_grad_norm_(state.memory.trainable_parameters(), state.config.grad_clip_coeff)
            assert torch.isfinite(norm)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)


def two_states(layer: str, acc: int, *extra: str) -> tuple[SimpleNamespace, SimpleNamespace]:
    new = bench.fast_run_state(small_args("--layer", layer, *extra))
    new.config = dataclasses.replace(new.config, num_accumulation_steps=acc)
    old = copy.copy(new)
    old.memory = copy.deepcopy(new.memory)
    old.engine = OldFastEngine(FastEngine(new.engine.foundation, old.memory, new.engine.layer, torch.float32))
    old.optimizer = torch.optim.AdamW(old.memory.trainable_parameters(), lr=new.config.lr)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, new.scheduler.lr_lambdas[0])
    old.generator = torch.Generator().manual_seed(new.generator.initial_seed())
    old.progress = Progress()
    return new, old


# the last: one row a step (the paper's order), no padding, so the scored tokens are picked by a slice
@pytest.mark.parametrize("layer, acc, rows", [("1", 1, "3"), ("0", 2, "3"), ("0", 1, "1")])
def test_losses_and_weights_bitwise_equal_to_the_old_loop(layer, acc, rows):
    new, old = two_states(layer, acc, "--batch", rows)
    for _ in range(3):  # epochs: the first fills the caches, the later ones use them
        new.progress.batch = 0
        train_guidance.train_epoch(new)
        old_epoch(old)
        assert new.progress.sums == old.progress.sums
        assert all(v == v for v in new.progress.sums.values() if v is not None)
    for (name, a), b in zip(new.memory.state_dict().items(), old.memory.state_dict().values()):
        assert torch.equal(a, b), name
    assert new.progress.step == 3 * -(-3 // acc)  # the last batch of an epoch ends a step


# ---- non-finite steps are still refused --------------------------------------------------------

def test_a_non_finite_loss_part_is_refused_at_the_step_end_naming_its_batch(monkeypatch):
    new, _ = two_states("1", 3)
    real = train_guidance.train_step_losses
    calls = []

    def nan_in_batch_2(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            parts.ce_negative = parts.ce_negative * float("inf")
        return loss, parts

    before = copy.deepcopy(new.memory.state_dict())
    monkeypatch.setattr(train_guidance, "train_step_losses", nan_in_batch_2)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(ce_negative = inf\) at epoch 1, step 1 "
                                            r"\(batch 2 of 3\)$"):
        train_guidance.train_epoch(new)
    assert len(calls) == 3  # read once, at the step's end
    assert all(torch.equal(a, b) for a, b in zip(new.memory.state_dict().values(), before.values()))
    assert new.progress.step == 0 and new.progress.sums == dict.fromkeys(LOSS_PARTS, 0.0)


def test_a_non_finite_gradient_is_refused_before_the_weights_take_it(monkeypatch):
    new, _ = two_states("1", 1)
    real = train_guidance.train_step_losses

    def nan_gradient(engine, memory, *args, **kwargs):
        loss, parts = real(engine, memory, *args, **kwargs)
        return loss + torch.sqrt((memory.up.bias * 0).sum()), parts

    before = copy.deepcopy(new.memory.state_dict())
    monkeypatch.setattr(train_guidance, "train_step_losses", nan_gradient)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite gradient norm \(nan\) at epoch 1, step 1 \(batch 1 of 3\)$"):
        train_guidance.train_epoch(new)
    assert all(torch.equal(a, b) for a, b in zip(new.memory.state_dict().values(), before.values()))


# ---- no block above the hook: the final norm alone ---------------------------------------------

def tiny_llama():
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return from_model(AutoModelForCausalLM.from_config(config), bench._Tokenizer(), name="tiny-llama")


@pytest.mark.parametrize("make", [lambda: bench.build_foundation("tiny", "cpu", torch.float32, 0), tiny_llama],
                         ids=["gpt_neox", "llama"])
def test_the_norm_alone_equals_the_decoder_with_no_blocks(make):
    foundation = make()
    slices = DecoderSlices(foundation)
    assert slices.norm_only_top
    hidden = torch.randn(3, 10, foundation.hidden_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    top = foundation.num_blocks
    with slices.blocks(top, top, final_norm=True) as decoder:
        expected = decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
    with HostSyncCounter() as counter:
        got = slices.top(top, hidden, mask)
    assert torch.equal(got, expected) and counter.total == 0
    with slices.blocks(top - 1, top, final_norm=True) as decoder:  # a block above: the decoder as before
        expected = decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
    assert torch.equal(slices.top(top - 1, hidden, mask), expected)
