"""A sweep goes on past a failing point, names it, and exits 2; Ctrl-C exits 130 with the command that goes on;
Ray trials get absolute paths; the report marks unfinished and failed runs."""

import json
import os
import shutil
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config import RunConfig
from peftlab.errors import Interrupted


def _grid(tmp_path, tiny_model_dir, grid: dict, **train) -> Path:
    from test_train import tiny_config
    from tiny_data import write_cola

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "unused", **({"epochs": 1} | train))
    base = {key: value for key, value in config.to_dict().items() if key != "output_dir"}
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "sweep"), "base": base, "grid": grid}))
    return path


def test_a_failing_point_is_named_and_the_others_still_train_then_exit_2(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    from peftlab.engine import Callback
    from peftlab.train import train

    class Crash(Callback):
        def on_evaluation(self, engine, row):
            raise RuntimeError("boom at the first evaluation")

    def train_or_crash(config, resume=False, **kwargs):  # point "crash" fails mid-run, as a bug would
        if Path(config.output_dir).name == "crash":
            kwargs["callbacks"] = [Crash()]
        return train(config, resume=resume, **kwargs)

    monkeypatch.setattr("peftlab.commands.sweep.train", train_or_crash)
    grid = _grid(tmp_path, tiny_model_dir, {"setting": [{"name": "bad", "adapter.method": "nosuch"},
                                                        {"name": "crash", "adapter.rank": 2},
                                                        {"name": "good", "adapter.rank": 4}]})
    assert main(["sweep", str(grid)]) == 2
    err = capsys.readouterr().err
    sweep = tmp_path / "sweep"
    assert json.loads((sweep / "good" / "summary.json").read_text())["finished"]  # trained past two failures
    # Each failure named in one line as it happens, and again in the final summary.
    lines = [line for line in err.splitlines() if line.startswith("sweep: point ")]
    assert len(lines) == 2 and "bad" in lines[0] and "nosuch" in lines[0]
    assert "crash" in lines[1] and "RuntimeError: boom at the first evaluation" in lines[1]
    assert "2 of 3 point(s) failed" in err and "To retry them: peftlab sweep" in err
    # The report marks the failed run instead of showing it as an ordinary row.
    table = (sweep / "report.md").read_text()
    assert "| status |" in table
    crash = next(line for line in table.splitlines() if line.startswith("| crash |"))
    good = next(line for line in table.splitlines() if line.startswith("| good |"))
    assert "failed: RuntimeError: boom at the first evaluation" in crash and good.endswith("| finished |")


def test_stop_on_error_stops_at_the_first_failing_point(tiny_model_dir, tmp_path, capsys):
    grid = _grid(tmp_path, tiny_model_dir, {"setting": [{"name": "bad", "adapter.method": "nosuch"},
                                                        {"name": "good", "adapter.rank": 4}]})
    assert main(["sweep", str(grid), "--stop-on-error"]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "sweep" / "good").exists() and "1 of 2 point(s) failed" in err and "bad" in err
    assert "--stop-on-error" in main_help("sweep")


def main_help(command: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def test_the_report_marks_unfinished_and_failed_runs(tiny_model_dir, tmp_path):
    from test_train import tiny_config
    from tiny_data import write_cola

    from peftlab.report import write_report
    from peftlab.report.html import write_html_report
    from peftlab.train import train

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    runs = tmp_path / "runs"
    train(tiny_config(tiny_model_dir, data, runs / "done", epochs=1))
    train(tiny_config(tiny_model_dir, data, runs / "stopped", epochs=2), stop_after_epoch=1)
    shutil.copytree(runs / "stopped", runs / "killed")
    (runs / "killed" / "summary.json").unlink()  # a kill -9 leaves no summary
    (runs / "failed").mkdir()
    shutil.copy(runs / "done" / "config.yaml", runs / "failed" / "config.yaml")  # failed before any result
    names = ["done", "stopped", "killed", "failed"]
    table, _ = write_report([str(runs / name) for name in names], tmp_path / "report")
    status = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.read_text().splitlines()
              if line.startswith("| ") and not line.startswith("| run |")}
    assert status == {"done": "finished", "stopped": "unfinished at step 2", "killed": "unfinished at step 2",
                      "failed": "failed (no results)"}
    page = write_html_report([str(runs)], tmp_path / "page.html").read_text()
    assert "Run killed (unfinished at step 2)" in page and "Run failed (failed (no results))" in page
    assert "Comparison of 4 runs" in page


def test_ray_trials_get_absolute_paths_for_every_path_setting(tmp_path, monkeypatch):
    from peftlab.commands.sweep import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = RunConfig.from_dict({"output_dir": "runs/a", "model": {"name": "models/tiny"},
                                  "task": {"data_dir": "data", "name": "sst2"},
                                  "distill": {"teacher": "runs/teacher", "transfer_file": "transfer.txt"}})
    resolved = absolute_paths(config).to_dict()
    assert resolved["output_dir"] == str(tmp_path / "runs/a")
    assert resolved["model"]["name"] == str(tmp_path / "models/tiny")
    assert resolved["task"]["data_dir"] == str(tmp_path / "data") and resolved["task"]["name"] == "sst2"
    assert resolved["distill"]["teacher"] == str(tmp_path / "runs/teacher")
    assert resolved["distill"]["transfer_file"] == str(tmp_path / "transfer.txt")
    known = absolute_paths(RunConfig.from_dict({"model": {"name": "smollm2-135m"}, "task": {"data_dir": "/d"}}))
    assert known.model.name == "smollm2-135m" and known.task.data_dir == "/d"  # names and absolute paths stay


def test_a_ray_sweep_with_relative_paths_trains_like_a_local_one(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray.tune")
    from test_train import read_rows

    from peftlab.commands.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tinygpt2")
    grid = _grid(tmp_path, tiny_model_dir, {"adapter.rank": [2]})
    spec = json.loads(grid.read_text())
    spec["base"]["model"]["name"] = "models/tinygpt2"
    spec["base"]["task"]["data_dir"] = "data"
    spec["output_dir"] = "sweep"
    grid.write_text(json.dumps(spec))
    run_sweep("grid.yaml", backend="ray", cpus_per_trial=1)
    assert [row["step"] for row in read_rows(tmp_path / "sweep" / "rank2")] == [2]
    # Run again locally with the same relative grid: the Ray run (recorded with absolute paths) is the same run.
    run_sweep("grid.yaml")


def test_ctrl_c_on_a_ray_sweep_exits_130_with_the_command_that_goes_on(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    from types import SimpleNamespace

    from peftlab.commands.sweep import ray_failures

    # Tune ends the trials on Ctrl-C and returns as if they were done: a trial without a finished run was stopped.
    monkeypatch.chdir(tmp_path)
    points = [{"name": name, "output_dir": f"sweep/{name}", "config": {"train": {"epochs": 1}}}
              for name in ("rank2", "rank4")]
    (tmp_path / "sweep" / "rank2").mkdir(parents=True)
    (tmp_path / "sweep" / "rank2" / "config.yaml").write_text("{}")
    (tmp_path / "sweep" / "rank2" / "summary.json").write_text('{"finished": true}')
    results = [SimpleNamespace(error=None, config={"point": point}) for point in points]
    with pytest.raises(Interrupted, match=r"1 of 2 trial\(s\) before they ended \(rank4\)"):
        ray_failures(results, points)
    results[1].error = SimpleNamespace(cause=KeyboardInterrupt())  # a trial's own Ctrl-C is no failure either
    with pytest.raises(Interrupted, match="rank4"):
        ray_failures(results, points)
    results[1].error = RuntimeError("boom")
    assert ray_failures(results, points) == {"sweep/rank4": "RuntimeError: boom"}

    def interrupted(*args, **kwargs):
        raise Interrupted("Ray Tune stopped 1 of 2 trial(s) before they ended")

    monkeypatch.setattr("peftlab.commands.sweep.train_points_on_ray", interrupted)
    grid = _grid(tmp_path, tiny_model_dir, {"adapter.rank": [2, 4]})
    assert main(["sweep", str(grid), "--backend", "ray"]) == 130
    err = capsys.readouterr().err
    assert f"To go on: peftlab sweep {grid} --backend ray" in err and "not a run directory" not in err
    monkeypatch.setattr("peftlab.commands.sweep.train_points_on_ray",
                        lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["sweep", str(grid), "--backend", "ray"]) == 130
    assert "To go on: peftlab sweep" in capsys.readouterr().err
    assert os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") is None
