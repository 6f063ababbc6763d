"""The CUDA paths: fast path against the reference loop (fp32 and bf16), the pinned-host-memory prefix
cache, the memory inside generate(), a checkpoint written and resumed, torchrun with NCCL.

Every test here is marked `cuda`: opt-in (a plain `pytest` leaves them out), skipped without a GPU;
`pytest -m cuda` (gpu_check.py stage a) runs them. The CPU equivalents are in test_engines.py, test_resume.py and test_distributed.py.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import textwrap

import pytest
import torch
from test_engines import _Tok, make_batches

# project internals, in one block (their module paths may move)
import train_guidance
from conftest import ROOT, needs_cuda, tiny_model
from docmem.engines import FastEngine, ReferenceEngine
from docmem.training.checkpoint import CHECKPOINT_NAME, read_checkpoint
from document_memories import DocumentMemory, MemoryConfig
from fixtures_tiny import TORCHRUN, load_tensors, run_training, subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401
from foundations import from_model
from hook_lm import attach_memory
from utils import guidance_term, negative_keys

pytestmark = [pytest.mark.cuda, needs_cuda]

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 3.9e-3); over a few steps of a tiny model the
# fast path's chunked CE and the reference's full logits round differently. The stated tolerance, for
# the per-step losses and for all the memory's parameters together (measured on a CPU under bf16
# autocast: losses 9e-5, parameters 5e-3)
BF16_RTOL = 2e-2
DEVICE = "cuda"
CUDA_ARGS = ("--num_gpus", "1", "--device", "cuda:0")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make fp32 matmuls 10-bit: the 1e-5 comparisons are about the engines, not TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def cuda_setup(arch: str, dtype: torch.dtype = torch.float32):
    model = tiny_model(arch, num_layers=4).to(DEVICE, dtype)
    foundation = from_model(model, _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=8),
                            generator=torch.Generator().manual_seed(1)).to(DEVICE)  # the memory stays fp32
    batches = [b.to(DEVICE) for b in make_batches(padded=True)]
    return foundation, memory, batches


def train_steps(engine, memory, batches, steps: int = 3) -> torch.Tensor:
    """The training step of test_engines.train, on whatever device the engine's memory is on."""
    opt = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        neg = negative_keys("other", batch.doc_ids, memory.doc_keys, gen, 0.5)
        ce_pos, ce_neg = engine.losses(batch, [memory.keys_for(batch.doc_ids), neg])
        loss = ce_pos + 0.5 * guidance_term(ce_pos, ce_neg, 3.0, "clamped_mse")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(torch.stack([ce_pos, ce_neg]).detach().float().cpu())
    return torch.stack(losses)


def both_paths(arch: str, layer: int, dtype: torch.dtype):
    foundation, memory, batches = cuda_setup(arch, dtype)
    ref_mem, fast_mem = copy.deepcopy(memory), copy.deepcopy(memory)
    ref = train_steps(ReferenceEngine(foundation, ref_mem, layer, dtype), ref_mem, batches)
    fast = train_steps(FastEngine(foundation, fast_mem, layer, dtype), fast_mem, batches)
    assert not torch.equal(ref_mem.up.weight, memory.up.weight)  # the memories trained
    return ref, fast, ref_mem, fast_mem


