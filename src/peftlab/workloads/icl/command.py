"""`peftlab icl`: load the model (a base model, a local Hugging Face directory, or a trained run with its adapter
on), draw the demonstration sets, check that every (seed, k) fits the context, score each set and write the run
directory (`outputs`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from peftlab.config import RunConfig
from peftlab.data import evenly_spaced
from peftlab.data.datasets import get_dataset
from peftlab.errors import PeftlabError
from peftlab.generate import context_length
from peftlab.models import load_model, load_tokenizer, model_positions, resolve_device
from peftlab.runs import RunDir, run_environment
from peftlab.workloads.base import Workload
from peftlab.workloads.icl import IclConfig
from peftlab.workloads.icl.command_line import icl_run_config
from peftlab.workloads.icl.evaluation import (
    IclExample,
    PromptBuilder,
    answer_room,
    check_budget,
    demonstration_order,
    evaluate_set,
    generates,
    read_examples,
    read_problems_split,
)
from peftlab.workloads.icl.outputs import TASK_METRICS, write_outputs
from peftlab.workloads.icl.templates import (
    ZERO_SHOT_TRIGGER,
    PromptFormat,
    resolve_format,
)
from peftlab.workloads.loading import load_run


class IclWorkload(Workload):
    """An icl run evaluates a model in context; nothing of it is trained."""

    name = "icl"

    def task_for(self, config, tokenizer):
        raise PeftlabError(f"{config.output_dir} is an in-context learning evaluation (`peftlab icl`), not a run that "
                           "trains or evaluates a task; read its results.json / results.md")


@dataclass
class IclPlan:
    """Everything an icl run needs, checked before anything is scored."""

    task: str
    settings: IclConfig
    builder: PromptBuilder
    label_names: tuple[str, ...]
    pool: list[IclExample]
    test: list[IclExample]
    orders: dict[int, list[int]]  # seed -> the demonstration order (k shots: its first k)
    model: torch.nn.Module
    context: int
    room: int

    def description(self, model_name: str) -> dict:
        settings, prompt_format = self.settings, self.builder.format
        return {"task": self.task, "model": model_name, "run": settings.run, "split": settings.split,
                "examples": len(self.test), "demo_seeds": settings.demo_seeds, "format_name": settings.format,
                "format": prompt_format.text, "verbalizers": list(prompt_format.verbalizers),
                "delimiter": prompt_format.delimiter, "chat": settings.chat, "balanced": settings.balanced,
                "trigger": self.builder.trigger, "context_tokens": self.context, "answer_room": self.room}


def run_icl(args: argparse.Namespace) -> None:
    config = icl_run_config(args)
    run = RunDir(config.output_dir)
    run.check_new()
    plan = plan_icl(config, args.device)
    config.environment = run_environment(next(plan.model.parameters()).device, "fp32", 1,
                                         getattr(args, "command_line", None))
    lock = run.lock()
    try:
        run.write_config(config)
        sets, records = evaluate_sets(plan)
        written = write_outputs(run.path, plan.description(config.model.name), sets, records)
    finally:
        lock.release()
    print("\n".join(f"wrote {path}" for path in written))


def plan_icl(config: RunConfig, device: str) -> IclPlan:
    """Format, tokenizer, examples and demonstration orders (bad input is an error before the model loads), then
    the model, and every (seed, k) checked to fit its context. Sets config.model.name to the base model."""
    settings, task = config.icl, config.task.name
    label_names = () if task == "cot" else (get_dataset(task).label_names or ())
    prompt_format = resolve_format(task, settings.format, settings.verbalizers, len(label_names), settings.chat)
    if settings.run:
        config.model.name = RunDir(settings.run).read_config().model.name
    trigger = ZERO_SHOT_TRIGGER if task == "cot" and settings.reasoning == "zero-shot" else ""
    builder = PromptBuilder(prompt_format, load_tokenizer(config.model.name), settings.chat, trigger)
    check_tokenizer(builder, settings.chat, config.model.name)
    pool, test = examples_of(task, settings, config.task.data_dir, prompt_format)
    orders = {seed: demonstration_order(pool, max(settings.shots), seed, settings.balanced)
              for seed in range(settings.demo_seeds)}
    room = answer_room(task, settings, [builder.answer_tokens(v) for v in prompt_format.verbalizers])
    context, model = model_positions(config.model.name), None
    if context is None:  # nothing to read it from before the weights load
        model = load_icl_model(settings.run, config.model.name, device)
        context = context_length(model)
    check_budget(builder, settings, pool, test, orders, room, context, generates(task, settings))
    model = model or load_icl_model(settings.run, config.model.name, device)
    return IclPlan(task, settings, builder, label_names, pool, test, orders, model, context, room)


def evaluate_sets(plan: IclPlan) -> tuple[list[dict], list[dict]]:
    """(one summary per demonstration set, one record per set and test example), printing a line per set."""
    sets, records = [], []
    done: dict[tuple[str, ...], tuple] = {}  # a set evaluated already (every seed's 0 shots): its result, seconds
    for seed, order in plan.orders.items():
        for shots in plan.settings.shots:
            demonstrations = [plan.pool[index] for index in order[:shots]]
            key = tuple(d.origin for d in demonstrations)
            reused = key in done
            if not reused:
                started = time.perf_counter()
                result = evaluate_set(plan.model, plan.builder, plan.task, plan.settings, plan.test, demonstrations,
                                      plan.label_names)
                done[key] = result, time.perf_counter() - started
            result, seconds = done[key]
            sets.append({"seed": seed, "shots": shots, "demonstrations": list(key),
                         "prefix_tokens": result.prefix_tokens, "content_free_prior": result.prior,
                         "metrics": result.metrics, "seconds": seconds, "reused": reused})
            records += [{"seed": seed, "shots": shots, **record} for record in result.records]
            line = set_line(seed, shots, result, TASK_METRICS[plan.task][0], seconds)
            print(line + (" (the same demonstrations as an earlier set: reused)" if reused else ""), flush=True)
    return sets, records


def examples_of(task: str, settings: IclConfig, data_dir: str | None,
                prompt_format: PromptFormat) -> tuple[list[IclExample], list[IclExample]]:
    """(the demonstration pool, the examples evaluated: evenly spaced ones with --limit)."""
    if task == "cot":
        pool, test = read_problems_split(settings)
    else:
        pool = read_examples(task, "train", data_dir, prompt_format) if any(settings.shots) else []
        test = read_examples(task, settings.split, data_dir, prompt_format)
    return pool, evenly_spaced(test, settings.limit)


def check_tokenizer(builder: PromptBuilder, chat: bool, model: str) -> None:
    """Before the model loads: a chat template when --chat asks for one; verbalisers that are tokens."""
    if chat and not getattr(builder.tokenizer, "chat_template", None):
        raise PeftlabError(f"--chat: the tokenizer of {model} has no chat template; leave --chat out")
    delimiter = builder.answer_tokens("")  # the delimiter alone
    for verbalizer in builder.format.verbalizers:
        if builder.answer_tokens(verbalizer) == delimiter:
            raise PeftlabError(f"--verbalizers: {verbalizer!r} tokenises to nothing (beyond the delimiter before it) "
                               f"with the tokenizer of {model}, so it cannot be scored. Fix: choose verbalisers with "
                               "text this tokenizer keeps")


def load_icl_model(run_dir: str, base: str, device: str) -> torch.nn.Module:
    """The base causal LM, or a trained run's model with its best checkpoint's adapter on, in eval mode."""
    target, _ = resolve_device(device)
    if not run_dir:
        model, _ = load_model(base, task="causal-lm")
        return model.to(target).eval()
    _, run_task, model = load_run(run_dir)
    if run_task.model_task != "causal-lm":
        raise PeftlabError(f"{run_dir} trains a {run_task.model_task} model (a head instead of the language model "
                           "head); in-context learning needs a causal-LM run (instruct or qa) or a base model")
    return model.to(target).eval()


def set_line(seed: int, shots: int, result, metric: str, seconds: float) -> str:
    scores = ", ".join(f"{mode} {values[metric]:.4f}" for mode, values in result.metrics.items())
    return (f"seed {seed}, {shots} shots: {metric} {scores} ({len(result.records)} examples in {seconds:.1f} s; "
            f"{result.prefix_tokens} shared tokens computed once)")
