"""The baselines measured as the memory is: per-document LoRA and shared LoRA runs (into run_N/eval/), and
the document in the prompt (no training; a run's documents and LM, into --out or run_N/eval_prompt/).

The same measures and files as docmem/evaluation/pipeline.py: recall.json (ROUGE of greedy continuations
under the right condition, other documents' conditions and the plain LM), ce_matrix.json (document x
condition), attribution.json (top-1 on training segments and held-out continuations, by the lowest CE
over the documents' conditions) and summary.json with the same fields. A condition is an adapter (LoRA)
or a document's training text before the prompt; `right_key` / `other_keys` name the own / other
documents' conditions so that every method's summary reads alike.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docmem.baselines.lora_memory import LoraAdapters, LoraEngine, load_adapters
from docmem.baselines.prompt import PromptEngine, context_ids, training_text
from docmem.config import load_run_config
from docmem.engines import NO_MEMORY, KeySet, LossEngine
from docmem.errors import ConfigError
from docmem.evaluation.attribution import (
    Scorer,
    TextScores,
    attributed_documents,
    attribution_report,
    score_columns,
    table_scores,
)
from docmem.evaluation.ce_table import CETable, ce_matrix, shared_ce
from docmem.evaluation.generation import Prompt, RecallInputs, greedy_rows, plan_conditions, prompts_of, recall_report
from docmem.evaluation.options import EVAL_DIR, EvalOptions, write_json
from docmem.pictures import evaluation_plots as analysis_plots
from docmem.pictures.picture_thread import PictureThread
from docmem.run_folder import (
    MEMORY_DIR,
    LoadedRun,
    documents_mismatch,
    load_documents,
)
from foundations.placement import open_foundation, resolve_device, resolve_precision

log = logging.getLogger(__name__)
PROMPT_EVAL_DIR = "eval_prompt"  # run_N/eval_prompt/: the prompt baseline on that run's documents
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Method:
    """How a baseline is measured: its conditions, how it scores and how it generates."""
    name: str  # lora, lora_shared, prompt
    kind: str  # per_document or shared (generation.plan_conditions)
    engine: LossEngine  # CE under a column (doc_columns[j], shared_column or NO_MEMORY)
    attribution_engine: LossEngine | None  # the same, without a prefix cache (texts are not training batches)
    doc_columns: list[KeySet]  # document j's condition
    shared_column: KeySet  # a shared method's one condition
    row_ids: Callable[[str, Prompt, int | None], list[int]]  # a generation row's input ids
    generate_batch: Callable[[list[tuple[str, int | None]], dict[str, Any]], torch.Tensor]  # rows' conditions


def load_run_parts(run_dir: Path, options: EvalOptions) -> LoadedRun:
    """A run's config, LM and documents (checked against config.yaml), without its memory."""
    config, saved = load_run_config(run_dir, flag="run_dir")
    device = resolve_device(config, options.device)
    precision = resolve_precision(config, device)
    foundation = open_foundation(config, device, precision.lm)  # never shared: peft changes the LM in place
    documents = load_documents(config)
    mismatch = documents_mismatch(saved.get("documents", []), documents) if "documents" in saved else None
    if mismatch:
        raise ConfigError("run_dir", str(run_dir), f"the documents rebuilt from config.yaml differ ({mismatch})")
    return LoadedRun(run_dir, config, saved, foundation, None, documents, precision.lm, precision.head)


def lora_method(run: LoadedRun, adapters: LoraAdapters) -> Method:
    plan = adapters.plan
    shared = plan.kind == "lora_shared"
    names = {d: adapters.adapter_of(d) for d in range(len(run.documents))} if not shared else {}

    def tag(condition: str, doc: int | None) -> str:
        if condition == "no_memory":
            return BASE
        return plan.adapters[0] if shared else names[doc]

    def generate_batch(rows: list[tuple[str, int | None]], kwargs: dict[str, Any]) -> torch.Tensor:
        return adapters.model.generate(**kwargs, adapter_names=[tag(c, d) for c, d in rows])

    budget = int(run.config.cache_budget_gb * (1 << 30))
    return Method(plan.kind, "shared" if shared else "per_document",
                  LoraEngine(adapters, run.dtype, budget, run.head_dtype),
                  LoraEngine(adapters, run.dtype, budget, run.head_dtype, one_batch=True),
                  [names[d] for d in sorted(names)], plan.adapters[0],
                  lambda condition, prompt, doc: list(prompt.ids), generate_batch)


def prompt_method(run: LoadedRun, contexts: list[list[int]]) -> Method:
    engine = PromptEngine(run.foundation, contexts)

    def row_ids(condition: str, prompt: Prompt, doc: int | None) -> list[int]:
        return list(prompt.ids) if condition == "no_memory" else contexts[doc] + list(prompt.ids)

    return Method("prompt", "per_document", engine, engine, list(range(len(contexts))), None, row_ids,
                  lambda rows, kwargs: run.foundation.model.generate(**kwargs))


