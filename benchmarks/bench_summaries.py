"""What the periodic summaries cost over a paper-sized run: 50 summaries (500 epochs, --save_freq 10) of a
10-document keyed memory on a Pythia-1B-wide LM (hidden 2048, the real GPT-NeoX vocabulary of 50304 for the
logit lens; one block, random weights: the summary never runs the blocks).

    python -m benchmarks.bench_summaries [--summaries 50] [--save_freq 10] [--docs 10] [--old]

Each summary is docmem.training.summaries.SummaryWriter.write as training calls it (loss curves over the history so
far, the selection heatmap, the logit lens over the whole vocabulary, their JSON), on a memory nudged
between summaries so every frame differs; then SummaryWriter.write_run_pictures once (selection_stats.png
and the three GIFs), as at the end of training. Prints each summary's seconds, first / last / ratio, and
the total overhead, wall-clock and CPU (the CPU seconds are the steadier figure on a shared machine).
The former scheme also drew selection_stats.png and rebuilt the three GIFs from every frame so far at
each summary: --old times that on the same frames (adds minutes); without --old it is estimated from
GIF builds of 1 and N frames (a build is linear in its frames), and marked so.
Last line: one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.bench_train_step import model_config
from docmem.config import TrainConfig
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.pictures import plots
from docmem.run_folder import new_memory
from docmem.training.summaries import SummaryWriter
from foundations.common import from_model
from utils import selection_stats

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b"
# WikiText-like titles, of the lengths the heatmap and the logit lens lay out
TITLES = ("Valkyria Chronicles III", "Tower Building of the Little Rock Arsenal", "Cicely Mary Barker",
          "Gambia women's national football team", "Plain maskray", "2011 – 12 Columbus Blue Jackets season",
          "Gregorian Tower", "There's Got to Be a Way", "Nebraska Highway 88", "USS Atlanta ( 1861 )")


def build(args: argparse.Namespace, run_dir: Path) -> SummaryWriter:
    config = model_config("pythia-1b")
    config.num_hidden_layers = 1
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    foundation = from_model(AutoModelForCausalLM.from_config(config), tokenizer, name="pythia-1b-wide")
    train = TrainConfig(hook_memory_layer=0, max_labels=args.docs, num_gpus=0, save_freq=args.save_freq)
    memory = new_memory(train, foundation, [None] * args.docs)  # only their number matters: not a subset run
    memory.eval()
    titles = [TITLES[i % len(TITLES)] + (f" ({i // len(TITLES)})" if i >= len(TITLES) else "") for i in range(args.docs)]
    return SummaryWriter(run_dir, foundation, memory, titles, train)


@torch.no_grad()
def advance(writer: SummaryWriter, history: list[dict], epochs: int) -> None:
    """epochs more metrics records, the memory nudged as training would move it."""
    for p in writer.memory.parameters():
        p.add_(0.05 * torch.randn_like(p))
    stats = selection_stats(writer.memory.selection(writer.memory.doc_keys), writer.config.l0_threshold)
    for _ in range(epochs):
        e = len(history) + 1
        history.append({"epoch": e, "step": e * 10, "loss": 3.0 / e ** 0.3, "ce_positive": 2.8 / e ** 0.3,
                        "ce_negative": 4.5 + 1.0 / e, "guidance_term": 0.01, **stats})


def old_extra_seconds(writer: SummaryWriter, history: list[dict], count: int) -> float:
    """What the former scheme added at summary `count`: selection_stats.png over the history so far and
    the three GIFs rebuilt from the first `count` frames of each."""
    started = time.perf_counter()
    analysis_plots.plot_selection_stats({"run": history[:count * writer.config.save_freq]},
                                        writer.run_dir / "old_selection_stats.png")
    for name, frames in writer.frames.items():
        if frames:
            plots.make_gif(frames[:count], writer.run_dir / f"old_{name}.gif")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summaries", type=int, default=50)
    p.add_argument("--save_freq", type=int, default=10)
    p.add_argument("--docs", type=int, default=10)
    p.add_argument("--tokenizer", default=str(TOKENIZER))
    p.add_argument("--old", action="store_true", help="also time the former scheme (every GIF rebuilt at each summary)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.summaries < 2 or args.docs < 1 or args.save_freq < 1:
        p.error("--summaries >= 2, --docs >= 1, --save_freq >= 1")
    if not Path(args.tokenizer).is_dir():
        p.error(f"--tokenizer {args.tokenizer}: no such folder")
    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_summaries_"))
    try:
        writer = build(args, run_dir)
        history: list[dict] = []
        wall, cpu = [], []
        for k in range(1, args.summaries + 1):
            advance(writer, history, args.save_freq)
            started, started_cpu = time.perf_counter(), time.process_time()
            writer.write(len(history), history)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            print(f"summary {k:3d} (epoch {len(history)}): {wall[-1]:.3f} s ({cpu[-1]:.3f} s CPU)", flush=True)
        started, started_cpu = time.perf_counter(), time.process_time()
        writer.write_run_pictures(history)
        final, final_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        report = {"summaries": args.summaries, "save_freq": args.save_freq, "docs": args.docs,
                  "vocab_size": writer.foundation.model.config.vocab_size, "threads": args.threads,
                  "first_s": round(wall[0], 3), "last_s": round(wall[-1], 3),
                  "last_over_first": round(wall[-1] / wall[0], 3),
                  "first_cpu_s": round(cpu[0], 3), "last_cpu_s": round(cpu[-1], 3),
                  "last_over_first_cpu": round(cpu[-1] / cpu[0], 3),
                  "summaries_s": round(sum(wall), 2), "run_pictures_s": round(final, 2),
                  "total_s": round(sum(wall) + final, 2), "total_cpu_s": round(sum(cpu) + final_cpu, 2),
                  "summary_s": [round(t, 3) for t in wall], "load_average_1m": os.getloadavg()[0]}
        # the former scheme: the same summaries plus, at summary k, its extra work on k frames
        extra_1, extra_n = old_extra_seconds(writer, history, 1), old_extra_seconds(writer, history, args.summaries)
        slope = (extra_n - extra_1) / (args.summaries - 1)
        report["old_extra_1_s"], report["old_extra_last_s"] = round(extra_1, 3), round(extra_n, 3)
        report["old_total_estimated_s"] = round(sum(wall) + sum(extra_1 + slope * (k - 1)
                                                                for k in range(1, args.summaries + 1)), 1)
        if args.old:
            extra = [old_extra_seconds(writer, history, k) for k in range(1, args.summaries + 1)]
            report["old_total_measured_s"] = round(sum(wall) + sum(extra), 1)
            report["old_last_over_first"] = round((wall[-1] + extra[-1]) / (wall[0] + extra[0]), 3)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"first summary {report['first_s']} s, last {report['last_s']} s (ratio {report['last_over_first']}; "
          f"CPU {report['first_cpu_s']} / {report['last_cpu_s']} s, ratio {report['last_over_first_cpu']}); "
          f"{args.summaries} summaries {report['summaries_s']} s + run pictures at the end "
          f"{report['run_pictures_s']} s = {report['total_s']} s ({report['total_cpu_s']} s CPU), "
          f"load average {report['load_average_1m']:.1f}")
    old = (f"{report['old_total_measured_s']} s (measured)" if "old_total_measured_s" in report
           else f"~{report['old_total_estimated_s']} s (estimated from its extra work at summaries 1 and "
                f"{args.summaries})")
    print(f"former scheme (selection_stats.png and the GIFs redrawn at every summary): {old}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
