"""The comparison of methods (`bash run.sh compare`): keyed memory (both initialisations), shared memory,
per-document LoRA, shared LoRA and the document in the prompt, on the same documents, in one report.

    python -m docmem.evaluation.methods_report --out DIR --method keyed RUN... --method lora RUN... \
        --prompt_from RUN

Each --method names a method and the runs of its learning-rate sweep (same epochs); a run without
eval/summary.json is evaluated first. The best run of each method is picked by one rule (RULE) and set
beside the others; --prompt_from evaluates the prompt baseline on that run's documents and LM (into
DIR/prompt/). Writes DIR/methods.md, methods.json, recall.png and ce.png.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from docmem.atomic import write_atomic
from docmem.cli import OneLineParser, run_command
from docmem.errors import EvalError
from docmem.evaluation.baselines import evaluate_prompt
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.evaluation.pipeline import evaluate_run
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.run_folder import LORA_CONFIG_NAME, MEMORY_DIR, resolve_run_dir
from utils import table_cell

log = logging.getLogger(__name__)
PROG = "methods_report"
METHODS = {  # name -> what it is
    "keyed": "keyed memory, the method (--memory_init released)",
    "keyed_zero": "keyed memory, --memory_init zero_output (starts as the plain LM)",
    "shared": "shared memory (one memory, no keys)",
    "lora": "per-document LoRA (one adapter per document; the adapter is the key)",
    "lora_shared": "one LoRA adapter for all documents",
    "prompt": "the document in the prompt (no training)",
}
RULE = ("best run of a method: the highest ROUGE-L recall under the right condition (own key / own adapter / "
        "the memory), ties broken by the lower CE under it")
FORGETTING = {
    "keyed": "drop its key or edit the memory (forget.py): instant, approximate: the shared weights keep what they "
             "learnt and a key search may still recall it (evaluate_memory.py --forget --reference measures it); "
             "exact only by retraining without it (or, with --memory_shards, retraining its shard)",
    "shared": "no handle on one document: exact only by retraining on the others (the whole training time)",
    "lora": "delete its adapter file (lora_memory.remove_document): instant and exact: no other adapter depends on "
            "its text (each adapter trains only on its own document's rows, clipped on its own; tested bit for bit)",
    "lora_shared": "no handle on one document: exact only by retraining the adapter on the others",
    "prompt": "remove its text from the store: instant and exact (nothing was trained)",
}
FORGETTING["keyed_zero"] = FORGETTING["keyed"]


def right_condition(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """(ROUGE-L recall, CE) under the right condition: own key / adapter / text, or a shared method's memory."""
    recall, ce = summary["rougeL_recall"], summary["ce"]
    if "right_key" in recall:
        return recall["right_key"], ce.get("diagonal_mean")
    return recall.get("memory"), ce.get("memory_mean")


