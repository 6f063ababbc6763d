"""Stage paper_table: the paper's table on a real LM at the paper's scale. SmolLM2-135M with `run.sh
smollm2`'s settings (10 WikiText-103 articles x 10 segments of 128 words, max length 256, batch 16,
500 epochs, 32 memory entries on block 27), trained five ways, all at once on the GPU as background
jobs (at most MAX_JOBS at a time): key activations tanh, relu and sigmoid, a nonlinear key generator
(--document_key_module_type nonlinear --key_internal_layers 2), and the shared memory without keys.
Each run is evaluated (evaluate_memory.py --run_dir, at most MAX_JOBS at once), then one --compare
report. The table, one row per run, beside the paper's figures (METHOD.md section 6, "What the paper
measures"): R between the memory size (L0) and the document length, L0, L2 and the pairwise distance
at epoch SELECTION_EPOCH (from metrics.jsonl), the landscape's minima (how many lie nearest the own
key), and ROUGE-L recall, keyed against shared (from eval/*.json). --smoke runs the same code at tiny
size (the tiny LM, 2 articles, 2 epochs) and gives the same table shape."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .common import ROOT, WIKITEXT, WIKITEXT_CONFIG, Stage, StageError, metrics, read_json, training_figures

# name -> flags beside the preset's (the preset's key activation is tanh, its key generator linear)
RUNS: dict[str, list[str]] = {
    "tanh": [],
    "relu": ["--key_activation", "relu"],
    "sigmoid": ["--key_activation", "sigmoid"],
    "keygen_nonlinear": ["--document_key_module_type", "nonlinear", "--key_internal_layers", "2"],
    "shared": ["--document_memory", "shared"],
}
# the paper's R of L0 against document length (METHOD.md section 6); it gives no other figure per row
PAPER_R = {"tanh": 0.97, "relu": 0.86, "sigmoid": 0.79}
SELECTION_EPOCH = 50
MAX_JOBS = 5
THREADS_PER_JOB = "3"  # 16 cores over MAX_JOBS processes
EVAL_RESERVE_S = 90  # of the stage's limit, kept for the evaluations and the report
EVAL_ARGS = ["--grid", "5", "--max_other_keys", "2", "--new_tokens", "64", "--gen_batch_size", "128"]
SMOKE_EVAL_ARGS = ["--grid", "2", "--prompt_tokens", "8", "--new_tokens", "8", "--max_other_keys", "1",
                   "--threads", "1"]
SMOKE_RESERVE_S = 60
COLUMNS = ("run", "R (L0 vs length)", "paper R", f"L0 @{SELECTION_EPOCH}", f"L2 @{SELECTION_EPOCH}",
           f"pairwise @{SELECTION_EPOCH}", "landscape minima at own key", "minimum to own key",
           "R-L recall own key / shared memory", "R-L recall other keys", "R-L recall no memory", "epochs")


def preset_flags(preset: str = "smollm2") -> list[str]:
    """The training flags of a run.sh preset's `common=(...)` array: the one place its settings are written."""
    text = (ROOT / "run.sh").read_text()
    block = re.search(rf"\n  {preset}\)\n(.*?)\n    ;;", text, re.S)
    common = re.search(r"\bcommon=\((.*?)\)", block[1], re.S) if block else None
    if common is None:
        raise StageError(f"run.sh's {preset} preset has no common=(...) flags to take the paper's settings from")
    return shlex.split(common[1])