def max_param_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest ||a - b|| / ||a|| over the memory's tensors."""
    return max(((x - y).norm() / x.norm().clamp_min(1e-30)).item()
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def global_param_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||a|| over all the memory's parameters at once. In bf16 a per-tensor figure is noise for
    the zero-initialised biases (norm ~0.1 after 3 steps; on a CPU: 0.19 for one of them, while the whole
    memory differs by 5e-3, as much as bf16 against fp32 on the same path)."""
    flat = [torch.cat([t.flatten().float() for t in m.state_dict().values()]) for m in (a, b)]
    return ((flat[0] - flat[1]).norm() / flat[0].norm()).item()


@pytest.mark.parametrize("layer", [1, 3])
def test_fast_equals_reference_fp32(arch, layer):
    ref, fast, ref_mem, fast_mem = both_paths(arch, layer, torch.float32)
    assert ((ref - fast).abs() / ref.abs()).max().item() <= 1e-5
    assert max_param_rel(ref_mem, fast_mem) <= 1e-5


def test_fast_close_to_reference_bf16(arch):
    ref, fast, ref_mem, fast_mem = both_paths(arch, 2, torch.bfloat16)
    assert ((ref - fast).abs() / ref.abs()).max().item() <= BF16_RTOL
    assert global_param_rel(ref_mem, fast_mem) <= BF16_RTOL
    assert next(fast_mem.parameters()).dtype == torch.float32  # autocast left the memory in fp32


def test_prefix_cache_spills_to_pinned_host_memory(arch):
    foundation, memory, batches = cuda_setup(arch)
    keysets = [[memory.keys_for(b.doc_ids)] for b in batches]
    size = batches[0].input_ids.numel() * 32 * 4  # one batch's hidden state, fp32, hidden 32
    unlimited = FastEngine(foundation, memory, 1, torch.float32)
    spilling = FastEngine(foundation, memory, 1, torch.float32, cache_budget_bytes=size + size // 2)
    with torch.no_grad():
        for _ in range(2):  # the second round reads the cache
            for b, keys in zip(batches, keysets):
                (a,), (c,) = unlimited.losses(b, keys), spilling.losses(b, keys)
                torch.testing.assert_close(a, c, rtol=1e-6, atol=0)
    places = [(t.device.type, t.is_pinned() if t.device.type == "cpu" else False) for t in spilling.cache.values()]
    assert places[0] == ("cuda", False)
    assert ("cpu", True) in places, places  # past the device budget: pinned host memory


def test_tiny_cache_budget_trains_on_cuda(tiny_lm_dir, tmp_path):
    """train_guidance.py with a cache budget of a few KiB (device cache, pinned spill, recompute) ends
    where the default budget ends."""
    for name, extra in (("default", ()), ("tiny", ("--cache_budget_gb", "0.000006"))):
        done = run_training(tiny_argv(tiny_lm_dir, tmp_path / name, *CUDA_ARGS, *extra, num_epochs=3, save_freq=3))
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_tensors(tmp_path / "default" / "run_0" / "memory" / "memory.safetensors")
    b = load_tensors(tmp_path / "tiny" / "run_0" / "memory" / "memory.safetensors")
    for name in a:
        assert ((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)).item() <= 1e-5, name
    config = (tmp_path / "tiny" / "run_0" / "config.yaml").read_text()
    assert DEVICE in config


def test_memory_inside_generate(arch):
    foundation, memory, _ = cuda_setup(arch)
    model, block = foundation.model, foundation.block(2)
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    keys = memory.keys_for([0, 1])
    # token 0 is eos: min_new_tokens keeps generate() from stopping (it masks 0), the loop below likewise
    options = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        with attach_memory(block, memory, keys) as hook:
            kept = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
            assert hook.calls >= 8  # once for the prompt, once per new token (KV cache)
            # the same greedy tokens from full forward passes, no KV cache
            ids = prompt
            for _ in range(8):
                logits = model(ids).logits[:, -1]
                logits[:, 0] = -float("inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert kept.device.type == DEVICE
    assert torch.equal(kept, ids)
    assert not torch.equal(kept, plain)  # the memory changed what the LM says


def _sigterm_at_call(monkeypatch, call: int) -> None:
    real, calls = train_guidance.train_step_losses, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_guidance, "train_step_losses", wrapper)


def test_checkpoint_written_and_resumed_on_cuda(tiny_lm_dir, tmp_path, monkeypatch):
    """Stopped by SIGTERM in epoch 3, resumed: the same weights and losses as an unbroken run (CUDA
    kernels may reorder sums between processes, hence a tolerance instead of bit equality)."""
    def argv(folder: str) -> list[str]:
        return tiny_argv(tiny_lm_dir, tmp_path / folder, *CUDA_ARGS, num_epochs=4, save_freq=2)

    assert train_guidance.main(argv("whole")) == 0
    _sigterm_at_call(monkeypatch, 8)  # 3 batches an epoch: epoch 3, batch 2
    with pytest.raises(SystemExit) as stopped:
        train_guidance.main(argv("broken"))
    assert stopped.value.code == 143
    run_dir = tmp_path / "broken" / "run_0"
    state = read_checkpoint(run_dir / CHECKPOINT_NAME).state
    assert state["epoch"] == 2 and not (run_dir / "summary.json").exists()
    monkeypatch.undo()
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    whole, broken = tmp_path / "whole" / "run_0", run_dir
    a, b = (load_tensors(d / "memory" / "memory.safetensors") for d in (whole, broken))
    for name in a:
        assert ((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)).item() <= 1e-4, name
    la = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=0)


NCCL_SCRIPT = """
import copy, os, sys, types
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from docmem.distributed import wrap_memory
from document_memories import DocumentMemory, MemoryConfig

dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
total = torch.full((3,), 2.0, device="cuda")
dist.all_reduce(total)
assert total.tolist() == [2.0, 2.0, 2.0]
memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=8),
                        generator=torch.Generator().manual_seed(0)).cuda()
