"""A run's life as a user sees it: recipes and overrides, the resolved plan, step logs and trackers, mid-epoch
checkpoints that survive a kill, --max-steps, portable evaluation, and what a run prints when it ends."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import read_rows, tiny_config, write_cola

from peftlab.cli import main
from peftlab.train import train


def tiny_arguments(model_dir, data, output_dir, *extra):
    return ["train", "--task", "cola", "--model", model_dir, "--data-dir", data, "--device", "cpu", "--targets",
            "all-linear", "--rank", "4", "--alpha", "8", "--lora-dropout", "0.1", "--lr", "3e-3",
            "--output-dir", str(output_dir), *extra]


# ----------------------------------------------------------------------------------------------------------
# Step checkpoints: a kill mid-epoch resumes at the saved step and ends like the uninterrupted run

KILL_SCRIPT = """
import os, signal, sys
import peftlab.engine as engine
original = engine.Engine._step_row
def step_row(self, *args):
    row = original(self, *args)
    if row["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`: no handler, no cleanup
    return row
engine.Engine._step_row = step_row
from peftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_mid_epoch_resumes_at_its_last_step_checkpoint_and_ends_the_same(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=96, dev_rows=16)
    options = ["--epochs", "2", "--batch-size", "8", "--save-every", "4", "--eval-every", "5"]  # 12 steps per epoch
    assert main(tiny_arguments(tiny_model_dir, data, tmp_path / "whole", *options)) == 0
    killed = tmp_path / "killed"
    process = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *tiny_arguments(tiny_model_dir, data, killed, *options)],
                             env=os.environ | {"KILL_AT_STEP": "19"}, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    # Killed in epoch 2 at step 19: checkpoints/last is the step-16 checkpoint, 4 batches into epoch 2.
    state = json.loads((killed / "checkpoints/last/training_state.json").read_text())
    assert '"batches_done"' in json.dumps(state)
    assert [row["step"] for row in read_rows(killed)] == [5, 10, 12, 15]
    assert json.loads((killed / "steps.jsonl").read_text().splitlines()[-1])["step"] == 19
    assert main(["train", "--resume", str(killed)]) == 0
    whole, resumed = read_rows(tmp_path / "whole"), read_rows(killed)
    assert [row["step"] for row in resumed] == [row["step"] for row in whole] == [5, 10, 12, 15, 20, 24]
    for row, reference in zip(resumed, whole):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_mcc", "lr"):
            if key in reference:
                assert row[key] == pytest.approx(reference[key], abs=1e-6), (row["step"], key)
    # Steps after the checkpoint were replayed once: steps.jsonl holds each step once, with the same losses.
    steps, reference_steps = (
        [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()] for run in (killed, tmp_path / "whole"))
    assert [row["step"] for row in steps] == list(range(1, 25))
    assert [row["loss"] for row in steps] == pytest.approx([row["loss"] for row in reference_steps], abs=1e-6)
    for name, tensor in load_file(tmp_path / "whole/checkpoints/last/peftlab_adapter.safetensors").items():
        torch.testing.assert_close(load_file(killed / "checkpoints/last/peftlab_adapter.safetensors")[name], tensor,
                                   atol=1e-6, rtol=0)


