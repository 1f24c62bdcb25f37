"""Comparing runs: ``comparison_table``, ``draw_comparison`` and ``mtlfast report A B``."""

import json

import pytest

from mtlfast.train.report import comparison_table, draw_comparison


def _results(semseg, depth, delta=None, steps=10, best_step=8):
    tasks = {"semseg": {"mIoU": semseg}, "depth": {"rmse": depth}}
    return {
        "steps": steps,
        "final": {"tasks": tasks, "delta_m": delta},
        "best": {"step": best_step, "results": {"tasks": tasks, "delta_m": delta}},
        "constant_predictor": {"tasks": {"semseg": {"mIoU": 0.1}, "depth": {"rmse": 2.0}}},
        "train_time_s": 12.3,
        "images_per_s": 4.5,
        "peak_memory_bytes": 300 * 2**20,
    }


def _row(table, start):
    return next(line for line in table.splitlines() if line.startswith(start)).split()


def test_table_marks_the_best_run_per_task_in_its_direction():
    runs = {"a": _results(0.5, 1.0, -0.05), "b": _results(0.6, 1.2, 0.01)}
    table = comparison_table(runs, details={"a": {"model": "mtinet"}, "b": {"model": "padnet"}})
    assert table.splitlines()[0].split() == ["a", "b"]
    assert _row(table, "model") == ["model", "mtinet", "padnet"]
    assert _row(table, "semseg") == ["semseg", "mIoU", "(higher", "better)", "0.5", "0.6", "*"]
    assert _row(table, "depth") == ["depth", "rmse", "(lower", "better)", "1", "*", "1.2"]
    assert _row(table, "delta_m")[-2:] == ["-5.00%", "+1.00%"]
    assert _row(table, "step of the best")[-2:] == ["8", "8"]
    assert _row(table, "peak memory")[-2:] == ["300", "300"]


def test_missing_tasks_and_figures_show_as_dashes():
    b = _results(0.6, 1.2)
    del b["final"]["tasks"]["depth"], b["images_per_s"]
    b["final"]["tasks"]["edge"] = {"odsF": 0.3}
    table = comparison_table({"a": _results(0.5, 1.0), "b": b}, which="final")
    assert _row(table, "depth")[-2:] == ["1", "-"]  # one value: nothing to mark
    assert _row(table, "edge")[-2:] == ["-", "0.3"]
    assert _row(table, "images/s")[-2:] == ["4.50", "-"]
    assert _row(table, "delta_m")[-2:] == ["-", "-"]
    assert _row(table, "step of the final")[-2:] == ["10", "10"]


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="which"):
        comparison_table({"a": _results(0.5, 1.0)}, which="last")
    with pytest.raises(ValueError, match="runs"):
        comparison_table({})
    with pytest.raises(ValueError, match="which"):
        draw_comparison({"a": _results(0.5, 1.0)}, "x.png", which="last")


def test_plot_is_a_png(tmp_path):
    path = draw_comparison({"a": _results(0.5, 1.0), "b": _results(0.6, 1.2)}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compares_runs(tmp_path, capsys):
    from mtlfast.train.cli import main

    runs = []
    for name, (semseg, depth) in {"one": (0.5, 1.0), "two": (0.4, 0.9)}.items():
        run = tmp_path / name
        run.mkdir()
        (run / "results.json").write_text(json.dumps(_results(semseg, depth)))
        (run / "config.yaml").write_text("model: {name: mtinet}\nbalancing: {name: mgda}\n")
        runs.append(str(run))
    plot = tmp_path / "compare.png"
    assert main(["report", *runs, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "model")[-2:] == ["mtinet", "mtinet"]
    assert _row(out, "balancing")[-2:] == ["mgda", "mgda"]
    assert plot.is_file()
    assert main(["report", runs[0], runs[0]]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["report", runs[0], str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err
