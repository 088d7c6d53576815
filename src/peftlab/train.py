"""The run service: training, evaluating and exporting a configured run. It builds the task and model a run's
config describes through the workload registry (`peftlab.workloads.loading`; it names no workload), hands them to
the engine (`peftlab.engine`) with the run directory (`peftlab.runs`), and writes the summary. The commands that
orchestrate several runs (`peftlab.commands`, a workload's `commands`) sit above it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

from peftlab.catalog import PRECISIONS, export_base
from peftlab.config import CORE_SECTIONS, RunConfig
from peftlab.data import evenly_spaced, resolve_data_dir
from peftlab.data.datasets import check_split, get_dataset
from peftlab.engine import SCHEDULES, Callback, Engine, evaluate
from peftlab.errors import Interrupted, PeftlabError
from peftlab.fileio import check_writable, finite_or_null, read_text, write_text_atomic
from peftlab.hf import export_merged, export_peft, read_export_record
from peftlab.models import resolve_device, resolve_precision
from peftlab.options import RUN_PLACE_OPTIONS, eval_options, settings_options
from peftlab.peft import parameter_report
from peftlab.peft.checkpoint import checkpoint_parameters
from peftlab.peft.methods import get_method
from peftlab.peft.prepare import check_extra_trainable, unused_settings
from peftlab.predict import in_batches
from peftlab.report import method_label, plot_history, run_title
from peftlab.runs import METRICS, STEPS, TRACKERS, RunDir, RunLock, run_environment
from peftlab.tasks import Task
from peftlab.trackers import TRACKER_NAMES, Trackers, check_trackers
from peftlab.weights import pack_for_decoding
from peftlab.workloads.loading import build_model, build_task, load_run, workload_for
from peftlab.workloads.registry import spec_for


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
        (task.test_limit >= 0, f"--test-limit must be >= 0 (0 = all examples), got {task.test_limit}"),
        (train.save_every >= 0, f"--save-every must be >= 0 (0 = at epoch ends only), got {train.save_every}"),
        (train.max_steps >= 0, f"--max-steps must be >= 0 (0 = the epochs decide), got {train.max_steps}"),
        (train.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got '{train.precision}'"),
        (set(train.report_to) <= set(TRACKER_NAMES), f"--report-to takes {', '.join(TRACKER_NAMES)} (comma-separated), "
                                                     f"got {','.join(train.report_to)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftlabError(message)
    get_method(config.adapter.method)  # an unknown method is named now, not after the model loads
    check_extra_trainable(config.adapter.extra_trainable or [])
    check_trackers(train.report_to)
    check_adapter(config)


def check_adapter(config: RunConfig) -> None:
    """The method's settings against the model (a prefix and the longest example must fit its positions), and a
    warning for adapter options the method does not read."""
    adapter, task = config.adapter, config.task
    method = get_method(adapter.method)
    method.check_fits(method.settings(adapter), config.model.name, task.max_length or get_dataset(task.name).max_length)
    unused = unused_settings(adapter)
    if unused:  # a warning, not an error: a recipe or sweep may carry another method's settings
        flags = {option.field.name: option.flag for option in settings_options(("adapter",)).values()}
        print(f"warning: {', '.join(flags.get(name, name) for name in unused)} not used by --method {adapter.method} "
              "(ignored)")


# What --init-from does not compare: dropout acts only in training, and the extras (a head) follow the objective.
INIT_FREE_SETTINGS = ("dropout", "extra_trainable")


def init_run_config(config: RunConfig) -> RunConfig | None:
    """The config of the run `--init-from` names (None without it), checked: a run with that checkpoint, not this
    run itself, on the same model, with the same adapter settings (so its adapter fits this run's)."""
    source = config.train.init_from
    if not source:
        return None
    checkpoint = config.train.init_checkpoint
    if checkpoint not in ("best", "last"):
        raise PeftlabError(f"--init-checkpoint must be best or last, got '{checkpoint}'")
    run = RunDir(source)
    if run.path.resolve() == Path(config.output_dir).resolve():
        raise PeftlabError(f"--init-from {source} is this run's own directory. Fix: --resume {source} continues it")
    if not (run.path / "config.yaml").is_file() or not run.checkpoint(checkpoint).is_dir():
        raise PeftlabError(f"--init-from {source}: not a run with a checkpoints/{checkpoint} (expected "
                           f"{run.checkpoint(checkpoint)}). Fix: give a run directory written by `peftlab train`")
    source_config = run.read_config()
    if source_config.model.name != config.model.name:
        raise PeftlabError(f"--init-from {source} trained on model '{source_config.model.name}', this run is on "
                           f"'{config.model.name}'. Fix: --model {source_config.model.name}")
    flags = {option.field.name: option.flag for option in settings_options(("adapter",)).values()}
    mine, theirs = vars(config.adapter), vars(source_config.adapter)
    differ = [name for name in mine if name not in INIT_FREE_SETTINGS and mine[name] != theirs.get(name)]
    if differ:
        what = ", ".join(f"{flags.get(name, name)} {_setting_text(theirs.get(name))} there, "
                         f"{_setting_text(mine[name])} here" for name in differ)
        raise PeftlabError(f"--init-from {source}: its adapter differs from this run's ({what}). Fix: give this run "
                           "the same adapter settings (e.g. --recipe with that run's config.yaml)")
    return source_config


def _setting_text(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def init_from_run(model, config: RunConfig, say=print) -> RunConfig | None:
    """Start `model` (built fresh for this run) from the adapter weights of the run `--init-from` names (None
    without it): every tensor of its checkpoint that this model has with the same shape is copied in; tensors this
    run's model lacks or shapes differently (another objective's or task's head) are named and left as this run
    built them. Trainability stays this run's own. Returns the init run's config."""
    source_config = init_run_config(config)
    if source_config is None:
        return None
    directory = RunDir(config.train.init_from).checkpoint(config.train.init_checkpoint)
    try:
        fits, left = checkpoint_parameters(model, directory)
    except PeftlabError as error:
        raise PeftlabError(f"--init-from {error}") from None
    with torch.no_grad():
        for parameter, tensor in fits.values():
            parameter.copy_(tensor)
    say(f"Initialised from {directory}: {len(fits)} tensor(s)"
        + (f"; not carried (this run's model has none of that shape): {', '.join(left)}" if left else ""))
    return source_config


def selection_metric(config: RunConfig, task: Task) -> str:
    """The validation metric that picks checkpoints/best: --select-metric, checked against the task's metrics."""
    choices = ("loss", *task.metric_names)
    select = config.train.select_metric or task.select_metric_default
    if select not in choices:
        raise PeftlabError(f"--select-metric '{select}' is not a validation metric of {task.name}: expected one of "
                           f"{', '.join(choices)} (loss = lowest, the others highest)")
    return select


def train(config: RunConfig, resume: bool = False, stop_after_epoch: int | None = None, dry_run: bool = False,
          command: str | None = None, callbacks: Sequence[Callback] = ()) -> dict:
    """Train (or, with `resume`, continue) the run described by `config`; returns the run's summary.

    Args:
        config: the whole run; written to `<output_dir>/config.yaml`.
        resume: continue from `<output_dir>/checkpoints/last` (model, optimizer, scheduler, RNG, epoch); a run
            that never finished an epoch starts again from step 0; a finished run is left as it is.
        stop_after_epoch: stop after this many epochs as if interrupted (to be resumed later).
        dry_run: build the model, encode the data, print the parameter report and the resolved plan, stop.
        command: the command line that started the run, recorded in config.yaml.
        callbacks: more `Callback`s (after the plots and trackers), e.g. a sweep backend's reporting.
    """
    started = time.perf_counter()
    validate(config)
    run = RunDir(config.output_dir)
    device, _ = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    # Accelerate keeps one mixed-precision setting per process; runs of one process (a sweep) may differ in it.
    # Only that state is reset: the processes' own (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if precision == "fp32" else precision,
                              log_with=config.train.report_to or None, project_dir=str(run.path / TRACKERS))
    say = accelerator.print
    task = build_task(config)
    select = selection_metric(config, task)  # before the model loads, not after an epoch
    # One writer per run directory: the main process holds RUN/.lock until the run ends, fails or is stopped.
    lock = None if dry_run else _lock_run_dir(run, accelerator)
    try:
        state = "new" if dry_run else _prepare_run_dir(run, config, resume, accelerator)
        if state == "done":
            say(f"{run} has finished already; nothing to do. Its summary: {run.path / 'summary.json'}")
            return run.read_summary()
        model = build_model(config, task, accelerator.device, fresh=state in ("new", "restart") and not dry_run)
        if state in ("new", "restart"):  # a resumed run has its own weights in checkpoints/last
            init_from_run(model, config, say)
        report = parameter_report(model)
        say("\n".join(report.lines()))

        callbacks = [PlotHistory(run, config), *([Trackers(config)] if config.train.report_to else []), *callbacks]
        engine = Engine(task, model, config.train, run, config.model.name, select, accelerator, callbacks)
        if dry_run:
            say(dry_run_plan(config, engine, device, precision))
            if run.state(config.train.epochs) != "new":
                say(f"warning: {run} already holds a run; training there would be refused. Fix: choose another "
                    f"--output-dir, or continue that run with --resume {run}")
            return {"parameters": vars(report) | {"reduction": report.reduction}}
        train_examples = evenly_spaced(task.encode("train"), config.task.train_limit)
        val_examples = evenly_spaced(task.encode("validation"), config.task.eval_limit)
        if state == "new" and accelerator.is_main_process:  # written once the run is known to start
            config.environment = run_environment(device, precision, accelerator.num_processes, command)
            run.write_config(config)
        summary = fit_and_summarise(config, engine, report, train_examples, val_examples, state == "resume",
                                    stop_after_epoch)
        if accelerator.is_main_process:
            run.write_summary(summary)
            say(closing_text(run, engine, summary, time.perf_counter() - started))
        accelerator.wait_for_everyone()
        return summary
    finally:
        if lock is not None:
            lock.release()


def fit_and_summarise(config: RunConfig, engine: Engine, report, train_examples, val_examples, resume: bool,
                      stop_after_epoch: int | None) -> dict:
    """Train (or continue), then the run's summary with the best checkpoint's test score where the task has a test
    split; Ctrl-C becomes `Interrupted` saying what was kept."""
    try:
        engine.fit(train_examples, val_examples, resume=resume, stop_after_epoch=stop_after_epoch)
        summary = run_summary(config, engine, report, len(train_examples), len(val_examples))
        if engine.task.test_split and engine.finished:
            summary["test"] = engine.test_best(engine.task.test_split, config.task.test_limit)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped at step {engine.history.step}. {engine.kept()}") from None
    return summary


def dry_run_plan(config: RunConfig, engine: Engine, device, precision: str) -> str:
    """--dry-run's output after the parameter report: the resolved plan (not for a task whose data is costly to
    read, a distillation's: its teacher would label it first)."""
    task = engine.task
    if task.encoding_is_costly:
        return "Plan: not computed for a dry run (reading the data would have the teacher label it first)"
    return plan_text(config, engine, evenly_spaced(task.encode("train"), config.task.train_limit),
                     evenly_spaced(task.encode("validation"), config.task.eval_limit), device, precision, engine.select)


def plan_text(config: RunConfig, engine: Engine, train_examples, val_examples, device, precision: str,
              select: str) -> str:
    """--dry-run's resolved plan: data, steps, schedule, evaluation, device and where the run goes."""
    settings = config.train
    plan = engine.plan(train_examples)
    steps = sum(len(batches) for batches in plan)
    warmup = round(settings.warmup_ratio * steps)
    per_epoch = ", ".join(str(length) for length in dict.fromkeys(len(batches) for batches in plan))
    cut = f", cut at --max-steps {settings.max_steps}" if settings.max_steps and steps == settings.max_steps else ""
    lines = [
        f"Plan for {config.output_dir}:",
        f"  data        {len(train_examples):,} training and {len(val_examples):,} validation examples of "
        f"{config.task.name}{f' (--train-limit {config.task.train_limit})' if config.task.train_limit else ''}",
        f"  steps       {steps:,} optimizer steps: {len(plan)} epoch(s) of {per_epoch} steps, batch "
        f"{settings.batch_size} (grad accumulation {settings.grad_accum}){cut}",
        f"  schedule    lr {settings.lr:g}, {warmup} warm-up steps ({settings.warmup_ratio:g}), then "
        f"{settings.schedule}; weight decay {settings.weight_decay:g}, clip {settings.max_grad_norm:g}",
        f"  evaluation  every epoch{f' and every {settings.eval_every} steps' if settings.eval_every else ''}; "
        f"checkpoints/best by validation {select}",
        f"  saving      checkpoints/last at every epoch end"
        f"{f' and every {settings.save_every} steps' if settings.save_every else ''}",
        f"  device      {device}, {engine.accelerator.num_processes} process(es), fp32 weights, precision {precision}",
        f"  trackers    {', '.join(settings.report_to) or 'none'}",
    ]
    return "\n".join(lines)


def closing_text(run: RunDir, engine: Engine, summary: dict, seconds: float) -> str:
    """The lines a run ends with: what was done, the best evaluation, where everything is, how long it took."""
    history, best = engine.history, summary.get("best") or {}
    done = ("finished" if engine.finished else "stopped") + f" at step {history.step}/{engine.total_steps}"
    lines = [f"Run {done} ({history.epoch} epoch(s)) in {_duration(seconds)}"
             f"{' (this part)' if engine.resumed else ''}."]
    if best:
        lines.append(f"  best        validation {engine.select} {best[f'val_{engine.select}']:.4f} at step "
                     f"{best['step']} (epoch {best['epoch']}): {run.checkpoint('best')}")
    if engine.saved_last:
        lines.append(f"  last        {run.checkpoint('last')} (step {engine.saved_last[1]}, resumable)")
    if "test" in summary:
        test = summary["test"]
        metrics = {key: value for key, value in test.items() if key not in ("split", "epoch")}
        lines.append(f"  test        {test['split']}: {engine.task.format_metrics(metrics)}")
    lines.append(f"  files       {run}/: {METRICS}, {STEPS}, plots/, summary.json"
                 f"{', trackers/' if (run.path / TRACKERS).is_dir() else ''}")
    if not engine.finished:
        lines.append(f"  continue    peftlab train --resume {run}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


class PlotHistory(Callback):
    """plots/loss.png and plots/metrics.png, redrawn after every evaluation (main process). The step rows are kept
    as they come; steps.jsonl is read once, for the steps of a run's earlier parts."""

    def __init__(self, run: RunDir, config: RunConfig):
        self.run, self.title = run, run_title(run.path.name, config.task.name, method_label(config.to_dict()))
        self.steps: list[dict] | None = None

    def on_step(self, engine: Engine, row: dict) -> None:
        if not engine.accelerator.is_main_process:
            return
        if self.steps is None:
            self.steps = self.run.read_steps()  # this step is in it already
        else:
            self.steps.append(row)

    def on_evaluation(self, engine: Engine, row: dict) -> None:
        if engine.accelerator.is_main_process:
            plot_history(engine.history.rows, self.run.plots, self.title, engine.task.metric_names,
                         engine.select, engine.history.best_step, self.steps)


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
        "select_metric": engine.select, "metric_names": list(engine.task.metric_names),
        "best": engine.best_row(), "last": final_rows[-1] if final_rows else None,
        "epochs_completed": engine.history.epoch, "steps_completed": engine.history.step,
        "finished": engine.finished, "elapsed_seconds": engine.history.seconds,
        "seconds_per_epoch": [row["train_seconds"] for row in final_rows],
    }


def _lock_run_dir(run: RunDir, accelerator) -> RunLock | None:
    """The main process takes the run directory's lock (`RunDir.lock`: a second writer is refused, a dead one's lock
    taken over); every process learns whether it did, so all of them stop on a refusal."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = run.lock(accelerator.print)
        except PeftlabError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise PeftlabError(refusal)
    return lock


def _prepare_run_dir(run: RunDir, config: RunConfig, resume: bool, accelerator) -> str:
    """The run directory's state (`RunDir.state`): a new run's folder must hold nothing a run writes; a resumed
    one is first repaired from whatever a killed process left there. The caller holds the run's lock
    (`_lock_run_dir`), so nothing repaired here belongs to a live process."""
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
                 limit: int = 0, config: RunConfig | None = None, predictions_file: str | None = None,
                 place: dict | None = None, weights: str = "fp32", **settings) -> dict:
    """Evaluate a run's checkpoint (`best` or `last`) on a split; prints and returns the metrics, and writes them
    into the run (`eval_results_path`: RUN/eval/<split>.json with the data directory, checkpoint, limit and time).

    Without `run_dir`, evaluates the un-tuned base model `config` describes (zero-shot; language-model tasks), and
    only prints. `limit` keeps N evenly spaced examples; `predictions_file` receives every example's origin, input,
    prediction, reference and the task's own scores, and a classifier's label names and probabilities (JSON lines).
    `place` ({"device": ..., "data_dir": ...}) overrides where the run's config.yaml says it ran (a run trained on a
    GPU, or moved to another machine). `weights`: fp16 or int8 packs the frozen linear layers for a CPU
    (`peftlab.weights`; the metrics go to RUN/eval/<split>-<weights>.json). `settings`: the evaluation settings of
    the run's workload section, by option name (e.g. predict="score" for an instruct run; see
    `peftlab.options.eval_options("any")`).
    """
    if limit < 0:
        raise PeftlabError(f"--limit must be >= 0 (0 = all examples), got {limit}")
    if predictions_file:
        check_writable(Path(predictions_file))  # before a long evaluation, not after it
    if run_dir:
        config = read_run_config(run_dir, place)
        results_path = eval_results_path(RunDir(run_dir), split, checkpoint, config.task.data_dir, weights)
        try:
            check_writable(results_path)
        except PeftlabError as error:  # a run one may read but not write (a shared folder): evaluate, say so
            print(f"note: the metrics will only be printed, not kept in the run: {error}")
            results_path = None
    check_split(config.task.name, split, config.task.data_dir)  # before the model loads
    apply_evaluation_settings(config, settings)
    if weights != "fp32" and config.train.merge_for_evaluation:
        raise PeftlabError(f"--weights {weights} packs the base weights as they are, so adapters cannot be merged into "
                           "them, but this evaluation merges them (--merge-for-evaluation, or the run's config.yaml). "
                           "Fix: add --no-merge-for-evaluation, or evaluate with --weights fp32")
    if run_dir:
        config, task, model = load_run(run_dir, checkpoint, config)
        label = f"{run_dir} [{checkpoint}]"
    else:
        task = build_task(config)
        if task.model_task != "causal-lm":
            raise PeftlabError(f"a {task.name} classifier without fine-tuning has a random head: give a RUN_DIR")
        device, dtype = resolve_device(config.train.device)
        model = workload_for(config).base_model(config, task, dtype).to(device)
        label = f"{config.model.name} (no fine-tuning)"
    pack_for_decoding(model.eval(), weights)
    examples = evenly_spaced(task.encode(split), limit)
    batch_size = batch_size or config.train.eval_batch_size
    metrics = evaluate(model, task, examples, batch_size, predictions_file=predictions_file,
                       merge_adapters=config.train.merge_for_evaluation)
    if predictions_file:
        add_prediction_details(Path(predictions_file), workload_for(config), task, model, split, examples, batch_size)
        print(f"predictions: {predictions_file}")
    if run_dir and results_path:
        record = {"split": split, "checkpoint": checkpoint, "data_dir": str(data_folder(config) or ""), "limit": limit,
                  "weights": weights, "examples": len(examples), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "metrics": metrics}
        write_text_atomic(results_path, json.dumps(finite_or_null(record), indent=1, allow_nan=False) + "\n")
        print(f"metrics: {results_path}")
    packed = f", {weights} weights" if weights != "fp32" else ""
    print(f"{label} {split} ({len(examples)} examples{packed}): Loss: {metrics['loss']:.4f}, "
          f"{task.format_metrics(metrics)}, {metrics['examples_per_second']:.1f} examples/s")  # last: the line a user reads
    return metrics


def data_folder(config: RunConfig) -> Path | None:
    """The folder a run's dataset is read from (None: none can be found here)."""
    try:
        return resolve_data_dir(config.task.data_dir, config.task.name).resolve()
    except PeftlabError:
        return None


