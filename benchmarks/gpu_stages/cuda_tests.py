"""Stage cuda_tests: the CUDA tests (pytest -m cuda tests/test_cuda.py), counted from their JUnit report; on the
GPU nothing may skip, since a skip there hides a missing piece. pytest runs verbose, so a run cut off by
the stage's limit still records the outcome of every test that finished (read from its log)."""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import Stage, StageError

# pytest -v prints "tests/test_cuda.py::test_name[param] PASSED   [ 7%]" as each test ends
_VERBOSE_LINE = re.compile(r"^\S+::(?P<name>\S+) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def outcomes_from_log(log: Path) -> dict[str, str]:
    """Each finished test's outcome, from a verbose pytest log (lower case, as in the JUnit report)."""
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _VERBOSE_LINE.match(line.strip())
        if match:
            found[match["name"]] = match["outcome"].lower()
    return found


def run(st: Stage) -> None:
    junit = st.work / "junit.xml"
    result = st.run("pytest", [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-rs",
                               "-p", "no:cacheprovider", f"--junitxml={junit}"], check=False)
    if result["timed_out"]:
        done = outcomes_from_log(st.runner.logs / result["log"])
        st.figures.update(finished_before_limit=done,
                          counts={"finished": len(done), "passed": sum(v == "passed" for v in done.values())})
        raise StageError(f"pytest ran out of the stage's time after {result['seconds']} s, "
                         f"{len(done)} tests finished ({st.figures['counts']['passed']} passed)")
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
