"""The one training engine every workload uses (on Hugging Face Accelerate); it knows tasks only through the `Task`
protocol (`peftlab.tasks`) and run directories only through `peftlab.runs.RunDir`, and imports no workload.

Per optimizer step the engine takes one *global* batch of `batch_size` examples, gives each process its share
(examples p, p+P, p+2P, ...), splits that share into `grad_accum` micro-batches, and scales every micro-batch's
summed loss by P / (targets in the whole global batch, `Task.count_targets`). Gradients therefore equal those of
the mean loss over the global batch whatever the number of processes or accumulation steps, so a 2-process run
follows the 1-process trajectory (tested).

Batches are length-grouped (shuffled, then sorted by length within windows of 50 batches, then the batches are
shuffled) and padded per batch. A task that `shares_prefixes` (SQuAD's questions on one paragraph) has its examples
batched in units that share a prefix: a unit is never split over processes or micro-batches, so the task computes
its prefix once; a batch then holds at most `batch_size` examples. The order depends only on (seed, epoch), which is what makes `--resume`
reproduce an uninterrupted run exactly.

Every optimizer step is a line of steps.jsonl (loss, learning rate, gradient norm, examples/s); with `save_every`
checkpoints/last is also written mid-epoch with the epoch's position and partial totals, so a killed run resumes at
that step and ends with the uninterrupted run's metrics. `max_steps` cuts the plan (and the schedule) short.

A task may return its own per-batch quantities (`StepOutput.sums`, each a sum and its count, e.g. DPO's rewards):
the engine adds sums and counts over micro-batches, processes and steps and writes the means, Σ sum / Σ count,
in steps.jsonl (per step), metrics.jsonl (`train_<name>` per epoch, `val_<name>` per evaluation) and the trackers.

`evaluate` (every evaluation: end of epoch, mid-epoch, the test split, `peftlab eval`) calls
`Task.begin_evaluation` before its first batch and `Task.end_evaluation` after its last, also after an error, so a
task can compute once what every batch of an evaluation shares (a prefix cache, a calibration pass).

Callbacks (`Callback`) see every optimizer step, every evaluation and every epoch end, after the engine has saved
what it saves; trackers, plots and sweeps hook in there.
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
from tqdm.auto import tqdm

from peftlab.config import TrainConfig
from peftlab.data import evenly_spaced
from peftlab.errors import PeftlabError
from peftlab.fileio import write_text_atomic
from peftlab.peft import merged
from peftlab.runs import RunDir
from peftlab.shared_prefix import prefix_units
from peftlab.tasks import Encoded, StepOutput, Task

SCHEDULES = ("linear", "cosine", "constant")
LENGTH_GROUP_WINDOW = 50  # batches per sorting window
# The engine's own keys of a steps.jsonl line; a task's own sums (`StepOutput.sums`) follow under their names.
STEP_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "examples", "seconds", "examples_per_second")


# ----------------------------------------------------------------------------------------------------------
# Batching and schedule


def example_units(examples: Sequence[Encoded], shares_prefixes: bool, max_size: int) -> list[list[int]]:
    """The indivisible groups of examples: those sharing a prefix (at most `max_size` each), else one each."""
    if not shares_prefixes:
        return [[index] for index in range(len(examples))]
    return prefix_units(examples, max_size)


def unit_length(examples: Sequence[Encoded], unit: list[int]) -> int:
    """Tokens of a unit computed together: the shared prefix once, then each example's rest."""
    shared = examples[unit[0]].shared_length if len(unit) > 1 else 0
    return shared + sum(examples[index].length - shared for index in unit)


