"""The one training engine every workload uses (on Hugging Face Accelerate).

Per optimizer step the engine takes one *global* batch of `batch_size` examples, gives each process its share
(examples p, p+P, p+2P, ...), splits that share into `grad_accum` micro-batches, and scales every micro-batch's
summed loss by P / (targets in the whole global batch). Gradients therefore equal those of the mean loss over
the global batch whatever the number of processes or accumulation steps, so a 2-process run follows the
1-process trajectory (tested).

Batches are length-grouped (shuffled, then sorted by length within windows of 50 batches, then the batches are
shuffled) and padded per batch. The order depends only on (seed, epoch), which is what makes `--resume`
reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.config import RunConfig, load_config, save_config
from peftlab.data import evenly_spaced
from peftlab.errors import Interrupted, PeftlabError
from peftlab.fileio import check_writable, finite_or_null, replace_directory, write_json_lines, write_text_atomic
from peftlab.peft.checkpoint import CONFIG_FILE as ADAPTER_MARKER
from peftlab.runs import (check_last_checkpoint, check_new_run_dir, checkpoint_dir, damaged_checkpoint, recover_run,
                          run_state)
from peftlab.tasks import Encoded, Task, get_task

SCHEDULES = ("linear", "cosine", "constant")
LENGTH_GROUP_WINDOW = 50  # batches per sorting window


# ----------------------------------------------------------------------------------------------------------
# Batching and schedule


def epoch_batches(examples: Sequence[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each global batch of one epoch: shuffled, length-grouped, deterministic in (seed, epoch)."""
    generator = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    generator.shuffle(order)
    window = batch_size * LENGTH_GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: examples[index].length)
        batches += [chunk[offset : offset + batch_size] for offset in range(0, len(chunk), batch_size)]
    generator.shuffle(batches)
    return batches


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then linear decay to 0, cosine decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def process_share(batch: list[int], process_index: int, num_processes: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches of one global batch."""
    mine = batch[process_index::num_processes]
    size = math.ceil(len(mine) / grad_accum) if mine else 0
    return [mine[offset : offset + size] for offset in range(0, len(mine), size)] if mine else []


# ----------------------------------------------------------------------------------------------------------
# Training state on disk (safetensors + JSON, never pickle)


def _flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """Split a nested state (dicts, lists, tensors, scalars) into a JSON skeleton and a flat tensor dict."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(key, f"{prefix}/k{i}", tensors), _flatten(item, f"{prefix}/{i}", tensors)]
                             for i, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_flatten(item, f"{prefix}/{i}", tensors) for i, item in enumerate(value)]
    return value


def _unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {_unflatten(key, tensors): _unflatten(item, tensors) for key, item in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_unflatten(item, tensors) for item in skeleton]
    return skeleton


