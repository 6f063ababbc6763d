"""Fidelity to the released code (fxnnxc/DocGuidanceLLM, commit 31e623c), pinned as facts.

Where the project follows the released code, a test computes the released behaviour from its
description (written here, never imported) and compares. Where the project keeps a fix, the
test shows the project's behaviour next to the released one it replaces (docs/fidelity.md, "What this
fixes in the released code").
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import wikitext
from conftest import SHARED_DATA, needs_shared, tiny_model
from docmem.batching import Batch, make_batches
from docmem.config import TrainConfig, parse_args
from docmem.training.run_state import Progress
from docmem.training.signals import StopOnSignal
from document_memories import DocumentMemory, MemoryConfig, SwiGLU
from fixtures_tiny import build_tokenizer, finish, start_training, tiny_lm_dir  # noqa: F401
from foundations import prepare_tokenizer
from foundations.placement import resolve_dtype
from train_guidance import optimizer_step, train_epoch

WIKITEXT_2 = SHARED_DATA / "wikitext_document_level" / "wikitext-2-v1" / "wikitext-2-v1-test.parquet"


# --- released behaviour, written from its description -----------------------------------------

def released_title(page: str) -> str:
    """The released `id`: the text between the first two `=` of the first `=...=` match."""
    return re.findall("=.*=", page)[0].strip().split("=")[1].strip()


def released_segment_count(page: str, segment_length: int, max_segments: int) -> int:
    """The released windows: one segment below segment_length words, else starts
    range(0, n - segment_length, segment_length // 2), at most max_segments."""
    n = len(page.replace("\n", " ").split())
    if n < segment_length:
        return 1
    return len(range(0, n - segment_length, segment_length // 2)[:max_segments])


def released_make_mlp(key_dim: int, num_layers: int, act: str, width: int, out: int) -> list[tuple]:
    """(kind, in, out) of the released make_mlp's layers."""
    if num_layers == 1:
        return [("Linear", key_dim, out)]
    layers = [("Linear", key_dim, width), (act,)]
    for _ in range(num_layers - 1):
        layers += [("Linear", width, width), (act,)]
    return layers + [("Linear", width, out)]


def build_released_mlp(key_dim: int, num_layers: int, width: int, out: int) -> nn.Module:
    """released_make_mlp's layers as modules (relu), parameter names as the released Sequential."""
    layers = [nn.Linear(*spec[1:]) if spec[0] == "Linear" else nn.ReLU()
              for spec in released_make_mlp(key_dim, num_layers, "ReLU", width, out)]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def released_swiglu(z: torch.Tensor) -> torch.Tensor:
    x, gate = z.chunk(2, dim=-1)
    return F.silu(gate) * x


# --- 1. the documents a seed selects ---------------------------------------------------------

@needs_shared
def test_seeds_1_2_3_select_the_released_articles_in_draw_order(tiny_lm_dir, tmp_path):  # noqa: F811
    import pyarrow.parquet as pq

    pages = pq.read_table(WIKITEXT_2).column("page").to_pylist()
    procs = {}
    for seed in (1, 2, 3):
        argv = ["--lm_path", str(tiny_lm_dir), "--dataset", "wikitext-2-v1", "--data_split", "test",
                "--data_path", str(WIKITEXT_2.parent.parent), "--data_cache_dir", str(tmp_path / "cache"),
                "--max_labels", "10", "--max_segments", "1", "--segment_length", "128", "--max_length", "8",
                "--hook_memory_layer", "2", "--num_epochs", "1", "--save_freq", "1", "--num_gpus", "0",
                "--seed", str(seed), "--save_dir", str(tmp_path / f"seed{seed}")]
        procs[seed] = start_training(argv, tmp_path / f"log{seed}")
    for seed, proc in procs.items():
        err = finish(proc)
        assert proc.returncode == 0, err[-2000:]
        # the released draw: np.random.seed(seed); np.random.choice(range(N), K, replace=False)
        np.random.seed(seed)
        drawn = np.random.choice(range(len(pages)), 10, replace=False).tolist()
        expected = [{"title": released_title(pages[row]), "article_index": row,
                     "segments": min(1, released_segment_count(pages[row], 128, 1))} for row in drawn]
        expected = [doc for doc in expected if doc["segments"] > 0]
        config = yaml.safe_load((tmp_path / f"seed{seed}" / "run_0" / "config.yaml").read_text())
        got = [{k: d[k] for k in ("title", "article_index", "segments")} for d in config["documents"]]
        assert got == expected, seed
    assert len(pages) == 62
    np.random.seed(1)
    assert np.random.choice(range(62), 10, replace=False).tolist() == [21, 52, 38, 24, 2, 41, 60, 50, 35, 44]


def test_a_local_generator_draws_what_the_released_global_one_did():
    for seed in (0, 1, 2, 3, 12345):
        np.random.seed(seed)
        released = np.random.choice([i for i in range(500)], 20, replace=False).tolist()
        assert wikitext.draw_articles(500, 20, seed) == released


def test_drawn_articles_without_segments_are_dropped_and_keys_follow_draw_order():
    articles = [f" = A{i} = \n " + " ".join(["w"] * (i % 4)) for i in range(12)]  # rows 0, 4, 8 are title only
    articles = [a if i % 4 else "   " for i, a in enumerate(articles)]  # now without any word
    docs = wikitext.select_documents(articles, 8, seed=2, segment_length=16, max_segments=2)
    kept = [row for row in wikitext.draw_articles(12, 8, 2) if row % 4]
    assert [(d.index, d.article_index, d.title) for d in docs] == [(i, row, f"A{row}") for i, row in enumerate(kept)]


# --- 2. the key generator --------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("key_activation", ["tanh", "swiglu"])
def test_key_internal_layers_build_the_released_layers(layers: int, key_activation: str):
    config = parse_args(["--document_key_module_type", "nonlinear", "--key_internal_layers", str(layers),
                         "--key_activation", key_activation, "--key_internal_dim", "12", "--hook_memory_dim", "8",
                         "--key_internal_activation", "relu", "--lm_path", "unused"])
    memory = DocumentMemory(MemoryConfig(hidden_size=16, num_docs=3, memory_dim=config.hook_memory_dim,
                                         key_activation=config.key_activation, module_type="nonlinear",
                                         key_internal_dim=config.key_internal_dim,
                                         key_internal_layers=config.key_internal_layers,
                                         key_internal_activation=config.key_internal_activation),
                            generator=torch.Generator().manual_seed(0))
    modules = list(memory.gate) if isinstance(memory.gate, nn.Sequential) else [memory.gate]
    built = [("Linear", m.in_features, m.out_features) if isinstance(m, nn.Linear) else (type(m).__name__,)
             for m in modules]
    out = 16 if key_activation == "swiglu" else 8
    assert built == released_make_mlp(2, layers, "ReLU", 12, out)
    assert sum(kind == "Linear" for kind, *_ in built) == (1 if layers == 1 else layers + 1)
    for linear in (m for m in modules if isinstance(m, nn.Linear)):  # the released layer_init
        w = linear.weight
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, 2 * torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
        assert torch.count_nonzero(linear.bias) == 0


def test_swiglu_passes_the_second_half_of_the_gate_through_silu():
    value, gate = torch.randn(4, 8), torch.randn(4, 8)
    out = SwiGLU()(torch.cat([value, gate], dim=-1))
    torch.testing.assert_close(out, value * F.silu(gate))
    torch.testing.assert_close(out, released_swiglu(torch.cat([value, gate], dim=-1)))
    assert not torch.allclose(out, F.silu(value) * gate)


class ReleasedMemory(nn.Module):
    """The released linear / non-linear document memory's forward, with a key set."""

    def __init__(self, gate: nn.Module, key_activation: str) -> None:
        super().__init__()
        self.up_proj, self.down_proj, self.linear_for_lmm = nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 16)
        self.key_module = gate
        self.key_activation = released_swiglu if key_activation == "swiglu" else {
            "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}[key_activation]

    def forward(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up_proj(x)) * self.key_activation(self.key_module(key))
        return x + F.gelu(self.linear_for_lmm(self.down_proj(h)))


@pytest.mark.parametrize("key_activation", ["tanh", "relu", "sigmoid", "swiglu"])
@pytest.mark.parametrize("module_type, layers", [("linear", 1), ("nonlinear", 1), ("nonlinear", 2),
                                                 ("nonlinear", 3), ("nonlinear", 4)])
def test_memory_equals_the_released_module_on_mapped_weights(key_activation: str, module_type: str, layers: int):
    memory = DocumentMemory(MemoryConfig(hidden_size=16, num_docs=3, memory_dim=8, key_activation=key_activation,
                                         module_type=module_type, key_internal_layers=layers, key_internal_dim=12),
                            generator=torch.Generator().manual_seed(1))
    out = 16 if key_activation == "swiglu" else 8
    released = ReleasedMemory(build_released_mlp(2, layers, 12, out), key_activation)
    released.key_module.load_state_dict(memory.gate.state_dict())  # same parameter names: 0.weight, 2.bias, ...
    for mine, theirs in ((memory.up, released.up_proj), (memory.down, released.down_proj),
                         (memory.out, released.linear_for_lmm)):
        theirs.load_state_dict(mine.state_dict())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    for doc in range(3):
        torch.testing.assert_close(memory(x, memory.keys_for([doc])), released(x, memory.doc_keys[doc].detach()),
                                   rtol=1e-6, atol=1e-6)


# --- 4. deviations kept on purpose, next to the released behaviour ---------------------------

def test_last_full_window_is_kept_where_released_dropped_the_article():
    for n, mine, theirs in ((16, 1, 0), (24, 2, 1), (25, 2, 2), (15, 1, 1)):
        article = " ".join(f"w{i}" for i in range(n))
        assert len(wikitext.segment_article(article, 16, 10)) == mine
        assert released_segment_count(article, 16, 10) == theirs
    exact = " ".join(["w"] * 16)  # exactly segment_length words: released drops the article
    docs = wikitext.select_documents([exact, "a b"], 2, seed=0, segment_length=16, max_segments=4)
    assert sorted(len(d.segments) for d in docs) == [1, 1]


def test_two_drawn_articles_with_one_title_stay_two_documents():
    articles = [" = <unk> = \n first text", " = <unk> = \n second text"]
    docs = wikitext.select_documents(articles, 2, seed=0, segment_length=8, max_segments=1)
    assert sorted(d.segments[0] for d in docs) == ["= <unk> = first text", "= <unk> = second text"]
    # released: both looked up by title -> the first row's text, one dataloader, one key never trained
    released_rows = [[released_title(a) for a in articles].index(released_title(articles[d.article_index]))
                     for d in docs]
    assert released_rows == [0, 0]


@needs_shared
def test_wikitext_2_test_split_has_repeated_titles_that_seed_1_draws():
    import pyarrow.parquet as pq

    pages = pq.read_table(WIKITEXT_2).column("page").to_pylist()
    docs = wikitext.select_documents(pages, 10, seed=1, segment_length=128, max_segments=10)
    same = [d for d in docs if d.title == "<unk>"]
    assert [d.article_index for d in same] == [24, 60] and same[0].segments != same[1].segments


class StubEngine:
    """CE of a batch = 3 + mean memory output over a fixed hidden state: differentiable, cheap."""

    def __init__(self, memory: DocumentMemory) -> None:
        self.memory = memory
        self.hidden = {i: torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)}

    def losses(self, batch: Batch, key_sets, per_document: bool = False) -> list[torch.Tensor]:
        return [(3 + self.memory(self.hidden[batch.index], keys).mean()).reshape(1) for keys in key_sets]


def test_gradient_accumulation_is_a_mean_flushed_at_epoch_end(tmp_path):
    acc, alpha, tau = 2, 0.1, 3.5
    config = TrainConfig(lm_path="unused", max_labels=3, num_accumulation_steps=acc, grad_clip_coeff=0,
                         guidance=alpha, target_negative_ce=tau, negative_key_type="zero")
    memory = DocumentMemory(MemoryConfig(hidden_size=8, num_docs=3, memory_dim=4),
                            generator=torch.Generator().manual_seed(0))
    engine = StubEngine(memory)
    batches = [Batch(i, torch.full((2,), i % 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                     torch.zeros(2, 3, dtype=torch.long)) for i in range(5)]
    steps: list[list[torch.Tensor]] = []

    class Recorder(torch.optim.SGD):  # lr 0: the weights stay, so each step's gradient is checkable
        def step(self, closure=None):
            steps.append([p.grad.clone() for p in memory.trainable_parameters()])

    optimizer = Recorder(memory.trainable_parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # the parts of a RunState the epoch loop reads
    train_epoch(SimpleNamespace(config=config, engine=engine, memory=memory, batches=batches, optimizer=optimizer,
                                scheduler=scheduler, generator=torch.Generator().manual_seed(0), progress=Progress(),
                                stop=StopOnSignal(), run_dir=tmp_path, save_checkpoint=lambda: None, graphs=None))

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, memory.trainable_parameters())

    def ce(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = engine.losses(batch, [memory.keys_for(batch.doc_ids), torch.zeros(2, 2)])
        return pos[0], neg[0]

    def project(batch: Batch) -> torch.Tensor:
        pos, neg = ce(batch)
        return (pos + alpha * torch.minimum((neg - tau) ** 2, pos)) / acc

    def released(batch: Batch) -> torch.Tensor:  # only the positive CE divided, the clamp against it too
        pos, neg = ce(batch)
        pos = pos / acc
        return pos + alpha * torch.clamp_max((neg - tau) ** 2, pos)

    # here: steps after batches 2, 4 and (the partial accumulation, at the end of the epoch) 5
    expected = [project(batches[0]) + project(batches[1]), project(batches[2]) + project(batches[3]),
                project(batches[4])]
    assert len(steps) == 3
    for got, loss in zip(steps, expected):
        for g, e in zip(got, grads(loss)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    # released: a step when (batches so far + 1) % acc == 0, i.e. after batches 1, 3, 5, ... counted over
    # epochs and never flushed (a partial accumulation ran into the next epoch, or was lost at the end);
    # and the guidance term, not divided, weighed acc times more than here. Its first step:
    pos, neg = ce(batches[0])
    assert (neg - tau) ** 2 < pos / acc  # the unclamped branch, where the weights differ
    first_released = grads(released(batches[0]))
    assert not all(torch.allclose(g, e) for g, e in zip(steps[0], first_released))
    mine_guidance = grads(alpha * (neg - tau) ** 2 / acc)
    released_guidance = grads(released(batches[0]) - pos / acc)
    for m, r in zip(mine_guidance, released_guidance):
        torch.testing.assert_close(r, acc * m)


def test_grad_clip_zero_is_off_where_released_zeroed_the_gradient():
    memory = DocumentMemory(MemoryConfig(hidden_size=8, num_docs=3, memory_dim=4),
                            generator=torch.Generator().manual_seed(0))
    memory(torch.randn(2, 3, 8), memory.keys_for([0, 1])).square().sum().backward()
    before = [p.grad.clone() for p in memory.trainable_parameters()]
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.extend(p.grad.clone() for p in memory.trainable_parameters())

    optimizer = Recorder(memory.trainable_parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    optimizer_step(SimpleNamespace(memory=memory, optimizer=optimizer, scheduler=scheduler,
                                   config=TrainConfig(lm_path="unused", grad_clip_coeff=0)), "here")
    assert all(torch.equal(a, b) for a, b in zip(seen, before))
    released = [g.clone().requires_grad_(False) for g in before]  # released: clip_grad_norm_(params, 0)
    params = [nn.Parameter(torch.zeros_like(g)) for g in released]
    for p, g in zip(params, released):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, 0.0)
    assert all(float(p.grad.abs().max()) < 1e-6 for p in params)


# --- batching, precision and the released hook ------------------------------------------------

def test_each_batch_is_padded_to_its_own_longest_segment_as_released():
    tokenizer = prepare_tokenizer(build_tokenizer())  # any tokenizer: padding is what is checked
    segments = [" ".join(["word"] * n) for n in (20, 3, 4, 5)]
    doc = wikitext.Document(index=0, article_index=0, title="t", segments=segments)
    batches = make_batches([doc], tokenizer, batch_size=2, max_length=64)
    released = [tokenizer(segments[i:i + 2], padding=True, return_tensors="pt")["input_ids"] for i in (0, 2)]
    assert [b.input_ids.shape for b in batches] == [r.shape for r in released]
    assert all(torch.equal(b.input_ids, r) for b, r in zip(batches, released))


def test_precision_auto_is_bf16_on_cuda_and_fp32_gives_the_released_numerics():
    def dtype(precision: str, device: str) -> torch.dtype:
        return resolve_dtype(TrainConfig(lm_path="unused", precision=precision), device)

    assert dtype("auto", "cuda:0") == torch.bfloat16 and dtype("auto", "cpu") == torch.float32
    assert dtype("fp32", "cuda:0") == torch.float32  # what the released code trains in


def test_released_hook_fails_on_current_blocks():
    """Blocks return a tensor now; the released hook's `(output[0],) + output[1:]` raises (it printed
    the error and returned the block's output unchanged, so its memory trained nothing)."""
    model = tiny_model("gpt_neox", num_layers=2)
    seen = []
    handle = model.gpt_neox.layers[0].register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert isinstance(seen[0], torch.Tensor)
    with pytest.raises(TypeError):
        (seen[0][0],) + seen[0][1:]
