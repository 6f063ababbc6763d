"""Stage paper_run: the paper's run timed. `run.sh paper` (10 documents x 10 segments of 128 words, max length
256, batch 16, 500 epochs, a summary every 10) on a random-weight Pythia-1B with the real tokenizer and
the WikiText copy, in bf16: wall time to summary.json, s/step with and without the summaries, the peak
GPU memory; then 20 epochs in fp32 for the fp32-vs-bf16 CE difference."""
from __future__ import annotations

import sys

from .common import (
    TOKENIZER,
    WIKITEXT,
    WIKITEXT_CONFIG,
    Progress,
    Stage,
    StageError,
    metrics,
    newest_run,
    read_json,
    training_figures,
)

FP32_RESERVE_S = 45  # of the stage's limit, kept for the fp32 comparison run


def model_and_scale(st: Stage) -> tuple[str, list[str], int]:
    """(--lm_path, flags that scale the run, fp32 epochs): Pythia-1B's shape, or the smoke run's tiny model."""
    if st.smoke:
        scale = ["--max_labels", "2", "--max_segments", "2", "--segment_length", "16", "--max_length", "32",
                 "--hook_memory_layer", "1", "--num_epochs", "4", "--save_freq", "2", "--num_gpus", "0"]
        return str(st.tiny_lm()), scale, 4
    lm = st.work / "pythia-1b-random"
    st.run("make_model", [sys.executable, "-m", "benchmarks.make_random_lm", "--shape", "pythia-1b", "--dtype",
                          "bf16", "--seed", "0", "--tokenizer", str(st.data / TOKENIZER), "--out", str(lm)])
    return str(lm), [], 20


def run(st: Stage) -> None:
    wikitext = ["--dataset", WIKITEXT_CONFIG, "--data_path", str(st.data / WIKITEXT), "--data_split", "test"]
    lm, scale, fp32_epochs = model_and_scale(st)
    base = ["bash", "run.sh", "paper", "--lm_path", lm, *wikitext, *scale]
    progress = Progress(st.work / "bf16")
    result = st.run("paper_bf16", base + ["--precision", "bf16", "--save_dir", str(st.work / "bf16")],
                    reserve=0 if st.smoke else FP32_RESERVE_S, poll=progress, check=False)
    if not list((st.work / "bf16").glob("run_*")):
        raise StageError(f"the bf16 run exited with {result['rc']} before it made its run folder (log {result['log']})")
    bf16_run = newest_run(st.work / "bf16")
    history = metrics(bf16_run)
    st.figures["bf16"] = {"process_seconds": result["seconds"], "wall_to_summary_s": progress.summary_at,
                          "epochs_done": len(history), "progress_samples": progress.samples[-50:]}
    if len(progress.samples) >= 3:  # steady pace from the samples, whatever happens at the end
        (t0, e0), (t1, e1) = progress.samples[1], progress.samples[-1]
        st.figures["bf16"]["s_per_epoch_sampled"] = round((t1 - t0) / (e1 - e0), 4) if e1 > e0 else None
    if (bf16_run / "summary.json").is_file():
        st.figures["bf16"]["summary"] = training_figures(read_json(bf16_run / "summary.json"))
    st.pictures += sorted(bf16_run.glob("summaries/epoch_*/losses.png"))[-1:]
    if result["timed_out"] or result["rc"] != 0:
        raise StageError(f"the bf16 run {'ran out of time' if result['timed_out'] else 'exited ' + str(result['rc'])}"
                         f" after {len(history)} epochs (log {result['log']})")
    st.run("paper_fp32", base + ["--precision", "fp32", "--num_epochs", str(fp32_epochs), "--save_freq",
                                 str(fp32_epochs), "--save_dir", str(st.work / "fp32")])
    fp32_run = newest_run(st.work / "fp32")
    fp32 = metrics(fp32_run)
    pairs = [(a["ce_positive"], b["ce_positive"]) for a, b in zip(fp32, history)]
    diffs = [abs(a - b) for a, b in pairs]
    st.figures["fp32_vs_bf16"] = {
        "epochs": len(pairs), "ce_positive_fp32": [a for a, _ in pairs], "ce_positive_bf16": [b for _, b in pairs],
        "max_abs_diff": max(diffs), "max_rel_diff": max(d / max(abs(a), 1e-12) for d, (a, _) in zip(diffs, pairs)),
        "abs_diff_last_epoch": diffs[-1],
        "fp32_run": training_figures(read_json(fp32_run / "summary.json")),
    }