def fill_batches(units: Sequence[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive units into batches of at most `batch_size` examples (units of one: exactly that many)."""
    batches, current, size = [], [], 0
    for unit in units:
        if current and size + len(unit) > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(unit)
        size += len(unit)
    return batches + ([current] if current else [])


def epoch_batches(examples: Sequence[Encoded], batch_size: int, seed: int, epoch: int,
                  shares_prefixes: bool = False) -> list[list[list[int]]]:
    """Each global batch of one epoch as its units of example indices: units shuffled, length-grouped (sorted by
    length within windows of 50 batches), batches shuffled; deterministic in (seed, epoch)."""
    generator = random.Random(seed * 100_003 + epoch)
    units = example_units(examples, shares_prefixes, batch_size)
    generator.shuffle(units)
    window = batch_size * LENGTH_GROUP_WINDOW
    batches = []
    for start in range(0, len(units), window):
        chunk = sorted(units[start : start + window], key=lambda unit: unit_length(examples, unit))
        batches += fill_batches(chunk, batch_size)
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


def truncate_plan(plan: list[list], max_steps: int) -> list[list]:
    """The epochs' batches up to `max_steps` optimizer steps in all (0 = all of them); the last epoch may be cut."""
    if not max_steps:
        return plan
    kept, left = [], max_steps
    for batches in plan:
        if left <= 0:
            break
        kept.append(batches[:left])
        left -= len(kept[-1])
    return kept


def process_share(batch: list[list[int]], process_index: int, num_processes: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches (example indices) of one global batch of units: every P-th unit, then split
    into `grad_accum` runs of units."""
    mine = batch[process_index::num_processes]
    size = max(1, math.ceil(len(mine) / grad_accum))
    return [[index for unit in mine[offset : offset + size] for index in unit] for offset in range(0, len(mine), size)]


# ----------------------------------------------------------------------------------------------------------
# Sums over micro-batches, processes and steps


def float64_zeros(size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.float64)


@dataclass
class Totals:
    """What the engine adds up over micro-batches, processes and steps: the summed loss, its targets and the
    correct predictions (`core`), and the task's own sums (`task`: name -> [sum, count], `StepOutput.sums`), whose
    written value is the mean Σ sum / Σ count."""

    core: torch.Tensor = field(default_factory=lambda: float64_zeros(3))  # (loss sum, targets, correct)
    task: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (sum, count), float64

    def add(self, output: StepOutput, counted: bool = True) -> None:
        """Add one batch; one that is not `counted` (a process without examples) adds only the names of its sums,
        so every process reduces a vector of the same length."""
        if counted:
            self.core += torch.tensor([output.loss_sum.item(), output.num_targets, output.num_correct],
                                      dtype=torch.float64)
        for name, (total, count) in output.sums.items():
            value = torch.tensor([float(total), float(count)], dtype=torch.float64) if counted else float64_zeros(2)
            self.task[name] = self.task.get(name, float64_zeros(2)) + value

    def __iadd__(self, other: "Totals") -> "Totals":
        self.core = self.core + other.core
        for name, value in other.task.items():
            self.task[name] = self.task.get(name, float64_zeros(2)) + value
        return self

    def reduce(self, accelerator) -> "Totals":
        """The sums over all processes (one all-reduce of core + task sums, names in sorted order)."""
        names = sorted(self.task)
        flat = torch.cat([self.core] + [self.task[name] for name in names])  # (3 + 2 * names,)
        flat = accelerator.reduce(flat.to(accelerator.device), "sum").cpu()
        return Totals(flat[:3], {name: flat[3 + 2 * index : 5 + 2 * index] for index, name in enumerate(names)})

    def task_means(self) -> dict[str, float | None]:
        """Each task sum's mean, Σ sum / Σ count (None when it counted nothing)."""
        return {name: (value[0] / value[1]).item() if value[1] else None for name, value in self.task.items()}

    @classmethod
    def restore(cls, core: list[float] | None, task: dict[str, list[float]] | None) -> "Totals":
        """The totals saved in a mid-epoch checkpoint (`History.epoch_totals`, `History.epoch_sums`)."""
        return cls(torch.tensor(core, dtype=torch.float64) if core else float64_zeros(3),
                   {name: torch.tensor(value, dtype=torch.float64) for name, value in (task or {}).items()})


def own_names(values: dict, taken: dict, whose: str) -> dict:
    """`values`, when none of its names is in `taken` already (a task's sum may not overwrite the engine's keys)."""
    clash = sorted(set(values) & set(taken))
    if clash:
        raise PeftlabError(f"{whose} returns {', '.join(clash)}, which the engine writes itself. Fix: rename them "
                           f"(the engine's own: {', '.join(taken)})")
    return values


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class History:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_value: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    rows: list[dict] = field(default_factory=list)
    # Where a mid-epoch checkpoint (--save-every) stopped in the epoch after `epoch`: batches done, their
    # (loss sum, targets, correct) and training seconds. All 0/None at epoch boundaries.
    batches_done: int = 0
    epoch_totals: list[float] | None = None
    epoch_sums: dict[str, list[float]] | None = None  # the task's own sums so far: name -> [sum, count]
    epoch_seconds: float = 0.0
    seconds: float = 0.0  # wall-clock seconds of training and evaluation up to the saved state (all parts)


class Callback:
    """Hooks into the loop; every method is optional. They run on every process, after the engine's own saving."""

    def on_step(self, engine: "Engine", row: dict) -> None:
        """After each optimizer step; `row` is its line of steps.jsonl (step, loss, lr, grad_norm, examples/s)."""

    def on_evaluation(self, engine: "Engine", row: dict) -> None:
        """After each evaluation (mid-epoch or end of epoch); `row` is the line added to metrics.jsonl."""

    def on_epoch_end(self, engine: "Engine", row: dict) -> None:
        """After an epoch's own evaluation and checkpoints."""

    def on_train_end(self, engine: "Engine") -> None:
        """When `fit` returns or stops with an error (the history holds what was done)."""


class Engine:
    """Trains `model` on `task` into `run` with the settings of `train_config`.

    Args:
        task: the workload's task (the `Task` protocol).
        model: the prepared model (its method applied, trainability set).
        train_config: optimisation and evaluation settings.
        run: the run directory (metrics.jsonl and checkpoints are written there).
        base_model: the base model's name, recorded in the adapter checkpoints.
        select: the validation metric that picks checkpoints/best ("loss" = lowest, others highest).
        accelerator: an `accelerate.Accelerator`.
        callbacks: `Callback`s, called in order.
    """

    def __init__(self, task: Task, model: torch.nn.Module, train_config: TrainConfig, run: RunDir, base_model: str,
                 select: str, accelerator, callbacks: Sequence[Callback] = ()):
        self.task, self.settings, self.run, self.base_model, self.select = task, train_config, run, base_model, select
        self.accelerator, self.callbacks = accelerator, list(callbacks)
        self.model, self.history = model, History()
        self.saved_last: tuple[int, int, int] | None = None  # checkpoints/last on disk: (epoch, step, batches_done)
        self.optimizer = self.scheduler = None  # made by `fit`, which knows the number of steps
        self.total_steps = self.num_epochs = 0  # of the whole run (after --max-steps), known once `fit` plans
        self.resumed = False
        self._clock = (0.0, time.perf_counter())  # (history.seconds when this part started, when it started)

    # --- the run ---------------------------------------------------------------------------------------------

    def fit(self, train_examples: list[Encoded], val_examples: list[Encoded], resume: bool = False,
            stop_after_epoch: int | None = None) -> History:
        """Train every epoch not done yet (from checkpoints/last when `resume`); returns the history."""
        settings = self.settings
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms: no decay
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
        )
        plan = self.plan(train_examples)
        self.total_steps = total_steps = sum(len(batches) for batches in plan)
        self.num_epochs = len(plan)
        warmup_steps = round(settings.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, settings.schedule)
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        if resume:
            self.history = History(**self.run.restore_last(self.accelerator, self.model, self.optimizer,
                                                           self.scheduler, self.base_model))
            self.saved_last = (self.history.epoch, self.history.step, self.history.batches_done)
            self.resumed = True
            self.accelerator.print(f"Resumed from {self.run.checkpoint('last')} at step {self.history.step} "
                                   f"({self._position(plan)})")
        if self.accelerator.is_main_process:
            self.run.trim_steps(self.history.step)  # steps after the checkpoint are replayed
        self._clock = (self.history.seconds, time.perf_counter())
        last_epoch = len(plan) if stop_after_epoch is None else min(stop_after_epoch, len(plan))
        try:
            for epoch in range(self.history.epoch, last_epoch):
                self._run_epoch(epoch, plan[epoch], train_examples, val_examples)
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
        return self.history

    def plan(self, train_examples: list[Encoded]) -> list[list[list[list[int]]]]:
        """Every epoch's batches (units of example indices), known up front: the schedule's length."""
        settings = self.settings
        return truncate_plan([epoch_batches(train_examples, settings.batch_size, settings.seed, epoch,
                                            self.task.shares_prefixes) for epoch in range(settings.epochs)],
                             settings.max_steps)

    @property
    def finished(self) -> bool:
        """Whether every planned step is done (all epochs, or --max-steps)."""
        return self.total_steps > 0 and self.history.step == self.total_steps

    def _position(self, plan) -> str:
        history = self.history
        if history.batches_done:
            return f"epoch {history.epoch + 1}, batch {history.batches_done}/{len(plan[history.epoch])}"
        return f"after epoch {history.epoch}"

    def kept(self, how_to_continue: bool = True) -> str:
        """What the run directory holds now, and (`how_to_continue`) how to go on from it."""
        run, history = self.run.path, self.history
        best = (f" checkpoints/best holds step {history.best_step} (validation {self.select} {history.best_value:.4f})."
                if history.best_step is not None else "")
        if self.saved_last:
            epoch, step, batches_done = self.saved_last
            where = f"step {step} (mid-epoch {epoch + 1})" if batches_done else f"epoch {epoch} (step {step})"
            kept = f"{run}/checkpoints/last holds {where}.{best}"
            return kept + (f" Continue with: peftlab train --resume {run}" if how_to_continue else "")
        kept = f"Nothing resumable was saved yet (no checkpoints/last).{best}"
        return kept + (f" `peftlab train --resume {run}` starts the run again from step 0" if how_to_continue else "")

    def best_row(self) -> dict | None:
        history = self.history
        return next((row for row in history.rows if row.get(f"val_{self.select}") == history.best_value and (
            row["step"] == history.best_step if history.best_step is not None else row["epoch"] == history.best_epoch)),
            None)  # training states written before best_step existed know the epoch only

    def test_best(self, split: str, limit: int = 0) -> dict:
        """Metrics of checkpoints/best on the held-out split (`limit`: N evenly spaced examples), printed; the model
        keeps the best weights."""
        self.run.load_checkpoint(self.accelerator.unwrap_model(self.model), "best", self.base_model)
        examples = evenly_spaced(self.task.encode(split), limit)
        metrics = evaluate(self.model, self.task, examples, self.settings.eval_batch_size, self.accelerator,
                           merge_adapters=self.settings.merge_for_evaluation)
        self.accelerator.print(f"Test ({split}, {len(examples)} examples, best checkpoint of step "
                               f"{self.history.best_step}): Loss: {metrics['loss']:.4f}, "
                               f"{self.task.format_metrics(metrics)}")
        return {"split": split, "epoch": self.history.best_epoch, "step": self.history.best_step,
                "examples": len(examples)} | metrics

    # --- one epoch, one step ---------------------------------------------------------------------------------

    def _run_epoch(self, epoch: int, batches: list[list[list[int]]], train_examples: list[Encoded],
                   val_examples: list[Encoded]) -> None:
        settings, accelerator, history = self.settings, self.accelerator, self.history
        start = history.batches_done  # > 0: resumed from a mid-epoch checkpoint
        totals = Totals.restore(history.epoch_totals, history.epoch_sums) if start else Totals()  # the epoch so far
        seconds_before = history.epoch_seconds if start else 0.0
        started = time.perf_counter()
        self.model.train()
        progress = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{self.num_epochs}", initial=start,
                        disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True, mininterval=2.0)
        eval_seconds = 0.0  # mid-epoch evaluations, not counted as training time
        with progress:  # closed (its line cleared) also on Ctrl-C, so what is printed next starts a line
            for index in range(start, len(batches)):
                step_started = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                step_totals, grad_norm = self._step(batches[index], train_examples)
                totals += step_totals
                history.step += 1
                row = self._step_row(epoch, index, len(batches), step_totals, grad_norm, lr,
                                     time.perf_counter() - step_started, sum(len(unit) for unit in batches[index]))
                progress.update(1)
                progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                for callback in self.callbacks:
                    callback.on_step(self, row)
                last_of_epoch = index == len(batches) - 1  # the epoch's own evaluation follows
                if settings.eval_every and history.step % settings.eval_every == 0 and not last_of_epoch:
                    eval_started = time.perf_counter()
                    self._evaluate_and_record(epoch, val_examples, None, None, final=False)
                    self.model.train()
                    eval_seconds += time.perf_counter() - eval_started
                if settings.save_every and history.step % settings.save_every == 0 and not last_of_epoch:
                    history.batches_done, history.epoch_totals = index + 1, totals.core.tolist()
                    history.epoch_sums = {name: value.tolist() for name, value in totals.task.items()}
                    history.epoch_seconds = seconds_before + time.perf_counter() - started - eval_seconds
                    self._save(improved=False, last=True)
        train_seconds = seconds_before + time.perf_counter() - started - eval_seconds
        history.batches_done, history.epoch_totals, history.epoch_sums, history.epoch_seconds = 0, None, None, 0.0
        row = self._evaluate_and_record(epoch, val_examples, totals, train_seconds, final=True)
        for callback in self.callbacks:
            callback.on_epoch_end(self, row)

    def _step(self, batch: list[list[int]], examples: list[Encoded]) -> tuple[Totals, float]:
        """One optimizer step on a global batch (units of example indices); returns its totals over every process
        and the gradient norm."""
        accelerator, settings = self.accelerator, self.settings
        # This process's micro-batches, each a list of example indices (units whole): [[i, ...], ...]
        micro_batches = process_share(batch, accelerator.process_index, accelerator.num_processes, settings.grad_accum)
        # One padded batch per micro-batch, e.g. input_ids (b, T): b <= batch_size / (P * grad_accum) rows of the
        # micro-batch's longest length T. A process with no examples still joins the all-reduce with one example.
        collated = [self._collate([examples[index] for index in micro]) for micro in micro_batches or [batch[0][:1]]]
        # Targets of the whole global batch, over all processes: the normaliser of the summed loss.
        count = sum(self.task.count_targets(inputs) for inputs in collated) if micro_batches else 0
        global_targets = float(accelerator.reduce(torch.tensor(float(count), device=accelerator.device), "sum").item())
        totals = Totals()
        for index, inputs in enumerate(collated):
            sync = index == len(collated) - 1
            with nullcontext() if sync else accelerator.no_sync(self.model), accelerator.autocast():
                output = self.task.forward(self.model, inputs)
                weight = accelerator.num_processes / global_targets if micro_batches else 0.0
                accelerator.backward(output.loss_sum * weight)
            totals.add(output, counted=bool(micro_batches))
        totals = totals.reduce(accelerator)
        step = self.history.step + 1
        if not math.isfinite(totals.core[0].item()):
            raise self._diverged(f"the training loss became {totals.core[0].item()} at step {step}")
        # The norm of the gradients of all processes (clipped when --max-grad-norm > 0; inf only measures it).
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm or math.inf)
        if not math.isfinite(float(grad_norm)):
            raise self._diverged(f"the gradient norm became {float(grad_norm)} at step {step} (the loss was finite)")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, float(grad_norm)

    def _collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        """`Task.collate` of the examples, on this process's device."""
        return {key: value.to(self.accelerator.device) for key, value in self.task.collate(examples).items()}

    def _step_row(self, epoch: int, index: int, num_batches: int, totals: Totals, grad_norm: float, lr: float,
                  seconds: float, examples: int) -> dict:
        """The step's line of steps.jsonl (main process appends it): the engine's `STEP_KEYS`, then the means of
        the task's own sums."""
        row = {"step": self.history.step, "epoch": round(epoch + (index + 1) / num_batches, 4),
               "loss": (totals.core[0] / totals.core[1]).item(), "lr": lr, "grad_norm": grad_norm,
               "examples": examples, "seconds": seconds, "examples_per_second": examples / seconds}
        row |= own_names(totals.task_means(), row, f"{type(self.task).__name__}'s StepOutput.sums")
        if self.accelerator.is_main_process:
            self.run.append_step(row)
        return row

    def _diverged(self, what: str) -> PeftlabError:
        return PeftlabError(f"{what}; stopped before saving anything from that state. {self.kept(False)} "
                            "Fix: a new run with a lower --lr or clipped gradients (--max-grad-norm 1); resuming "
                            "would replay the same steps")

    # --- evaluation and checkpoints --------------------------------------------------------------------------

    def _evaluate_and_record(self, epoch: int, val_examples: list[Encoded], train_totals: Totals | None,
                             train_seconds: float | None, final: bool) -> dict:
        evaluation = evaluate(self.model, self.task, val_examples, self.settings.eval_batch_size, self.accelerator,
                              merge_adapters=self.settings.merge_for_evaluation)
        if not math.isfinite(evaluation["loss"]):
            raise self._diverged(f"the validation loss became {evaluation['loss']} at step {self.history.step}")
        if not all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad):
            raise self._diverged(f"some trained weights are no longer finite at step {self.history.step}")
        row = {"epoch": epoch + 1, "step": self.history.step, "final_of_epoch": final, "lr": self.scheduler.get_last_lr()[0]}
        if train_totals is not None:
            core = train_totals.core
            row |= {"train_loss": core[0].item() / core[1].item(), "train_accuracy": core[2].item() / core[1].item(),
                    "train_seconds": train_seconds}
            row |= own_names({f"train_{name}": mean for name, mean in train_totals.task_means().items()}, row,
                             f"{type(self.task).__name__}'s StepOutput.sums")
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
        else:
            self._print_evaluation(row)
        self._save(improved, last=final)
        for callback in self.callbacks:
            callback.on_evaluation(self, row)
        return row

    def _print_epoch(self, row: dict) -> None:
        epochs = self.num_epochs
        say = self.accelerator.print
        say(f"Train Epoch: [{row['epoch']}/{epochs}], Loss: {row['train_loss']:.4f}, Accuracy: {row['train_accuracy']:.4f}, "
            f"Time: {row['train_seconds']:.1f}s")
        metrics = {key.removeprefix("val_"): value for key, value in row.items() if key.startswith("val_")}
        say(f"Val Epoch: [{row['epoch']}/{epochs}], Loss: {row['val_loss']:.4f}, {self.task.format_metrics(metrics)}, "
            f"{row['val_examples_per_second']:.1f} examples/s")

    def _print_evaluation(self, row: dict) -> None:
        """A mid-epoch evaluation's line."""
        metrics = {key.removeprefix("val_"): value for key, value in row.items() if key.startswith("val_")}
        if self.accelerator.is_main_process:  # tqdm.write: the epoch's progress bar is on screen
            tqdm.write(f"Val Step: {row['step']}/{self.total_steps} (epoch {row['epoch']}), Loss: "
                       f"{row['val_loss']:.4f}, {self.task.format_metrics(metrics)}, "
                       f"{row['val_examples_per_second']:.1f} examples/s")

    def _save(self, improved: bool, last: bool) -> None:
        """checkpoints/best when `improved`, checkpoints/last (everything resuming needs) when `last`, and
        metrics.jsonl."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(self.model)
        rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
        rng_states = accelerator.gather_for_metrics([rng], use_gather_object=True) if accelerator.num_processes > 1 else [rng]
        base, since = self._clock
        self.history.seconds = base + time.perf_counter() - since
        if accelerator.is_main_process:
            metadata = {"epoch": self.history.epoch, "step": self.history.step,
                        "history": self.history.rows[-1] if self.history.rows else None}
            if improved:
                self.run.save_best(model, self.base_model, metadata)
            if last:
                training_state = {"scheduler": self.scheduler.state_dict(), "rng": rng_states,
                                  "history": vars(self.history), "num_processes": accelerator.num_processes}
                self.run.save_last(model, self.base_model, metadata, self.optimizer.state_dict(), training_state)
            self.run.write_metrics(self.history.rows)
        if last:
            self.saved_last = (self.history.epoch, self.history.step, self.history.batches_done)
        accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, task: Task, examples: list[Encoded], batch_size: int, accelerator=None,
             predictions_file: str | Path | None = None, merge_adapters: bool = False) -> dict:
    """Loss and task metrics on `examples`, with the model in eval mode; adapters stay unmerged unless
    `merge_adapters` (`--merge-for-evaluation`: merged for this evaluation, un-merged after, see `peft.merged`).

    Examples (units of examples sharing a prefix, see `Task.shares_prefixes`) are sorted by length so batches carry
    little padding; with several processes each evaluates every P-th unit and the results are gathered, so every
    process returns the same metrics. `Task.begin_evaluation` sees every example before the first batch and
    `Task.end_evaluation` ends it, also after an error. The task's own sums (`StepOutput.sums`) are reported as
    their means. `predictions_file`: also write every example's prediction and reference there (JSON lines, in
    example order).
    """
    process_index = accelerator.process_index if accelerator else 0
    num_processes = accelerator.num_processes if accelerator else 1
    plain = accelerator.unwrap_model(model) if accelerator else model
    plain.eval()
    units = example_units(examples, task.shares_prefixes, batch_size)
    units = sorted(units, key=lambda unit: unit_length(examples, unit))[process_index::num_processes]
    started = time.perf_counter()
    with merged(plain) if merge_adapters else nullcontext(), torch.inference_mode(), \
            accelerator.autocast() if accelerator else nullcontext():
        task.begin_evaluation(plain, examples)
        try:
            results, totals = evaluation_pass(plain, task, examples, fill_batches(units, batch_size), accelerator)
        finally:
            task.end_evaluation()
    seconds = time.perf_counter() - started
    if num_processes > 1:
        gathered = accelerator.gather_for_metrics([(results, totals, seconds)], use_gather_object=True)
        results, totals = [item for part in gathered for item in part[0]], Totals()
        for part in gathered:
            totals += part[1]
        seconds = max(part[2] for part in gathered)
    predictions = [prediction for _, prediction in sorted(results)]
    metrics = task.metrics(predictions, examples)
    if predictions_file:
        write_predictions(Path(predictions_file), task, predictions, examples)
    metrics |= own_names(totals.task_means(), metrics, f"{type(task).__name__}'s StepOutput.sums")
    return {"loss": totals.core[0].item() / totals.core[1].item()} | metrics | {
        "examples_per_second": len(examples) / seconds}


def evaluation_pass(model, task: Task, examples: list[Encoded], batches: list[list[list[int]]],
                    accelerator=None) -> tuple[list[tuple[int, object]], Totals]:
    """Every batch of units through `task.forward` (and `task.predict` when forward predicts nothing), with a
    progress bar: (example index, prediction) pairs and the totals."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    results, totals = [], Totals()
    progress = tqdm(total=sum(len(unit) for batch in batches for unit in batch), desc="evaluate", unit="example",
                    leave=False, dynamic_ncols=True, mininterval=2.0,
                    disable=accelerator is not None and not accelerator.is_main_process)
    with progress:
        for batch_units in batches:
            indices = [index for unit in batch_units for index in unit]
            batch = [examples[i] for i in indices]
            inputs = {key: value.to(device) for key, value in task.collate(batch).items()}
            output = task.forward(model, inputs)
            predictions = output.predictions if output.predictions is not None else task.predict(model, batch)
            totals.add(output)
            results += list(zip(indices, predictions))
            progress.update(len(indices))
    return results, totals


def write_predictions(path: Path, task: Task, predictions: list, examples: Sequence[Encoded]) -> None:
    """One JSON line per example: where it comes from, what was predicted, the reference, and the task's own
    per-example scores (`Task.example_metrics`, e.g. SQuAD's EM/F1)."""
    lines = []
    for prediction, example in zip(predictions, examples):
        record = {"origin": example.origin, "prediction": prediction, "reference": task.reference(example)}
        record |= task.example_metrics(prediction, example)
        lines.append(json.dumps(record, ensure_ascii=False, default=_json_value))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _json_value(value):
    """What json cannot write itself: a reference dataclass (by field) or a tensor (as lists)."""
    if is_dataclass(value):
        return {member.name: getattr(value, member.name) for member in fields(value)}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
