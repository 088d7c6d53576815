import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.config import RunConfig
from peftlab import engine as engine_module
from peftlab.engine import epoch_batches, lr_multiplier, process_share
from peftlab.peft.base import adapter_modules
from peftlab.train import evaluate_run, train
from tiny_data import write_cola  # noqa: F401  (other tests import it from here)

def tiny_config(model_dir, data_dir, output_dir, **train_overrides) -> RunConfig:
    config = RunConfig(output_dir=str(output_dir))
    config.model.name = model_dir
    config.task.data_dir = data_dir
    config.adapter.targets = ["all-linear"]
    config.adapter.rank = 4
    config.adapter.alpha = 8
    config.adapter.dropout = 0.1  # exercises the RNG state on resume
    config.train.epochs = 3
    config.train.batch_size = 16
    config.train.lr = 3e-3
    config.train.device = "cpu"
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_length_grouped_batches_cover_every_example_once():
    from peftlab.tasks import Encoded

    examples = [Encoded([0] * (index % 17 + 1), 0, f"x:{index}") for index in range(1000)]
    batches = [[index for unit in batch for index in unit] for batch in epoch_batches(examples, 32, seed=1, epoch=0)]
    assert sorted(index for batch in batches for index in batch) == list(range(1000))
    assert epoch_batches(examples, 32, seed=1, epoch=0) == epoch_batches(examples, 32, seed=1, epoch=0)
    assert epoch_batches(examples, 32, seed=1, epoch=0) != epoch_batches(examples, 32, seed=1, epoch=1)
    assert all(len(batch) == 32 for batch in batches[:-1] if len(batch) != 1000 % 32)
    spans = [max(examples[i].length for i in batch) - min(examples[i].length for i in batch) for batch in batches]
    assert sum(spans) / len(spans) < 3  # grouped: little padding within a batch (random batches span ~16)


def test_lr_schedule_warms_up_then_decays():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 10, "constant") == 1.0


def test_process_share_splits_every_example_once():
    batch = [[index] for index in range(10)]
    shares = [process_share(batch, rank, 2, 2) for rank in range(2)]
    assert shares == [[[0, 2, 4], [6, 8]], [[1, 3, 5], [7, 9]]]
    assert process_share([[7]], 1, 2, 1) == []
    # Units (examples sharing a prefix) stay whole: every P-th unit, then runs of units.
    units = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    assert [process_share(units, rank, 2, 2) for rank in range(2)] == [[[0, 1, 2], [4, 5]], [[3], [6, 7, 8, 9]]]


