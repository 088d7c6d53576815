"""Faults and bad inputs: nothing a user has is deleted or overwritten, diverged weights are never saved, a killed
or interrupted run can always go on, and every failure is one clear line (exit code 2) instead of a traceback."""

import json
import math
import os
import re
import shutil
import stat

import pytest
import torch
from test_train import read_rows, tiny_config, write_cola

from safetensors.torch import load_file

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.fileio import replace_directory, write_text_atomic
from peftlab.workloads.classification.workload import ClassificationTask
from peftlab.train import export_run, train


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path):
    """A one-epoch run (tiny GPT-2, synthetic CoLA) in tmp_path/run."""
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1))
    return tmp_path / "run"


def run_files(run):
    return sorted(str(path.relative_to(run)) for path in run.rglob("*"))


# ----------------------------------------------------------------------------------------------------------
# Export never deletes what it did not write


def test_export_refuses_a_users_folder_a_file_and_the_run_itself(finished_run, tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("my notes")
    (tmp_path / "a-file").write_text("keep me")
    before = run_files(finished_run)
    for target, message in ((users, "not an export of this run"), (tmp_path / "a-file", "is a file"),
                            (finished_run, "the run directory itself"), (tmp_path, "holds the run directory"),
                            (finished_run / "checkpoints", "part of the run")):
        assert main(["export", str(finished_run), str(target), "--format", "merged"]) == 2
        assert message in capsys.readouterr().err
    assert (users / "notes.txt").read_text() == "my notes"
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert run_files(finished_run) == before
    # --overwrite replaces a user's path when asked, but never the run or a folder holding it.
    for target in (finished_run, tmp_path, finished_run / "checkpoints"):
        with pytest.raises(PeftlabError, match="the run directory itself|holds the run directory|part of the run"):
            export_run(str(finished_run), str(target), "merged", overwrite=True)
    assert run_files(finished_run) == before
    assert main(["export", str(finished_run), str(users), "--format", "merged", "--overwrite"]) == 0
    assert (users / "config.json").is_file() and not (users / "notes.txt").exists()


def test_an_earlier_export_of_the_same_run_is_replaced_but_not_one_of_another_run(finished_run, tmp_path):
    out = tmp_path / "export"
    export_run(str(finished_run), str(out), "merged")
    export_run(str(finished_run), str(out), "peft")  # the same run again, another format: replaced whole
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    other = tmp_path / "other-run"
    shutil.copytree(finished_run, other)
    with pytest.raises(PeftlabError, match="an export of another run"):
        export_run(str(other), str(out), "peft")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(str(finished_run), str(empty), "peft")  # an empty folder loses nothing
    assert (empty / "adapter_model.safetensors").is_file()


def test_replace_directory_refuses_a_folder_without_its_marker(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "user.txt").write_text("x")

    def fill(path):
        (path / "MARKER").write_text("")

    with pytest.raises(PeftlabError, match="not written by peftlab"):
        replace_directory(target, fill, "MARKER")
    assert (target / "user.txt").read_text() == "x"
    (target / "user.txt").unlink()
    replace_directory(target, fill, "MARKER")  # empty: replaced
    (target / "extra").write_text("")
    replace_directory(target, fill, "MARKER")  # ours (has the marker): replaced whole
    assert sorted(path.name for path in target.iterdir()) == ["MARKER"]


def test_report_never_overwrites_a_report_it_did_not_write(finished_run, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "report.md").write_text("# my own report\n")
    assert main(["report", str(finished_run), "--output-dir", str(folder)]) == 2
    assert "peftlab did not write" in capsys.readouterr().err
    assert (folder / "report.md").read_text() == "# my own report\n"
    assert main(["report", str(finished_run), "--output-dir", str(tmp_path / "fresh")]) == 0
    assert main(["report", str(finished_run), "--output-dir", str(tmp_path / "fresh")]) == 0  # its own: replaced
    out = capsys.readouterr().out
    assert "| run | method |" in out and "<!--" not in out


# ----------------------------------------------------------------------------------------------------------
# Non-finite losses, gradients and metrics


def poison_forward(monkeypatch, when, how):
    """ClassificationTask.forward with its output changed by `how` on the calls where when(call, training) holds."""
    original = ClassificationTask.forward
    calls = {"train": 0, "eval": 0}

    def forward(self, model, batch):
        output = original(self, model, batch)
        mode = "train" if model.training else "eval"
        calls[mode] += 1
        if when(calls[mode], mode):
            output = how(output)
        return output

    monkeypatch.setattr(ClassificationTask, "forward", forward)


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss whose update would ruin the weights)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, gradient):
        return gradient * math.inf


def with_loss(output, loss_sum):
    output.loss_sum = loss_sum
    return output