def pick_best(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RULE over a method's runs (each with its summary)."""
    def key(row: dict[str, Any]) -> tuple[float, float]:
        recall, ce = right_condition(row["summary"])
        return (-(recall if recall is not None else -1.0), ce if ce is not None else float("inf"))

    return min(rows, key=key)


def memory_cost(run_dir: Path, config: dict[str, Any], summary: dict[str, Any], documents: int) -> dict[str, Any]:
    """Trainable parameters and bytes on disk per document of a run's memory/ (memory or adapters)."""
    memory = run_dir / MEMORY_DIR
    if (memory / LORA_CONFIG_NAME).is_file():
        lora = json.loads((memory / LORA_CONFIG_NAME).read_text())
        sizes = [e["bytes"] for e in lora["adapter_files"]]
        return {"trainable_parameters": lora["parameters"], "keyed_memory_parameters": lora["keyed_parameters"],
                "lora_rank": lora["rank"], "bytes_per_document": sum(sizes) / documents,
                "bytes_note": "its adapter file" if len(sizes) == documents else "the one adapter / documents"}
    skip = set() if config.get("learn_doc_keys") else {"doc_keys"}
    if config.get("document_memory") == "shared":  # its key-to-selection map is never used
        skip |= {k for k in _tensor_names(memory) if k.startswith("gate.")}
    with safe_open(str(memory / "memory.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k not in skip | {"forget_basis"})
    size = sum(p.stat().st_size for p in memory.iterdir() if p.is_file())
    return {"trainable_parameters": params, "bytes_per_document": size / documents,
            "bytes_note": "memory/ (shared by all documents) / documents"}


def _tensor_names(memory: Path) -> list[str]:
    with safe_open(str(memory / "memory.safetensors"), "pt") as f:
        return list(f.keys())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def add_one_document(name: str, train: dict[str, Any], documents: int) -> tuple[float, str]:
    """Seconds to add one document to a trained model, and how the figure is obtained."""
    if name == "lora":
        per = list((train.get("train_seconds_per_adapter") or {}).values())
        return sum(per) / max(len(per), 1), "measured: the mean time one adapter's steps took (a new one trains alone)"
    seconds = train["train_seconds"] * (documents + 1) / documents
    return seconds, ("derived: retraining on n + 1 documents, train time x (n + 1) / n (the weights are shared: a "
                     "new document trained alone would change what the others recall)")


def method_row(name: str, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """One method's figures from its (best) run."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    train = json.loads((run_dir / "summary.json").read_text())
    n = summary["documents"]
    recall, ce = summary["rougeL_recall"], summary["ce"]
    own_recall, own_ce = right_condition(summary)
    add_seconds, add_how = add_one_document(name, train, n)
    return {
        "method": name, "what": METHODS[name], "run_dir": str(run_dir), "lr": config.get("lr"),
        "epochs": config.get("num_epochs"), "documents": n,
        "recall_right": own_recall, "recall_other": recall.get("other_keys"), "recall_plain_lm": recall.get("no_memory"),
        "ce_diagonal": own_ce, "ce_off_diagonal": ce.get("off_diagonal_mean"), "ce_plain_lm": ce.get("no_memory_mean"),
        "attribution_training": (summary.get("attribution_top1_accuracy") or {}).get("training_segments"),
        "attribution_held_out": (summary.get("attribution_top1_accuracy") or {}).get("held_out"),
        **memory_cost(run_dir, config, summary, n),
        "context_tokens_per_query": summary["settings"]["prompt_tokens"],
        "train_seconds": train["train_seconds"], "wall_seconds": train["wall_seconds"],
        "add_document_seconds": add_seconds, "add_document_how": add_how, "forgetting": FORGETTING[name],
    }


def prompt_row(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    recall, ce = summary["rougeL_recall"], summary["ce"]
    attribution = summary.get("attribution_top1_accuracy") or {}
    return {
        "method": "prompt", "what": METHODS["prompt"], "run_dir": str(out), "lr": None, "epochs": 0,
        "documents": summary["documents"], "recall_right": recall.get("right_key"),
        "recall_other": recall.get("other_keys"), "recall_plain_lm": recall.get("no_memory"),
        "ce_diagonal": ce.get("diagonal_mean"), "ce_off_diagonal": ce.get("off_diagonal_mean"),
        "ce_plain_lm": ce.get("no_memory_mean"), "attribution_training": attribution.get("training_segments"),
        "attribution_held_out": attribution.get("held_out"), "trainable_parameters": 0,
        "bytes_per_document": sum(summary["document_bytes"]) / len(summary["document_bytes"]),
        "bytes_note": "the document's text (UTF-8)", "context_tokens_per_query": summary["context_tokens_per_query"],
        "train_seconds": 0.0, "wall_seconds": 0.0, "add_document_seconds": 0.0,
        "add_document_how": "nothing to train: its text joins the store", "forgetting": FORGETTING["prompt"],
    }


def markdown(rows: list[dict[str, Any]], sweeps: dict[str, list[dict[str, Any]]]) -> str:
    header = ["method", "lr", "R-L recall right", "other", "plain LM", "CE diag", "CE off-diag", "CE plain LM",
              "attr. top-1 train", "attr. top-1 held-out", "trainable params", "bytes / doc", "context tokens / query",
              "train s", "add 1 doc s"]
    keys = ["method", "lr", "recall_right", "recall_other", "recall_plain_lm", "ce_diagonal", "ce_off_diagonal",
            "ce_plain_lm", "attribution_training", "attribution_held_out", "trainable_parameters", "bytes_per_document",
            "context_tokens_per_query", "train_seconds", "add_document_seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = {"bytes_per_document": 0, "context_tokens_per_query": 1, "train_seconds": 1, "add_document_seconds": 1}
    lines += ["| " + " | ".join(f"{r[k]:g}" if k == "lr" and r[k] is not None else table_cell(r[k], digits.get(k, 3), grouped=True)
                                for k in keys) + " |" for r in rows]
    lines += ["", f"{RULE}. Every method trains for the same epochs on the same documents and batches. Recall: mean "
              "ROUGE-L recall of greedy continuations (over documents) under the right condition, other documents' "
              "conditions and the plain LM. CE in nats/token (documents x conditions: the diagonal is the own "
              "condition). The prompt baseline scores each row's tokens after its first (nothing precedes the first "
              "without a context), so its plain-LM CE differs a little from the trained methods'. Attribution: top-1 "
              "by the lowest CE over the documents' conditions. bytes / doc: memory/ on disk per document (see notes).", "", "## The methods", ""]
    lines += [f"- **{r['method']}**: {r['what']}; `{r['run_dir']}`. Bytes: {r['bytes_note']}. Adding a document: "
              f"{r['add_document_how']}. Forgetting one: {r['forgetting']}." for r in rows]
    lines += ["", "## Learning-rate sweeps", "", "| method | lr | R-L recall right | CE right | run |", "|---|---|---|---|---|"]
    for name, runs in sweeps.items():
        for run in runs:
            recall, ce = right_condition(run["summary"])
            lines.append(f"| {name} | {run['lr']:g} | {table_cell(recall, grouped=True)} | {table_cell(ce, grouped=True)} | `{run['run_dir']}` |")
    lora = [r for r in rows if "keyed_memory_parameters" in r]
    if lora:
        lines += ["", "LoRA ranks were matched to the keyed memory's trainable parameters: "
                  + "; ".join(f"{r['method']} rank {r['lora_rank']}, {r['trainable_parameters']:,} parameters against "
                              f"the keyed memory's {r['keyed_memory_parameters']:,}" for r in lora) + "."]
    return "\n".join(lines) + "\n"


def build_report(methods: dict[str, list[str]], prompt_from: str | None, out: Path, options: EvalOptions
                 ) -> dict[str, Any]:
    """Evaluate what needs it, pick each method's best run, write the report; returns methods.json."""
    out.mkdir(parents=True, exist_ok=True)
    rows, sweeps = [], {}
    for name, paths in methods.items():
        if name not in METHODS or name == "prompt":
            raise EvalError(f"--method {name}: unknown method (allowed: {', '.join(m for m in METHODS if m != 'prompt')})")
        runs = []
        for path in paths:
            run_dir = resolve_run_dir(path, flag="method")
            summary_path = run_dir / EVAL_DIR / "summary.json"
            summary = (json.loads(summary_path.read_text()) if summary_path.is_file()
                       else evaluate_run(run_dir, options))
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            runs.append({"run_dir": str(run_dir), "lr": config.get("lr"), "summary": summary})
        best = pick_best(runs)
        sweeps[name] = runs
        rows.append(method_row(name, Path(best["run_dir"]), best["summary"]))
    if prompt_from is not None:
        target = out / "prompt"
        path = target / "summary.json"
        summary = (json.loads(path.read_text()) if path.is_file()
                   else evaluate_prompt(resolve_run_dir(prompt_from, flag="prompt_from"), options, target))
        rows.append(prompt_row(summary, target))
    if not rows:
        raise EvalError("nothing to compare: give --method NAME RUN... or --prompt_from RUN")
    labels = [r["method"] for r in rows]
    analysis_plots.plot_compare_recall(labels, {"right": [r["recall_right"] for r in rows],
                                                "other": [r["recall_other"] for r in rows],
                                                "plain LM": [r["recall_plain_lm"] for r in rows]}, out / "recall.png")
    ces = [v for r in rows for v in (r["ce_diagonal"], r["ce_off_diagonal"], r["ce_plain_lm"]) if v is not None]
    analysis_plots.plot_compare_recall(labels, {"diagonal": [r["ce_diagonal"] for r in rows],
                                                "off-diagonal": [r["ce_off_diagonal"] for r in rows],
                                                "plain LM": [r["ce_plain_lm"] for r in rows]}, out / "ce.png",
                                       ylabel="CE (nats/token)", top=1.18 * max(ces, default=1.0))
    write_atomic(out / "methods.md", markdown(rows, sweeps))
    report = {"rule": RULE, "methods": rows,
              "sweeps": {k: [{**r, "summary": None, "recall_right": right_condition(r["summary"])[0],
                              "ce_right": right_condition(r["summary"])[1]} for r in v] for k, v in sweeps.items()}}
    write_json(out / "methods.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder of the report")
    parser.add_argument("--method", nargs="+", action="append", default=[], metavar="NAME_OR_RUN",
                        help=f"a method ({', '.join(m for m in METHODS if m != 'prompt')}) and its runs")
    parser.add_argument("--prompt_from", help="a run whose documents and LM the prompt baseline uses")
    defaults = EvalOptions(grid=0)
    for flag in ("prompt_tokens", "new_tokens", "max_other_keys", "gen_batch_size"):
        parser.add_argument(f"--{flag}", type=int, default=getattr(defaults, flag))
    args = parser.parse_args(argv)

    def work() -> None:
        methods: dict[str, list[str]] = {}
        for name, *runs in args.method:
            if not runs:
                raise EvalError(f"--method {name}: give its runs after the name")
            methods.setdefault(name, []).extend(runs)
        options = EvalOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, grid=0,
                              max_other_keys=args.max_other_keys, gen_batch_size=args.gen_batch_size).validate()
        build_report(methods, args.prompt_from, Path(args.out), options)
        sys.stdout.write((Path(args.out) / "methods.md").read_text().split("\n\n")[0] + "\n")

    return run_command(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