def _at_epoch(history: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """metrics.jsonl's record of that epoch (or the last one, when the run has fewer), with the epoch."""
    if not history:
        return {}
    record = next((r for r in history if r.get("epoch") == epoch), history[-1])
    return {k: record.get(k) for k in ("epoch", "l0", "l2", "pairwise_distance", "normalized_distance")}


def row(name: str, run_dir: Path | None) -> dict[str, Any]:
    """One row of the table from a run folder (its metrics.jsonl, eval/summary.json, eval/landscape.json)."""
    out: dict[str, Any] = {"run": name, "flags": " ".join(RUNS[name]) or "(the preset's)", "paper_r": PAPER_R.get(name)}
    if run_dir is None:
        return {**out, "missing": "no run folder"}
    history = metrics(run_dir)
    out.update(run_dir=str(run_dir), epochs=len(history), selection_at=_at_epoch(history, SELECTION_EPOCH))
    if (run_dir / "summary.json").is_file():
        out["training"] = training_figures(read_json(run_dir / "summary.json"))
    evaluation = run_dir / "eval" / "summary.json"
    if not evaluation.is_file():
        return {**out, "missing": "not evaluated"}
    summary = read_json(evaluation)
    recall = summary.get("rougeL_recall") or {}
    out.update(r=summary.get("length_l0_pearson_r"), recall_own=recall.get("right_key", recall.get("memory")),
               recall_other=recall.get("other_keys"), recall_no_memory=recall.get("no_memory"),
               ce=summary.get("ce"), landscape=summary.get("landscape"))
    landscape = run_dir / "eval" / "landscape.json"
    if landscape.is_file() and not read_json(landscape).get("skipped"):
        out["landscape_minima"] = [{k: d.get(k) for k in ("minimum", "own_key", "nearest_key_to_minimum",
                                                          "minimum_nearest_own_key", "distance_minimum_to_own_key")}
                                   for d in read_json(landscape)["documents"]]
    return out


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def table_md(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        sel, land = r.get("selection_at") or {}, r.get("landscape") or {}
        minima = (f"{land['minima_nearest_own_key']}/{land['documents']}" if land.get("documents") else "–")
        cells = [r["run"], _f(r.get("r")), _f(r.get("paper_r")), _f(sel.get("l0")), _f(sel.get("l2")),
                 _f(sel.get("pairwise_distance")), minima, _f(land.get("mean_distance_minimum_to_own_key")),
                 _f(r.get("recall_own")), _f(r.get("recall_other")), _f(r.get("recall_no_memory")),
                 str(r.get("epochs", "–")) + (f" ({r['missing']})" if r.get("missing") else "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    epochs = sorted({(r.get("selection_at") or {}).get("epoch") for r in rows} - {None})
    lines += ["", f"L0, L2, pairwise: mean over documents at epoch {', '.join(map(str, epochs)) or '–'} (metrics.jsonl; "
              f"the last epoch when a run has fewer than {SELECTION_EPOCH}). R: Pearson R of each document's L0 "
              "against its length, final memory (eval/length_vs_l0.json). Landscape: documents whose perplexity "
              "minimum over the key grid lies nearest their own key, and the mean distance from minimum to own key "
              "(eval/landscape.json). Recall: mean ROUGE-L recall of greedy continuations under the own key (keyed) "
              "or the memory (shared), other documents' keys, and no memory. Paper R: METHOD.md section 6."]
    return "\n".join(lines)


def run(st: Stage) -> None:
    flags = ["--dataset", WIKITEXT_CONFIG, "--data_path", str(st.data / WIKITEXT), "--data_split", "test",
             "--save_freq", "100"]
    env = {"OMP_NUM_THREADS": THREADS_PER_JOB}
    eval_args, reserve = EVAL_ARGS, EVAL_RESERVE_S
    if st.smoke:
        flags += [*st.tiny_flags(), "--max_labels", "2", "--max_segments", "2", "--num_epochs", "2"]
        env, eval_args, reserve = {"OMP_NUM_THREADS": "1"}, SMOKE_EVAL_ARGS, SMOKE_RESERVE_S
    common = preset_flags("smollm2")
    jobs = [(f"train_{name}", [sys.executable, "train_guidance.py", *common, *extra, *flags,
                               "--save_dir", str(st.work / name)]) for name, extra in RUNS.items()]
    trained = st.run_jobs(jobs, MAX_JOBS, env, reserve=reserve)
    finished = [name for name, rec in zip(RUNS, trained) if rec["rc"] == 0
                and list((st.work / name).glob("run_*/summary.json"))]
    runs = {name: max((st.work / name).glob("run_*"), key=lambda p: p.stat().st_mtime, default=None) for name in RUNS}
    evaluated = st.run_jobs([(f"eval_{name}", [sys.executable, "evaluate_memory.py", "--run_dir", str(runs[name]),
                                               *eval_args]) for name in finished], MAX_JOBS, env)
    done = [name for name, rec in zip(finished, evaluated) if rec["rc"] == 0]
    report = st.work / "report"
    if done:
        st.run("compare", [sys.executable, "evaluate_memory.py", "--compare", *(str(runs[n]) for n in done),
                           "--out", str(report), *eval_args], env=env, check=False)
    rows = [row(name, runs[name]) for name in RUNS]
    st.figures.update(rows=rows, table_md=table_md(rows), settings={"preset": "smollm2", "common": common,
                                                                    "flags": flags, "eval_args": eval_args})
    if (report / "compare.md").is_file():
        st.figures["compare_md"] = (report / "compare.md").read_text()
    st.pictures += [p for p in (report / "recall.png", runs["tanh"] and runs["tanh"] / "eval" / "landscape.png")
                    if p and p.is_file()]
    problems = [f"{rec['name']}: {_outcome(rec)} (log {rec['log']})" for rec in trained + evaluated if rec["rc"] != 0]
    if problems:
        raise StageError("; ".join(problems))


def _outcome(record: dict[str, Any]) -> str:
    if record.get("not_started"):
        return "not started before the limit"
    return "ran out of time" if record["timed_out"] else f"exited {record['rc']}"