def eval_results_path(run: RunDir, split: str, checkpoint: str, data_dir: str | None, weights: str = "fp32") -> Path:
    """Where `evaluate_run` writes a run's metrics: RUN/eval/<split>.json for its best checkpoint on the data it was
    trained on, with fp32 weights; `-last` is added for the last checkpoint, `-data-<8 hex digits>` (of the
    folder's path) for another data folder, and `-fp16` / `-int8` for packed weights, so that no evaluation
    replaces another's; the same evaluation again replaces its file."""
    trained = run.read_config()
    here = copy.deepcopy(trained)
    here.task.data_dir = data_dir
    name = split + ("" if checkpoint == "best" else f"-{checkpoint}")
    folder = data_folder(here)
    if folder != data_folder(trained):
        name += "-data-" + hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    name += "" if weights == "fp32" else f"-{weights}"
    return run.path / "eval" / f"{name}.json"


def add_prediction_details(path: Path, workload, task: Task, model, split: str, examples, batch_size: int) -> None:
    """The evaluation's predictions file with each example's input (as `peftlab predict` takes it) and the
    workload's prediction details (a classifier's label names and probabilities), in the same order."""
    inputs = workload.split_inputs(task, split)
    details = in_batches(lambda batch: workload.prediction_details(task, model, batch), examples, batch_size)
    records = [json.loads(line) for line in read_text(path, "predictions file").splitlines()]
    records = [{"origin": record["origin"], "input": inputs.get(record["origin"])} | record | detail
               for record, detail in zip(records, details)]
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def apply_evaluation_settings(config: RunConfig, settings: dict) -> None:
    """Put `evaluate_run`'s evaluation settings (option name -> value) into the run's config: a core setting
    (e.g. merge_for_evaluation) where it lives, a workload's into the run's workload section; a setting of another
    workload's section is an error naming the option."""
    options = eval_options("any")
    workload = spec_for(config).name
    for dest, value in settings.items():
        if dest not in options:
            raise PeftlabError(f"evaluate_run: unknown evaluation setting '{dest}' (expected one of "
                               f"{', '.join(options) or 'none'})")
        if value is None:
            continue
        option = options[dest]
        if option.section in CORE_SECTIONS:
            setattr(getattr(config, option.section), option.field.name, value)
            continue
        if option.section != workload:
            raise PeftlabError(f"{option.flag} applies to {option.section} runs; {config.task.name} here is {workload}")
        if config.sections.get(workload) is None:
            config.sections[workload] = spec_for(config).settings()
        setattr(config.sections[workload], option.field.name, value)


