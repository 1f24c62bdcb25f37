"""The Makefile runs the benchmarks under the glibc malloc settings the harness documents."""

import re
from pathlib import Path

from benchmarks import harness, report

ROOT = Path(__file__).resolve().parents[1]


def test_makefile_pins_the_harness_malloc_settings():
    line = next(s for s in (ROOT / "Makefile").read_text().splitlines() if s.startswith("MALLOC_ENV :="))
    assert dict(re.findall(r"(\w+)=(\d+)", line)) == harness.MALLOC_ENV
    assert set(report.MALLOC_ENV) == set(harness.MALLOC_ENV)


def test_report_warns_when_malloc_is_not_pinned():
    lines = report._header({"malloc_env": {name: None for name in harness.MALLOC_ENV}})
    assert any("not pinned" in s for s in lines)
    lines = report._header({"malloc_env": dict(harness.MALLOC_ENV)})
    assert not any("not pinned" in s for s in lines)
