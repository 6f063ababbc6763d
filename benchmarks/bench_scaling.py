"""Time per epoch and memory against the number of documents (issue: many documents).

    python -m benchmarks.bench_scaling                      # 10, 100, 1000 documents, tiny GPT-NeoX
    python -m benchmarks.bench_scaling --docs 10 100 1000 3000 --segments 2 --seq 48

Each document gets --segments random token segments of --seq tokens (a few left-padded); one
epoch is the training loop of train_guidance.py (fast path, `other` negatives, AdamW) over
every document in the released order. The first epoch fills the prefix cache and is reported
apart; the timed epochs follow. The growth exponent is the slope of log(time per epoch)
against log(number of segments): 1 means linear. Prints lines, then one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from benchmarks.record import write_record
from docmem.batching import Batch
from docmem.config import TrainConfig
from docmem.engines import FastEngine
from document_memories import DocumentMemory, MemoryConfig
from foundations import from_model
from train_guidance import train_step_losses


class _Tokenizer:  # the batches are made of token ids; from_model only needs pad/eos
    eos_token = pad_token = "<eos>"
    eos_token_id = pad_token_id = 0
    padding_side = "left"


def tiny_foundation(vocab: int, hidden: int, layers: int):
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * hidden, max_position_embeddings=512)
    return from_model(AutoModelForCausalLM.from_config(config), _Tokenizer(), name=f"tiny-{hidden}x{layers}")


def make_batches(num_docs: int, segments: int, seq: int, vocab: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for doc in range(num_docs):
        ids = torch.randint(1, vocab, (segments, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : seq // 4] = 0  # one left-padded row per document
        ids = ids.masked_fill(mask == 0, 0)
        batches.append(Batch(len(batches), torch.full((segments,), doc), ids, mask, ids.masked_fill(mask == 0, -100)))
    return batches


def epoch_seconds(foundation, num_docs: int, args) -> dict:
    batches = make_batches(num_docs, args.segments, args.seq, args.vocab)
    memory = DocumentMemory(MemoryConfig(hidden_size=args.hidden, num_docs=num_docs, memory_dim=32, key_dim=2),
                            generator=torch.Generator().manual_seed(1))
    engine = FastEngine(foundation, memory, args.layers - 1, torch.float32)
    config = TrainConfig(max_labels=num_docs, lm_path="unused")
    optimizer = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def one_epoch() -> float:
        start = time.perf_counter()
        for batch in batches:
            loss, _ = train_step_losses(engine, memory, batch, config, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(memory.trainable_parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = one_epoch()
    timed = [one_epoch() for _ in range(args.epochs)]
    return {"documents": num_docs, "segments": num_docs * args.segments, "first_epoch_s": first,
            "epoch_s": statistics.median(timed), "epoch_s_all": timed, "prefix_cache_bytes": engine.cached_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def growth_exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[10, 100, 1000], help="numbers of documents")
    p.add_argument("--segments", type=int, default=2, help="segments per document")
    p.add_argument("--seq", type=int, default=48, help="tokens per segment")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after the cache-filling one)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--record", metavar="JSON", help="also write the figures, stamped, to this result file "
                    "(docs/results/NAME.json; `python -m benchmarks.results` renders it)")
    args = p.parse_args(argv)
    if len(args.docs) < 2 or min(args.docs) < 2:
        p.error("--docs: give at least two numbers, each >= 2 (other negatives need two documents)")
    torch.set_num_threads(args.threads)
    foundation = tiny_foundation(args.vocab, args.hidden, args.layers)
    rows = []
    for n in args.docs:
        row = epoch_seconds(foundation, n, args)
        rows.append(row)
        print(f"{n:>6} documents, {row['segments']:>6} segments: {row['epoch_s']:.3f} s/epoch "
              f"(first {row['first_epoch_s']:.3f} s), prefix cache {row['prefix_cache_bytes'] / 2**20:.1f} MiB, "
              f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    exponent = growth_exponent([r["segments"] for r in rows], [r["epoch_s"] for r in rows])
    print(f"growth exponent of time per epoch in the number of segments: {exponent:.3f}")
    result = {"rows": rows, "growth_exponent": exponent, "device": "cpu", "threads": args.threads,
              "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers},
              "segments_per_doc": args.segments, "seq": args.seq, "torch_version": torch.__version__}
    print(json.dumps(result))
    if args.record:
        write_record(args.record, result, "benchmarks.bench_scaling", argv)
    return result


if __name__ == "__main__":
    main()
