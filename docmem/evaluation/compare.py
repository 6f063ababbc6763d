"""Several runs side by side (evaluate_memory.py --compare): each labelled by the config
fields that set it apart, one table (compare.md, compare.json) and overlaid curves."""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from docmem.atomic import write_atomic
from docmem.config import TrainConfig, load_run_config
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.evaluation.pipeline import evaluate_run
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.run_folder import FoundationCache, read_metrics, resolve_run_dir
from utils import table_cell

log = logging.getLogger(__name__)

# config fields that say where or how often, not what was trained: never a label in --compare
NON_SEMANTIC_FIELDS = {"save_dir", "save_freq", "top_k_tokens", "cache_budget_gb", "lm_cache_dir", "data_cache_dir",
                       "device", "num_gpus", "reference_loop", "precision"}


def differing_fields(configs: Sequence[dict]) -> list[str]:
    """TrainConfig fields whose values are not the same in every run (where/how-often fields aside)."""
    names = [f.name for f in fields(TrainConfig) if f.name not in NON_SEMANTIC_FIELDS]
    return [n for n in names if len({json.dumps(_field(c, n), sort_keys=True) for c in configs}) > 1]


def _field(config: dict, name: str) -> Any:
    """A config value; a field the run predates reads as TrainConfig's default."""
    if name in config:
        return config[name]
    default = TrainConfig.__dataclass_fields__.get(name)
    return None if default is None else default.default


def run_labels(configs: Sequence[dict], names: Sequence[str]) -> list[str]:
    """Each run labelled by the fields where it departs from the most common value among the runs
    (a field without a single most common value is named in every label); a run that departs
    nowhere is the 'baseline'. Duplicate labels get the run's name."""
    varying = differing_fields(configs)
    modes: dict[str, str | None] = {}
    for f in varying:
        counts = Counter(json.dumps(_field(c, f), sort_keys=True) for c in configs).most_common()
        # no single most common value (e.g. two runs): name the field in every label
        modes[f] = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None
    labels = []
    for c in configs:
        parts = [f"{f}={_field(c, f)}" for f in varying if json.dumps(_field(c, f), sort_keys=True) != modes[f]]
        labels.append(", ".join(parts) if parts else "baseline")
    counts = Counter(labels)
    return [f"{label} [{name}]" if counts[label] > 1 else label for label, name in zip(labels, names)]


def compare(run_paths: Sequence[str | Path], out: str | Path, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the runs that lack eval/summary.json, then one table and overlaid curves for all:
    DIR/compare.md, compare.json, recall.png, selection_stats.png. Returns compare.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [resolve_run_dir(p) for p in run_paths]
    cache: FoundationCache = {}
    summaries, configs, histories = [], [], []
    for run_dir in run_dirs:
        path = run_dir / EVAL_DIR / "summary.json"
        if path.is_file():
            summaries.append(json.loads(path.read_text()))
        else:
            log.info(f"{run_dir} has no {EVAL_DIR}/ yet: evaluating it")
            summaries.append(evaluate_run(run_dir, options, cache))
        configs.append(load_run_config(run_dir, flag="compare")[1])
        histories.append(read_metrics(run_dir))
    names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    labels = run_labels(configs, names)
    conditions = list(dict.fromkeys(c for s in summaries for c in s["rougeL_recall"]))
    stat_keys = ("l0", "l2", "pairwise_distance", "normalized_distance")

    rows = []
    for label, run_dir, summary, config in zip(labels, run_dirs, summaries, configs):
        ce = summary["ce"]
        sel = summary.get("selection_final") or {}
        rows.append({
            "label": label, "run_dir": str(run_dir),
            "config": {f: _field(config, f) for f in differing_fields(configs)},
            "rougeL_recall": {c: summary["rougeL_recall"].get(c) for c in conditions},
            "ce_diagonal_mean": ce.get("diagonal_mean", ce.get("memory_mean")),
            "ce_off_diagonal_mean": ce.get("off_diagonal_mean"),
            "ce_diagonal_lowest_rows": ce.get("diagonal_lowest_rows"),
            "ce_no_memory_mean": ce.get("no_memory_mean"),
            "selection_final": {k: sel.get(k) for k in stat_keys} if sel else None,
            "length_l0_pearson_r": summary.get("length_l0_pearson_r"),
            "acceptance_passed": (summary.get("acceptance") or {}).get("passed"),
            "documents": summary.get("documents"),
        })

    header = (["run"] + [f"R-L rec. {c}" for c in conditions]
              + ["CE diag", "CE off-diag", "diag lowest", "CE no_mem", "L0", "L2", "pairwise", "normalized", "R"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        sel = row["selection_final"] or {}
        cells = ([row["label"]] + [table_cell(row["rougeL_recall"][c]) for c in conditions]
                 + [table_cell(row["ce_diagonal_mean"]), table_cell(row["ce_off_diagonal_mean"]),
                    table_cell(None if (lowest := row["ce_diagonal_lowest_rows"]) is None else f"{lowest}/{row['documents']}"),
                    table_cell(row["ce_no_memory_mean"])]
                 + [table_cell(sel.get(k), 2) for k in stat_keys] + [table_cell(row["length_l0_pearson_r"])])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    varying = differing_fields(configs)
    notes = [
        "",
        f"Runs differ in: {', '.join(varying) if varying else 'nothing (same settings)'}. "
        "Each is labelled by where it departs from the most common setting.",
        "R-L rec.: mean ROUGE-L recall of greedy continuations (over documents). For a shared memory, "
        "`memory` is the memory without key and CE diag is its mean CE. CE in nats/token. "
        "L0/L2/pairwise/normalized: final memory selection, mean over documents. "
        "R: Pearson R of L0 against document length.",
        "",
        *[f"- {row['label']}: `{row['run_dir']}`" for row in rows],
    ]
    write_atomic(out / "compare.md", "\n".join(lines + notes) + "\n")
    report = {"runs": rows, "conditions": conditions, "differing_fields": varying}
    write_json(out / "compare.json", report)
    analysis_plots.plot_compare_recall(labels, {c: [row["rougeL_recall"][c] for row in rows] for c in conditions},
                                       out / "recall.png")
    analysis_plots.plot_selection_stats(dict(zip(labels, histories)), out / "selection_stats.png",
                                        title="memory-selection statistics over epochs (mean over documents)")
    log.info(f"comparison of {len(rows)} runs written to {out}")
    return report
