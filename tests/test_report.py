"""Sweep/report plots: the validation-loss figure picks curves or bars by how often the runs were evaluated."""

import struct

import pytest

from PIL import Image

from peftlab.report import plot_validation_loss


def _png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def _run(name: str, losses: list[float], task: str = "cola") -> dict:
    return {"name": name, "config": {"task": {"name": task}},
            "rows": [{"step": 10 * (index + 1), "val_loss": loss} for index, loss in enumerate(losses)]}


def test_runs_evaluated_once_get_one_bar_each_and_runs_with_history_get_curves(tmp_path):
    once = [_run(f"rank{rank}", [1.0 / rank]) for rank in (4, 8, 16)]
    bars = plot_validation_loss(once, tmp_path / "bars.png")
    curves = plot_validation_loss(once + [_run("long", [1.2, 0.9])], tmp_path / "curves.png")
    # 110 dpi: bars are (1.5 + 0.4 per run) inches tall, curves 4.5 inches.
    assert _png_size(bars) == (770, round((1.5 + 0.4 * 3) * 110))
    assert _png_size(curves) == (770, round(4.5 * 110))


def test_runs_without_validation_are_left_out_of_the_plot(tmp_path):
    runs = [_run("evaluated", [0.5]), _run("not-evaluated", []) | {"rows": [{"step": 5, "train_loss": 1.0}]}]
    assert _png_size(plot_validation_loss(runs, tmp_path / "one.png"))[1] == round((1.5 + 0.4) * 110)


def _method_run(name: str, task: str, adapter: dict, trainable: int, metric: str, val: list[float],
                test: float | None = None) -> dict:
    rows = [{"step": 10 * (i + 1), "val_loss": 1.0 - score, f"val_{metric}": score, "val_examples_per_second": 40.0 + i}
            for i, score in enumerate(val)]
    rows[-1] |= {"final_of_epoch": True, "train_seconds": 120.0}
    summary = {"select_metric": metric, "parameters": {"trainable": trainable, "total": 1_000_000}}
    if test is not None:
        summary["test"] = {"split": "test", metric: test}
    defaults = {"targets": ["all-linear"], "rank": 16, "alpha": 32.0, "adapter_size": 64, "adapter_placement": "houlsby",
                "adapter_nonlinearity": "relu", "prefix_length": 10, "prefix_projection": None}
    return {"name": name, "config": {"task": {"name": task}, "adapter": defaults | adapter, "train": {}},
            "rows": rows, "summary": summary}


def test_methods_table_pairs_runs_by_name_across_tasks_and_scores_tested_runs_on_test():
    from peftlab.report import methods_table

    cola = [_method_run("lora", "cola", {"method": "lora"}, 5000, "mcc", [0.31, 0.45]),
            _method_run("prefix10", "cola", {"method": "prefix"}, 1000, "mcc", [0.12, 0.10])]
    rt = [_method_run("lora", "rotten_tomatoes", {"method": "lora"}, 4000, "accuracy", [0.8], test=0.835)]
    table = methods_table({"cola": cola, "rotten_tomatoes": rt}).splitlines()
    assert table[0] == ("| run | method | trainable params | % of model | cola best validation mcc | rotten_tomatoes test "
                        "accuracy | cola s / epoch | cola val examples/s | rotten_tomatoes s / epoch | "
                        "rotten_tomatoes val examples/s |")
    assert table[2] == "| prefix10 | prefix p10 | 1,000 | 0.1% | 0.1200 | — | 120 | 40.5 | — | — |"  # smallest first
    assert table[3] == "| lora | lora r16 α32 all-linear | 5,000 | 0.5% | 0.4500 | 0.8350 | 120 | 40.5 | 120 | 40.0 |"


def test_each_method_describes_its_own_settings_in_the_tables():
    """The tables ask the method (`AdapterMethod.describe`); nothing in report/ knows a method's settings."""
    from peftlab.report import method_settings

    adapter = {"targets": ["q", "v"], "rank": 4, "alpha": 8.0, "dropout": 0.1, "adapter_size": 16,
               "adapter_placement": "pfeiffer", "adapter_nonlinearity": "gelu", "prefix_length": 5,
               "prefix_projection": 12}
    expected = {"lora": "lora r4 α8 q,v", "dora": "dora r4 α8 q,v", "ia3": "ia3 q,v",
                "adapter": "adapter pfeiffer m16 gelu", "prefix": "prefix p5 H12", "full": "full", "bitfit": "bitfit",
                "head": "head"}
    assert {method: method_settings(adapter | {"method": method}) for method in expected} == expected
    assert method_settings(adapter | {"method": "lora", "rank": 0}) == "full"  # the course spec's rank 0
    written_before_projections = {"method": "prefix", "targets": ["q", "v"], "rank": 8, "prefix_length": 10}
    assert method_settings(written_before_projections) == "prefix p10"
    assert method_settings({"method": "retired"}) == "retired"  # a method no longer registered: its name