EXPORT_FORMATS = ("peft", "merged")


def read_run_config(run_dir: str, place: dict | None) -> RunConfig:
    """A run's config.yaml with `place` (device, data_dir) put where it is used now."""
    config = RunDir(run_dir).read_config()
    for dest, value in (place or {}).items():
        option = RUN_PLACE_OPTIONS[dest]
        setattr(getattr(config, option.section), option.field.name, value)
    resolve_device(config.train.device)  # an unusable --device fails here, not after loading
    return config


def export_run(run_dir: str, output_dir: str, export_format: str = "peft", checkpoint: str = "best",
               overwrite: bool = False, place: dict | None = None, base_model: str | None = None) -> Path:
    """Export a run's checkpoint for the Hugging Face ecosystem: a `peft` adapter or a merged plain model.

    `output_dir` must not exist, be empty, or hold an earlier export of this run; `overwrite` replaces anything
    else there, except the run itself, a folder holding it, or a part of it. The export names its base by the
    model's public id (`catalog.export_base`), or `base_model` (a hub id or a path) when given.
    """
    if export_format not in EXPORT_FORMATS:
        raise PeftlabError(f"unknown export format '{export_format}': expected {' or '.join(EXPORT_FORMATS)}")
    check_export_target(Path(run_dir), Path(output_dir), overwrite)  # before the model loads
    config, task, model = load_run(run_dir, checkpoint, read_run_config(run_dir, place))
    refusal = workload_for(config).not_exportable
    if refusal:
        raise PeftlabError(f"{run_dir} is {refusal}: nothing to export; its checkpoints are safetensors + JSON already")
    base = export_base(config.model.name, base_model)
    record = {"run": str(Path(run_dir).resolve()), "checkpoint": checkpoint, "base_model": base.name_or_path,
              "base_model_note": base.note}
    if export_format == "peft":
        path = export_peft(model, output_dir, base.name_or_path, record, overwrite)
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
