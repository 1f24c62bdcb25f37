"""Tables and target checks from pytest-benchmark JSONs of the op and engine benchmarks.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--markdown]
    python -m benchmarks.report RESULTS.json [MORE.json ...] [--markdown]

Each RESULTS.json comes from ``pytest benchmarks/bench_<suite>.py --benchmark-json=RESULTS.json``
(``make bench`` runs each suite in its own process and file; several files are reported as one
run, ``read``). For every
(op, device, dtype, shape, variant, mode) the report prints one row per impl: median time, GB/s
of the ideal traffic, that bandwidth as a % of a plain device copy moving as many bytes,
speed-up over each baseline of the group (``eager_loop``, ``naive_head``, ``eager``,
``compile``: its median time over the impl's), and peak extra memory (what each figure means:
``benchmarks/bench_attention_distill.py``). Then one line per fused backend against its targets
(``TARGETS``):

* CPU: >= 2x ``eager`` (``task_se``: >= 2x ``eager_loop``, ASTMT's per-task loop) and
  >= 1.0x ``compile``;
* CUDA: >= 80% of copy bandwidth and >= 1.3x ``compile``;
* ``skip_fusion`` at K=6 layers, forward_backward: peak extra memory <= 1/4 of ``naive_head``'s.

Then the engine benchmarks (``benchmarks/bench_engine.py``): peak memory and step time of each
strategy against the number of tasks T, the partially labelled case, and their targets
(``engine_figures``):

* recompute's peak memory at the largest T (16 in a full run) <= 1.15x its peak at T=1, while
  naive's grows with T;
* recompute's step time <= 1.35x naive's, at every T;
* partial labels (each sample labelled for one of 7 tasks): recompute (lazy) >= 2x faster than
  ``naive_all_rows`` (every head on every sample).

It is a report: the exit status is 0 whatever the targets say (2 for unusable arguments).
Only the standard library is used, so it runs anywhere the JSON is. Each section is its own
module: ``report_run`` (the files and the header), ``report_ops``, ``report_engine``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/report.py ...
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report_engine import engine_figures, render_engine
from benchmarks.report_ops import Group, Row, load, render_ops
from benchmarks.report_run import header, read

__all__ = ["engine_figures", "load", "main", "read", "render"]


def render(
    machine_info: dict, groups: dict[Group, list[Row]], markdown: bool, engine: dict | None = None
) -> list[str]:
    """The report's lines: the header, the op tables, the engine section (``engine``:
    :func:`engine_figures` of the same JSON) and the summary of every target checked."""
    lines = header(machine_info)
    op_lines, checked = render_ops(groups, markdown)
    lines += op_lines
    if engine is not None and engine["peak_extra_bytes"]:
        engine_lines, engine_checked = render_engine(engine, markdown)
        lines += engine_lines
        checked += engine_checked
    failed = [name for name, ok in checked if not ok]
    if checked:
        lines.append(f"Targets: {len(checked) - len(failed)}/{len(checked)} passed.")
        lines += [f"  FAIL: {name}" for name in failed]
    else:
        lines.append("Targets: nothing to check, no fused backend was benchmarked.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSONs (--benchmark-json=...)")
    parser.add_argument("--markdown", action="store_true", help="GitHub-flavoured markdown tables")
    args = parser.parse_args(argv)
    data = read(args.json)
    machine_info, groups = load(data)
    print("\n".join(render(machine_info, groups, args.markdown, engine_figures(data))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
