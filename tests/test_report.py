"""Reports: goals, plots, HTML, comparison across runs, and what a browser shows."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from compress import run
from compress.cli import main
from compress.report.plots import pareto_front

FAST = {"type": "finetune", "method": "full", "lr": 5e-3, "max_steps": 3, "batch_size": 8}


def test_pareto_front_keeps_only_undominated_points():
    points = [(10, 0.9), (5, 0.8), (5, 0.7), (8, 0.85), (12, 0.88), (3, 0.5)]
    assert pareto_front(points, lower_y_better=False) == [(3, 0.5), (5, 0.8), (8, 0.85), (10, 0.9)]
    assert pareto_front([(1, 9.0), (2, 5.0), (3, 7.0)], lower_y_better=True) == [(1, 9.0), (2, 5.0)]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    from compress import testing

    root = tmp_path_factory.mktemp("runs")
    folders = []
    for i, steps in enumerate((2, 4, 6)):
        recipe = testing.tiny_recipe(tiny_bert_dir, sentiment_csv, "sequence-classification", root / f"r{i}",
                                     name=f"run{i}", stages=[{**FAST, "max_steps": steps}],
                                     goals={"accuracy": {"max_drop": 0.5}, "latency_b4": {"min_speedup": 100}})
        run(recipe)
        folders.append(root / f"r{i}")
    return folders


def test_goals_are_marked_and_strict_fails(three_runs, tmp_path, capsys):
    report = json.loads((three_runs[0] / "report.json").read_text())
    goals = {g["metric"]: g for g in report["goals"]}
    assert goals["accuracy"]["passed"] is True
    assert goals["latency_b4"]["passed"] is False and goals["latency_b4"]["actual"] < 100
    md = (three_runs[0] / "report.md").read_text()
    assert "## Goals" in md and "1 of 2 passed" in md and "| FAIL |" in md

    recipe = json.loads((three_runs[0] / "run.json").read_text())["recipe"]
    recipe["output_dir"] = str(tmp_path / "strict")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet", "--strict"]) == 3
    assert "goal(s) failed (--strict)" in capsys.readouterr().err


def test_report_files_and_plots(three_runs):
    folder = three_runs[1]
    for name in ("pareto", "latency", "layers", "loss"):
        png = folder / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html


def test_unknown_goal_metric(cls_recipe):
    from compress import RecipeError, load_recipe

    cls_recipe["goals"] = {"acuracy": {"max_drop": 0.01}, }
    with pytest.raises(RecipeError, match="goals.acuracy: unknown metric; did you mean 'accuracy'"):
        load_recipe(cls_recipe)
    cls_recipe["goals"] = {"latency_b8": {"min_speedup": 2}}  # eval.batch_size is 4
    with pytest.raises(RecipeError, match="latency_bN needs N = eval.batch_size"):
        load_recipe(cls_recipe)


def test_compare_three_runs(three_runs, tmp_path, capsys):
    assert main(["compare", *map(str, three_runs), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert all(f"run{i}" in out for i in range(3))
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(data["rows"]) == 6  # baseline + one stage per run
    finals = [r for r in data["rows"] if r[1] == "01-finetune"]
    for row, folder in zip(finals, three_runs, strict=True):
        acc = json.loads((folder / "report.json").read_text())["points"][-1]["accuracy"]["accuracy"]
        assert row[7] == f"{100 * acc:.2f}%"
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Size against accuracy](compare.png)" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_refuses_a_folder_without_report(tmp_path):
    assert main(["compare", str(tmp_path)]) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_report_renders_plots_in_headless_chromium(three_runs, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600",
                    f"--screenshot={shot}", (three_runs[2] / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    # The latency bars are drawn in #4c72b0: a screenshot without the plots has none of that colour.
    bar = (abs(pixels[..., 0] - 0x4C / 255) < 0.03) & (abs(pixels[..., 1] - 0x72 / 255) < 0.03) & (
        abs(pixels[..., 2] - 0xB0 / 255) < 0.03)
    assert bar.sum() > 2000
