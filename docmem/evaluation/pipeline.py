"""Every measurement of one run, into run_N/eval/ (the files: docs/run_folder.md).

evaluate_run(run_dir, options) loads a saved run (docmem/run_folder.py) and measures it;
evaluate_trained(...) measures the objects training still holds (train_guidance.py
--eval_at_end). Both end in evaluate_loaded, which runs, in order: recall in generation,
the CE matrix, selection statistics, L0 against length, the key landscape and attribution.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import wikitext
from docmem.config import TrainConfig, load_run_config
from docmem.evaluation.attribution import evaluate_attribution
from docmem.evaluation.baselines import evaluate_lora_run
from docmem.evaluation.ce_table import CETable, evaluate_ce_matrix
from docmem.evaluation.generation import evaluate_recall
from docmem.evaluation.landscape import compute_landscape, landscape_skipped, length_report, selection_report
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.pictures.picture_thread import PictureThread
from docmem.run_folder import FoundationCache, LoadedRun, load_run, read_metrics, resolve_run_dir
from document_memories import DocumentMemory
from foundations import Foundation
from foundations.placement import resolve_precision

log = logging.getLogger(__name__)


def evaluate_loaded(run: LoadedRun, options: EvalOptions) -> dict[str, Any]:
    """Every measurement of one run, written into run_dir/eval/; returns summary.json's content.
    The pictures are drawn by a helper thread while the measuring goes on (drawing.py)."""
    options.validate()
    run.memory.eval()
    started = time.time()
    out = run.run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    documents = run.documents[: options.max_docs] if options.max_docs else run.documents
    n = len(documents)
    titles = [d.title for d in documents]
    memory = run.memory
    log.info(f"{run.run_dir}: {n} documents, {'keyed' if run.config.uses_keys else 'shared'} memory on block "
             f"{run.config.hook_memory_layer} of {run.foundation.name}")

    with PictureThread() as pictures:
        # 1. recall in generation
        recall = evaluate_recall(run, documents, options)
        write_json(out / "recall.json", recall)
        pictures.draw(analysis_plots.plot_recall_bars, recall["mean"], out / "recall.png",
                      title=f"{run.run_dir.name}: ROUGE recall of greedy continuations "
                            f"({recall['segments_scored']} segments, {n} documents)")

        # 2. CE matrix (token level, no generation)
        t0 = time.time()
        table = CETable(run, documents, options)
        ce = evaluate_ce_matrix(table, run, documents, options.ce_other_keys)
        write_json(out / "ce_matrix.json", ce)
        if ce["matrix"] is not None:
            pictures.draw(analysis_plots.plot_ce_matrix, np.array(ce["matrix"]), titles, out / "ce_matrix.png")
        log.info(f"CE matrix in {time.time() - t0:.1f}s")

        # 3. selection statistics over training and of the final memory
        history = read_metrics(run.run_dir)
        selection, selections = selection_report(memory, history, options.l0_threshold)
        write_json(out / "selection_stats.json", selection)
        pictures.draw(analysis_plots.plot_selection_stats, {run.run_dir.name: history}, out / "selection_stats.png",
                      title=f"{run.run_dir.name}: memory-selection statistics (mean over documents)")

        # 4. memory size against document length
        lengths = [table.tokens(d) for d in range(n)]
        length_json = length_report(selections, lengths, documents, options.l0_threshold)
        write_json(out / "length_vs_l0.json", length_json)
        r = length_json.get("pearson_r")
        if selections is not None:
            pictures.draw(analysis_plots.plot_length_vs_l0, lengths, [d["l0"] for d in length_json["documents"]],
                          titles, out / "length_vs_l0.png", r, options.l0_threshold)

        # 5. the DocRep landscape
        landscape_summary = landscape(run, table, titles, options, out, pictures)

        # 6. attribution, last: the landscape's pictures are drawn meanwhile
        attribution = None
        if run.config.uses_keys:  # which document a text came from: training segments and held-out continuations
            t0 = time.time()
            attribution = evaluate_attribution(run, documents, options.gen_batch_size, options.key_sets_per_pass,
                                               table, options.attribution_docs)
            write_json(out / "attribution.json", attribution)
            attribution = {k: attribution[k]["top1_accuracy"] for k in ("training_segments", "held_out")}
            log.info(f"attribution top-1 accuracy: {attribution} (in {time.time() - t0:.1f}s)")
    measured = {"selection_final": selection["final"], "length_l0_pearson_r": r, "landscape": landscape_summary}
    summary = _summarise(run, options, recall, ce, measured, time.time() - started)
    summary["attribution_top1_accuracy"] = attribution
    write_json(out / "summary.json", summary)
    log.info(f"written to {out} in {summary['wall_seconds']:.0f}s")
    return summary


def landscape(run: LoadedRun, table: CETable, titles: list[str], options: EvalOptions, out: Path,
              pictures: PictureThread) -> dict[str, Any] | None:
    """landscape.json, landscape.png and landscape/doc_NN.png (each drawn as soon as its document is
    measured); returns the summary's part."""
    skipped = landscape_skipped(run.memory, options.grid)
    if skipped:
        write_json(out / "landscape.json", {"skipped": True, "reason": skipped})
        return None
    t0 = time.time()
    n = len(titles)
    keys = run.memory.doc_keys.detach()[:n].float().cpu().numpy()
    own = [tuple(k) for k in keys.tolist()]

    def draw_document(d: int, entry: dict[str, Any], axis: np.ndarray) -> None:
        ppl = np.array(entry["perplexity"])
        pictures.draw(analysis_plots.plot_landscape, ppl, axis, own[d], [k for j, k in enumerate(own) if j != d],
                      tuple(entry["minimum"]["key"]), f"{d}: {titles[d]}\nperplexity over keys (min {ppl.min():.3g})",
                      out / "landscape" / f"doc_{d:02d}.png")

    with tqdm(total=n * options.grid ** 2, desc="landscape", unit="key", dynamic_ncols=True) as bar:
        land = compute_landscape(lambda doc, cands: table.ce(doc, list(cands), bar), keys, options.grid,
                                 on_document=draw_document)
    land.update({"grid": options.grid, "titles": titles, "perplexity_index": "[document][y][x]"})
    near = sum(d["minimum_nearest_own_key"] for d in land["documents"])
    land["minima_nearest_own_key"] = near
    write_json(out / "landscape.json", land)
    pictures.draw(analysis_plots.plot_landscape_overview, [np.array(d["perplexity"]) for d in land["documents"]],
                  np.array(land["axis"]), own, [tuple(d["minimum"]["key"]) for d in land["documents"]], titles,
                  out / "landscape.png")
    log.info(f"landscape ({options.grid}x{options.grid} keys) in {time.time() - t0:.1f}s")
    return {"minima_nearest_own_key": near, "documents": n,
            "mean_distance_minimum_to_own_key":
                float(np.mean([d["distance_minimum_to_own_key"] for d in land["documents"]]))}