def save_state(directory: Path, name: str, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> dict:
    """A state saved by `save_state`; an unreadable file is a `damaged_checkpoint` error naming it."""
    try:
        tensors = load_file(directory / f"{name}.safetensors")
    except (OSError, SafetensorError) as error:
        raise damaged_checkpoint(directory, f"{name}.safetensors cannot be read: {error}") from None
    try:
        skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        return _unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise damaged_checkpoint(directory, f"{name}.json cannot be read: {type(error).__name__}: {error}") from None


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class History:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_value: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    rows: list[dict] = field(default_factory=list)


def build_model(config: RunConfig, task: Task, device: torch.device, dtype: torch.dtype, fresh: bool = False):
    """The run's model before any checkpoint is loaded; `fresh`: a new training run, whose initial weights may
    come from elsewhere (a student's embedding from its teacher) — a resumed or loaded run skips that work."""
    from peftlab.models import load_model
    from peftlab.peft import apply_method

    if config.distill.teacher:  # a distillation run trains a small student, not the teacher's transformer
        from peftlab.distill import init_student_embedding
        from peftlab.students import build_student

        student = build_student(config.distill, task.vocabulary, task.num_labels)
        if fresh and config.distill.embedding_init == "teacher":
            init_student_embedding(student, config.distill, task.vocabulary)
        return student.to(device)
    num_labels = getattr(task, "num_labels", 2)
    model, _ = load_model(config.model.name, task=task.model_task, init=config.model.init, num_labels=num_labels, dtype=dtype)
    adapter = config.adapter
    apply_method(model, adapter.method, adapter.targets, adapter.rank, adapter.alpha, adapter.dropout,
                 adapter.extra_trainable or None)
    head = getattr(model, "score", None)
    if head is not None and not any(parameter.requires_grad for parameter in head.parameters()):
        print("warning: the classifier head is frozen at its random initialisation; add 'head' to --extra-trainable")
    return model.to(device)


def build_task(config: RunConfig) -> Task:
    from peftlab.models import load_tokenizer

    task = get_task(config.task, load_tokenizer(config.model.name))
    if config.distill.teacher:
        from peftlab.distill import DistillationTask

        task = DistillationTask(task, config)
    return task


def build_task_and_model(config: RunConfig, device: torch.device, fresh: bool = False) -> tuple[Task, torch.nn.Module]:
    """The run's task and its prepared model (`fresh`: see `build_model`); the seed first, so a random-init base
    is rebuilt exactly."""
    task = build_task(config)
    torch.manual_seed(config.train.seed)
    return task, build_model(config, task, device, torch.float32, fresh)


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
        (task.max_length >= 0, f"--max-length must be >= 0 (0 = the task's), got {task.max_length}"),
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
    from accelerate import Accelerator

    from peftlab.models import resolve_device
    from peftlab.peft import parameter_report

    validate(config)
    output = Path(config.output_dir)
    device, _ = resolve_device(config.train.device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    say = accelerator.print
    task = build_task(config)
    select = selection_metric(config, task)  # before the model loads, not after an epoch
    state = "new" if dry_run else _prepare_run_dir(output, config, resume, accelerator)
    if state == "done":
        say(f"{output} has finished all {config.train.epochs} epochs already; nothing to do (its summary: {output / 'summary.json'})")
        return json.loads((output / "summary.json").read_text(encoding="utf-8"))
    torch.manual_seed(config.train.seed)
    model = build_model(config, task, accelerator.device, torch.float32, fresh=state in ("new", "restart") and not dry_run)
    report = parameter_report(model)
    say("\n".join(report.lines()))
    if dry_run:
        return {"parameters": vars(report) | {"reduction": report.reduction}}

    train_examples = task.encode("train")
    train_examples = evenly_spaced(train_examples, config.task.train_limit)
    val_examples = evenly_spaced(task.encode("validation"), config.task.eval_limit)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms: no decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.train.lr,
    )
    steps_per_epoch = math.ceil(len(train_examples) / config.train.batch_size)
    total_steps = steps_per_epoch * config.train.epochs
    warmup_steps = round(config.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, config.train.schedule)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    history = History()
    if state == "new" and accelerator.is_main_process:  # written once the run is known to start
        save_config(config, output / "config.yaml")
    if state == "resume":
        last = checkpoint_dir(output, "last")
        history = _restore(last, config, accelerator, model, optimizer, scheduler)
        say(f"Resumed from {last} after epoch {history.epoch} (step {history.step})")

    engine = _Engine(config, task, accelerator, model, optimizer, scheduler, history, output, select)
    last_epoch = config.train.epochs if stop_after_epoch is None else min(stop_after_epoch, config.train.epochs)
    try:
        for epoch in range(history.epoch, last_epoch):
            engine.run_epoch(epoch, train_examples, val_examples)
        summary = engine.summary(report, len(train_examples), len(val_examples))
        test_split = getattr(task, "test_split", None)
        if test_split and history.epoch == config.train.epochs:
            summary["test"] = engine.test_best(test_split)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped at step {history.step}. {engine.kept()}") from None
    if accelerator.is_main_process:
        write_text_atomic(output / "summary.json", json.dumps(finite_or_null(summary), indent=2, allow_nan=False) + "\n")
    accelerator.wait_for_everyone()
    return summary


def _prepare_run_dir(output: Path, config: RunConfig, resume: bool, accelerator) -> str:
    """The run directory's state (`runs.run_state`): a new run's folder must hold nothing a run writes; a resumed
    one is first repaired from whatever a killed process left there."""
    if not resume:
        check_new_run_dir(output)
        return "new"
    if accelerator.is_main_process:
        for repair in recover_run(output):
            accelerator.print(f"{output}: {repair}")
    accelerator.wait_for_everyone()
    state = run_state(output, config.train.epochs)
    if state == "new":
        raise PeftlabError(f"nothing to resume: {output} holds no run (no config.yaml). Fix: start it without --resume")
    if state == "restart":
        accelerator.print(f"{output}: no epoch had finished (no checkpoints/last), so nothing is resumable; training "
                          "starts again from step 0 with its config.yaml (the same steps are replayed)")
    return state


class _Engine:
    """The loop itself; its state is the run's history plus the objects it was given."""

    def __init__(self, config, task, accelerator, model, optimizer, scheduler, history: History, output: Path, select: str):
        self.config, self.task, self.accelerator = config, task, accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.history, self.output, self.select = history, output, select
        # What checkpoints/last holds on disk (epoch, step): said when the run stops early.
        self.saved_last = (history.epoch, history.step) if history.epoch else None

    def kept(self, how_to_continue: bool = True) -> str:
        """What the run directory holds now, and (`how_to_continue`) how to go on from it."""
        run, history = self.output, self.history
        best = (f" checkpoints/best holds step {history.best_step} (validation {self.select} {history.best_value:.4f})."
                if history.best_step is not None else "")
        if self.saved_last:
            epoch, step = self.saved_last
            kept = f"{run}/checkpoints/last holds epoch {epoch} (step {step}).{best}"
            return kept + (f" Continue with: peftlab train --resume {run}" if how_to_continue else "")
        kept = f"No epoch had finished, so nothing is resumable.{best}"
        return kept + (f" `peftlab train --resume {run}` starts the run again from step 0" if how_to_continue else "")

    def run_epoch(self, epoch: int, train_examples: list[Encoded], val_examples: list[Encoded]) -> None:
        from tqdm.auto import tqdm

        train_config, accelerator = self.config.train, self.accelerator
        batches = epoch_batches(train_examples, train_config.batch_size, train_config.seed, epoch)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct predictions
        started = time.perf_counter()
        self.model.train()
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{train_config.epochs}", disable=not accelerator.is_main_process,
                        leave=False, dynamic_ncols=True, mininterval=2.0)
        eval_seconds = 0.0  # mid-epoch evaluations, not counted as training time
        for index, batch in enumerate(progress):
            step_totals = self._step(batch, train_examples)
            totals += step_totals
            self.history.step += 1
            progress.set_postfix(loss=f"{step_totals[0] / step_totals[1]:.4f}", refresh=False)
            last_of_epoch = index == len(batches) - 1  # the epoch's own evaluation follows
            if train_config.eval_every and self.history.step % train_config.eval_every == 0 and not last_of_epoch:
                eval_started = time.perf_counter()
                self._evaluate_and_record(epoch, val_examples, None, None, final=False)
                self.model.train()
                eval_seconds += time.perf_counter() - eval_started
        train_seconds = time.perf_counter() - started - eval_seconds
        self._evaluate_and_record(epoch, val_examples, totals, train_seconds, final=True)

    def _step(self, batch: list[int], examples: list[Encoded]) -> torch.Tensor:
        accelerator, train_config = self.accelerator, self.config.train
        micro_batches = process_share(batch, accelerator.process_index, accelerator.num_processes, train_config.grad_accum)
        collated = []
        for micro in micro_batches or [batch[:1]]:  # a process with no examples still joins the all-reduce
            inputs = {key: value.to(accelerator.device) for key, value in self.task.collate([examples[i] for i in micro]).items()}
            collated.append(inputs)
        # Targets of the whole global batch, over all processes: the normaliser of the summed loss.
        global_targets = self._count_targets(collated, bool(micro_batches))
        totals = torch.zeros(3, dtype=torch.float64)
        for index, inputs in enumerate(collated):
            sync = index == len(collated) - 1
            with nullcontext() if sync else accelerator.no_sync(self.model), accelerator.autocast():
                output = self.task.forward(self.model, inputs)
                weight = accelerator.num_processes / global_targets if micro_batches else 0.0
                accelerator.backward(output.loss_sum * weight)
            if micro_batches:
                totals += torch.tensor([output.loss_sum.item(), output.num_targets, output.num_correct])
        totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
        step = self.history.step + 1
        if not math.isfinite(totals[0].item()):
            raise self._diverged(f"the training loss became {totals[0].item()} at step {step}")
        # The norm of the gradients of all processes (clipped when --max-grad-norm > 0; inf only measures it).
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), train_config.max_grad_norm or math.inf)
        if not math.isfinite(float(grad_norm)):
            raise self._diverged(f"the gradient norm became {float(grad_norm)} at step {step} (the loss was finite)")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _count_targets(self, collated: list[dict], has_examples: bool) -> float:
        count = sum(_num_targets(inputs) for inputs in collated) if has_examples else 0
        total = self.accelerator.reduce(torch.tensor(float(count), device=self.accelerator.device), "sum")
        return float(total.item())

    def _diverged(self, what: str) -> PeftlabError:
        return PeftlabError(f"{what}; stopped before saving anything from that state. {self.kept(False)} "
                            "Fix: a new run with a lower --lr or clipped gradients (--max-grad-norm 1); resuming "
                            "would replay the same steps")

    def _evaluate_and_record(self, epoch, val_examples, train_totals, train_seconds, final: bool) -> None:
        evaluation = evaluate(self.model, self.task, val_examples, self.config.train.eval_batch_size, self.accelerator)
        if not math.isfinite(evaluation["loss"]):
            raise self._diverged(f"the validation loss became {evaluation['loss']} at step {self.history.step}")
        if not all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad):
            raise self._diverged(f"some trained weights are no longer finite at step {self.history.step}")
        row = {"epoch": epoch + 1, "step": self.history.step, "final_of_epoch": final, "lr": self.scheduler.get_last_lr()[0]}
        if train_totals is not None:
            row |= {"train_loss": train_totals[0].item() / train_totals[1].item(),
                    "train_accuracy": train_totals[2].item() / train_totals[1].item(),
                    "train_seconds": train_seconds}
        row |= {f"val_{key}": value for key, value in evaluation.items()}
        self.history.rows.append(row)
        value = evaluation[self.select]
        best = self.history.best_value
        improved = math.isfinite(value) and (best is None or (value < best if self.select == "loss" else value > best))
        if improved:
            self.history.best_value, self.history.best_epoch, self.history.best_step = value, epoch + 1, self.history.step
        if final:
            self.history.epoch = epoch + 1
            self._print_epoch(row)
        self._save(improved, final)

    def _print_epoch(self, row: dict) -> None:
        epochs = self.config.train.epochs
        say = self.accelerator.print
        say(f"Train Epoch: [{row['epoch']}/{epochs}], Loss: {row['train_loss']:.4f}, Accuracy: {row['train_accuracy']:.4f}, "
            f"Time: {row['train_seconds']:.1f}s")
        metrics = {key.removeprefix("val_"): value for key, value in row.items() if key.startswith("val_")}
        say(f"Val Epoch: [{row['epoch']}/{epochs}], Loss: {row['val_loss']:.4f}, {self.task.format_metrics(metrics)}, "
            f"{row['val_examples_per_second']:.1f} sentences/s")

    def _save(self, improved: bool, final: bool) -> None:
        from peftlab.peft import save_adapter
        from peftlab.report import plot_history

        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(self.model)
        checkpoints = self.output / "checkpoints"
        base = self.config.model.name
        rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
        rng_states = accelerator.gather_for_metrics([rng], use_gather_object=True) if accelerator.num_processes > 1 else [rng]
        if accelerator.is_main_process:
            metadata = {"epoch": self.history.epoch, "step": self.history.step, "history": self.history.rows[-1]}
            if improved:
                replace_directory(checkpoints / "best", lambda path: save_adapter(model, path, base, metadata),
                                  ADAPTER_MARKER)
            if final:
                def fill_last(path: Path) -> None:
                    save_adapter(model, path, base, metadata)
                    save_state(path, "optimizer", self.optimizer.state_dict())
                    save_state(path, "training_state", {
                        "scheduler": self.scheduler.state_dict(), "rng": rng_states,
                        "history": vars(self.history), "num_processes": accelerator.num_processes,
                    })
                replace_directory(checkpoints / "last", fill_last, ADAPTER_MARKER)
            write_json_lines(self.output / "metrics.jsonl", self.history.rows)
            plot_history(self.history.rows, self.output / "plots", self.config.task.name)
        if final:
            self.saved_last = (self.history.epoch, self.history.step)
        accelerator.wait_for_everyone()

    def test_best(self, split: str) -> dict:
        """Metrics of checkpoints/best on the held-out split, printed; the model keeps the best weights."""
        from peftlab.peft import load_adapter

        load_adapter(self.accelerator.unwrap_model(self.model), self.output / "checkpoints" / "best", self.config.model.name)
        metrics = evaluate(self.model, self.task, self.task.encode(split), self.config.train.eval_batch_size, self.accelerator)
        self.accelerator.print(f"Test ({split}, best checkpoint of epoch {self.history.best_epoch}): Loss: {metrics['loss']:.4f}, "
                               f"{self.task.format_metrics(metrics)}")
        return {"split": split, "epoch": self.history.best_epoch} | metrics

    def summary(self, report, num_train: int, num_val: int) -> dict:
        final_rows = [row for row in self.history.rows if row.get("final_of_epoch")]
        history = self.history
        best = next((row for row in history.rows if row.get(f"val_{self.select}") == history.best_value and (
            row["step"] == history.best_step if history.best_step is not None else row["epoch"] == history.best_epoch)),
            None)  # training states written before best_step existed know the epoch only
        return {
            "task": self.config.task.name, "model": self.config.model.name, "method": self.config.adapter.method,
            "parameters": {"total": report.total, "trainable": report.trainable, "adapter": report.adapter,
                           "reduction": report.reduction},
            "train_examples": num_train, "validation_examples": num_val,
            "skipped_examples": dict(getattr(self.task, "skipped", {})),
            "num_processes": self.accelerator.num_processes,
            "select_metric": self.select, "best": best, "last": final_rows[-1] if final_rows else None,
            "epochs_completed": self.history.epoch,
            "seconds_per_epoch": [row["train_seconds"] for row in final_rows],
        }


