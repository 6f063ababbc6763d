"""Where a fast training step's wall time goes on a GPU: the device busy against the host.

    python -m benchmarks.profile_step                                   # the paper's shape and 16 x 256, on CUDA
    python -m benchmarks.profile_step --shapes tiny:4x32 --device cpu   # the same code on a CPU (smoke)

For a few steps of train_guidance.train_epoch on the fast path (a shape of bench_train_step.py with
random weights, the hook on the last block, `other` negatives, AdamW), after a warm-up epoch that
fills the prefix cache: the wall time per step, the time the device is busy (the union of its
kernels' intervals, from torch.profiler), the kernels (CUDA) or operations (CPU) per step, and the
operations that make the host wait for the device (benchmarks/host_syncs.py, counted in a separate
epoch so the count does not slow the timed one). A step whose busy time is far below its wall time
waits on the host: launches, Python, syncs. Each shape is profiled with CUDA graphs off and on
(--cuda_graphs on: each batch's step captured and replayed, after warm-up epochs that hold the eager
steps and every capture; on a CPU the replays call the step, which checks the code path, not its speed).
Lines first, one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import bench_train_step as bench
from benchmarks.host_syncs import HostSyncCounter
from benchmarks.record import write_record
from docmem.cuda_graphs import EAGER_STEPS
from train_guidance import train_epoch

# NAME:BATCHxSEQ; the paper's step is one document's 10 segments of 128 words (about 176 tokens)
DEFAULT_SHAPES = ("pythia-1b:10x176", "pythia-1b:16x256")


def parse_shape(text: str) -> tuple[str, int, int]:
    name, _, size = text.partition(":")
    batch, _, seq = size.partition("x")
    if name not in bench.SHAPES or not batch.isdigit() or not seq.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:BATCHxSEQ with NAME one of {', '.join(bench.SHAPES)}")
    return name, int(batch), int(seq)


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals, in their unit."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def profile_shape(shape: tuple[str, int, int], args: argparse.Namespace, graphs: str = "off") -> dict:
    name, batch, seq = shape
    bench_args = bench.parse_args(["--shape", name, "--batch", str(batch), "--seq", str(seq), "--device", args.device,
                                   "--precision", args.precision])
    bench_args.num_batches = args.steps  # one epoch = the profiled steps
    state = bench.fast_run_state(bench_args)
    if graphs == "on":
        bench.use_cuda_graphs(state)
    cuda = bench_args.device.startswith("cuda")
    # warm-up: the prefix cache and the optimizer's state; with graphs, the eager steps and every capture
    warm_epochs = -(-(EAGER_STEPS + args.steps) // args.steps) if graphs == "on" else 1
    for _ in range(warm_epochs):
        train_epoch(state)
        state.progress.batch = 0
    with HostSyncCounter(bench.host_tensors(state)) as counter:
        train_epoch(state)
    state.progress.batch = 0
    bench.sync(bench_args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        train_epoch(state)
        bench.sync(bench_args.device)
        wall = time.perf_counter() - started
    events = prof.events()
    if cuda:
        work = [e for e in events if e.device_type == DeviceType.CUDA]
    else:  # on a CPU the device is the host: its top-level operations
        work = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
                and e.cpu_parent is None]
    busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in work]) / 1e6
    steps = args.steps
    return {"shape": name, "batch": batch, "seq": seq, "device": bench.device_name(bench_args.device),
            "precision": args.precision, "cuda_graphs": graphs, "steps": steps,
            "graphs_replayed": state.graphs.replays if graphs == "on" else None,
            "wall_ms_per_step": 1e3 * wall / steps, "busy_ms_per_step": 1e3 * busy / steps,
            "busy_share": busy / wall if wall else None,
            ("kernels_per_step" if cuda else "operations_per_step"): len(work) / steps,
            "host_syncs_per_step": counter.total / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="NAME:BATCHxSEQ each (default: the paper's step and 16 x 256 at the Pythia-1B shape)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="bf16", choices=sorted(bench.DTYPES))
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per shape")
    parser.add_argument("--cuda_graphs", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="profile each shape with CUDA graphs off, on, or both")
    parser.add_argument("--record", metavar="JSON", help="also write the rows, stamped, to this result file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    rows = []
    for shape, graphs in ((shape, graphs) for shape in args.shapes for graphs in args.cuda_graphs):
        row = profile_shape(shape, args, graphs)
        rows.append(row)
        count = row.get("kernels_per_step", row.get("operations_per_step"))
        print(f"{row['shape']} {row['batch']}x{row['seq']} {row['precision']} on {row['device']}: "
              f"{row['wall_ms_per_step']:.2f} ms a step, the device busy {row['busy_ms_per_step']:.2f} ms "
              f"({100 * (row['busy_share'] or 0):.0f}%), {count:.0f} "
              f"{'kernels' if 'kernels_per_step' in row else 'operations'} and "
              f"{row['host_syncs_per_step']:g} host syncs a step (CUDA graphs {row['cuda_graphs']})", flush=True)
    if args.record:
        write_record(args.record, {"rows": rows}, "benchmarks.profile_step", argv)
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
