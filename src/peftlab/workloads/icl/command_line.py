"""The command line of `peftlab icl` and the run configuration it builds, checked before any model loads (light:
no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab.config import CONFIG_VERSION, ModelConfig, RunConfig, TaskConfig
from peftlab.data.datasets import check_split
from peftlab.errors import PeftlabError
from peftlab.options import add_options, apply_options, documented_fields
from peftlab.workloads.icl import DEFAULT_SHOTS, PREDICT_MODES, REASONING, IclConfig
from peftlab.workloads.icl.templates import FORMATS, format_names

TASKS = ("cola", "rotten_tomatoes", "squad", "cot")
RUN_CONFIG = "config.yaml"  # what marks --model as a run directory rather than a Hugging Face model directory


def icl_options() -> dict:
    return {dest: option for dest, option in documented_fields(IclConfig, "icl").items() if dest != "run"}


def icl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="a known model name (see `peftlab models`), a local Hugging Face model directory, or a "
                        "run directory of `peftlab train` (a causal-LM run: evaluated with its adapter on) "
                        "(default: smollm2-135m)")
    parser.add_argument("--task", required=True, choices=TASKS,
                        help="the task evaluated; cot: chain-of-thought problems of a --demonstrations file")
    parser.add_argument("--output-dir", help="the run directory to write (default: runs/icl-<task>-<model>)")
    parser.add_argument("--data-dir", help="data directory (default: $PEFTLAB_DATA)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    add_options(parser, icl_options())
    parser.epilog = f"Named formats: {format_names()}."


def icl_run_config(args: argparse.Namespace) -> RunConfig:
    """The icl run's configuration from the command line, every setting checked (data files included)."""
    config = RunConfig(model=ModelConfig(name=args.model), task=TaskConfig(name=args.task, data_dir=args.data_dir),
                       version=CONFIG_VERSION)
    config.icl = IclConfig()
    apply_options(config, args, icl_options())
    settings = config.icl
    defaults = [k for k in DEFAULT_SHOTS if args.task != "cot" or k <= settings.demonstration_pool]
    settings.shots = parse_shots(settings.shots or defaults)
    settings.format = settings.format or next(iter(FORMATS[args.task]))
    if (Path(args.model) / RUN_CONFIG).is_file():
        settings.run = args.model
    config.train.device = args.device
    config.output_dir = args.output_dir or f"runs/icl-{args.task}-{Path(args.model.rstrip('/')).name}"
    check_settings(settings, args.task, args.data_dir)
    return config


def parse_shots(values: list) -> list[int]:
    try:
        shots = [int(value) for value in values]
    except ValueError:
        raise PeftlabError(f"--shots {','.join(map(str, values))}: expected comma-separated whole numbers, e.g. "
                           "0,1,2,4,8,16") from None
    if not shots or min(shots) < 0 or len(set(shots)) != len(shots):
        raise PeftlabError(f"--shots {','.join(map(str, values))}: give distinct numbers >= 0")
    return sorted(shots)


def check_settings(settings: IclConfig, task: str, data_dir: str | None) -> None:
    for name, value, least in (("--demo-seeds", settings.demo_seeds, 1), ("--limit", settings.limit, 0),
                               ("--max-new-tokens", settings.max_new_tokens, 1), ("--batch-size", settings.batch_size, 1)):
        if value < least:
            raise PeftlabError(f"{name} must be >= {least}, got {value}")
    if settings.predict not in PREDICT_MODES:
        raise PeftlabError(f"--predict must be one of {', '.join(PREDICT_MODES)}, got '{settings.predict}'")
    if settings.balanced and task in ("squad", "cot"):
        raise PeftlabError(f"--balanced draws the labels in turn; {task} has no labels")
    if task == "cot":
        check_chain_of_thought(settings)
        return
    if settings.demonstrations:
        raise PeftlabError("--demonstrations is the problems file of --task cot; the other tasks draw their "
                           "demonstrations from the train split")
    if settings.split == "train":
        raise PeftlabError("the demonstrations are drawn from the train split, so it cannot be the split evaluated; "
                           "choose --split validation (or test)")
    check_split(task, settings.split, data_dir)
    if any(settings.shots):
        check_split(task, "train", data_dir)


def check_chain_of_thought(settings: IclConfig) -> None:
    if not settings.demonstrations:
        raise PeftlabError("--task cot needs --demonstrations FILE.jsonl (input, rationale, answer per line), e.g. "
                           "examples/cot-arithmetic.jsonl")
    if settings.reasoning not in REASONING:
        raise PeftlabError(f"--reasoning must be one of {', '.join(REASONING)}, got '{settings.reasoning}'")
    if settings.reasoning == "zero-shot" and settings.shots != [0]:
        raise PeftlabError("--reasoning zero-shot prompts without demonstrations: give --shots 0")
    if settings.demonstration_pool < max(settings.shots):
        raise PeftlabError(f"--shots {max(settings.shots)} needs at least that many problems in the demonstration "
                           f"pool (--demonstration-pool {settings.demonstration_pool})")
