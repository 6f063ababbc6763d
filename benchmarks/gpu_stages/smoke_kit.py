"""A kit for gpu_check.py --smoke, built where it runs, so the smoke run goes through the real kit
code: a tiny pure-Python wheel (checked against this Python, installed into a target folder, imported
by the probe) and a GGUF-like file split into two call folders (joined and checked by sha256)."""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

PROBE_MODULE = "docmem_kit_probe"
SMOKE_GGUF_FILE = "smoke.gguf"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_probe_wheel(folder: Path) -> Path:
    """docmem_kit_probe-0.1-py3-none-any.whl: one module, one requirement the image meets (packaging)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{PROBE_MODULE}-0.1.dist-info"
    files = {
        f"{PROBE_MODULE}/__init__.py": b'"""Installed by gpu_check.py --smoke from its own kit."""\nVERSION = "0.1"\n',
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: docmem-kit-probe\nVersion: 0.1\n"
                            b"Requires-Python: >=3.9\nRequires-Dist: packaging>=20\n\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,", ""])
    wheel = folder / f"{PROBE_MODULE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return wheel


def build_smoke_kit(root: Path) -> list[Path]:
    """root/call1 and root/call2, as prepare_gpu_kit.py lays them out: wheels/, gguf/ parts, manifest.json."""
    blob = hashlib.sha256(b"docmem").digest() * 4096  # 128 KiB standing in for the 98 MB GGUF
    halves = (blob[: len(blob) // 2], blob[len(blob) // 2:])
    kits = [root / "call1", root / "call2"]
    parts = []
    for i, (kit, chunk) in enumerate(zip(kits, halves)):
        write_probe_wheel(kit / "wheels")
        (kit / "gguf").mkdir(parents=True, exist_ok=True)
        (kit / "gguf" / f"{SMOKE_GGUF_FILE}.part{i}").write_bytes(chunk)
        parts.append({"path": f"gguf/{SMOKE_GGUF_FILE}.part{i}", "bytes": len(chunk), "folder": kit.name})
    manifest = {"created": "smoke", "commit": None, "packages": {},
                "gguf": {"file": SMOKE_GGUF_FILE, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                         "parts": parts}}
    for kit in kits:
        (kit / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return kits
