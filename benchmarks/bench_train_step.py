"""Time one training step of a document memory three ways (benchmarks/README.md).

    python -m benchmarks.bench_train_step --shape pythia-70m --batch 4 --seq 128
    python -m benchmarks.bench_train_step --shape pythia-1b --layer 15 --device cuda --precision bf16
    python -m benchmarks.bench_train_step --count_syncs

Paths (same training step for all, only the engine differs):
  released         two full forward+backward passes of the hooked LM (ReferenceEngine) with the
                   LM's parameters left trainable: their gradients are computed and thrown
                   away every step, as the released code did (LM in eval mode, so losses match)
  frozen_two_pass  the same two passes with the LM frozen (ReferenceEngine as it is)
  fast             prefix cache + one batched suffix pass + chunked CE (FastEngine); its cache
                   is filled in the warm-up step, as every epoch after the first reuses it

One step = losses under the positive and an `other` negative key, loss = ce_pos + 0.1 *
clamped_mse guidance (tau 4.5), backward, grad-norm clip 5, AdamW. Random weights and random
token batches (some rows left padded). By default the paths run interleaved on CPU (one step of
each in turn, so a shared machine's drifting load hits all alike) and one after another on CUDA
(--order). Human-readable lines first, ONE JSON object last.

--count_syncs: instead, count on the CPU the operations that would make the host wait for the GPU
(benchmarks/host_syncs.py) in one fast training step of train_guidance.py's loop after a warm-up
step, per operation; the last line is `host syncs per step: N`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from benchmarks.cuda_rules import imitate_cuda_autocast
from benchmarks.host_syncs import HostSyncCounter
from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.engines import FastEngine, ReferenceEngine
from docmem.optimizer_step import adamw
from docmem.step_values import read_on_host
from docmem.training.run_state import Progress, make_scheduler
from document_memories import DocumentMemory, MemoryConfig
from foundations import Foundation, block_device, from_model
from train_guidance import graphed_steps, train_epoch, train_step_losses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("released", "frozen_two_pass", "fast")
PATH_ALIASES = {"a": "released", "b": "frozen_two_pass", "c": "fast"}

# Real Pythia / Llama-2 dimensions (random weights). (arch, hidden, layers, heads, intermediate, vocab)
SHAPES: dict[str, tuple[str, int, int, int, int, int]] = {
    "tiny": ("gpt_neox", 64, 2, 4, 256, 512),
    "pythia-70m": ("gpt_neox", 512, 6, 8, 2048, 50304),
    "pythia-160m": ("gpt_neox", 768, 12, 12, 3072, 50304),
    "pythia-410m": ("gpt_neox", 1024, 24, 16, 4096, 50304),
    "pythia-1b": ("gpt_neox", 2048, 16, 8, 8192, 50304),
    "pythia-1.4b": ("gpt_neox", 2048, 24, 16, 8192, 50304),
    "pythia-2.8b": ("gpt_neox", 2560, 32, 32, 10240, 50304),
    "llama-7b-like": ("llama", 4096, 32, 32, 11008, 32000),
}
# above this many parameters the fp32 equality check runs on `tiny` instead of the shape itself
MAX_FP32_CHECK_PARAMS = 2_000_000_000


# ---- model and data ------------------------------------------------------------------------------

def model_config(shape: str):
    arch, hidden, layers, heads, inter, vocab = SHAPES[shape]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gpt_neox":  # Pythia: rotary on a quarter of each head, parallel residual
        return GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                             layer_norm_eps=1e-5, **common)
    return LlamaConfig(num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5, **common)


def count_params(shape: str) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    return sum(p.numel() for p in model.parameters())


class _Tokenizer:  # the engines never tokenize; from_model only needs pad/eos and the padding side
    eos_token = pad_token = "<eos>"
    eos_token_id = pad_token_id = 0
    padding_side = "left"


def build_foundation(shape: str, device: str, dtype: torch.dtype, seed: int) -> Foundation:
    torch.manual_seed(seed)
    with torch.device(device):  # initialise straight on the device, in the LM's dtype
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    return from_model(model, _Tokenizer(), name=shape)  # frozen, eval mode


def make_batches(num_batches: int, batch: int, seq: int, vocab: int, num_docs: int, device: str,
                 seed: int) -> list[Batch]:
    """Random tokens, one document per batch; odd rows are left padded by varying amounts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(num_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        for row in range(1, batch, 2):
            pad = min(seq - 2, (seq // 8) * (1 + (row // 2) % 3))
            ids[row, :pad] = 0
            mask[row, :pad] = 0
        labels = ids.masked_fill(mask == 0, -100)
        doc = torch.full((batch,), j % num_docs, dtype=torch.long)
        out.append(Batch(j, doc, ids.to(device), mask.to(device), labels.to(device)))
    return out


# ---- measuring -----------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap back to the OS so the next path's RSS starts clean (glibc only)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one path's extra, untimed step. CUDA: max_memory_allocated (reset before it).
    CPU: the resident-set high-water mark VmHWM, reset before it through /proc/self/clear_refs;
    where that is not allowed, the process-lifetime ru_maxrss (not per path). Both include the
    weights."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated_over_one_step"
        if not device.startswith("cuda"):
            self.kind = "cpu_peak_rss_vmhwm_over_one_step" if self._reset_hwm() else "cpu_lifetime_ru_maxrss"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _rss_bytes("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> int:
        """Resets the peak; returns the memory in use now."""
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.kind == "cpu_peak_rss_vmhwm_over_one_step":
            self._reset_hwm()
        return _rss_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated()
        if self.kind == "cpu_peak_rss_vmhwm_over_one_step":
            return _rss_bytes("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- one path ------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every path of one comparison shares."""
    foundation: Foundation
    memory0: DocumentMemory  # every path starts from a copy of it
    layer: int
    dtype: torch.dtype
    config: TrainConfig
    seed: int  # of the negative-key generator: the same draws on every path
    device: str
    chunk_size: int = 1024


class PathRunner:
    """One path's engine, memory copy, optimizer and negative-key generator; step() = one timed training step."""

    def __init__(self, path: str, setup: Setup) -> None:
        self.path, self.foundation, self.config, self.device = path, setup.foundation, setup.config, setup.device
        self.memory = copy.deepcopy(setup.memory0)  # every path starts from the same memory
        if path == "fast":
            self.engine = FastEngine(setup.foundation, self.memory, setup.layer, setup.dtype,
                                     chunk_size=setup.chunk_size)
        else:
            self.engine = ReferenceEngine(setup.foundation, self.memory, setup.layer, setup.dtype)
        self.params = self.memory.trainable_parameters()
        self.optimizer = adamw(self.params, setup.config.lr)
        self.generator = torch.Generator().manual_seed(setup.seed)  # same negative draws on every path
        self.times: list[float] = []
        self.losses: list[tuple[float, float, float]] = []

    def step(self, batch: Batch, record: bool = True) -> None:
        """One training step; record=False: untimed and not kept (the memory-measuring step)."""
        model = self.foundation.model
        if self.path == "released":
            model.requires_grad_(True)  # the released code never froze the LM
        try:
            sync(self.device)
            t0 = time.perf_counter()
            loss, parts = train_step_losses(self.engine, self.memory, batch, self.config, self.generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip_coeff)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.path == "released":
                model.zero_grad(set_to_none=True)  # LM gradients: computed, then thrown away
            sync(self.device)
            elapsed = time.perf_counter() - t0
        finally:
            model.requires_grad_(False)
            model.zero_grad(set_to_none=True)
        if record:
            self.times.append(elapsed)
            self.losses.append(tuple(read_on_host([parts.loss, parts.ce_positive, parts.ce_negative])))

    def finish(self, batch: Batch, meter: PeakMemory | None) -> dict:
        """Snapshot the memory's parameters, then measure peak memory over one more (untimed) step
        from a trimmed heap, so the timed steps run on the allocator's ordinary steady state."""
        state = {k: v.detach().float().cpu().clone() for k, v in self.memory.state_dict().items()}
        peak = start = 0
        if meter:
            release_memory(self.device)
            start = meter.start()
            self.step(batch, record=False)
            peak = meter.peak()
        self.engine.clear_cache()
        return {"times": self.times, "losses": self.losses, "state": state, "peak": peak, "start_mem": start}


def run_paths(paths: list[str], setup: Setup, batches: list[Batch], steps: int, meter: PeakMemory | None = None,
              interleave: bool = False) -> dict[str, dict]:
    """`steps` training steps of each path: path after path, or (interleave) round-robin step by step,
    so that a shared machine's changing load hits every path alike."""
    results: dict[str, dict] = {}
    if interleave:
        runners = [PathRunner(p, setup) for p in paths]
        for i in range(steps):
            for r in runners:
                r.step(batches[i % len(batches)])
        for r in runners:
            results[r.path] = r.finish(batches[steps % len(batches)], meter)
    else:
        for p in paths:
            release_memory(setup.device)
            r = PathRunner(p, setup)
            for i in range(steps):
                r.step(batches[i % len(batches)])
            results[p] = r.finish(batches[steps % len(batches)], meter)
            del r
    release_memory(setup.device)
    return results


def rel_diffs(a: dict, b: dict) -> tuple[float, float]:
    """Largest relative difference of per-step losses, and of parameters (||a-b|| / ||a|| per tensor)."""
    loss = max(abs(x - y) / max(abs(x), 1e-30) for ra, rb in zip(a["losses"], b["losses"]) for x, y in zip(ra, rb))
    par = 0.0
    for name, ta in a["state"].items():
        tb = b["state"][name]
        par = max(par, ((ta - tb).norm() / ta.norm().clamp_min(1e-30)).item())
    return loss, par


def new_memory(foundation: Foundation, args, seed: int) -> DocumentMemory:
    cfg = MemoryConfig(hidden_size=foundation.hidden_size, num_docs=args.num_docs, memory_dim=args.memory_dim,
                       key_dim=args.key_dim)
    memory = DocumentMemory(cfg, generator=torch.Generator().manual_seed(seed))
    return memory.to(block_device(foundation, args.layer))  # fp32


def fp32_check(shape: str, args, config: TrainConfig, steps: int) -> tuple[float, float]:
    """(b) vs (c) in fp32 on `shape`, untimed: max relative loss and parameter differences."""
    foundation = build_foundation(shape, args.device, torch.float32, args.seed)
    layer = args.layer if shape == args.shape else foundation.num_blocks - 1
    sub = argparse.Namespace(**{**vars(args), "layer": layer})
    memory0 = new_memory(foundation, sub, args.seed + 1)
    batches = make_batches(args.num_batches, args.batch, args.seq, foundation.model.config.vocab_size,
                           args.num_docs, args.device, args.seed + 2)
    setup = Setup(foundation, memory0, layer, torch.float32, config, args.seed + 3, args.device, args.fast_chunk_size)
    runs = run_paths(["frozen_two_pass", "fast"], setup, batches, steps)
    del setup
    del foundation
    release_memory(args.device)
    return rel_diffs(runs["frozen_two_pass"], runs["fast"])


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: pythia-70m (tiny with --count_syncs)")
    p.add_argument("--layer", type=int, default=None, help="0-based hooked block (default: the last)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=sorted(DTYPES),
                   help="LM weight dtype; the memory stays fp32 under autocast")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path before the timed ones")
    p.add_argument("--memory_dim", type=int, default=32)
    p.add_argument("--key_dim", type=int, default=2)
    p.add_argument("--num_docs", type=int, default=4, help="documents (keys) the negatives are drawn from")
    p.add_argument("--num_batches", type=int, default=1, help="distinct batches cycled through (one document each)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of released,frozen_two_pass,fast (or a,b,c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default=None, choices=("sequential", "interleaved"),
                   help="paths one after another, or round-robin step by step (default: interleaved on CPU, "
                        "where other processes' load drifts; sequential on CUDA)")
    p.add_argument("--fast_chunk_size", type=int, default=1024, help="tokens per chunk of the fast path's linear+CE")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tf32", action="store_true", help="let CUDA fp32 matmuls use TF32 "
                   "(torch.backends.cuda.matmul.allow_tf32; off by default, as in PyTorch)")
    p.add_argument("--count_syncs", action="store_true", help="count the operations of one fast step that would "
                   "wait for the GPU (on the CPU; benchmarks/host_syncs.py), instead of timing")
    p.add_argument("--imitate_cuda_autocast", action="store_true", help="on the CPU, run autocast with CUDA's "
                   "fp32 op list (gpu_check.py --smoke: a CPU run meets what a GPU run would)")
    args = p.parse_args(argv)
    args.paths = [PATH_ALIASES.get(x.strip(), x.strip()) for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in PATHS]
    if bad or not args.paths:
        p.error(f"--paths: unknown {bad}; allowed: {', '.join(PATHS)} (or a, b, c)")
    args.shape = args.shape or ("tiny" if args.count_syncs else "pythia-70m")
    if args.count_syncs:  # the counter imitates a GPU on the CPU
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.order is None:
        args.order = "sequential" if args.device.startswith("cuda") else "interleaved"
    if args.num_docs < 2:
        p.error("--num_docs must be >= 2 (negative keys of type 'other')")
    if min(args.steps, args.batch, args.seq, args.num_batches) < 1 or args.seq < 4 or args.warmup < 0:
        p.error("--steps, --batch, --num_batches must be >= 1, --seq >= 4, --warmup >= 0")
    return args


def autocast_rules(imitate_cuda: bool) -> contextlib.AbstractContextManager:
    """The autocast rules the timed steps run under: CPU autocast as it is, or imitating CUDA's fp32 op list."""
    return imitate_cuda_autocast() if imitate_cuda else contextlib.nullcontext()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # process-wide switches of this benchmark process alone, recorded in the report
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    with autocast_rules(args.imitate_cuda_autocast):
        return count_syncs(args) if args.count_syncs else measure(args)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(negative_key_type="other", guidance=0.1, target_negative_ce=4.5,
                       guidance_loss="clamped_mse", grad_clip_coeff=5.0, lr=1e-3,
                       key_dim=args.key_dim, hook_memory_dim=args.memory_dim)


def fast_run_state(args: argparse.Namespace) -> SimpleNamespace:
    """What train_guidance.train_epoch reads, for the fast path on --shape with one batch per epoch."""
    config = train_config(args)
    foundation = build_foundation(args.shape, args.device, DTYPES[args.precision], args.seed)
    layer = foundation.num_blocks - 1 if args.layer is None else args.layer
    memory = new_memory(foundation, argparse.Namespace(**{**vars(args), "layer": layer}), args.seed + 1)
    batches = make_batches(args.num_batches, args.batch, args.seq, foundation.model.config.vocab_size,
                           args.num_docs, args.device, args.seed + 2)
    optimizer = adamw(memory.trainable_parameters(), config.lr)
    return SimpleNamespace(config=config, progress=Progress(), batches=batches, memory=memory,
                           engine=FastEngine(foundation, memory, layer, DTYPES[args.precision],
                                             chunk_size=args.fast_chunk_size),
                           optimizer=optimizer, scheduler=make_scheduler(optimizer, config, 1 << 20),
                           generator=torch.Generator().manual_seed(args.seed + 3), stop=SimpleNamespace(signum=0),
                           device=args.device, graphs=None)


def use_cuda_graphs(state: SimpleNamespace) -> SimpleNamespace:
    """The state's steps captured per batch (--cuda_graphs on; on a CPU replayed by calling the step,
    docmem/cuda_graphs.py's EagerRecorder): AdamW made capturable on CUDA, as train_guidance.py makes it."""
    cuda = str(state.device).startswith("cuda")
    state.config = replace(state.config, cuda_graphs="on")
    state.optimizer = adamw(state.memory.trainable_parameters(), state.config.lr, capturable=cuda)
    state.scheduler = make_scheduler(state.optimizer, state.config, 1 << 20)
    state.graphs = graphed_steps(state)
    return state


def host_tensors(state: SimpleNamespace) -> list[torch.Tensor]:
    """What stays on the host in a CUDA run: the batches' document ids and Adam's step counts."""
    ids = [t for b in state.batches for t in (b.doc_ids, b.chunk_doc_ids, b.chunk_of_row) if t is not None]
    steps = [s["step"] for s in state.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    return ids + steps


def count_syncs(args: argparse.Namespace) -> dict:
    """One epoch of train_guidance.train_epoch over the batches after a warm-up epoch (which fills
    the prefix cache and the optimizer's state), counted per step."""
    state = fast_run_state(args)
    steps = len(state.batches)
    train_epoch(state)
    state.progress.batch = 0
    with HostSyncCounter(host_tensors(state)) as counter:
        train_epoch(state)
    per_step = counter.total / steps
    print(f"{args.shape}, hook at block {state.engine.layer} of {state.engine.foundation.num_blocks}, batch "
          f"{args.batch} x {args.seq}, {steps} step(s) counted; operations that would wait for the GPU:")
    for name, n in sorted(counter.counts.items()):
        print(f"  {name}: {n / steps:g} per step")
    print(f"host syncs per step: {per_step:g}", flush=True)
    return {"host_syncs_per_step": per_step, "counts": dict(counter.counts), "steps": steps}


def measure(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.precision]
    # the fast path fills its cache once per batch: warm up at least one pass over the batches
    warmup = max(args.warmup, args.num_batches)
    config = train_config(args)

    t0 = time.perf_counter()
    foundation = build_foundation(args.shape, args.device, dtype, args.seed)
    if args.layer is None:
        args.layer = foundation.num_blocks - 1
    foundation.block(args.layer)  # raises on an out-of-range layer
    n_params = sum(p.numel() for p in foundation.model.parameters())
    print(f"{args.shape}: {n_params / 1e6:.1f}M params, {foundation.num_blocks} blocks, hook at block {args.layer}, "
          f"{args.precision} on {args.device} ({device_name(args.device)}, {torch.get_num_threads()} threads), "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    memory0 = new_memory(foundation, args, args.seed + 1)
    batches = make_batches(args.num_batches, args.batch, args.seq, foundation.model.config.vocab_size,
                           args.num_docs, args.device, args.seed + 2)
    meter = PeakMemory(args.device)

    setup = Setup(foundation, memory0, args.layer, dtype, config, args.seed + 3, args.device, args.fast_chunk_size)
    results = run_paths(args.paths, setup, batches, warmup + args.steps, meter, args.order == "interleaved")
    for path, r in results.items():
        r["median"] = median(r["times"][warmup:])
        print(f"{path:>16}: {r['median']:.4f} s/step (median of {args.steps}; first step {r['times'][0]:.4f} s), "
              f"peak memory {r['peak'] / 2**20:.0f} MiB, loss {r['losses'][-1][0]:.4f}", flush=True)

    def ratio(a: str, b: str) -> float | None:
        return results[a]["median"] / results[b]["median"] if a in results and b in results else None

    # equality of (b) and (c) in fp32: from the timed runs when they are fp32, else a separate run
    if args.precision == "fp32" and {"frozen_two_pass", "fast"} <= set(results):
        check = {"precision": "fp32", "shape": args.shape, "source": "timed_runs", "steps": warmup + args.steps}
        diff_loss, diff_params = rel_diffs(results["frozen_two_pass"], results["fast"])
    else:
        check_shape = args.shape if count_params(args.shape) <= MAX_FP32_CHECK_PARAMS else "tiny"
        del foundation, memory0, batches, setup
        release_memory(args.device)
        check = {"precision": "fp32", "shape": check_shape, "source": "separate_fp32_run", "steps": warmup + 2}
        diff_loss, diff_params = fp32_check(check_shape, args, config, warmup + 2)
    print(f"fp32 check ({check['source']}, {check['shape']}): max rel diff loss {diff_loss:.2e}, "
          f"params {diff_params:.2e}")
    extra = {}
    if args.precision == "fp32" and {"released", "frozen_two_pass"} <= set(results):
        extra["max_rel_diff_loss_released_vs_frozen"] = rel_diffs(results["released"], results["frozen_two_pass"])[0]

    report = {
        "released_s_per_step": results.get("released", {}).get("median"),
        "frozen_two_pass_s_per_step": results.get("frozen_two_pass", {}).get("median"),
        "fast_s_per_step": results.get("fast", {}).get("median"),
        "fast_first_step_s": results["fast"]["times"][0] if "fast" in results else None,
        "speedup_vs_released": ratio("released", "fast"),
        "speedup_vs_frozen_two_pass": ratio("frozen_two_pass", "fast"),
        "peak_memory_bytes": {p: r["peak"] for p, r in results.items()},
        "memory_at_path_start_bytes": {p: r["start_mem"] for p, r in results.items()},
        "peak_memory_kind": meter.kind,
        "max_rel_diff_loss": diff_loss,
        "max_rel_diff_params": diff_params,
        "equality_check": check,
        **extra,
        "step_times_s": {p: r["times"] for p, r in results.items()},
        "warmup_steps": warmup, "timed_steps": args.steps,
        "device": args.device, "device_name": device_name(args.device), "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "shape": args.shape, "num_params": n_params, "layer": args.layer, "batch": args.batch, "seq": args.seq,
        "precision": args.precision, "memory_dim": args.memory_dim, "key_dim": args.key_dim,
        "paths": args.paths, "order": args.order, "fast_chunk_size": args.fast_chunk_size,
        "torch_version": torch.__version__, "tf32": args.tf32, "imitate_cuda_autocast": args.imitate_cuda_autocast,
    }
    for name in ("vs_released", "vs_frozen_two_pass"):
        if report[f"speedup_{name}"] is not None:
            print(f"fast path speed-up {name}: {report[f'speedup_{name}']:.2f}x")
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