def test_more_seeds_of_a_method_are_one_row_with_mean_and_std():
    from peftlab.report import methods_table

    cola = [_method_run(name, "cola", {"method": "lora"}, 5000, "mcc", [score])
            for name, score in (("lora", 0.2), ("lora_seed1", 0.3), ("lora_seed2", 0.4))]
    table = methods_table({"cola": cola}).splitlines()
    assert len(table) == 3  # header, rule, one row
    assert table[2].startswith("| lora | lora r16 α32 all-linear | 5,000 | 0.5% | 0.3000 ± 0.1000 (3 seeds) | 120 |")


def test_score_against_parameters_is_drawn_on_a_log_axis(tmp_path):
    from peftlab.report import plot_score_vs_parameters

    runs = [_method_run(name, "cola", {"method": "lora"}, size, "mcc", [0.2]) for name, size in
            (("small", 100), ("large", 10_000_000))]
    path = plot_score_vs_parameters(runs, tmp_path / "score.png")
    assert _png_size(path) == (round(7.5 * 110), round(4.8 * 110))


def test_scores_of_other_tasks_and_metrics_never_share_an_axis(tmp_path):
    """CoLA's MCC, RT's accuracy and SQuAD's F1 (0-100) each get a panel; so do test and validation scores, and each
    task's validation loss."""
    from peftlab.report.plots import plot_score_vs_parameters, score_panels

    runs = [_method_run("lora", "cola", {"method": "lora"}, 5000, "mcc", [0.3]),
            _method_run("ia3", "cola", {"method": "ia3"}, 500, "mcc", [0.2]),
            _method_run("lora", "rotten_tomatoes", {"method": "lora"}, 5000, "accuracy", [0.8], test=0.82),
            _method_run("lora", "squad", {"method": "lora"}, 5000, "f1", [61.0])]
    assert {name: [run["name"] for run in group] for name, group in score_panels(runs).items()} == {
        "cola, best validation MCC": ["lora", "ia3"], "rotten_tomatoes, test accuracy": ["lora"],
        "squad, best validation F1": ["lora"]}
    assert _png_size(plot_score_vs_parameters(runs, tmp_path / "score.png")) == (round(3 * 7.5 * 110), round(4.8 * 110))
    losses = plot_validation_loss([_run("a", [0.5], "cola"), _run("b", [0.7], "squad")], tmp_path / "loss.png")
    assert _png_size(losses)[0] == 2 * 770


@pytest.mark.parametrize("steps", [(1, 2, 3), (8,)])  # (8,): one evaluation, where a locator falls back to 7.6, 7.8
def test_history_plots_count_whole_steps_and_label_the_best_checkpoint(tmp_path, monkeypatch, steps):
    from matplotlib.axes import Axes

    from peftlab.report import plot_history

    panels = []
    original = Axes.legend

    def remember(axes, *args, **kwargs):  # every panel's state just before it is drawn
        panels.append((axes.get_title(), axes.get_xticks(), axes.get_legend_handles_labels()[1]))
        return original(axes, *args, **kwargs)

    monkeypatch.setattr(Axes, "legend", remember)
    rows = [{"step": step, "epoch": 1, "val_loss": 1.0 / step, "val_accuracy": 0.5 + step / 10, "val_mcc": step / 10}
            for step in steps]
    rows[-1] |= {"final_of_epoch": True, "train_loss": 0.4, "train_accuracy": 0.7}
    best = steps[-1]
    written = plot_history(rows, tmp_path, "run", ("accuracy", "mcc"), "mcc", best_step=best)
    assert [path.name for path in written] == ["loss.png", "metrics.png"]
    assert [title for title, _, _ in panels] == ["run: loss", "run: accuracy", "run: MCC"]  # one metric a panel
    for title, ticks, labels in panels:
        assert all(float(tick).is_integer() for tick in ticks), (title, ticks)
        assert f"best checkpoint (step {best})" in labels
    assert f"best MCC {best / 10:.4f}" in panels[2][2] and not any("best MCC" in label for label in panels[1][2])


