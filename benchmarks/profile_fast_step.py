"""Where the time of one fast-path training step goes (investigation aid for bench_train_step.py).

    python -m benchmarks.profile_fast_step --shape pythia-70m --batch 4 --seq 128

Times, as medians over --repeats rounds (every item once per round, so drifting load on a shared
machine hits all alike): the fast step (loss + backward), the frozen two-pass step, two plain no-grad
forwards, the linear+CE alone at several chunk sizes, and the bare matmuls the linear+CE cannot avoid (logits and the
hidden-state gradient), so the overhead above that floor is visible. Lines, then one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks import bench_train_step as bench
from docmem import chunked_ce
from docmem.config import TrainConfig
from docmem.engines import FastEngine, ReferenceEngine
from train_guidance import train_step_losses


def timed_round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each function, run in turn (one call of each per round) so that a shared
    machine's drifting load hits them alike; one untimed warm-up round first."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="pythia-70m", choices=sorted(bench.SHAPES))
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    f = bench.build_foundation(args.shape, "cpu", torch.float32, 0)
    layer = f.num_blocks - 1 if args.layer is None else args.layer
    ns = argparse.Namespace(num_docs=4, memory_dim=32, key_dim=2, layer=layer)
    memory = bench.new_memory(f, ns, 1)
    batch = bench.make_batches(1, args.batch, args.seq, f.model.config.vocab_size, 4, "cpu", 2)[0]
    config = TrainConfig(key_dim=2, hook_memory_dim=32)
    gen = torch.Generator().manual_seed(3)
    fast = FastEngine(f, memory, layer, torch.float32)
    ref = ReferenceEngine(f, memory, layer, torch.float32)

    def step(engine):
        loss, _ = train_step_losses(engine, memory, batch, config, gen)
        loss.backward()
        memory.zero_grad(set_to_none=True)

    def two_forwards():
        with torch.no_grad():
            for _ in range(2):
                f.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)

    # the linear+CE on what the fast path feeds it: 2 key sets x valid tokens
    head = f.model.get_output_embeddings()
    targets = batch.labels[:, 1:].repeat(2, 1)
    t = targets[targets != -100]
    hidden = torch.randn(len(t), f.hidden_size, requires_grad=True)
    w = head.weight
    probs = torch.randn(len(t), w.shape[0])

    def ce(fn, chunk):
        return lambda: fn(hidden, w, t, bias=head.bias, chunk_size=chunk).mean().backward()

    fns = {"fast_step": lambda: step(fast),
           "frozen_two_pass_step": lambda: step(ref),
           "two_full_forwards_no_grad": two_forwards}
    for chunk in (256, 1024, 4096):
        fns[f"linear_ce_chunk{chunk}"] = ce(chunked_ce.linear_cross_entropy, chunk)
    fns["matmul_floor_logits_plus_grad"] = lambda: (hidden.detach() @ w.t(), probs @ w)
    out: dict[str, float | int] = dict(timed_round_robin(fns, args.repeats))
    out["valid_tokens_in_head"] = len(t)
    for k, v in out.items():
        print(f"{k:>34}: {v:.4f}" if isinstance(v, float) else f"{k:>34}: {v}")
    print(json.dumps({"shape": args.shape, "layer": layer, "batch": args.batch, "seq": args.seq,
                      "threads": torch.get_num_threads(), **out}))


if __name__ == "__main__":
    main()