def _num_targets(inputs: dict) -> int:
    return len(inputs["labels"]) if inputs["labels"].ndim == 1 else int((inputs["labels"] != -100).sum())


def _restore(directory: Path, config: RunConfig, accelerator, model, optimizer, scheduler) -> History:
    """Load checkpoints/last into the prepared objects; a damaged or incomplete checkpoint is a clear error."""
    from peftlab.peft import load_adapter

    check_last_checkpoint(directory)
    optimizer_state, state = load_state(directory, "optimizer"), load_state(directory, "training_state")
    try:
        written_by = state["num_processes"]
        if written_by != accelerator.num_processes:
            raise PeftlabError(f"{directory} was written by {written_by} process(es); resume with the same number "
                               f"(now {accelerator.num_processes})")
        load_adapter(accelerator.unwrap_model(model), directory, config.model.name)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][accelerator.process_index]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return History(**state["history"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise damaged_checkpoint(directory, f"its training state does not fit this run: {type(error).__name__}: {error}") from None


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, task: Task, examples: list[Encoded], batch_size: int, accelerator=None,
             predictions_file: str | Path | None = None) -> dict:
    """Loss and task metrics on `examples`, with the model in eval mode (LoRA merged).

    Examples are sorted by length so batches carry little padding; with several processes each evaluates every
    P-th example and the results are gathered, so every process returns the same metrics. `predictions_file`:
    also write every example's prediction and reference there (JSON lines, in example order).
    """
    process_index = accelerator.process_index if accelerator else 0
    num_processes = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    plain = accelerator.unwrap_model(model) if accelerator else model
    plain.eval()
    order = sorted(range(len(examples)), key=lambda index: examples[index].length)[process_index::num_processes]
    results, loss_sum, targets = [], 0.0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for offset in range(0, len(order), batch_size):
            indices = order[offset : offset + batch_size]
            batch = [examples[i] for i in indices]
            inputs = {key: value.to(device) for key, value in task.collate(batch).items()}
            with accelerator.autocast() if accelerator else nullcontext():
                output = task.forward(plain, inputs)
                predictions = output.predictions if output.predictions is not None else task.predict(plain, batch)
            loss_sum += output.loss_sum.item()
            targets += output.num_targets
            results += list(zip(indices, predictions))
    seconds = time.perf_counter() - started
    if num_processes > 1:
        gathered = accelerator.gather_for_metrics([(results, loss_sum, targets, seconds)], use_gather_object=True)
        results = [item for part in gathered for item in part[0]]
        loss_sum, targets = sum(part[1] for part in gathered), sum(part[2] for part in gathered)
        seconds = max(part[3] for part in gathered)
    predictions = [prediction for _, prediction in sorted(results)]
    metrics = task.metrics(predictions, examples)
    if predictions_file:
        write_predictions(Path(predictions_file), task, predictions, examples)
    return {"loss": loss_sum / targets} | metrics | {"examples_per_second": len(examples) / seconds}


def write_predictions(path: Path, task: Task, predictions: list, examples: Sequence[Encoded]) -> None:
    """One JSON line per example: where it comes from, what was predicted, the reference, and the task's own
    per-example scores when it has them (`example_metrics`, e.g. SQuAD's EM/F1)."""
    per_example = getattr(task, "example_metrics", None)
    lines = []
    for prediction, example in zip(predictions, examples):
        record = {"origin": example.origin, "prediction": prediction,
                  "reference": getattr(example.target, "reference", example.target)}
        if per_example:
            record |= per_example(prediction, example)
        lines.append(json.dumps(record, ensure_ascii=False, default=_json_value))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _json_value(value):
    """What json cannot write itself: a reference dataclass (by field) or a tensor (as lists)."""
    if is_dataclass(value):
        return {member.name: getattr(value, member.name) for member in fields(value)}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load_run(run_dir: str, checkpoint: str = "best"):
    """Rebuild a run's model with its checkpoint (`best` or `last`) loaded; returns (config, task, model)."""
    from peftlab.models import resolve_device
    from peftlab.peft import load_adapter

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise PeftlabError(f"{run} is not a run directory (no config.yaml)")
    config = load_config(run / "config.yaml")
    config.output_dir = str(run)  # where the run is now, whatever path it was trained under
    directory = run / "checkpoints" / checkpoint
    if not directory.is_dir():
        raise PeftlabError(f"{run} has no checkpoint '{checkpoint}' (expected {directory})")
    device, _ = resolve_device(config.train.device)
    task, model = build_task_and_model(config, device)
    load_adapter(model, directory, config.model.name)
    return config, task, model


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
        config, task, model = load_run(run_dir, checkpoint)
        label = f"{run_dir} [{checkpoint}]"
    else:
        from peftlab.models import load_model, load_tokenizer, resolve_device

        task = get_task(config.task, load_tokenizer(config.model.name))
        if task.model_task != "causal-lm":
            raise PeftlabError(f"a {task.name} classifier without fine-tuning has a random head: give a RUN_DIR")
        device, dtype = resolve_device(config.train.device)
        model, _ = load_model(config.model.name, task=task.model_task, init=config.model.init, dtype=dtype)
        model.to(device)
        label = f"{config.model.name} (no fine-tuning)"
    if predict:
        if not hasattr(task, "predict_mode"):
            raise PeftlabError(f"--predict applies to instruct tasks; {task.name} here is a classifier")
        task.predict_mode = predict
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
    from peftlab.models import hf_reference
    from peftlab.hf import export_merged, export_peft

    if export_format not in EXPORT_FORMATS:
        raise PeftlabError(f"unknown export format '{export_format}': expected {' or '.join(EXPORT_FORMATS)}")
    check_export_target(Path(run_dir), Path(output_dir), overwrite)  # before the model loads
    config, task, model = load_run(run_dir, checkpoint)
    if config.distill.teacher:
        raise PeftlabError(f"{run_dir} is a distilled student (DistilRNN), not a Hugging Face model: nothing to export; "
                           "its checkpoints are safetensors + JSON already")
    record = {"run": str(Path(run_dir).resolve()), "checkpoint": checkpoint}
    if export_format == "peft":
        path = export_peft(model, output_dir, hf_reference(config.model.name), record, overwrite)
    else:
        path = export_merged(model, output_dir, task.tokenizer, record, overwrite)
    print(f"exported {run_dir} [{checkpoint}] as {export_format} to {path}")
    return path


def check_export_target(run: Path, target: Path, overwrite: bool) -> None:
    """Refuse an export path whose replacement would lose something (see `export_run`)."""
    from peftlab.hf import read_export_record

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
