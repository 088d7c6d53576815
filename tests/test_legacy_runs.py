"""Run directories written by an older peftlab (tests/legacy_runs/<commit>, made by its make_runs.py) still load
and evaluate to the numbers they recorded: the validation loss and every metric of their best checkpoint."""

import shutil
from pathlib import Path

import pytest
from tiny_data import write_cola, write_rotten_tomatoes

from peftlab.runs import RunDir
from peftlab.train import evaluate_run
from peftlab.workloads.loading import load_run

LEGACY = Path(__file__).parent / "legacy_runs"
RUNS = sorted(path for path in LEGACY.glob("*/*") if (path / "config.yaml").is_file())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy-data")
    write_cola(folder), write_rotten_tomatoes(folder)
    return str(folder)


def placed(run: Path, tmp_path: Path, model: str, data: str) -> Path:
    """The commit's runs copied to tmp_path with their placeholders (TINY_MODEL, DATA, RUNS) filled in."""
    folder = tmp_path / "runs"
    shutil.copytree(run.parent, folder)
    for path in [*folder.glob("*/config.yaml"), *folder.rglob("*.json")]:
        text = path.read_text().replace("TINY_MODEL", model).replace("DATA", data).replace("RUNS", str(folder))
        path.write_text(text)
    return folder / run.name


def test_there_are_legacy_runs_of_every_kind():
    assert {path.name for path in RUNS} >= {"cola-lora", "cola-dora", "cola-prefix", "rt-instruct", "distill"}


@pytest.mark.parametrize("run", RUNS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_a_legacy_run_loads_and_evaluates_to_its_recorded_numbers(run, tmp_path, tiny_model_dir, data):
    copy = placed(run, tmp_path, tiny_model_dir, data)
    best = RunDir(str(copy)).read_summary()["best"]
    config, task, _ = load_run(str(copy))
    assert config.version == 2 and config.model.name == tiny_model_dir
    metrics = evaluate_run(str(copy), "validation", "best", limit=config.task.eval_limit)  # as during training
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    for name in task.metric_names:
        assert metrics[name] == pytest.approx(best[f"val_{name}"], abs=1e-9), name
