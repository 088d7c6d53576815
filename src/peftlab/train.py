"""Training, evaluating and exporting a configured run: builds the task and model a run's config describes, hands
them to the engine (`peftlab.engine`) with the run directory (`peftlab.runs`), and writes the summary.
"""

from __future__ import annotations

import math
from pathlib import Path

from accelerate import Accelerator

from peftlab.config import InstructConfig, RunConfig
from peftlab.data import evenly_spaced
from peftlab.engine import SCHEDULES, Callback, Engine, evaluate
from peftlab.errors import Interrupted, PeftlabError
from peftlab.fileio import check_writable
from peftlab.hf import export_merged, export_peft, read_export_record
from peftlab.models import hf_reference, load_model, resolve_device
from peftlab.peft import parameter_report
from peftlab.report import plot_history
from peftlab.runs import RunDir
from peftlab.tasks import Task
from peftlab.workloads import build_model, build_task, load_run, workload_for


def validate(config: RunConfig) -> None:
    """Every setting the engine reads, checked before anything is loaded (the option is named as on the CLI)."""
    train, task = config.train, config.task
    checks = [
        (train.epochs >= 1, f"--epochs must be >= 1, got {train.epochs}"),
        (train.batch_size >= 1, f"--batch-size must be >= 1, got {train.batch_size}"),
        (train.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {train.eval_batch_size}"),
        (train.grad_accum >= 1, f"--grad-accum must be >= 1, got {train.grad_accum}"),
        (math.isfinite(train.lr) and train.lr > 0, f"--lr must be > 0, got {train.lr}"),
        (0 <= train.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {train.warmup_ratio}"),
        (train.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{train.schedule}'"),
        (train.weight_decay >= 0, f"--weight-decay must be >= 0, got {train.weight_decay}"),
        (train.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping), got {train.max_grad_norm}"),
        (train.eval_every >= 0, f"--eval-every must be >= 0 (0 = once per epoch), got {train.eval_every}"),
        (task.train_limit >= 0, f"--train-limit must be >= 0 (0 = all examples), got {task.train_limit}"),
        (task.eval_limit >= 0, f"--eval-limit must be >= 0 (0 = all examples), got {task.eval_limit}"),
        (task.max_length is None or task.max_length >= 1, f"--max-length must be >= 1, got {task.max_length}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftlabError(message)


def selection_metric(config: RunConfig, task: Task) -> str:
    """The validation metric that picks checkpoints/best: --select-metric, checked against the task's metrics."""
    choices = ("loss", *task.metric_names)
    select = config.train.select_metric or task.select_metric_default
    if select not in choices:
        raise PeftlabError(f"--select-metric '{select}' is not a validation metric of {task.name}: expected one of "
                           f"{', '.join(choices)} (loss = lowest, the others highest)")
    return select


def train(config: RunConfig, resume: bool = False, stop_after_epoch: int | None = None, dry_run: bool = False) -> dict:
    """Train (or, with `resume`, continue) the run described by `config`; returns the run's summary.

    Args:
        config: the whole run; written to `<output_dir>/config.yaml`.
        resume: continue from `<output_dir>/checkpoints/last` (model, optimizer, scheduler, RNG, epoch); a run
            that never finished an epoch starts again from step 0; a finished run is left as it is.
        stop_after_epoch: stop after this many epochs as if interrupted (to be resumed later).
        dry_run: build the model, print the parameter report and stop.
    """
    validate(config)
    run = RunDir(config.output_dir)
    device, _ = resolve_device(config.train.device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    say = accelerator.print
    task = build_task(config)
    select = selection_metric(config, task)  # before the model loads, not after an epoch
    state = "new" if dry_run else _prepare_run_dir(run, config, resume, accelerator)
    if state == "done":
        say(f"{run} has finished all {config.train.epochs} epochs already; nothing to do (its summary: "
            f"{run.path / 'summary.json'})")
        return run.read_summary()
    model = build_model(config, task, accelerator.device, fresh=state in ("new", "restart") and not dry_run)
    report = parameter_report(model)
    say("\n".join(report.lines()))
    if dry_run:
        return {"parameters": vars(report) | {"reduction": report.reduction}}

    train_examples = evenly_spaced(task.encode("train"), config.task.train_limit)
    val_examples = evenly_spaced(task.encode("validation"), config.task.eval_limit)
    if state == "new" and accelerator.is_main_process:  # written once the run is known to start
        run.write_config(config)
    engine = Engine(task, model, config.train, run, config.model.name, select, accelerator,
                    [PlotHistory(run, config.task.name)])
    try:
        history = engine.fit(train_examples, val_examples, resume=state == "resume", stop_after_epoch=stop_after_epoch)
        summary = run_summary(config, engine, report, len(train_examples), len(val_examples))
        if task.test_split and history.epoch == config.train.epochs:
            summary["test"] = engine.test_best(task.test_split)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped at step {engine.history.step}. {engine.kept()}") from None
    if accelerator.is_main_process:
        run.write_summary(summary)
    accelerator.wait_for_everyone()
    return summary


class PlotHistory(Callback):
    """plots/loss.png and plots/accuracy.png, redrawn after every evaluation (main process)."""

    def __init__(self, run: RunDir, title: str):
        self.run, self.title = run, title

    def on_evaluation(self, engine: Engine, row: dict) -> None:
        if engine.accelerator.is_main_process:
            plot_history(engine.history.rows, self.run.plots, self.title)


def run_summary(config: RunConfig, engine: Engine, report, num_train: int, num_val: int) -> dict:
    """summary.json: what was trained, on what, and the best and last evaluations."""
    final_rows = [row for row in engine.history.rows if row.get("final_of_epoch")]
    return {
        "task": config.task.name, "model": config.model.name, "method": config.adapter.method,
        "parameters": {"total": report.total, "trainable": report.trainable, "adapter": report.adapter,
                       "reduction": report.reduction},
        "train_examples": num_train, "validation_examples": num_val,
        "skipped_examples": engine.task.skipped,
        "num_processes": engine.accelerator.num_processes,
        "select_metric": engine.select, "best": engine.best_row(), "last": final_rows[-1] if final_rows else None,
        "epochs_completed": engine.history.epoch,
        "seconds_per_epoch": [row["train_seconds"] for row in final_rows],
    }


def _prepare_run_dir(run: RunDir, config: RunConfig, resume: bool, accelerator) -> str:
    """The run directory's state (`RunDir.state`): a new run's folder must hold nothing a run writes; a resumed
    one is first repaired from whatever a killed process left there."""
    if not resume:
        run.check_new()
        return "new"
    if accelerator.is_main_process:
        for repair in run.recover():
            accelerator.print(f"{run}: {repair}")
    accelerator.wait_for_everyone()
    state = run.state(config.train.epochs)
    if state == "new":
        raise PeftlabError(f"nothing to resume: {run} holds no run (no config.yaml). Fix: start it without --resume")
    if state == "restart":
        accelerator.print(f"{run}: no epoch had finished (no checkpoints/last), so nothing is resumable; training "
                          "starts again from step 0 with its config.yaml (the same steps are replayed)")
    return state


def evaluate_run(run_dir: str | None, split: str = "validation", checkpoint: str = "best", batch_size: int | None = None,
                 predict: str | None = None, limit: int = 0, config: RunConfig | None = None,
                 predictions_file: str | None = None) -> dict:
    """Evaluate a run's checkpoint (`best` or `last`) on a split; prints and returns the metrics.

    Without `run_dir`, evaluates the un-tuned base model `config` describes (zero-shot; instruct tasks only).
    `predict` overrides an instruct task's prediction mode; `limit` keeps N evenly spaced examples;
    `predictions_file` receives every example's prediction (JSON lines).
    """
    if limit < 0:
        raise PeftlabError(f"--limit must be >= 0 (0 = all examples), got {limit}")
    if predictions_file:
        check_writable(Path(predictions_file))  # before a long evaluation, not after it
    if run_dir:
        config = RunDir(run_dir).read_config()
    if predict:
        if workload_for(config).name != "instruct":
            raise PeftlabError(f"--predict applies to instruct tasks; {config.task.name} here is "
                               f"{workload_for(config).name}")
        config.instruct = config.instruct or InstructConfig()
        config.instruct.predict = predict
    if run_dir:
        config, task, model = load_run(run_dir, checkpoint, config)
        label = f"{run_dir} [{checkpoint}]"
    else:
        task = build_task(config)
        if task.model_task != "causal-lm":
            raise PeftlabError(f"a {task.name} classifier without fine-tuning has a random head: give a RUN_DIR")
        device, dtype = resolve_device(config.train.device)
        model, _ = load_model(config.model.name, task=task.model_task, init=config.model.init, dtype=dtype)
        model.to(device)
        label = f"{config.model.name} (no fine-tuning)"
    examples = evenly_spaced(task.encode(split), limit)
    metrics = evaluate(model, task, examples, batch_size or config.train.eval_batch_size,
                       predictions_file=predictions_file)
    print(f"{label} {split} ({len(examples)} examples): Loss: {metrics['loss']:.4f}, {task.format_metrics(metrics)}, "
          f"{metrics['examples_per_second']:.1f} examples/s")
    if predictions_file:
        print(f"predictions: {predictions_file}")
    return metrics


EXPORT_FORMATS = ("peft", "merged")


def export_run(run_dir: str, output_dir: str, export_format: str = "peft", checkpoint: str = "best",
               overwrite: bool = False) -> Path:
    """Export a run's checkpoint for the Hugging Face ecosystem: a `peft` adapter or a merged plain model.

    `output_dir` must not exist, be empty, or hold an earlier export of this run; `overwrite` replaces anything
    else there, except the run itself, a folder holding it, or a part of it.
    """
    if export_format not in EXPORT_FORMATS:
        raise PeftlabError(f"unknown export format '{export_format}': expected {' or '.join(EXPORT_FORMATS)}")
    check_export_target(Path(run_dir), Path(output_dir), overwrite)  # before the model loads
    config, task, model = load_run(run_dir, checkpoint)
    refusal = workload_for(config).not_exportable
    if refusal:
        raise PeftlabError(f"{run_dir} is {refusal}: nothing to export; its checkpoints are safetensors + JSON already")
    record = {"run": str(Path(run_dir).resolve()), "checkpoint": checkpoint}
    if export_format == "peft":
        path = export_peft(model, output_dir, hf_reference(config.model.name), record, overwrite)
    else:
        path = export_merged(model, output_dir, task.tokenizer, record, overwrite)
    print(f"exported {run_dir} [{checkpoint}] as {export_format} to {path}")
    return path


def check_export_target(run: Path, target: Path, overwrite: bool) -> None:
    """Refuse an export path whose replacement would lose something (see `export_run`)."""
    run_path, target_path = run.resolve(), target.resolve()
    fix = f"Fix: choose a path outside the run, e.g. {run.resolve().name}-export beside it"
    if target_path == run_path:
        raise PeftlabError(f"{target} is the run directory itself; exporting there would replace the run. {fix}")
    if target_path in run_path.parents:
        raise PeftlabError(f"{target} holds the run directory {run}; exporting there would replace it. {fix}")
    if not target.exists() and not target.is_symlink():
        return
    earlier = read_export_record(target) if target.is_dir() else None
    if earlier and earlier.get("run") == str(run_path):
        return  # an earlier export of this run: replaced
    if run_path in target_path.parents:
        raise PeftlabError(f"{target} is part of the run {run} (not an export of it); exporting there would replace "
                           "it. Fix: choose a path that does not exist yet")
    if overwrite or (target.is_dir() and not any(target.iterdir())):
        return
    what = ("a file" if not target.is_dir() else
            f"an export of another run ({earlier.get('run')})" if earlier else "a folder that is not an export of this run")
    raise PeftlabError(f"{target} exists and is {what}; nothing was changed. Fix: choose another path, or add "
                       "--overwrite to replace it")