def evaluate_method(run: LoadedRun, method: Method, options: EvalOptions, out: Path) -> dict[str, Any]:
    """recall, CE matrix and attribution of one baseline into `out`; returns summary.json's content."""
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    documents = run.documents[: options.max_docs] if options.max_docs else run.documents
    titles = [d.title for d in documents]
    tokenizer = run.foundation.tokenizer
    prompts, skipped = prompts_of(tokenizer, documents, options, run.config.max_length)
    plans = plan_conditions(prompts, len(documents), method.kind, options.max_other_keys)
    everything = [(c, i, d) for c, rows in plans.items() for i, d in rows]
    inputs = [method.row_ids(c, prompts[i], d) for c, i, d in everything]
    with PictureThread() as pictures:  # drawn while the measuring goes on
        t0 = time.time()
        continuations = greedy_rows(run.foundation, inputs, [len(prompts[i].reference_ids) for _, i, _ in everything],
                                    options.gen_batch_size,
                                    lambda rows, kw: method.generate_batch([(everything[r][0], everything[r][2])
                                                                            for r in rows], kw))
        log.info(f"{method.name}: {len(everything)} generations in {time.time() - t0:.1f}s")
        recall = recall_report(RecallInputs(tokenizer, documents, prompts, skipped, options, run.config.max_length), plans,
                               continuations)
        write_json(out / "recall.json", recall)
        pictures.draw(analysis_plots.plot_recall_bars, recall["mean"], out / "recall.png",
                      title=f"{method.name}: ROUGE recall ({recall['segments_scored']} segments)")
        table = CETable(run, documents, options, engine=method.engine)
        attribution = None
        if method.kind == "per_document":
            ce = ce_matrix(table, titles, method.doc_columns[: len(documents)], {"no_memory": NO_MEMORY},
                           options.ce_other_keys)
            if ce["matrix"] is not None:
                pictures.draw(analysis_plots.plot_ce_matrix, np.array(ce["matrix"]), titles, out / "ce_matrix.png")
            ce_part = {k: ce[k] for k in ("diagonal_mean", "off_diagonal_mean", "diagonal_lowest_rows",
                                           "diagonal_lowest_every_row")}
            ce_part["no_memory_mean"] = float(np.mean(ce["no_memory"]))
            chosen = attributed_documents(len(documents), options.attribution_docs)
            training = table_scores(table, documents, method.doc_columns[: len(documents)], chosen=chosen)
            report = attribution_report(run.config, documents, _text_scorer(run, method, options, len(documents)),
                                        training, chosen)
            write_json(out / "attribution.json", report)
            attribution = {k: report[k]["top1_accuracy"] for k in ("training_segments", "held_out")}
        else:
            ce = shared_ce(table, titles, method.shared_column)
            ce_part = {"memory_mean": float(np.mean(ce["memory"])), "no_memory_mean": float(np.mean(ce["no_memory"]))}
        write_json(out / "ce_matrix.json", ce)
    log.info(f"{method.name}: written to {out} in {time.time() - started:.0f}s")
    summary = {
        "run_dir": str(run.run_dir), "document_memory": method.name, "documents": len(documents),
        "settings": asdict(options), "rougeL_recall": {c: recall["mean"][c]["rougeL"]["recall"] for c in plans},
        "recall_mean": recall["mean"], "segments_scored": recall["segments_scored"],
        "segments_skipped_too_short": skipped, "ce": ce_part, "selection_final": None,
        "length_l0_pearson_r": None, "landscape": None, "attribution_top1_accuracy": attribution,
        "acceptance": None, "wall_seconds": time.time() - started,
    }
    return summary


def _text_scorer(run: LoadedRun, method: Method, options: EvalOptions, n: int
                 ) -> Callable[[list[str], str], list[TextScores]]:
    scorer = Scorer(run.foundation, None, run.config.hook_memory_layer, run.dtype, run.config.max_length,
                    options.gen_batch_size, options.key_sets_per_pass, head_dtype=run.head_dtype)
    engine = method.attribution_engine or method.engine

    def score(texts: list[str], label: str) -> list[TextScores]:
        counts, means = score_columns(engine, scorer, texts, method.doc_columns[:n] + [NO_MEMORY])
        return [TextScores(int(counts[t]), means[t, :n].tolist(), float(means[t, n]), float(means[t, n]))
                for t in range(len(texts))]

    return score


def evaluate_lora_run(run_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """A LoRA baseline run's eval/ (its adapters from memory/)."""
    run = load_run_parts(run_dir, options.validate())
    adapters = load_adapters(run.foundation, run_dir / MEMORY_DIR)
    summary = evaluate_method(run, lora_method(run, adapters), options, run_dir / EVAL_DIR)
    summary["lora"] = {"rank": adapters.plan.rank, "targets": list(adapters.plan.targets),
                       "trainable_parameters": adapters.plan.parameters,
                       "parameters_per_adapter": adapters.plan.parameters_per_adapter,
                       "keyed_memory_parameters": adapters.plan.keyed_parameters}
    write_json(run_dir / EVAL_DIR / "summary.json", summary)
    return summary


def evaluate_prompt(run_dir: Path, options: EvalOptions, out: Path | None = None) -> dict[str, Any]:
    """The document-in-the-prompt baseline on a run's documents and LM (its memory is not used), into
    `out` (default run_dir/eval_prompt/); its summary adds the context it costs per query."""
    run = load_run_parts(run_dir, options.validate())
    out = out or run_dir / PROMPT_EVAL_DIR
    contexts = context_ids(run.foundation.tokenizer, run.documents, run.config.segment_length)
    summary = evaluate_method(run, prompt_method(run, contexts), options, out)
    prompts, _ = prompts_of(run.foundation.tokenizer, run.documents, options, run.config.max_length)
    summary["context_tokens_per_query"] = float(np.mean([len(contexts[p.doc]) + len(p.ids) for p in prompts]))
    summary["document_tokens"] = [len(c) for c in contexts]
    summary["document_bytes"] = [len(training_text(d, run.config.segment_length).encode()) for d in run.documents]
    write_json(out / "summary.json", summary)
    return summary