plain = copy.deepcopy(memory)
wrapped = wrap_memory(memory, types.SimpleNamespace(enabled=True))  # DDP over the NCCL group
assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)).cuda()
keys = plain.keys_for([0, 1])
wrapped(x, keys).square().mean().backward()
plain(x, keys).square().mean().backward()
for (name, a), b in zip(memory.named_parameters(), plain.parameters()):
    if a.grad is not None:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0, msg=name)
print("NCCL", torch.cuda.nccl.version(), "ok")
dist.destroy_process_group()
"""


def _torchrun(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--nproc_per_node", "1",
                           *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def test_nccl_process_group_and_ddp_memory(tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(textwrap.dedent(NCCL_SCRIPT.format(root=str(ROOT))))
    done = _torchrun([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout


def test_torchrun_one_process_trains_like_plain_run(tiny_lm_dir, tmp_path):
    """One process under torchrun on the GPU (WORLD_SIZE 1: training needs no process group then)."""
    plain = run_training(tiny_argv(tiny_lm_dir, tmp_path / "plain", *CUDA_ARGS, num_epochs=3, save_freq=3))
    assert plain.returncode == 0, plain.stderr[-3000:]
    done = _torchrun([str(ROOT / "train_guidance.py"),
                      *tiny_argv(tiny_lm_dir, tmp_path / "torchrun", *CUDA_ARGS, num_epochs=3, save_freq=3)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_tensors(tmp_path / "plain" / "run_0" / "memory" / "memory.safetensors")
    b = load_tensors(tmp_path / "torchrun" / "run_0" / "memory" / "memory.safetensors")
    for name in a:
        assert ((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)).item() <= 1e-5, name


def test_cuda_graphs_train_as_the_eager_steps(tiny_lm_dir, tmp_path, monkeypatch):
    """--cuda_graphs on against off, bf16 on the GPU: the same losses every epoch and the same memory
    within bf16's tolerance, every batch captured once and replayed after the eager warm-up steps."""
    made = []
    real = train_guidance.graphed_steps

    def keep(state):
        made.append(real(state))
        return made[-1]

    monkeypatch.setattr(train_guidance, "graphed_steps", keep)
    for name, mode in (("eager", "off"), ("graphs", "on")):
        assert train_guidance.main(tiny_argv(tiny_lm_dir, tmp_path / name, *CUDA_ARGS, "--precision", "bf16",
                                             "--cuda_graphs", mode, num_epochs=4, save_freq=4)) == 0
    (steps,) = made
    assert steps.disabled is None and steps.captured == 3 and steps.replays == 4 * 3 - 3
    assert all(g.checked for g in steps.graphs.values())
    lines = {name: [json.loads(line) for line in (tmp_path / name / "run_0" / "metrics.jsonl").read_text().splitlines()]
             for name in ("eager", "graphs")}
    for a, b in zip(lines["eager"], lines["graphs"]):
        for key in ("loss", "ce_positive", "ce_negative"):
            assert b[key] == pytest.approx(a[key], rel=BF16_RTOL), (a["epoch"], key)
    a = load_tensors(tmp_path / "eager" / "run_0" / "memory" / "memory.safetensors")
    b = load_tensors(tmp_path / "graphs" / "run_0" / "memory" / "memory.safetensors")
    for name in a:
        assert ((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)).item() <= BF16_RTOL, name
    config = (tmp_path / "graphs" / "run_0" / "config.yaml").read_text()
    assert "cuda_graphs_used: 'on'" in config or "cuda_graphs_used: on" in config

