"""Save a causal LM of real dimensions with random weights and a real tokenizer, for --lm_path.

    python -m benchmarks.make_random_lm --shape pythia-1b --tokenizer ../shared/data/tokenizers/gpt-neox-20b \
        --out /tmp/pythia-1b-random --dtype bf16

The shapes are bench_train_step.py's (pythia-70m ... pythia-2.8b, llama-7b-like, tiny). The paper's run
timed on a GPU (gpu_check.py stage c) needs Pythia-1B's shape and tokenizer, not its weights, which the
GPU machines cannot download. Weights are drawn with --seed on --device (cuda when there is one: a
1B-parameter CPU initialisation takes minutes) and saved as safetensors in --dtype.
--vocab_size overrides the shape's (the tiny smoke-test model uses the tokenizer's 50304).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.bench_train_step import DTYPES, SHAPES, model_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--tokenizer", required=True, help="folder of a tokenizer AutoTokenizer can load")
    p.add_argument("--out", required=True, help="folder to write (config, safetensors, tokenizer)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--vocab_size", type=int, default=None, help="override the shape's vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        p.error(f"--tokenizer {args.tokenizer}: no such folder")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")


    started = time.perf_counter()
    config = model_config(args.shape)
    if args.vocab_size is not None:
        config.vocab_size = args.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        p.error(f"--vocab_size: the tokenizer has {len(tokenizer)} tokens, more than the model's {config.vocab_size}")
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(t.numel() for t in model.parameters())
    print(f"{args.shape}: {n / 1e6:.1f}M parameters ({args.dtype}, random, seed {args.seed}) written to {out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
