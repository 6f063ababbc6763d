"""Stage a: the CUDA tests (pytest -m cuda tests/test_cuda.py), counted from their JUnit report; on the
GPU nothing may skip, since a skip there hides a missing piece."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

from .common import Stage, StageError


def stage_a(st: Stage) -> None:
    junit = st.work / "junit.xml"
    result = st.run("pytest", [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs",
                               "-p", "no:cacheprovider", f"--junitxml={junit}"], check=False)
    if result["timed_out"]:
        raise StageError(f"pytest ran out of the stage's time after {result['seconds']} s")
    try:
        suite = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        raise StageError(f"pytest wrote no readable JUnit report ({e}; log {result['log']})") from e
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag + ": " + (child.get("message") or "")[:300]
        cases[case.get("name")] = outcome
    st.figures.update(counts=counts, tests=cases)
    if result["rc"] != 0:
        raise StageError(f"pytest exited with {result['rc']}: {counts['failures']} failed, {counts['errors']} errors")
    if not st.smoke and counts["skipped"]:
        reasons = sorted({v for v in cases.values() if v.startswith("skipped")})
        raise StageError(f"{counts['skipped']} CUDA tests skipped on the GPU machine: {'; '.join(reasons)[:400]}")
