"""`peftlab train`, `peftlab eval` and `peftlab export`: the command line's arguments turned into calls of the run
service (`peftlab.train`)."""

from __future__ import annotations

import argparse

from peftlab.config import RunConfig, parse_assignment, set_dotted
from peftlab.data.datasets import only_dataset_of
from peftlab.errors import PeftlabError
from peftlab.options import RUN_PLACE_OPTIONS, apply_options, eval_options, train_options
from peftlab.recipes import recipe_values
from peftlab.runs import RunDir
from peftlab.train import evaluate_run, export_run, train


def train_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run configuration: --resume's config.yaml; else the defaults, --recipe, --set, then the given options."""
    if args.resume:
        return RunDir(args.resume).read_config()
    values = recipe_values(args.recipe) if args.recipe else {}
    values.pop("environment", None)  # a run's config.yaml as a recipe: where it ran is not a setting
    for option in args.set:
        key, value = parse_assignment(option)
        set_dotted(values, key, value, f"--set {option}")
    config = RunConfig.from_dict(values) if values else RunConfig()
    apply_options(config, args, train_options())
    if args.task is None and "name" not in (values.get("task") or {}):
        config.task.name = only_dataset_of(config.task.objective) or config.task.name  # --objective dpo alone
    if args.output_dir:
        config.output_dir = args.output_dir
    elif "output_dir" not in values:
        model = config.model.name.rstrip("/").rsplit("/", 1)[-1]
        config.output_dir = f"runs/{config.task.name}-{model}-{config.adapter.method}"
    return config


def run_train(args: argparse.Namespace) -> None:
    options = train_options()
    given = [options[dest].flag for dest in options if getattr(args, dest) is not None]
    given += [flag for flag, value in (("--recipe", args.recipe), ("--set", args.set), ("--output-dir", args.output_dir))
              if value]
    if args.resume and given:
        raise PeftlabError(f"--resume continues the run as configured in its config.yaml; drop {given[0]}")
    train(train_config_from_args(args), resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
          dry_run=args.dry_run, command=args.command_line)


def run_eval(args: argparse.Namespace) -> None:
    settings = {dest: getattr(args, dest) for dest in eval_options("any")}
    zero_shot = {dest: option for dest, option in eval_options("zero-shot").items() if dest not in settings}
    given = [dest for dest in zero_shot if getattr(args, dest) is not None]
    if args.run_dir and given:
        raise PeftlabError(f"{zero_shot[given[0]].flag} describes a model without RUN_DIR; a run uses its own "
                           "config.yaml")
    config = None
    if not args.run_dir:
        config = RunConfig()
        apply_options(config, args, zero_shot | RUN_PLACE_OPTIONS)
    evaluate_run(args.run_dir, args.split, args.checkpoint, args.batch_size, args.limit, config, args.predictions,
                 place=_place(args) if args.run_dir else None, weights=args.weights, **settings)


def _place(args: argparse.Namespace) -> dict:
    """--device / --data-dir given for a run: where it is evaluated or exported now."""
    return {dest: getattr(args, dest) for dest in RUN_PLACE_OPTIONS if getattr(args, dest) is not None}


def run_export(args: argparse.Namespace) -> None:
    export_run(args.run_dir, args.output_dir, args.format, args.checkpoint, args.overwrite, place=_place(args),
               base_model=args.base_model)
