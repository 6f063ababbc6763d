"""How many documents one memory holds: a table and one plot from evaluated capacity runs.

    python -m benchmarks.capacity_report --out outputs/capacity/report outputs/capacity/*_m*_n*
    python -m benchmarks.capacity_report --out outputs/scale/report outputs/scale/*_n*/

Reads each run's config.yaml (document_memory, hook_memory_dim, key_dim, max_labels), eval/summary.json
and eval/ce_matrix.json (written by evaluate_memory.py) and its memory/ and writes into --out:

    capacity.json   one row per run: method (keyed, shared, lora, lora_shared), entries, key_dim, documents,
                    trainable parameters (and LoRA rank), ROUGE-L recall under the document's own key or
                    adapter (keyed, lora) or the memory (shared, lora_shared), under other documents' keys or
                    adapters, without memory; CE under the own / other keys or adapters and without memory;
                    attribution top-1 over every document as a candidate (training segments, held-out
                    continuations; keyed and lora only); bits stored per trainable parameter (BITS_RULE)
    capacity.md     the same as a table
    capacity.png    recall, CE and bits per parameter against the number of documents, one line per (kind,
                    entries); runs named <kind>_n<documents> (run.sh scale: entries grow with the documents)
                    make one line per kind

`bash run.sh capacity` and `bash run.sh scale` train and evaluate the runs, then call this. A run without
eval/ is listed as missing (a failed or unfinished run), never silently dropped. Exit 0, or 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.record import table_cells, write_record
from docmem.evaluation.ce_table import own_ce
from docmem.evaluation.methods_report import memory_cost

COLUMNS = ("kind", "entries", "key_dim", "documents", "epochs", "parameters", "recall_own", "recall_other",
           "recall_no_memory", "ce_own", "ce_other", "ce_no_memory", "attribution_training", "attribution_held_out",
           "bits_per_parameter", "cell_minutes")
BITS_RULE = ("bits stored per trainable parameter: the sum over every document's scored training tokens of the "
             "plain LM's CE minus the CE under the document's own key or adapter (the memory, for a shared memory or "
             "shared adapter), in bits (nats / ln 2), over the run's trainable parameters (eval/ce_matrix.json: each "
             "document's mean CEs and scored_tokens)")
ANCHORS = {"Allen-Zhu & Li 2024": 2.0, "Morris et al. 2025": 3.6}  # bits per parameter LMs store
PER_DOCUMENT = ("keyed", "lora")  # methods with one condition per document (a key, an adapter)
STYLES = {"keyed": "-", "shared": "--", "lora": "-.", "lora_shared": (0, (1, 1))}


def newest_run(path: Path) -> Path:
    """A run folder (holds config.yaml) or a save_dir: its highest-numbered run_N."""
    if (path / "config.yaml").is_file():
        return path
    runs = sorted((p for p in path.glob("run_*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    if not runs:
        raise FileNotFoundError(f"{path} holds no config.yaml and no run_N folder")
    return runs[-1]


def _from_name(path: Path) -> dict[str, Any]:
    """kind, entries, documents from a folder named as run.sh names them: <kind>_m<entries>_n<documents>
    (run.sh capacity) or <kind>_n<documents> (run.sh scale: the entries follow the documents)."""
    match = re.fullmatch(r"(keyed|shared|lora_shared|lora)(?:_m(\d+))?_n(\d+)", path.name)
    if not match:
        return {"kind": "?", "entries": None, "documents": None, "scaled": False}
    return {"kind": match[1], "entries": int(match[2]) if match[2] else None, "documents": int(match[3]),
            "scaled": match[2] is None}


def bits_stored(ce: dict[str, Any], own_per_document: bool) -> dict[str, Any] | None:
    """What the memory stores, from ce_matrix.json: sum over documents of scored_tokens x (CE without memory
    - CE under the own key / adapter, or the memory), nats and bits; None for a file without scored_tokens
    (an evaluation from before they were written)."""
    tokens = ce.get("scored_tokens")
    if tokens is None:
        return None
    if own_per_document:
        own = own_ce(ce)
    else:
        own = ce["memory"]
    nats = sum(t * (plain - mine) for t, plain, mine in zip(tokens, ce["no_memory"], own))
    return {"tokens": int(sum(tokens)), "nats": nats, "bits": nats / math.log(2)}


def trainable_parameters(run: Path, config: dict[str, Any], summary: dict[str, Any]) -> int | None:
    """The run's trainable parameters: its adapters' (LoRA), else its memory's as the comparison counts them
    (memory.safetensors, without the fixed keys, and without a shared memory's unused key-to-selection map)."""
    lora = summary.get("lora")
    if lora:
        return lora.get("trainable_parameters")
    if not (run / "memory" / "memory.safetensors").is_file():
        return None
    return memory_cost(run, config, summary, max(int(summary.get("documents") or 1), 1))["trainable_parameters"]


def _cell_minutes(run: Path, eval_summary: dict[str, Any]) -> float | None:
    """The cell's cost: its training's wall_seconds (summary.json) and its evaluation's, in minutes."""
    train = run / "summary.json"
    if not train.is_file() or eval_summary.get("wall_seconds") is None:
        return None
    return (json.loads(train.read_text())["wall_seconds"] + eval_summary["wall_seconds"]) / 60


def read_row(path: Path) -> dict[str, Any]:
    """One run's figures; `missing` names what is absent when the run did not finish or was not evaluated."""
    try:
        run = newest_run(path)
    except FileNotFoundError as e:  # the training failed before it made its run folder
        return {"run_dir": str(path), **_from_name(path), "key_dim": None, "missing": str(e)}
    config = yaml.safe_load((run / "config.yaml").read_text())
    row: dict[str, Any] = {"run_dir": str(run), "kind": config.get("document_memory", "keyed"),
                           "entries": config.get("hook_memory_dim"), "key_dim": config.get("key_dim"),
                           "documents": config.get("max_labels"), "scaled": _from_name(path)["scaled"] or _from_name(run.parent)["scaled"]}
    summary_path = run / "eval" / "summary.json"
    if not summary_path.is_file():
        row["missing"] = f"{summary_path} (training or evaluation did not finish)"
        return row
    summary = json.loads(summary_path.read_text())
    recall, ce = summary["rougeL_recall"], summary["ce"]
    keyed = row["kind"] in PER_DOCUMENT
    lora = summary.get("lora") or {}
    attribution = summary.get("attribution_top1_accuracy") or {}
    row.update({
        "parameters": trainable_parameters(run, config, summary), "lora_rank": lora.get("rank"),
        "recall_own": recall.get("right_key") if keyed else recall.get("memory"),
        "recall_other": recall.get("other_keys") if keyed else None,
        "recall_no_memory": recall.get("no_memory"),
        "ce_own": ce.get("diagonal_mean") if keyed else ce.get("memory_mean"),
        "ce_other": ce.get("off_diagonal_mean") if keyed else None,
        "ce_no_memory": ce.get("no_memory_mean"),
        "attribution_training": attribution.get("training_segments"),
        "attribution_held_out": attribution.get("held_out"),
        "documents_evaluated": summary.get("documents"),
        "epochs": config.get("num_epochs"),
        "cell_minutes": _cell_minutes(run, summary),
    })
    settings = summary.get("settings") or {}
    sampled = [f"CE other keys over {settings['ce_other_keys']} drawn per document" if settings.get("ce_other_keys")
               else "", f"attribution of {settings['attribution_docs']} documents' texts" if settings.get("attribution_docs")
               else ""]
    if any(sampled):  # evaluate_memory.py --ce_other_keys / --attribution_docs: linear in the documents
        row["sampling_note"] = ", ".join(s for s in sampled if s) + " (every document still a candidate)"
    ce_path = run / "eval" / "ce_matrix.json"
    stored = bits_stored(json.loads(ce_path.read_text()), keyed) if ce_path.is_file() else None
    if stored is not None and row["documents_evaluated"] != row["documents"]:
        stored = None  # --max_docs: not every memorised token was scored
        row["bits_note"] = f"{row['documents_evaluated']} of {row['documents']} documents evaluated"
    row["bits_stored"] = stored
    row["bits_per_parameter"] = (stored["bits"] / row["parameters"] if stored and row["parameters"] else None)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["method", "entries", "key_dim", "documents", "epochs", "trainable params (LoRA rank)",
              "R-L recall own key / memory", "R-L recall other keys", "R-L recall no memory", "CE own key / memory", "CE other keys", "CE no memory",
              "attribution top-1 training", "attribution top-1 held-out", "bits / parameter",
              "training + evaluation (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "missing" in row:
            cells = [row["kind"], _cell(row["entries"]), _cell(row["key_dim"]), _cell(row["documents"])]
            cells += ["missing"] * (len(header) - len(cells))
        else:
            cells = [_cell(row[c]) for c in COLUMNS]
            if row.get("lora_rank") is not None:
                cells[COLUMNS.index("parameters")] = f"{row['parameters']} ({row['lora_rank']})"
            if row.get("bits_per_parameter") is not None:  # small where little is stored: significant figures
                cells[COLUMNS.index("bits_per_parameter")] = f"{row['bits_per_parameter']:.3g}"
            if row.get("cell_minutes") is not None:
                cells[COLUMNS.index("cell_minutes")] = f"{row['cell_minutes']:.1f}"
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "ROUGE-L recall of greedy continuations (mean over documents; evaluate_memory.py), CE in "
             "nats/token. A shared memory (or one shared LoRA adapter) has no keys: its own-key columns hold the "
             "memory's figures and its other-key columns are empty. Per-document LoRA: the own / other "
             "adapters; its rank matched to the keyed memory's parameters at the same entries (at least 1). "
             "Attribution top-1: the document whose key or adapter gives the text the lowest CE, every document a "
             "candidate (attribution.json).",
             "", f"Bits / parameter: {BITS_RULE}. For scale: LMs store about "
             + " and ".join(f"{v:g} bits per parameter ({k})" for k, v in ANCHORS.items()) + "."]
    notes += [f"- missing: {row['run_dir']}: {row['missing']}" for row in rows if "missing" in row]
    notes += [f"- no bits / parameter: {row['run_dir']}: {row['bits_note']}" for row in rows if "bits_note" in row]
    notes += [f"- sampled: {row['run_dir']}: {row['sampling_note']}" for row in rows if "sampling_note" in row]
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Three panels against the number of documents (log axis): ROUGE-L recall, CE and bits per parameter
    (with the anchors)."""

    fig = Figure(figsize=(16, 4.4))
    FigureCanvasAgg(fig)
    ax_recall, ax_ce, ax_bits = fig.subplots(1, 3)
    done = [r for r in rows if "missing" not in r]

    def series_of(r: dict[str, Any]) -> tuple[str, int | None]:  # a scaled run's entries follow its documents
        return (r["kind"], None if r.get("scaled") else r["entries"])

    for kind, entries in sorted(set(map(series_of, done)), key=str):
        series = sorted((r for r in done if series_of(r) == (kind, entries)), key=lambda r: r["documents"])
        x = [r["documents"] for r in series]
        style = STYLES.get(kind, "-")
        size = "entries scaled with documents" if entries is None else f"{entries} entries"
        name = f"{kind}, {'matched to ' if 'lora' in kind else ''}{size}"
        for ax, own, other in ((ax_recall, "recall_own", "recall_other"), (ax_ce, "ce_own", "ce_other")):
            line, = ax.plot(x, [r[own] for r in series], style, marker="o",
                            label=f"{name}: {'own key' if kind in PER_DOCUMENT else 'memory'}")
            if kind in PER_DOCUMENT:
                ax.plot(x, [r[other] for r in series], ":", marker="x", color=line.get_color(),
                        label=f"{kind}, {size}: other keys")
        bits = [(r["documents"], r["bits_per_parameter"]) for r in series if r.get("bits_per_parameter") is not None]
        if bits:
            ax_bits.plot(*zip(*bits), style, marker="o", label=name)
    for anchor, value in ANCHORS.items():
        ax_bits.axhline(value, color="grey", linestyle=":", linewidth=1)
        ax_bits.annotate(f"{value:g} ({anchor})", (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                         va="bottom", color="grey")
    counts = sorted({r["documents"] for r in done})
    for ax, label in ((ax_recall, "ROUGE-L recall"), (ax_ce, "CE (nats/token)"),
                      (ax_bits, "bits stored / trainable parameter")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("documents in one memory")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_recall.set_ylim(0, 1.02)
    ax_recall.legend(fontsize=7)
    if ax_bits.get_legend_handles_labels()[0]:
        ax_bits.legend(fontsize=7)
    fig.suptitle("memory capacity: recall, CE and bits per parameter against the number of documents")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="capacity run folders (save_dir or save_dir/run_N)")
    p.add_argument("--out", required=True, help="folder for capacity.json, capacity.md, capacity.png")
    p.add_argument("--record", metavar="JSON", help="also write the table, stamped, to this result file "
                                                    "(docs/results/capacity.json)")
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        try:
            rows.append(read_row(Path(run)))
        except (KeyError, yaml.YAMLError, json.JSONDecodeError) as e:
            sys.stderr.write(f"capacity_report.py: error: {run}: {e}\n")
            return 2
    rows.sort(key=lambda r: (str(r["kind"]), bool(r.get("scaled")), 0 if r.get("scaled") else r["entries"] or 0,
                             r["documents"] or 0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    (out / "capacity.md").write_text(table)
    plot(rows, out / "capacity.png")
    print(table, end="")
    if args.record:
        write_record(args.record, table_cells(table), "benchmarks.capacity_report", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