def test_training_learns_and_writes_the_run_directory(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_cola(tmp_path / "data")
    summary = train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=4))
    captured = capsys.readouterr()
    out = captured.out
    assert "evaluate: " in captured.err and "/40 [" in captured.err  # every evaluation shows its progress
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "plots/metrics.png",
                 "checkpoints/best/peftlab_adapter.safetensors", "checkpoints/last/optimizer.safetensors"):
        assert (run / name).is_file(), name
    assert "Train Epoch: [1/4], Loss:" in out and "Val Epoch: [4/4], Loss:" in out and "MCC:" in out
    assert "Number of parameters:" in out and "Reduction:" in out
    rows = read_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert sum(rows[-1]["val_predicted_counts"].values()) == 40
    best = max(rows, key=lambda row: row["val_mcc"])
    assert summary["best"]["val_mcc"] == best["val_mcc"]
    # Re-evaluating the best checkpoint reproduces the metrics recorded when it was saved.
    again = evaluate_run(str(run), "validation", "best")
    assert again["mcc"] == pytest.approx(best["val_mcc"], abs=1e-9)
    assert again["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    # Merged evaluation is asked for, never implied: the same scores, the adapters merged only for it.
    merges = []
    real_merged = engine_module.merged

    def counting_merged(model):
        modules = [module for _, module in adapter_modules(model) if module.mergeable]
        assert modules  # the run's LoRA layers
        merges.append(sum(module.merged for module in modules))
        return real_merged(model)

    monkeypatch.setattr(engine_module, "merged", counting_merged)
    assert evaluate_run(str(run), "validation", "best")["loss"] == again["loss"] and merges == []
    merged_again = evaluate_run(str(run), "validation", "best", merge_for_evaluation=True)
    assert merges == [0]  # nothing was merged before the merged evaluation asked for it
    assert merged_again["mcc"] == pytest.approx(again["mcc"], abs=1e-9)
    assert merged_again["loss"] == pytest.approx(again["loss"], rel=1e-5)


def test_resume_ends_exactly_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data")
    train(tiny_config(tiny_model_dir, data, tmp_path / "whole"))
    train(tiny_config(tiny_model_dir, data, tmp_path / "parts"), stop_after_epoch=1)
    assert [row["epoch"] for row in read_rows(tmp_path / "parts")] == [1]
    train(tiny_config(tiny_model_dir, data, tmp_path / "parts"), resume=True)
    whole, parts = read_rows(tmp_path / "whole"), read_rows(tmp_path / "parts")
    assert len(whole) == len(parts) == 3
    for row_whole, row_parts in zip(whole, parts):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_mcc", "lr"):
            assert row_parts[key] == pytest.approx(row_whole[key], abs=1e-6), key
    tensors_whole = load_file(tmp_path / "whole/checkpoints/last/peftlab_adapter.safetensors")
    tensors_parts = load_file(tmp_path / "parts/checkpoints/last/peftlab_adapter.safetensors")
    for name, tensor in tensors_whole.items():
        torch.testing.assert_close(tensors_parts[name], tensor, atol=1e-6, rtol=0)


def test_an_existing_run_is_not_overwritten(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1)
    train(config)
    with pytest.raises(PeftlabError, match="already holds a run"):
        train(config)


def test_nan_loss_stops_with_a_message(tiny_model_dir, tmp_path, monkeypatch):
    from peftlab.workloads.classification.workload import ClassificationTask

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    original = ClassificationTask.forward

    def poisoned(self, model, batch):
        output = original(self, model, batch)
        output.loss_sum = output.loss_sum * float("nan")
        return output

    monkeypatch.setattr(ClassificationTask, "forward", poisoned)
    with pytest.raises(PeftlabError, match="loss became nan at step 1"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1))


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=16)
    # No LoRA dropout: 4 micro-batches draw their dropout masks in another order than one batch does.
    for name, grad_accum in (("one", 1), ("accum", 4)):
        config = tiny_config(tiny_model_dir, data, tmp_path / name, epochs=2, grad_accum=grad_accum)
        config.adapter.dropout = 0.0
        train(config)
    for one, accum in zip(read_rows(tmp_path / "one"), read_rows(tmp_path / "accum")):
        assert accum["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
        assert accum["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)


def test_two_processes_follow_the_one_process_trajectory(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2` at the same global batch: two ranks really ran (the summary and the per-rank
    RNG states of checkpoints/last say so), and the losses are those of one process (fp32 reduction-order noise)."""
    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=16)
    common = ["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--targets", "all-linear",
              "--rank", "4", "--alpha", "8", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu"]
    assert main(common + ["--output-dir", str(tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "peftlab"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + common + ["--output-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    rng = json.loads((tmp_path / "two" / "checkpoints" / "last" / "training_state.json").read_text())
    rng_states = next(value for key, value in rng["__dict__"] if key == "rng")
    assert len(rng_states) == 2  # gathered from both ranks
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["num_processes"] == 1
    one, two = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert len(one) == len(two) == 2
    for row_one, row_two in zip(one, two):
        assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], abs=1e-5)
        assert row_two["val_loss"] == pytest.approx(row_one["val_loss"], abs=1e-5)
        assert row_two["val_mcc"] == pytest.approx(row_one["val_mcc"], abs=1e-9)


def test_export_run_merged_and_peft_reproduce_our_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftlab.train import export_run
    from peftlab.workloads.loading import load_run

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--format", "merged"]) == 0
    export_run(str(tmp_path / "run"), str(tmp_path / "peft"), "peft")
    _, _, ours = load_run(str(tmp_path / "run"))
    ours.eval()
    input_ids = torch.tensor([[464, 3797, 3332, 319, 262, 2603, 13]])  # no padding, no EOS
    mask = torch.ones_like(input_ids)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2), tmp_path / "peft"
    ).eval()
    with torch.no_grad():
        expected = ours(input_ids, mask)
        torch.testing.assert_close(merged(input_ids=input_ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(peft_model(input_ids=input_ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


def test_eval_takes_the_limit_by_trains_name_and_by_its_old_one(monkeypatch):
    from peftlab.cli import _build_parser, _command_parser
    from peftlab.commands import run as run_commands

    limits = []
    monkeypatch.setattr(run_commands, "evaluate_run", lambda *args, **settings: limits.append(args[4]))
    assert main(["eval", "runs/x", "--eval-limit", "7"]) == 0
    assert main(["eval", "runs/x", "--limit", "5"]) == 0
    assert limits == [7, 5]
    help_text = " ".join(_command_parser(_build_parser(), "eval").format_help().split())
    assert "--eval-limit N, --limit N" in help_text and "old name" in help_text
    assert "--eval-limit" in " ".join(_command_parser(_build_parser(), "train").format_help().split())


def test_ctrl_c_says_interrupted_on_a_line_of_its_own(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The epoch's progress bar is closed (its line cleared) before the command's last line is written."""
    from peftlab.workloads.classification.workload import ClassificationTask

    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=8)
    original, calls = ClassificationTask.forward, []

    def stopped(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "forward", stopped)
    code = main(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--device", "cpu",
                 "--epochs", "1", "--batch-size", "16", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 130 and "epoch 1/1" in err  # the bar was on screen
    before, _, after = err.partition("peftlab train: interrupted")
    assert before.endswith(("\r", "\n")) and before.rstrip("\r").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1].strip() == ""
    assert after.count("\n") == 1 and after.endswith("\n")
