"""How many documents one memory holds: a table and one plot from evaluated capacity runs.

    python -m benchmarks.capacity_report --out outputs/capacity/report outputs/capacity/*_m*_n*

Reads each run's config.yaml (document_memory, hook_memory_dim, max_labels) and eval/summary.json
(written by evaluate_memory.py) and writes into --out:

    capacity.json   one row per run: method (keyed, shared, lora, lora_shared), entries, documents,
                    ROUGE-L recall under the document's own key or adapter (keyed, lora) or the memory
                    (shared, lora_shared), under other documents' keys or adapters, without memory; CE under
                    the own / other keys or adapters and without memory; trainable parameters and LoRA rank
    capacity.md     the same as a table
    capacity.png    recall and CE against the number of documents, one line per (kind, entries)

`bash run.sh capacity` trains and evaluates the runs, then calls this. A run without eval/ is
listed as missing (a failed or unfinished run), never silently dropped. Exit 0, or 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.record import table_cells, write_record

COLUMNS = ("kind", "entries", "documents", "parameters", "recall_own", "recall_other", "recall_no_memory",
           "ce_own", "ce_other", "ce_no_memory")
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
    """kind, entries, documents from a folder named as run.sh names them: <kind>_m<entries>_n<documents>."""
    match = re.fullmatch(r"(keyed|shared|lora_shared|lora)_m(\d+)_n(\d+)", path.name)
    if not match:
        return {"kind": "?", "entries": None, "documents": None}
    return {"kind": match[1], "entries": int(match[2]), "documents": int(match[3])}


def read_row(path: Path) -> dict[str, Any]:
    """One run's figures; `missing` names what is absent when the run did not finish or was not evaluated."""
    try:
        run = newest_run(path)
    except FileNotFoundError as e:  # the training failed before it made its run folder
        return {"run_dir": str(path), **_from_name(path), "missing": str(e)}
    config = yaml.safe_load((run / "config.yaml").read_text())
    row: dict[str, Any] = {"run_dir": str(run), "kind": config.get("document_memory", "keyed"),
                           "entries": config.get("hook_memory_dim"), "documents": config.get("max_labels")}
    summary_path = run / "eval" / "summary.json"
    if not summary_path.is_file():
        row["missing"] = f"{summary_path} (training or evaluation did not finish)"
        return row
    summary = json.loads(summary_path.read_text())
    recall, ce = summary["rougeL_recall"], summary["ce"]
    keyed = row["kind"] in PER_DOCUMENT
    lora = summary.get("lora") or {}
    row.update({
        "parameters": lora.get("trainable_parameters"), "lora_rank": lora.get("rank"),
        "recall_own": recall.get("right_key") if keyed else recall.get("memory"),
        "recall_other": recall.get("other_keys") if keyed else None,
        "recall_no_memory": recall.get("no_memory"),
        "ce_own": ce.get("diagonal_mean") if keyed else ce.get("memory_mean"),
        "ce_other": ce.get("off_diagonal_mean") if keyed else None,
        "ce_no_memory": ce.get("no_memory_mean"),
        "documents_evaluated": summary.get("documents"),
    })
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["method", "entries", "documents", "LoRA params (rank)", "R-L recall own key / memory", "R-L recall other keys",
              "R-L recall no memory", "CE own key / memory", "CE other keys", "CE no memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "missing" in row:
            cells = [row["kind"], _cell(row["entries"]), _cell(row["documents"])] + ["missing"] * 7
        else:
            cells = [_cell(row[c]) for c in COLUMNS]
            if row.get("lora_rank") is not None:
                cells[3] = f"{row['parameters']} ({row['lora_rank']})"
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "ROUGE-L recall of greedy continuations (mean over documents; evaluate_memory.py), CE in "
             "nats/token. A shared memory (or one shared LoRA adapter) has no keys: its own-key columns hold the "
             "memory's figures and its other-key columns are empty. Per-document LoRA: the own / other "
             "adapters; its rank matched to the keyed memory's parameters at the same entries (at least 1)."]
    notes += [f"- missing: {row['run_dir']}: {row['missing']}" for row in rows if "missing" in row]
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels against the number of documents (log axis): ROUGE-L recall and CE."""

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_recall, ax_ce = fig.subplots(1, 2)
    done = [r for r in rows if "missing" not in r]
    for kind, entries in sorted({(r["kind"], r["entries"]) for r in done}):
        series = sorted((r for r in done if (r["kind"], r["entries"]) == (kind, entries)), key=lambda r: r["documents"])
        x = [r["documents"] for r in series]
        style = STYLES.get(kind, "-")
        for ax, own, other in ((ax_recall, "recall_own", "recall_other"), (ax_ce, "ce_own", "ce_other")):
            line, = ax.plot(x, [r[own] for r in series], style, marker="o",
                            label=f"{kind}, {'matched to ' if 'lora' in kind else ''}{entries} entries: "
                                  f"{'own key' if kind in PER_DOCUMENT else 'memory'}")
            if kind in PER_DOCUMENT:
                ax.plot(x, [r[other] for r in series], ":", marker="x", color=line.get_color(),
                        label=f"{kind}, {entries} entries: other keys")
    counts = sorted({r["documents"] for r in done})
    for ax, label in ((ax_recall, "ROUGE-L recall"), (ax_ce, "CE (nats/token)")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("documents in one memory")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_recall.set_ylim(0, 1.02)
    ax_recall.legend(fontsize=7)
    fig.suptitle("memory capacity: recall and CE against the number of documents")
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
    rows.sort(key=lambda r: (str(r["kind"]), r["entries"] or 0, r["documents"] or 0))
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
