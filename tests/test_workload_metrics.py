"""A tiny run of every workload, pinned to the metrics the code gave before the plug-in redesign (issue 16), so that
moving code around cannot change what a run computes. Recorded on 2026-12-01 with commit 7ea6176 (tiny random
GPT-2, synthetic data); tolerance 1e-4, far above fp32 noise between CPUs and far below any real change."""

import pytest
from test_instruct import instruct_config, write_rotten_tomatoes
from test_qa import colour_paragraphs, squad_config, write_squad
from test_train import tiny_config, write_cola

from peftlab.commands.distill import distill
from peftlab.workloads.distill.task import distill_config
from peftlab.train import train

TOLERANCE = 1e-4


def pinned(summary: dict) -> dict:
    """What is compared: the last evaluation's validation numbers, the training loss, and the test score."""
    last = summary["last"]
    values = {key: value for key, value in last.items() if key in (
        "train_loss", "val_loss", "val_accuracy", "val_mcc", "val_score_accuracy", "val_exact_match", "val_f1")}
    if summary.get("test"):
        values["test_accuracy"] = summary["test"]["accuracy"]
    return values


def assert_pinned(summary: dict, expected: dict) -> None:
    assert pinned(summary) == pytest.approx(expected, abs=TOLERANCE)


def test_classification(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data")
    summary = train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2))
    assert_pinned(summary, CLASSIFICATION)


def test_instruct(tiny_model_dir, tmp_path):
    data = write_rotten_tomatoes(tmp_path / "data")
    config = instruct_config(tiny_model_dir, data, tmp_path / "run", predict="both")
    config.adapter.method, config.train.lr, config.train.epochs = "full", 1e-2, 3
    assert_pinned(train(config), INSTRUCT)


def test_qa(tiny_model_dir, tmp_path):
    data = write_squad(tmp_path / "data", colour_paragraphs(24), colour_paragraphs(6, offset=3))
    config = squad_config(data)
    config.output_dir, config.model.name, config.adapter.method = str(tmp_path / "run"), tiny_model_dir, "full"
    config.train.epochs, config.train.batch_size, config.train.lr, config.train.device = 2, 8, 1e-2, "cpu"
    assert_pinned(train(config), QA)


def test_distill(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=48, dev_rows=24)
    train(tiny_config(tiny_model_dir, data, tmp_path / "teacher", epochs=1))
    config = distill_config(str(tmp_path / "teacher"))
    config.output_dir = str(tmp_path / "student")
    config.train.epochs, config.train.batch_size, config.train.device = 2, 16, "cpu"
    config.distill.embedding_size, config.distill.hidden_size, config.distill.augment = 8, 8, 1
    assert_pinned(distill(config), DISTILL)


# `pytest tests/test_workload_metrics.py` at commit 7ea6176 gave these (pinned(summary) of each run):
CLASSIFICATION = {"train_loss": 0.6809098521868387, "val_loss": 0.7003837585449219, "val_accuracy": 0.45,
                  "val_mcc": -0.08206099398622181}
INSTRUCT = {"train_loss": 0.4523198753595352, "val_loss": 0.4141533672809601, "val_accuracy": 0.75,
            "val_mcc": 0.5773502691896258, "val_score_accuracy": 0.75, "test_accuracy": 0.6979362101313321}
QA = {"train_loss": 9.303794860839844, "val_loss": 8.987499872843424, "val_exact_match": 16.666666666666668,
      "val_f1": 16.666666666666668}
DISTILL = {"train_loss": 0.34718460341294605, "val_loss": 0.7139265537261963, "val_accuracy": 0.2916666666666667,
           "val_mcc": -0.3988705859810952}
