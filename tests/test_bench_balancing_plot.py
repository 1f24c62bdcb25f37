"""benchmarks/bench_balancing.py --plot: a PNG from a results JSON, failed groups left out."""

import json

import pytest

from benchmarks import bench_balancing


def _case(impl, method, t, mib, s):
    return {"impl": impl, "method": method, "T": t, "peak_extra_bytes": mib * 2**20, "step_s": s}


def test_plot_writes_a_png(tmp_path):
    cases = [
        _case(impl, m, t, 75 + t, 0.5 * t)
        for impl in ("engine", "libmtl")
        for m in ("fixed", "mgda")
        for t in (2, 4)
    ]
    cases.append({"impl": "torchjd", "T": 4, "failed": "torchjd T=4: failed (exit -9)"})
    results = {"cases": cases, "setup": {"network": "tiny", "n": 2, "size": [8, 8]}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    bench_balancing.main(["--plot", str(tmp_path / "r.json"), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no case"):
        bench_balancing.plot({"cases": []}, str(tmp_path / "p.png"))