def _summarise(run: LoadedRun, options: EvalOptions, recall: dict, ce: dict, measured: dict[str, Any],
               seconds: float) -> dict[str, Any]:
    """summary.json: the headline numbers; `measured` holds selection_final, length_l0_pearson_r
    and landscape."""
    rouge_l = {c: recall["mean"][c]["rougeL"]["recall"] for c in recall["conditions"]}
    acceptance = None
    if run.config.uses_keys:
        def ratio(a: float, b: float | None) -> float | None:
            return None if b is None else (math.inf if b == 0 and a > 0 else (a / b if b else None))

        right = rouge_l["right_key"]
        vs_other = ratio(right, rouge_l.get("other_keys"))
        vs_plain = ratio(right, rouge_l["no_memory"])
        acceptance = {
            "rougeL_recall_right_over_other_keys": vs_other, "rougeL_recall_right_over_no_memory": vs_plain,
            "ce_diagonal_lowest_every_row": ce["diagonal_lowest_every_row"],
            "passed": bool((vs_other is None or vs_other >= 2) and vs_plain is not None and vs_plain >= 2
                           and ce["diagonal_lowest_every_row"]),
            "criteria": "ROUGE-L recall right_key >= 2x other_keys and >= 2x no_memory; CE row minima on the diagonal",
        }
        ce_part = {k: ce[k] for k in ("diagonal_mean", "off_diagonal_mean", "diagonal_lowest_rows",
                                       "diagonal_lowest_every_row")}
        ce_part.update({"no_key_mean": float(np.mean(ce["no_key"])), "no_memory_mean": float(np.mean(ce["no_memory"]))})
    else:
        ce_part = {"memory_mean": float(np.mean(ce["memory"])), "no_memory_mean": float(np.mean(ce["no_memory"]))}
    # json.dumps(allow_nan=False) rejects inf: write it as a string
    if acceptance:
        for k in ("rougeL_recall_right_over_other_keys", "rougeL_recall_right_over_no_memory"):
            if acceptance[k] == math.inf:
                acceptance[k] = "inf"
    return {
        "run_dir": str(run.run_dir), "document_memory": run.config.document_memory,
        "documents": len(ce["titles"]), "settings": asdict(options),
        "rougeL_recall": rouge_l, "recall_mean": recall["mean"],
        "segments_scored": recall["segments_scored"], "segments_skipped_too_short": recall["segments_skipped_too_short"],
        "ce": ce_part, **measured,
        "acceptance": acceptance, "wall_seconds": seconds,
    }


def evaluate_trained(run_dir: str | Path, config: TrainConfig, foundation: Foundation, memory: DocumentMemory,
                     documents: list[wikitext.Document], dtype: torch.dtype,
                     options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate right after training (train_guidance.py --eval_at_end), reusing the loaded LM."""
    head_dtype = resolve_precision(config, str(next(memory.parameters()).device)).head  # as training scored
    run = LoadedRun(Path(run_dir), config, {}, foundation, memory, documents, dtype, head_dtype)
    return evaluate_loaded(run, options or EvalOptions())


def evaluate_run(run_dir: str | Path, options: EvalOptions, foundation_cache: FoundationCache | None = None
                 ) -> dict[str, Any]:
    """Load a saved run (or a save_dir's newest finished one) and evaluate it (a LoRA baseline run:
    evaluation/baselines.py, with the same measures and files)."""
    run_dir = resolve_run_dir(run_dir)
    if load_run_config(run_dir, flag="run_dir")[0].uses_lora:
        return evaluate_lora_run(run_dir, options)
    run = load_run(run_dir, options.validate(), foundation_cache)
    return evaluate_loaded(run, options)
