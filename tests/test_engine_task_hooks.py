"""The engine's seams for tasks: `Task.begin_evaluation` / `end_evaluation` around every evaluation (end of epoch,
mid-epoch, test split, and after an error), and a task's own sums (`StepOutput.sums`) reduced over micro-batches
and written as means to steps.jsonl, metrics.jsonl and the evaluation's metrics. A one-weight model and a task
whose sums are known in advance, so every written value is computed here by hand."""

from __future__ import annotations

import json
from typing import Sequence

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from peftlab.config import TrainConfig
from peftlab.engine import Engine, epoch_batches, evaluate, process_share
from peftlab.runs import RunDir
from peftlab.tasks import Encoded, StepOutput, Task


class ScaleTask(Task):
    """Learn y = 2x with one weight. Its own sums: the inputs x ("input", a sum over examples) and the squared
    error ("squared_error", a sum over examples). Records every evaluation hook and forward call."""

    name, model_task = "scale", "regression"
    select_metric_default, metric_names = "loss", ()

    def __init__(self, fail_on_evaluation: bool = False):
        self.calls: list[tuple] = []
        self.fail_on_evaluation = fail_on_evaluation

    def encode(self, split: str) -> list[Encoded]:
        values = range(1, 13) if split == "train" else (3, 5, 10)
        return [Encoded([value], 2.0 * value, f"{split}:{value}") for value in values]

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([[float(e.input_ids[0])] for e in examples]),
                "y": torch.tensor([[e.target] for e in examples])}

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["x"])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        self.calls.append(("forward", model.training))
        if self.fail_on_evaluation and not model.training:
            raise RuntimeError("a batch failed")
        squared_error = (model(batch["x"]) - batch["y"]) ** 2  # (b, 1)
        return StepOutput(squared_error.sum(), len(batch["x"]), [0.0] * len(batch["x"]), 0,
                          sums={"input": (batch["x"].sum(), len(batch["x"])),
                                "squared_error": (squared_error.sum().detach(), len(batch["x"]))})

    def begin_evaluation(self, model: nn.Module, examples: Sequence[Encoded]) -> None:
        self.calls.append(("begin", len(examples), model.training, torch.is_inference_mode_enabled()))

    def end_evaluation(self) -> None:
        self.calls.append(("end",))

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict:
        return {}

    def format_metrics(self, metrics: dict) -> str:
        return "-"


def engine_for(task: Task, run_dir, **settings) -> Engine:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.5)
    config = TrainConfig(**({"epochs": 2, "batch_size": 4, "lr": 1e-2, "device": "cpu"} | settings))
    return Engine(task, model, config, RunDir(run_dir), "none", "loss", Accelerator(cpu=True))


def test_every_evaluation_is_framed_by_begin_and_end(tmp_path):
    task = ScaleTask()
    engine = engine_for(task, tmp_path, eval_every=2)  # 3 steps per epoch: one mid-epoch evaluation each
    engine.fit(task.encode("train"), task.encode("validation"))
    engine.test_best("validation")
    hooks = [call for call in task.calls if call[0] != "forward" or not call[1]]  # training forwards left out
    evaluation = [("begin", 3, False, True), ("forward", False), ("end",)]  # 3 examples, one batch of eval_batch_size
    assert hooks == evaluation * 5  # epoch 1: mid + end; epoch 2: mid + end; the test split


def test_end_evaluation_runs_when_the_evaluation_fails():
    task = ScaleTask(fail_on_evaluation=True)
    with pytest.raises(RuntimeError, match="a batch failed"):
        evaluate(nn.Linear(1, 1), task, task.encode("validation"), batch_size=2)
    assert [call[0] for call in task.calls] == ["begin", "forward", "end"]


def test_task_sums_are_written_as_means_over_micro_batches_steps_and_epochs(tmp_path):
    task = ScaleTask()
    engine = engine_for(task, tmp_path, epochs=1, grad_accum=2)  # 3 steps of 2 micro-batches of 2 examples
    train_examples = task.encode("train")
    engine.fit(train_examples, task.encode("validation"))
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    batches = epoch_batches(train_examples, 4, seed=0, epoch=0)
    assert [len(process_share(batch, 0, 1, 2)) for batch in batches] == [2, 2, 2]
    # "input": the mean x of the step's 4 examples, e.g. a batch of 3, 4, 5, 6 gives 4.5.
    expected = [sum(train_examples[i].input_ids[0] for unit in batch for i in unit) / 4 for batch in batches]
    assert [row["input"] for row in steps] == pytest.approx(expected, abs=1e-12)
    for row in steps:  # the step's mean squared error is its loss (the loss is a mean over examples too)
        assert row["squared_error"] == pytest.approx(row["loss"], rel=1e-12)
    (metrics,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_input"] == pytest.approx(6.5, abs=1e-12)  # the epoch saw x = 1..12 once each
    assert metrics["train_squared_error"] == pytest.approx(metrics["train_loss"], rel=1e-12)
    assert metrics["val_input"] == pytest.approx(6.0, abs=1e-12)  # (3 + 5 + 10) / 3
    # w after training: val squared error by hand from the saved weight.
    weight = engine.accelerator.unwrap_model(engine.model).weight.item()
    by_hand = sum((weight * x - 2 * x) ** 2 for x in (3, 5, 10)) / 3
    assert metrics["val_squared_error"] == pytest.approx(by_hand, rel=1e-6)
    assert metrics["val_loss"] == pytest.approx(by_hand, rel=1e-6)


def test_a_task_sum_may_not_take_a_name_the_engine_writes(tmp_path):
    class Clashing(ScaleTask):
        def forward(self, model, batch):
            output = super().forward(model, batch)
            output.sums["lr"] = (1.0, 1)
            return output

    task = Clashing()
    with pytest.raises(Exception, match="returns lr, which the engine writes itself"):
        engine_for(task, tmp_path).fit(task.encode("train"), task.encode("validation"))


def test_trackers_log_the_task_sums_of_each_step():
    from types import SimpleNamespace

    from peftlab.trackers import Trackers

    logged = []
    engine = SimpleNamespace(accelerator=SimpleNamespace(log=lambda values, step: logged.append((step, values))))
    trackers = Trackers(config=None)
    trackers.started = True
    row = {"step": 3, "epoch": 0.5, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.7, "examples": 4, "seconds": 0.5,
           "examples_per_second": 8.0, "input": 4.5, "squared_error": None}  # None: the sum counted nothing
    trackers.on_step(engine, row)
    assert logged == [(3, {"train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": 0.7, "train/examples_per_second": 8.0,
                           "train/input": 4.5, "train/epoch": 0.5})]