def test_a_nan_validation_loss_stops_before_saving_and_keeps_the_last_finite_state(tiny_model_dir, tmp_path, monkeypatch):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=3)
    # 8 dev sentences = 1 evaluation batch: the second evaluation (end of epoch 2) is NaN.
    poison_forward(monkeypatch, lambda call, mode: mode == "eval" and call == 2,
                   lambda output: with_loss(output, output.loss_sum * math.nan))
    with pytest.raises(PeftlabError, match=r"validation loss became nan at step 4; stopped before saving.*"
                                           r"checkpoints/last holds epoch 1 \(step 2\)"):
        train(config)
    run = tmp_path / "run"
    assert [row["epoch"] for row in read_rows(run)] == [1]
    for name in ("best", "last"):
        metadata = json.loads((run / "checkpoints" / name / "peftlab_adapter.json").read_text())["metadata"]
        assert metadata["step"] == 2


def test_an_infinite_gradient_norm_stops_before_the_update(tiny_model_dir, tmp_path, monkeypatch):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    poison_forward(monkeypatch, lambda call, mode: mode == "train" and call == 3,
                   lambda output: with_loss(output, InfiniteGradient.apply(output.loss_sum)))
    with pytest.raises(PeftlabError, match=r"gradient norm became (inf|nan) at step 3 \(the loss was finite\); stopped "
                                           r"before saving.*checkpoints/last holds epoch 1 \(step 2\)"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2, max_grad_norm=0.0))
    saved = load_file(tmp_path / "run" / "checkpoints" / "last" / "peftlab_adapter.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


def test_a_nan_metric_is_never_best_and_metrics_stay_valid_json(tiny_model_dir, tmp_path, monkeypatch):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    original = ClassificationTask.metrics
    calls = []

    def metrics(self, predictions, examples):
        calls.append(1)
        values = original(self, predictions, examples)
        return values | ({"mcc": math.nan} if len(calls) == 1 else {})

    monkeypatch.setattr(ClassificationTask, "metrics", metrics)
    summary = train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl")) for line in lines]
    assert rows[0]["val_mcc"] is None and rows[1]["val_mcc"] is not None
    assert summary["best"]["step"] == rows[1]["step"]
    best = json.loads((tmp_path / "run" / "checkpoints" / "best" / "peftlab_adapter.json").read_text())
    assert best["metadata"]["epoch"] == 2


# ----------------------------------------------------------------------------------------------------------
# Targets


def test_every_target_item_must_match_a_layer(make_tiny_llama, make_tiny_gpt2):
    from peftlab.models import convert_conv1d_to_linear
    from peftlab.peft import resolve_targets

    with pytest.raises(PeftlabError, match=r"target 'v_porj' matched no linear layer.*v_proj"):
        resolve_targets(make_tiny_llama(), ["q_proj", "v_porj"])
    gpt2 = make_tiny_gpt2()
    convert_conv1d_to_linear(gpt2)
    assert len(resolve_targets(gpt2, ["q", r"transformer\.h\.1\.mlp\..*"])) == 4  # 2 c_attn q slices + c_fc, c_proj
    with pytest.raises(PeftlabError, match=re.escape(r"target 'transformer\.h\.9\..*' matched no linear layer")):
        resolve_targets(gpt2, ["q", r"transformer\.h\.9\..*"])


# ----------------------------------------------------------------------------------------------------------
# Stuck runs: every state a crash or kill can leave resumes


def test_a_crash_after_a_mid_epoch_evaluation_restarts_from_step_zero_on_resume(tiny_model_dir, tmp_path, monkeypatch):
    data = write_cola(tmp_path / "data", train_rows=64, dev_rows=8)
    whole = tiny_config(tiny_model_dir, data, tmp_path / "whole", epochs=2, eval_every=2)
    train(whole)
    crashed = tiny_config(tiny_model_dir, data, tmp_path / "crashed", epochs=2, eval_every=2)
    with monkeypatch.context() as patch:
        poison_forward(patch, lambda call, mode: mode == "train" and call == 3,
                       lambda output: (_ for _ in ()).throw(RuntimeError("simulated crash")))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(crashed)
    run = tmp_path / "crashed"
    assert (run / "checkpoints" / "best").is_dir() and not (run / "checkpoints" / "last").exists()
    with pytest.raises(PeftlabError, match="already holds a run.*--resume"):
        train(crashed)
    train(crashed, resume=True)
    assert_same_trajectory(read_rows(run), read_rows(tmp_path / "whole"))


def assert_same_trajectory(rows, expected):
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, reference in zip(rows, expected):
        assert set(row) == set(reference)
        for key in ("train_loss", "val_loss", "val_mcc", "lr"):
            if key in reference:
                assert row[key] == pytest.approx(reference[key], abs=1e-6), key


def test_resume_recovers_from_a_kill_inside_the_checkpoint_swap(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, tmp_path / "whole", epochs=2))
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2)
    train(config, stop_after_epoch=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    os.replace(checkpoints / "last", checkpoints / ".last.old")  # killed between the two renames
    (checkpoints / ".best.abc123_z").mkdir()  # killed while filling a new best
    (checkpoints / ".best.abc123_z" / "half.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "run" / ".metrics.jsonl.k9x2m1qz").write_text("{half")
    train(config, resume=True)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "last"]
    assert not list((tmp_path / "run").glob(".metrics.jsonl.*"))
    assert_same_trajectory(read_rows(tmp_path / "run"), read_rows(tmp_path / "whole"))


# ----------------------------------------------------------------------------------------------------------
# Clear errors instead of tracebacks


@pytest.mark.parametrize("damage", ["truncate optimizer.safetensors", "delete training_state.json",
                                    "delete training_state.safetensors", "truncate training_state.json"])
def test_a_damaged_last_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path, capsys, damage):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2), stop_after_epoch=1)
    action, name = damage.split()
    path = tmp_path / "run" / "checkpoints" / "last" / name
    if action == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert f"checkpoints/last is damaged ({name}" in error and "move" in error


