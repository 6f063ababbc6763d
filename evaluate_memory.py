"""Measure what a trained document memory remembers .

    python evaluate_memory.py --run_dir outputs/demo/run_0 [--prompt_tokens 32 --new_tokens 64 --grid 10]
    python evaluate_memory.py --compare RUN_A RUN_B [...] --out DIR
    python evaluate_memory.py --run_dir RUN --forget DOC      (docmem/forgetting/edits.py: eval/forget_doc_NN.*)
    python evaluate_memory.py --run_dir RUN --method prompt [--out DIR]   the document-in-the-prompt baseline

One run: rebuilds the run's frozen LM and documents from its config.yaml, loads its memory/,
and writes into RUN/eval/:

    recall.json, recall.png            ROUGE-1/2/L (recall, precision, F1) of greedy continuations
                                       of each segment's first --prompt_tokens tokens against its
                                       true next tokens, under each condition:
                                         keyed run:  right_key, other_keys (up to --max_other_keys
                                                     other documents' keys each), no_key, no_memory
                                         shared run: memory, no_memory
                                       each continuation is as long as its reference, in tokens
    ce_matrix.json, ce_matrix.png      mean token CE of each document (rows) under each document's
                                       key (columns), plus no_key and no_memory columns
    length_vs_l0.json, .png            per document: L0 of its selection and its length in tokens,
                                       their Pearson R
    landscape.json, landscape.png,     key_dim == 2: perplexity of each document over a grid of keys,
    landscape/doc_NN.png               one heatmap per document, where each minimum lies
    attribution.json                   keyed run: top-1 accuracy of attributing each training segment and
                                       each held-out continuation to its document (docmem/evaluation/attribution.py)
    selection_stats.json, .png         L0, L2, pairwise and normalised distance over epochs
                                       (metrics.jsonl) and of the final memory
    summary.json                       the headline numbers (what --compare reads)

A LoRA baseline run (--document_memory lora / lora_shared) is measured the same way, its adapters standing
for keys (docmem/evaluation/baselines.py). --method prompt measures, on RUN's documents and LM, the
document's training text placed before each prompt (no training) into --out (default RUN/eval_prompt/),
and adds its context tokens per query.

--compare evaluates the runs that have no eval/ yet, then writes DIR/compare.md, compare.json,
recall.png and selection_stats.png, each run labelled by the config fields that set it apart.
A RUN may also be a save_dir: its newest finished run_N is taken. The measurements live in
docmem/evaluation/ (one module each); this file is the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from docmem.cli import OneLineParser, run_command
from docmem.errors import EvalError
from docmem.evaluation.baselines import evaluate_prompt
from docmem.evaluation.compare import compare
from docmem.evaluation.options import EvalOptions
from docmem.evaluation.pipeline import evaluate_run
from docmem.forgetting.attack_report import attack_report, attack_table
from docmem.forgetting.edits import evaluate_forgetting, forgetting_table
from docmem.run_folder import resolve_run_dir

PROG = "evaluate_memory.py"
METHODS = ("run", "prompt")
PRINTED = ("run_dir", "rougeL_recall", "ce", "length_l0_pearson_r", "landscape", "attribution_top1_accuracy",
           "acceptance")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run_dir", help="a run folder save_dir/run_N (or a save_dir: its newest finished run)")
    what.add_argument("--compare", nargs="+", metavar="RUN", help="runs to set side by side (evaluated if needed)")
    parser.add_argument("--out", help="folder of the comparison (with --compare) or of --method prompt")
    parser.add_argument("--method", choices=METHODS, default="run", help="with --run_dir: run = the run's own memory "
                        "or adapters; prompt = the document in the prompt, on the run's documents and LM")
    parser.add_argument("--forget", metavar="DOC", help="with --run_dir: measure forgetting this document (index or "
                        "title) both ways (drop_key, edit), before and after; writes eval/forget_doc_NN.json and .md")
    defaults = EvalOptions()
    parser.add_argument("--reference", metavar="RUN", help="with --forget: a run trained without the document "
                        "(train_guidance.py --exclude_docs); adds the key-search attack table (docmem/forgetting/attack_report.py)")
    parser.add_argument("--forgotten", nargs="*", default=[], metavar="MEMORY", help="with --forget: memories written "
                        "by forget.py, one row each in the attack table")
    parser.add_argument("--prompt_tokens", type=int, default=defaults.prompt_tokens, help="segment tokens given as the prompt")
    parser.add_argument("--new_tokens", type=int, default=defaults.new_tokens, help="tokens generated greedily and scored")
    parser.add_argument("--grid", type=int, default=defaults.grid, help="landscape: grid x grid keys (key_dim 2); 0 = no landscape")
    parser.add_argument("--l0_threshold", type=float, default=defaults.l0_threshold, help="entries with |s| above this are in use")
    parser.add_argument("--max_docs", type=int, default=None, help="evaluate only the first N documents")
    parser.add_argument("--max_other_keys", type=int, default=defaults.max_other_keys,
                        help="other_keys: at most this many other documents' keys per document")
    parser.add_argument("--gen_batch_size", type=int, default=defaults.gen_batch_size,
                        help="rows decoded together in recall (each leaves its batch when it has its tokens); "
                             "held-out texts per scoring batch in attribution")
    parser.add_argument("--key_sets_per_pass", type=int, default=defaults.key_sets_per_pass,
                        help="CE: key sets batched into one pass over the upper blocks")
    parser.add_argument("--ce_other_keys", type=int, default=defaults.ce_other_keys,
                        help="CE matrix: 0 = every document under every key (N^2 passes); K = under its own key and "
                             "K other documents' keys drawn for it (linear in N; matrix null, sampled_ce instead)")
    parser.add_argument("--attribution_docs", type=int, default=defaults.attribution_docs,
                        help="attribution: 0 = every document's texts; Q = the texts of Q documents spread evenly, "
                             "each still ranked against every document's key")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads for torch; 0 = torch's default (on a busy machine 1 can be much faster)")
    return parser


def evaluate(args: argparse.Namespace) -> None:
    """The command's work; writes its result (summary or comparison table) to stdout."""
    options = EvalOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, grid=args.grid,
                          l0_threshold=args.l0_threshold, max_docs=args.max_docs, max_other_keys=args.max_other_keys,
                          gen_batch_size=args.gen_batch_size, key_sets_per_pass=args.key_sets_per_pass,
                          ce_other_keys=args.ce_other_keys, attribution_docs=args.attribution_docs, device=args.device, threads=args.threads).validate()
    if options.threads:
        torch.set_num_threads(options.threads)
    if args.compare:
        if not args.out:
            raise EvalError("--compare needs --out DIR")
        if args.forget is not None or args.method != "run":
            raise EvalError("--forget and --method go with --run_dir (one run), not --compare")
        compare(args.compare, args.out, options)
        table = (Path(args.out) / "compare.md").read_text().split("\n\n")[0]  # the notes follow a blank line
        sys.stdout.write(table + "\n")
    elif args.method == "prompt":
        if args.forget is not None:
            raise EvalError("--forget measures a trained memory, not --method prompt")
        summary = evaluate_prompt(resolve_run_dir(args.run_dir), options, Path(args.out) if args.out else None)
        sys.stdout.write(json.dumps({k: summary[k] for k in PRINTED + ("context_tokens_per_query",)
                                     if k in summary}, indent=1) + "\n")
    elif args.forget is not None and (args.reference or args.forgotten):
        report = attack_report(args.run_dir, args.forget, options, args.reference, args.forgotten)
        sys.stdout.write(attack_table(report) + "\n")
    elif args.forget is not None:
        sys.stdout.write(forgetting_table(evaluate_forgetting(args.run_dir, args.forget, options)) + "\n")
    else:
        if args.out:
            raise EvalError("--out goes with --compare; a single run writes into RUN/eval/")
        summary = evaluate_run(args.run_dir, options)
        sys.stdout.write(json.dumps({k: summary[k] for k in PRINTED}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
