"""Stage paper_table: `run.sh smollm2`, the paper's experiment on SmolLM2-135M offline: keyed and shared memories
trained side by side (500 epochs each), each evaluated, one --compare report."""
from __future__ import annotations

import shutil

from .common import WIKITEXT, WIKITEXT_CONFIG, Stage, StageError, read_json, training_figures

# evaluation sized for the stage: no loss landscape (its grid is the slow part), greedy ROUGE-L of every
# segment under the own key and 2 others, 64 new tokens
EVAL_ARGS = "--grid 0 --max_other_keys 2 --new_tokens 64 --gen_batch_size 128"
SMOKE_EVAL_ARGS = "--grid 2 --prompt_tokens 8 --new_tokens 8 --max_other_keys 1 --threads 1"


def _compare_rows(report) -> dict:
    rows = read_json(report / "compare.json")["runs"]
    return {row["label"]: {k: row[k] for k in ("run_dir", "rougeL_recall", "ce_diagonal_mean", "ce_off_diagonal_mean",
                                               "ce_diagonal_lowest_rows", "ce_no_memory_mean", "selection_final",
                                               "length_l0_pearson_r", "acceptance_passed", "documents")}
            for row in rows}


def run(st: Stage) -> None:
    flags = ["--dataset", WIKITEXT_CONFIG, "--data_path", str(st.data / WIKITEXT), "--data_split", "test",
             "--save_freq", "100"]
    # two trainings at once: each gets half the threads the machine's 16 cores leave
    env = {"SMOLLM2_DIR": str(st.work), "SMOLLM2_JOBS": "2", "EVAL_ARGS": EVAL_ARGS, "OMP_NUM_THREADS": "6"}
    if st.smoke:
        flags += [*st.tiny_flags(), "--max_labels", "2", "--max_segments", "2", "--num_epochs", "2"]
        env.update(EVAL_ARGS=SMOKE_EVAL_ARGS, OMP_NUM_THREADS="1")
    result = st.run("smollm2", ["bash", "run.sh", "smollm2", *flags], env=env, check=False)
    trainings = {}
    for kind in ("keyed", "shared"):
        runs = sorted((st.work / kind).glob("run_*/summary.json"))
        if runs:
            trainings[kind] = training_figures(read_json(runs[-1]))
        log = st.work / f"{kind}.log"
        if log.is_file():  # run.sh's own per-training logs go into the bundle
            shutil.copy(log, st.runner.logs / f"paper_table_train_{kind}.log")
    st.figures["training"] = trainings
    if (st.work / "report" / "compare.json").is_file():
        st.figures["compare"] = _compare_rows(st.work / "report")
        st.figures["compare_md"] = (st.work / "report" / "compare.md").read_text()
        st.pictures += [p for p in (st.work / "report" / "recall.png",) if p.is_file()]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"run.sh smollm2 {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" (log {result['log']})")
