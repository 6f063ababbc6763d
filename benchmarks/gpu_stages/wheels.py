"""The kit's wheels checked against the Python they would be installed into, before any is: every
requirement of a carried wheel met by the image or by another carried wheel, and no package of the image
broken by a carried version that shadows its own, and each carried package at the version requirements.txt
names as tested (tested_versions: the one list of versions the kit fetches and checks). Each problem is
one line naming the package."""
from __future__ import annotations

import importlib.metadata
import platform
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
_NAME_VERSION = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*) (\d+(?:\.\d+)+)\b")


@dataclass(frozen=True)
class WheelInfo:
    name: str
    version: str
    requires: tuple[str, ...]
    requires_python: str | None


def tested_versions(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{canonical name: version} of every "NAME X.Y.Z" in requirements.txt's comments before its first
    requirement (its "Tested with: ..." lines)."""
    text = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        text.append(line.lstrip("# "))
    return {canonicalize_name(name): version for name, version in _NAME_VERSION.findall(" ".join(text))}


def wheel_info(wheel: Path) -> WheelInfo:
    """Name, version, Requires-Dist and Requires-Python from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields.setdefault(key, []).append(value.strip())
    return WheelInfo(fields["Name"][0], fields["Version"][0], tuple(fields.get("Requires-Dist", [])),
                     (fields.get("Requires-Python") or [None])[0])


def _applies(req: Requirement) -> bool:
    """A requirement outside any extra whose environment marker holds here."""
    return req.marker is None or req.marker.evaluate({"extra": ""})


def _accepts(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def check_wheels(wheels: list[Path], installed: dict[str, str] | None = None,
                 tested: dict[str, str] | None = None) -> list[str]:
    """One line per problem (empty: the wheels can be installed together over this environment)."""
    installed = installed_versions() if installed is None else installed
    tested = tested_versions() if tested is None else tested
    infos = [wheel_info(w) for w in wheels]
    carried = {canonicalize_name(i.name): i.version for i in infos}
    problems = []
    for info in infos:
        want = tested.get(canonicalize_name(info.name))
        if want is not None and want != info.version:
            problems.append(f"the kit's {info.name} {info.version} is not the tested {want} of requirements.txt: "
                            "a kit of another checkout? (prepare_gpu_kit.py builds it anew)")
        if info.requires_python and not _accepts(Requirement(f"python{info.requires_python}"),
                                                 platform.python_version()):
            problems.append(f"{info.name} {info.version} needs Python {info.requires_python}; "
                            f"this is {platform.python_version()}")
        for line in info.requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            name = canonicalize_name(req.name)
            if not _applies(req) or name in ("python",):
                continue
            version = carried.get(name, installed.get(name))
            where = "the kit carries" if name in carried else "the image has"
            if version is None:
                problems.append(f"{info.name} {info.version} needs {req}: neither the image nor the kit has {req.name}")
            elif not _accepts(req, version):
                problems.append(f"{info.name} {info.version} needs {req}; {where} {req.name} {version}")
    # a carried version shadows the image's own (the kit's folder comes first on PYTHONPATH)
    for dist in importlib.metadata.distributions():
        owner = dist.metadata["Name"]
        if not owner or canonicalize_name(owner) in carried:
            continue
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            name = canonicalize_name(req.name)
            if name in carried and name in installed and carried[name] != installed[name] and _applies(req) \
                    and not _accepts(req, carried[name]):
                problems.append(f"the kit's {req.name} {carried[name]} would break the image's {owner} "
                                f"{dist.version}, which needs {req}")
    return problems
