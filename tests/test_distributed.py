"""Several documents per step, and data parallelism with torchrun (gloo on CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from fixtures_tiny import TORCHRUN, load_tensors, subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401


def test_docs_per_step_gives_each_row_its_own_key(tiny_lm_dir):
    """A step over 4 documents = the mean of 4 per-document steps (each chunk its own key and negative)."""
    from docmem.batching import make_batches
    from docmem.config import parse_args
    from docmem.engines import FastEngine
    from docmem.run_folder import load_documents
    from document_memories import DocumentMemory, MemoryConfig
    from foundations import load_foundation
    from train_guidance import train_step_losses

    config = parse_args(tiny_argv(tiny_lm_dir, tiny_lm_dir / "unused", "--max_labels", "4", "--docs_per_step", "4",
                                  "--guidance", "0.5", "--target_negative_ce", "20"))
    foundation = load_foundation("pythia", "70m", lm_path=str(tiny_lm_dir), num_gpus=0)
    documents = load_documents(config)
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=4, memory_dim=8),
                            generator=torch.Generator().manual_seed(0))
    engine = FastEngine(foundation, memory, 2, torch.float32)
    mixed = make_batches(documents, foundation.tokenizer, 2, 64, docs_per_step=4)[0]
    assert mixed.chunk_doc_ids.tolist() == [0, 1, 2, 3] and len(set(mixed.doc_ids.tolist())) == 4
    loss, parts = train_step_losses(engine, memory, mixed, config, torch.Generator().manual_seed(7))

    # the same negatives, drawn once for the 4 chunks, then 4 separate per-document passes
    from utils import guidance_term, negative_keys

    drawn = negative_keys("other", mixed.chunk_doc_ids, memory.doc_keys, torch.Generator().manual_seed(7))
    singles = make_batches(documents, foundation.tokenizer, 2, 64)
    firsts = [next(b for b in singles if int(b.doc_ids[0]) == d) for d in range(4)]
    separate = []
    engine = FastEngine(foundation, memory, 2, torch.float32)  # a fresh prefix cache for the other batches
    for d, batch in enumerate(firsts):
        neg = drawn[d].expand(batch.doc_ids.shape[0], -1)
        ce_pos, ce_neg = engine.losses(batch, [memory.keys_for(batch.doc_ids), neg])
        separate.append(ce_pos + 0.5 * guidance_term(ce_pos, ce_neg, 20.0, "clamped_mse"))
    expected = torch.stack(separate).mean()
    # the mixed batch pads every chunk to the longest, which shifts absolute positions; rotary
    # attention depends on relative ones only, so the difference is float rounding
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    # and with every row keyed by document 0 instead, the loss differs: the keys really are per row
    (wrong,) = engine.losses(mixed, [memory.keys_for(torch.zeros_like(mixed.doc_ids))])
    (right,) = engine.losses(mixed, [memory.keys_for(mixed.doc_ids)])
    assert abs(wrong.item() - right.item()) > 1e-6


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _single_and_ddp(common: list[str], placeholder: Path, root: Path) -> tuple[Path, Path]:
    """Train `common` (a tiny_argv with save_dir `placeholder`) once in one process with 2 documents a
    step and once under torchrun with 2 processes; the two save_dirs."""
    single, ddp = root / "single", root / "ddp"
    _run([sys.executable, str(ROOT / "train_guidance.py"),
          *[str(single) if a == str(placeholder) else a for a in common], "--docs_per_step", "2"])
    _run([*TORCHRUN, "--nproc_per_node", "2",
          str(ROOT / "train_guidance.py"), *[str(ddp) if a == str(placeholder) else a for a in common]])
    assert not (ddp / "run_1").exists()  # rank 0 alone wrote
    return single, ddp


def test_torchrun_two_processes_equal_one_with_two_docs_per_step(tiny_lm_dir, tmp_path):
    common = tiny_argv(tiny_lm_dir, tmp_path / "x", "--max_labels", "4", "--num_epochs", "3", "--save_freq", "3")
    _single_and_ddp(common, tmp_path / "x", tmp_path)
    a = load_tensors(tmp_path / "single" / "run_0" / "memory" / "memory.safetensors")
    b = load_tensors(tmp_path / "ddp" / "run_0" / "memory" / "memory.safetensors")
    for name in a:
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert rel <= 1e-5, (name, rel)
    # the weights moved during training (the comparison is not of two untouched initialisations)
    from document_memories import DocumentMemory, load_memory

    trained = load_memory(tmp_path / "single" / "run_0" / "memory")
    start = DocumentMemory(trained.config, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(start.up.weight, a["up.weight"])


def test_torchrun_sharded_run_equals_one_process(tiny_lm_dir, tmp_path):
    """--memory_shards 2 under torchrun (2 processes, gloo): each shard's sub-run is data-parallel over the
    processes, and the memory equals that of one process with 2 documents a step. 3 documents: shards of
    2 and 1, so a shard with one document (random negatives, one chunk for two processes) runs too."""
    common = tiny_argv(tiny_lm_dir, tmp_path / "x", "--num_epochs", "3", "--save_freq", "3", "--memory_shards", "2")
    _single_and_ddp(common, tmp_path / "x", tmp_path)
    for shard in (0, 1):
        a = load_tensors(tmp_path / "single" / "run_0" / "memory" / f"shard_{shard}" / "memory.safetensors")
        b = load_tensors(tmp_path / "ddp" / "run_0" / "memory" / f"shard_{shard}" / "memory.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
            assert rel <= 1e-5, (shard, name, rel)
    from docmem.sharding import load_any_memory

    sharded = load_any_memory(tmp_path / "ddp" / "run_0" / "memory")  # the whole sharded memory loads
    assert sharded.config.num_docs == 3


NCCL_RULE_SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from nccl_rules import imitate_nccl
from docmem.distributed import init_distributed, shutdown

with imitate_nccl():
    ctx = init_distributed(use_cuda=True)
    got = ctx.mean([float(ctx.rank + 1), 10.0])  # the epoch metrics' reduction (train_guidance, key_ce)
    assert got == [1.5, 10.0], got
    assert ctx.broadcast_object({{"rank": ctx.rank}}) == {{"rank": 0}}
    ctx.barrier()
    shutdown(ctx)
# one file per process: two processes printing at once interleave their lines
with open(os.path.join({out!r}, f"rank_{{ctx.rank}}.txt"), "w") as f:
    f.write(f"{{ctx.device}} {{os.environ['MASTER_ADDR']}}")
"""


