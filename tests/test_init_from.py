"""`train --init-from RUN`: a new run starts from a finished run's adapter weights (its config.yaml says so), an
adapter of other settings is a clear error, and --dry-run warns about a folder that already holds a run."""

import json
from pathlib import Path

import pytest
import yaml

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.train import train
from test_train import read_rows, tiny_config
from tiny_data import write_cola


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("init-from")
    data = write_cola(root / "data", train_rows=32, dev_rows=16)
    config = tiny_config(tiny_model_dir, data, root / "first", epochs=2)
    config.adapter.dropout = 0.0
    train(config)
    return config


def _follow_up(first, output_dir, **train_settings):
    config = tiny_config(first.model.name, first.task.data_dir, output_dir, epochs=1, **train_settings)
    config.adapter.dropout = 0.0
    config.train.init_from = first.output_dir
    return config


def test_a_new_run_starts_where_the_init_run_ended(first_run, tmp_path, capsys):
    # An lr so small that the first step changes no weight: the first evaluation is the init run's model.
    still = _follow_up(first_run, tmp_path / "still", lr=1e-30)
    train(still)
    best = json.loads((Path(first_run.output_dir) / "summary.json").read_text())["best"]
    first = read_rows(tmp_path / "still")[0]
    assert first["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert first["val_mcc"] == best["val_mcc"] and first["val_accuracy"] == best["val_accuracy"]
    assert "Initialised from" in capsys.readouterr().out
    recorded = yaml.safe_load((tmp_path / "still" / "config.yaml").read_text())["train"]
    assert (recorded["init_from"], recorded["init_checkpoint"]) == (first_run.output_dir, "best")
    # Without --init-from the same run starts from the method's own initialisation: another first evaluation.
    fresh = _follow_up(first_run, tmp_path / "fresh", lr=1e-30)
    fresh.train.init_from = None
    train(fresh)
    assert read_rows(tmp_path / "fresh")[0]["val_loss"] != pytest.approx(best["val_loss"], rel=1e-4)


def test_another_adapter_or_a_missing_run_is_a_clear_error(first_run, tmp_path):
    other = _follow_up(first_run, tmp_path / "other")
    other.adapter.rank = 8
    with pytest.raises(PeftlabError, match=r"--init-from .*its adapter differs from this run's \(--rank 4 there, 8 here"):
        train(other)
    missing = _follow_up(first_run, tmp_path / "missing")
    missing.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(PeftlabError, match="not a run with a checkpoints/best"):
        train(missing)


def test_init_from_on_the_command_line_and_the_dry_run_warning(first_run, tmp_path, capsys):
    common = ["train", "--task", "cola", "--model", first_run.model.name, "--data-dir", first_run.task.data_dir,
              "--targets", "all-linear", "--rank", "4", "--alpha", "8", "--lora-dropout", "0", "--device", "cpu",
              "--epochs", "1", "--batch-size", "16"]
    assert main(common + ["--init-from", first_run.output_dir, "--init-checkpoint", "last", "--output-dir",
                          str(tmp_path / "more")]) == 0
    recorded = yaml.safe_load((tmp_path / "more" / "config.yaml").read_text())
    assert recorded["train"]["init_checkpoint"] == "last" and "--init-from" in recorded["environment"]["command"]
    capsys.readouterr()
    assert main(common + ["--output-dir", str(tmp_path / "more"), "--dry-run"]) == 0
    assert f"warning: {tmp_path / 'more'} already holds a run" in capsys.readouterr().out
    assert main(common + ["--output-dir", str(tmp_path / "new"), "--dry-run"]) == 0
    assert "already holds a run" not in capsys.readouterr().out


def test_another_objective_starts_from_the_adapter_and_names_the_head_it_leaves(first_run, tmp_path, capsys):
    """A CoLA classifier's adapter starts a Rotten Tomatoes instruct run: the LoRA tensors carry over; the
    classifier's head has no place in a language model and is named, not silently dropped."""
    from tiny_data import write_rotten_tomatoes

    config = _follow_up(first_run, tmp_path / "rt")
    config.task.name, config.task.data_dir = "rotten_tomatoes", write_rotten_tomatoes(tmp_path / "data")
    config.task.train_limit, config.task.eval_limit = 8, 4
    train(config, dry_run=True)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Initialised from"))
    assert line.endswith("not carried (this run's model has none of that shape): score.weight")