def test_max_steps_ends_the_run_and_its_schedule_there_and_a_finished_run_is_left_alone(tiny_model_dir, tmp_path,
                                                                                         capsys):
    data = write_cola(tmp_path / "data", train_rows=96, dev_rows=16)
    run = tmp_path / "run"
    arguments = tiny_arguments(tiny_model_dir, data, run, "--epochs", "3", "--batch-size", "8", "--max-steps", "15",
                               "--warmup-ratio", "0")
    assert main(arguments) == 0
    out = capsys.readouterr().out
    rows, steps = read_rows(run), [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [12, 15] and len(steps) == 15
    assert steps[-1]["lr"] == pytest.approx(3e-3 / 15)  # linear decay over 15 steps, not over 36
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps_completed"] == 15
    assert "Run finished at step 15/15" in out and "Train Epoch: [2/2]" in out
    before = sorted((path.name, path.stat().st_mtime_ns) for path in run.rglob("*"))
    assert main(["train", "--resume", str(run)]) == 0
    assert "has finished already; nothing to do" in capsys.readouterr().out
    assert sorted((path.name, path.stat().st_mtime_ns) for path in run.rglob("*")) == before


def test_every_step_is_logged_and_a_run_ends_with_its_summary(tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=16)
    run = tmp_path / "run"
    assert main(tiny_arguments(tiny_model_dir, data, run, "--epochs", "2", "--batch-size", "16",
                               "--eval-every", "3")) == 0
    out = capsys.readouterr().out
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == list(range(1, 9))
    assert all(row["examples"] == 16 and row["examples_per_second"] > 0 and row["grad_norm"] > 0 for row in steps)
    assert steps[0]["lr"] == 3e-3 and steps[1]["lr"] == pytest.approx(3e-3 * 7 / 8)  # the lr each step used
    assert [row["epoch"] for row in steps[:4]] == [0.25, 0.5, 0.75, 1.0]
    assert "Val Step: 3/8 (epoch 1), Loss: " in out and "Val Step: 6/8 (epoch 2)" in out  # mid-epoch evaluations
    best = json.loads((run / "summary.json").read_text())["best"]
    assert f"validation mcc {best['val_mcc']:.4f} at step {best['step']} (epoch {best['epoch']}): {run}/checkpoints/best" in out
    assert f"{run}/checkpoints/last (step 8, resumable)" in out and "Run finished at step 8/8 (2 epoch(s)) in " in out
    # Every file of the run directory gets the same permissions (the umask's), whichever way it was written.
    modes = {stat.S_IMODE(path.stat().st_mode) for path in run.rglob("*") if path.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


def test_tensorboard_receives_every_step_and_evaluation(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=16)
    run = tmp_path / "run"
    assert main(tiny_arguments(tiny_model_dir, data, run, "--epochs", "1", "--batch-size", "16", "--eval-every", "2",
                               "--report-to", "tensorboard")) == 0
    event_files = list((run / "trackers").rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    loss = events.Scalars("train/loss")
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [event.step for event in loss] == [1, 2, 3, 4]
    assert [event.value for event in loss] == pytest.approx([row["loss"] for row in steps], rel=1e-6)
    assert [event.step for event in events.Scalars("val/mcc")] == [2, 4]
    assert [event.value for event in events.Scalars("val/loss")] == pytest.approx(
        [row["val_loss"] for row in read_rows(run)], rel=1e-6)


def test_wandb_runs_offline_without_a_network_or_key(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    assert main(tiny_arguments(tiny_model_dir, data, run, "--epochs", "1", "--batch-size", "16",
                               "--report-to", "wandb")) == 0
    assert "W&B: offline (no API key)" in capsys.readouterr().out
    offline = list((run / "trackers" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_tracker_that_is_not_installed_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    import importlib.util

    import peftlab.train
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else find_spec(name, *args))
    monkeypatch.setattr(peftlab.train, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    assert main(tiny_arguments(tiny_model_dir, data, tmp_path / "run", "--report-to", "wandb")) == 2
    assert "the wandb package is not installed. Fix: pip install 'peftlab[wandb]'" in capsys.readouterr().err
    assert main(tiny_arguments(tiny_model_dir, data, tmp_path / "run", "--report-to", "tensorbord")) == 2
    assert "--report-to takes tensorboard, wandb" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Recipes, overrides and the resolved plan


@pytest.mark.parametrize("name", ["cola", "rotten_tomatoes", "squad"])
def test_each_recipe_is_a_valid_configuration_of_its_task(name):
    from peftlab.config import RunConfig
    from peftlab.recipes import recipe_summary, recipe_values

    config = RunConfig.from_dict(recipe_values(name))
    assert config.task.name == name and config.adapter.targets == ["all-linear"] and config.adapter.rank == 16
    assert "Measured:" in recipe_summary(name)


def test_recipe_set_and_options_resolve_in_order_and_dry_run_prints_the_plan(tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=100, dev_rows=16)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "cola", "--model", tiny_model_dir, "--data-dir", data, "--device", "cpu",
                 "--set", "train.lr=1e-4", "--set", "adapter.targets=q,v", "--rank", "4", "--output-dir", str(run),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "100 training and 16 validation examples of cola" in out
    assert "16 optimizer steps: 4 epoch(s) of 4 steps, batch 32" in out  # the recipe's epochs and batch size
    assert "lr 0.0001, 1 warm-up steps (0.06), then cosine" in out  # --set train.lr, the recipe's schedule
    assert "every epoch and every 67 steps" in out and "device      cpu, 1 process(es), fp32 weights" in out
    assert "Adapter parameters: 1,024" in out  # q,v at rank 4 (--rank beats the recipe's 16) on the tiny model
    assert not run.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--set", "train.lerning_rate=3"], "config.train: unknown key(s) lerning_rate"),
    (["--set", "adapter.rnk=3"], "(did you mean rank?)"),
    (["--set", "trian.lr=3"], "(did you mean train?)"),
    (["--set", "train.lr"], "expected SECTION.KEY=VALUE"),
    (["--set", "train.lr=fast"], "train.lr: expected float, found 'fast'"),
    (["--recipe", "colaa"], "unknown recipe 'colaa': expected one of cola, rotten_tomatoes, squad"),
    (["--eval-evry", "3"], "peftlab train: error: unrecognized arguments: --eval-evry (did you mean --eval-every?)"),
    (["--learning_rate", "3"], "--learning_rate (did you mean --lr?)"),  # transformers' name
    (["--select-metric", "f1"], "--select-metric 'f1' is not a validation metric of cola"),
    (["--method", "lorra"], "unknown method 'lorra': expected one of lora,"),
    (["--extra-trainable", "head,hed"], "--extra-trainable: unknown extra trainable(s) hed: expected any of head, biases, norms"),
    (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
])
def test_bad_settings_get_a_clear_error_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                               arguments, message):
    import peftlab.train

    monkeypatch.setattr(peftlab.train, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    assert exit_code(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--device", "cpu",
                      "--output-dir", str(tmp_path / "run"), *arguments]) == 2
    assert message in capsys.readouterr().err


def exit_code(arguments) -> int:
    """main's return code, or argparse's exit code for arguments it refuses itself."""
    try:
        return main(arguments)
    except SystemExit as error:
        return error.code


def test_a_recipe_file_with_a_yaml_string_lr_is_accepted(tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"model: {{name: {tiny_model_dir}}}\ntask: {{name: cola, data_dir: {data}}}\n"
                      "train: {lr: 3e-4, epochs: 1, device: cpu}\nadapter: {targets: q}\n")
    assert yaml.safe_load(recipe.read_text())["train"]["lr"] == "3e-4"  # what PyYAML makes of it
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "lr 0.0003," in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Portable runs and precision


def test_a_moved_run_evaluates_with_data_dir_and_device_and_splits_are_checked_first(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    import shutil

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1))
    recorded = read_rows(tmp_path / "run")[-1]
    moved_data = tmp_path / "elsewhere"
    shutil.move(data, moved_data)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 2  # its recorded data directory is gone
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(moved_data), "--device", "cpu"]) == 0
    assert f"MCC: {recorded['val_mcc']:.4f}" in capsys.readouterr().out

    import peftlab.workloads.loading
    monkeypatch.setattr(peftlab.workloads.loading, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(moved_data), "--split", "validation_ood"]) == 2
    assert "cola's validation_ood split has no file in the data directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(moved_data), "--split", "dev"]) == 2
    assert ("cola has no split 'dev': it offers train, validation, validation_ood; present here: train, validation"
            in capsys.readouterr().err)
    assert main(["eval", str(tmp_path / "run"), "--device", "cuda:3"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    monkeypatch.undo()
    shutil.copy(moved_data / "cola" / "in_domain_dev.tsv", moved_data / "cola" / "out_of_domain_dev.tsv")
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(moved_data), "--split", "validation_ood"]) == 0
    assert f"validation_ood (8 examples): Loss: {recorded['val_loss']:.4f}" in capsys.readouterr().out


def test_bf16_autocast_trains_on_cpu_and_fp16_asks_for_a_gpu(tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    assert main(tiny_arguments(tiny_model_dir, data, tmp_path / "bf16", "--epochs", "1", "--batch-size", "16",
                               "--precision", "bf16")) == 0
    assert yaml.safe_load((tmp_path / "bf16/config.yaml").read_text())["environment"]["precision"] == "bf16"
    fp32 = tmp_path / "fp32"
    assert main(tiny_arguments(tiny_model_dir, data, fp32, "--epochs", "1", "--batch-size", "16")) == 0
    bf16_loss, fp32_loss = read_rows(tmp_path / "bf16")[0]["train_loss"], read_rows(fp32)[0]["train_loss"]
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=0.05)  # autocast ran, and is close
    capsys.readouterr()
    assert main(tiny_arguments(tiny_model_dir, data, tmp_path / "fp16", "--precision", "fp16")) == 2
    assert "--precision fp16 needs a GPU" in capsys.readouterr().err