def test_the_collectives_obey_nccls_device_rule(tmp_path):
    """Two processes on a gloo group that refuses host tensors as NCCL does (tests/nccl_rules.py): the
    metrics' mean over processes must send its tensor from the GPU, and come back as plain floats."""
    script = tmp_path / "nccl_rule.py"
    script.write_text(textwrap.dedent(NCCL_RULE_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path))))
    done = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", str(script)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [(tmp_path / f"rank_{r}.txt").read_text() for r in (0, 1)]
    assert reports == ["cuda:0 127.0.0.1", "cuda:1 127.0.0.1"]  # each its own GPU; bound to the loopback address


def test_the_imitated_nccl_refuses_a_host_tensor():
    """The rule the test above relies on: a CPU tensor handed to a collective is refused before any group."""
    import pytest
    import torch.distributed as dist
    from nccl_rules import imitate_nccl, on_imitated_gpu

    original = dist.all_reduce
    with imitate_nccl():
        with pytest.raises(RuntimeError, match="imitated NCCL: all_reduce got a tensor on cpu"):
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))
        on_gpu = torch.ones(2, device="cuda:0") * 3
        assert on_imitated_gpu(on_gpu) and not on_imitated_gpu(on_gpu.cpu())
    assert dist.all_reduce is original  # restored on exit


def test_a_thousand_documents_on_two_processes_equal_one(tiny_lm_dir, tmp_path):
    """1,000 documents, 16 a step: two gloo processes of 8 each train the memory one process of 16
    trains, and report the same CE before and after (its other keys drawn per document, whatever
    process scores the document)."""
    common = ["--lm_path", str(tiny_lm_dir), "--dataset", "synthetic", "--synthetic_articles", "1000",
              "--max_labels", "1000", "--max_segments", "1", "--segment_length", "16", "--max_length", "32",
              "--hook_memory_layer", "2", "--hook_memory_dim", "64", "--key_dim", "8", "--num_epochs", "2",
              "--save_freq", "2", "--num_gpus", "0", "--lr", "1e-2", "--batch_size", "16"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, str(ROOT / "train_guidance.py"), *common, "--docs_per_step", "16", "--save_dir", str(single)])
    _run([*TORCHRUN, "--nproc_per_node", "2", str(ROOT / "train_guidance.py"), *common, "--docs_per_step", "8",
          "--save_dir", str(ddp)])
    a = load_tensors(single / "run_0" / "memory" / "memory.safetensors")
    b = load_tensors(ddp / "run_0" / "memory" / "memory.safetensors")
    for name in a:  # 126 steps of fp32 gradients summed in another order: equal to 1e-4
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert rel <= 1e-4, (name, rel)
    one, two = (json.loads((d / "run_0" / "summary.json").read_text()) for d in (single, ddp))
    assert one["num_documents"] == two["num_documents"] == 1000 and one["steps"] == two["steps"] == 2 * 63
    for key in ("initial_ce_positive", "initial_ce_negative", "final_ce_positive", "final_ce_negative"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["final_ce_positive"] < one["initial_ce_positive"]  # it trained
