"""Stage speed: the training step's speed (bench_train_step.py) at the paper's shape, Pythia-1B, block 15,
batch 16 x 256: the three paths in fp32; the frozen and fast paths in fp32 with TF32 (a measurement of
its own); the same two in bf16; then Llama-2-7B's shape in bf16 when the GPU holds it; then the fast
bf16 step profiled (benchmarks/profile_step.py: the device busy against wall time). The smoke run
takes the tiny shape on the CPU, its bf16 run under the CUDA-rule autocast imitation. The report is
written again after every row."""
from __future__ import annotations

import sys

from .common import GIB, Stage, StageError, last_json_line

# the targets set for the fast path in bf16 at this shape (reported beside the figures)
TARGET_FAST_BF16_S = 0.012
TARGET_PEAK_GIB = 4.0
REPORT_KEYS = ("released_s_per_step", "frozen_two_pass_s_per_step", "fast_s_per_step", "fast_first_step_s",
               "speedup_vs_released", "speedup_vs_frozen_two_pass", "max_rel_diff_loss", "max_rel_diff_params",
               "equality_check", "peak_memory_kind", "device_name", "num_params", "layer", "batch", "seq",
               "precision", "tf32", "imitate_cuda_autocast", "step_times_s")


def runs_for(st: Stage) -> dict[str, list[str]]:
    """Each run's flags, the most telling first: a run cut by the stage's limit leaves the earlier ones."""
    if st.smoke:
        tiny = ["--shape", "tiny", "--batch", "2", "--seq", "32", "--threads", "1", "--steps", "2"]
        return {"tiny_bf16": tiny + ["--precision", "bf16", "--paths", "b,c", "--imitate_cuda_autocast"],
                "tiny_fp32": tiny + ["--precision", "fp32", "--paths", "a,b,c", "--tf32"]}  # TF32: a no-op on the CPU
    shape = ["--shape", "pythia-1b", "--layer", "15", "--batch", "16", "--seq", "256"]
    runs = {"pythia-1b_bf16": shape + ["--precision", "bf16", "--paths", "b,c", "--steps", "10"],
            "pythia-1b_fp32": shape + ["--precision", "fp32", "--paths", "a,b,c", "--steps", "3"],
            "pythia-1b_fp32_tf32": shape + ["--precision", "fp32", "--paths", "b,c", "--steps", "5", "--tf32"]}
    if st.gpu_memory_gib >= 40:
        runs["llama-7b_bf16"] = ["--shape", "llama-7b-like", "--layer", "31", "--batch", "16", "--seq", "256",
                                 "--precision", "bf16", "--paths", "b,c", "--steps", "3"]
    else:
        st.figures["llama-7b_bf16"] = {"skipped": f"needs >= 40 GiB of GPU memory, this GPU has {st.gpu_memory_gib}"}
    return runs


def profile_step(st: Stage, device: str) -> None:
    """The fast bf16 step profiled (benchmarks/profile_step.py): the device busy against the wall time,
    kernels and host syncs per step, at the paper's shape and 16 x 256 (tiny on the smoke run)."""
    shapes = ["--shapes", "tiny:2x32", "--steps", "2"] if st.smoke else []
    result = st.run("profile_step", [sys.executable, "-m", "benchmarks.profile_step", "--device", device, *shapes],
                    check=False)
    if result["rc"] != 0 or result["timed_out"]:
        st.figures["profile_step"] = {"failed": "timed out" if result["timed_out"] else f"exit {result['rc']}"}
    else:
        st.figures["profile_step"] = last_json_line(st.runner.logs / result["log"])["rows"]
    st.checkpoint()


def run(st: Stage) -> None:
    device = "cpu" if st.smoke else "cuda"
    errors = []
    for name, flags in runs_for(st).items():
        result = st.run(name, [sys.executable, "-m", "benchmarks.bench_train_step", "--device", device, "--seed", "0",
                               *flags], check=False)
        if result["rc"] != 0 or result["timed_out"]:
            errors.append(f"{name}: {'timed out' if result['timed_out'] else 'exit ' + str(result['rc'])}")
            st.figures[name] = {"failed": errors[-1]}
            st.checkpoint()
            if result["timed_out"]:
                break
            continue
        report = last_json_line(st.runner.logs / result["log"])
        st.figures[name] = {**{k: report.get(k) for k in REPORT_KEYS},
                            "peak_gib": {p: round(v / GIB, 3) for p, v in report["peak_memory_bytes"].items()}}
        st.checkpoint()  # the report after every row: a call cut short keeps the rows that finished
    if not any(e.endswith("timed out") for e in errors):
        profile_step(st, device)
    bf16 = st.figures.get("pythia-1b_bf16", {})
    if bf16.get("fast_s_per_step") is not None:  # the targets, reported, never asserted
        st.figures["targets"] = {"fast_bf16_s_per_step_max": TARGET_FAST_BF16_S, "fast_bf16_peak_gib_max": TARGET_PEAK_GIB,
                                 "fast_s_per_step_met": bf16["fast_s_per_step"] <= TARGET_FAST_BF16_S,
                                 "fast_peak_gib_met": bf16["peak_gib"]["fast"] <= TARGET_PEAK_GIB}
    if errors:
        raise StageError("; ".join(errors))