def test_non_utf8_bytes_in_cola_and_squad_name_the_file_and_line(tmp_path):
    from peftlab.data.cola import read_cola
    from peftlab.data.squad import read_squad

    cola = tmp_path / "cola"
    cola.mkdir()
    (cola / "in_domain_dev.tsv").write_bytes(b"gj04\t1\t\tfine.\ngj04\t1\t\tbad \xff byte.\n")
    with pytest.raises(PeftlabError, match=r"in_domain_dev.tsv:2: not UTF-8 text \(byte 0xff"):
        read_cola("validation", tmp_path)
    squad = tmp_path / "squad"
    squad.mkdir()
    (squad / "dev-split-validation.json").write_bytes(b'{"data": [\n{"title": "caf\xe9"}]}')
    with pytest.raises(PeftlabError, match=r"dev-split-validation.json:2: not UTF-8 text"):
        read_squad("validation", tmp_path)
    (squad / "dev-split-validation.json").write_text('{"data": "unterminated')
    with pytest.raises(PeftlabError, match=r"not valid JSON \(Unterminated string starting at: line 1, column 10\)"):
        read_squad("validation", tmp_path)


def test_ctrl_c_prints_one_line_with_what_was_kept(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    poison_forward(monkeypatch, lambda call, mode: mode == "train" and call == 3,
                   lambda output: (_ for _ in ()).throw(KeyboardInterrupt()))
    run = tmp_path / "run"
    arguments = ["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--epochs", "2",
                 "--batch-size", "16", "--device", "cpu", "--output-dir", str(run)]
    assert main(arguments) == 130
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert f"interrupted: stopped at step 2. {run}/checkpoints/last holds epoch 1 (step 2)" in error
    assert f"Continue with: peftlab train --resume {run}" in error


@pytest.mark.parametrize("option, value, message", [
    ("--train-limit", "-5", "--train-limit must be >= 0"),
    ("--eval-every", "-1", "--eval-every must be >= 0"),
    ("--eval-limit", "-2", "--eval-limit must be >= 0"),
    ("--select-metric", "f1", "--select-metric 'f1' is not a validation metric of cola: expected one of loss, accuracy, mcc"),
])
def test_bad_settings_are_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys, option, value, message):
    import peftlab.train

    monkeypatch.setattr(peftlab.train, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    arguments = ["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--device", "cpu",
                 "--output-dir", str(tmp_path / "run"), option, value]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_files_and_checkpoints_follow_the_umask(finished_run, tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "shared.txt", "x")
        assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(previous)
    expected_file, expected_folder = 0o666 & ~previous, 0o777 & ~previous
    for path in (finished_run / "metrics.jsonl", finished_run / "summary.json", finished_run / "plots" / "loss.png"):
        assert stat.S_IMODE(path.stat().st_mode) == expected_file, path
    assert stat.S_IMODE((finished_run / "checkpoints" / "best").stat().st_mode) == expected_folder


def test_a_plot_that_fails_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    import matplotlib.figure

    from peftlab.report import plot_history

    rows = [{"epoch": 1, "step": 1, "final_of_epoch": True, "train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5,
             "val_accuracy": 0.5}]
    plot_history(rows, tmp_path, "run")
    before = (tmp_path / "loss.png").read_bytes()
    original = matplotlib.figure.Figure.savefig

    def half_then_fail(self, path, **kwargs):
        original(self, path, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        plot_history(rows, tmp_path, "another title")
    assert (tmp_path / "loss.png").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loss.png", "metrics.png"]
