"""The benchmarks' glibc malloc settings have one definition (benchmarks/malloc_env.py) that the
Makefile, the harness and the report all read; the report warns when a run lacked them."""

import re
import subprocess
import sys
from pathlib import Path

from benchmarks import harness, malloc_env, report_run

ROOT = Path(__file__).resolve().parents[1]


def test_makefile_takes_the_settings_from_their_definition():
    line = next(
        s for s in (ROOT / "Makefile").read_text().splitlines() if s.startswith("MALLOC_ENV ")
    )
    assert "benchmarks/malloc_env.py" in line
    printed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/malloc_env.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert dict(re.findall(r"(\w+)=(\d+)", printed)) == malloc_env.MALLOC_ENV
    assert harness.MALLOC_ENV is malloc_env.MALLOC_ENV


def test_no_other_file_writes_the_values():
    value = malloc_env.MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    shipped = [*ROOT.glob("Makefile"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("mtlfast/**/*.py")]
    copies = [
        p.name
        for p in shipped
        if p.name != "malloc_env.py" and f"MALLOC_MMAP_THRESHOLD_={value}" in p.read_text()
    ]
    assert not copies, f"the malloc settings are written again in {copies}"


def test_report_warns_when_malloc_is_not_pinned():
    lines = report_run.header({"malloc_env": {name: None for name in malloc_env.MALLOC_ENV}})
    assert any("not pinned" in s for s in lines)
    lines = report_run.header({"malloc_env": dict(malloc_env.MALLOC_ENV)})
    assert not any("not pinned" in s for s in lines)