# ----------------------------------------------------------------------------------------------------------
# The HTML page, opened in a real browser


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(page, tmp_path, width=1280, height=2400):
    """The DOM after load (scripts run) and a screenshot, from headless Chromium."""
    import subprocess

    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / "screenshot.png"
    subprocess.run([*flags, f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return dom.stdout, shot


def test_the_html_report_of_runs_and_a_sweep_renders_in_chromium(tiny_model_dir, tmp_path, capsys):
    import html
    import json
    import re

    import pytest
    from test_train import tiny_config, write_cola

    from peftlab.cli import main
    from peftlab.commands.sweep import run_sweep

    if not _chromium():
        pytest.skip("needs headless Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "sweep" / "unused", epochs=2, eval_every=1)
    grid = tmp_path / "grid.yaml"
    base = {key: value for key, value in config.to_dict().items() if key != "output_dir"}
    grid.write_text(json.dumps({"output_dir": str(tmp_path / "sweep"), "base": base,
                                "grid": {"adapter.rank": [2, 4]}}))
    run_sweep(str(grid))
    page = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "sweep"), "--html", str(page)]) == 0
    text = page.read_text()
    assert "src='data:image/png;base64," in text and "<link" not in text and "src='http" not in text  # self-contained
    dom, shot = _browse(page, tmp_path)
    images = len(re.findall(r"<img ", dom))
    assert images == 2 + 2 * 2  # the comparison plots (drawn afresh, not the sweep's own again), loss + metrics of each run
    assert f'data-images-decoded="{images}/{images}"' in dom  # every embedded plot decoded in the browser
    visible = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    assert "Comparison of 2 runs" in visible and "Run rank2" in visible and "Run rank4" in visible
    summary = json.loads((tmp_path / "sweep" / "rank4" / "summary.json").read_text())
    assert f"{summary['parameters']['adapter']:,}" in visible and "Evaluations" in visible
    assert f"{summary['best']['val_mcc']:.4f}" in visible and "config.yaml" in visible
    width, height = _png_size(shot)
    saturation = Image.open(shot).convert("RGB").convert("HSV").getchannel("S").histogram()
    # A rendered page, not a blank one: its plots' coloured lines and markers show (text and borders are grey).
    assert (width, height) == (1280, 2400) and sum(saturation[100:]) > 1000
    # A file peftlab did not write is never replaced.
    other = tmp_path / "mine.html"
    other.write_text("<html>mine</html>")
    assert main(["report", str(tmp_path / "sweep" / "rank2"), "--html", str(other)]) == 2
    assert other.read_text() == "<html>mine</html>" and "not a page peftlab wrote" in capsys.readouterr().err


def test_a_sweep_on_local_ray_tune_trains_each_point_once_like_the_local_backend(tiny_model_dir, tmp_path):
    import json

    import pytest
    from test_train import read_rows, tiny_config, write_cola

    from peftlab.commands.sweep import run_sweep

    pytest.importorskip("ray.tune")
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "unused", epochs=2)
    base = {key: value for key, value in config.to_dict().items() if key != "output_dir"}
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"base": base, "grid": {"adapter.rank": [2, 4]}}))
    run_sweep(str(grid), output_dir=str(tmp_path / "local"))
    run_sweep(str(grid), output_dir=str(tmp_path / "ray"), backend="ray", cpus_per_trial=1)
    for name in ("rank2", "rank4"):  # the same run directories and trajectories as one after the other
        ray_rows, local_rows = read_rows(tmp_path / "ray" / name), read_rows(tmp_path / "local" / name)
        assert [row["step"] for row in ray_rows] == [row["step"] for row in local_rows] == [2, 4]
        for row, reference in zip(ray_rows, local_rows):
            assert row["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
    table = (tmp_path / "ray" / "report.md").read_text()
    assert "| rank2 |" in table and "| rank4 |" in table
    # Tune saw every evaluation of each trial.
    results = sorted((tmp_path / "ray" / ".ray" / "tune").rglob("result.json"))
    assert len(results) == 2
    assert all([json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4] for path in results)
    # Done points are skipped on Ray too: nothing is trained again.
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "ray").glob("rank*/summary.json")}
    run_sweep(str(grid), output_dir=str(tmp_path / "ray"), backend="ray")
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_a_report_labels_students_records_every_command_and_writes_into_its_own_folder(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A distilled student is "lstm student" sized against its teacher; sweep and distill runs record the command
    that started them; without --output-dir the report goes to reports/<date>-<time>/, which is printed."""
    import json

    import yaml
    from test_train import tiny_config, write_cola

    from peftlab.cli import main

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "unused", epochs=1)
    grid = tmp_path / "grid.yaml"
    base = {key: value for key, value in config.to_dict().items() if key != "output_dir"}
    grid.write_text(json.dumps({"output_dir": str(tmp_path / "sweep"), "base": base, "grid": {"adapter.rank": [2]}}))
    assert main(["sweep", str(grid)]) == 0
    teacher = tmp_path / "sweep" / "rank2"
    student = tmp_path / "student"
    distill = ["distill", "--teacher", str(teacher), "--student", "lstm", "--embedding-size", "8", "--hidden-size",
               "8", "--epochs", "1", "--device", "cpu", "--output-dir", str(student)]
    assert main(distill) == 0

    def command(run):
        return yaml.safe_load((run / "config.yaml").read_text())["environment"]["command"]

    assert command(teacher) == f"peftlab sweep {grid}"
    assert command(student).startswith("peftlab distill --teacher ")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["report", str(teacher), str(student)]) == 0
    out = capsys.readouterr().out
    folder = next((tmp_path / "reports").iterdir())
    assert f"report folder: {folder.relative_to(tmp_path)}" in out and not (tmp_path / "report.md").exists()
    row = next(line for line in (folder / "report.md").read_text().splitlines() if line.startswith("| student |"))
    teacher_total = json.loads((teacher / "summary.json").read_text())["parameters"]["total"]
    student_total = json.loads((student / "summary.json").read_text())["parameters"]["total"]
    share = f"{100 * student_total / teacher_total:.3g}% of teacher"
    assert row.startswith(f"| student | lstm student | {student_total:,} | {share} |"), row
