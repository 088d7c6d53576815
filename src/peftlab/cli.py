"""The `peftlab` command: subcommands map onto plain functions of the Python API; no logic of its own."""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib import metadata

from peftlab import __version__
from peftlab.config import RunConfig, closest
from peftlab.errors import Interrupted, PeftlabError
from peftlab.options import EVAL_BASE_OPTIONS, RUN_PLACE_OPTIONS, TRAIN_OPTIONS, add_options, apply_options
from peftlab.workloads.distill.commands import add_distill_commands

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from peftlab.models import DEFAULT_MODEL, INITS

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"known model name (see `peftlab models`), local Hugging Face directory, or (generate) a run directory of an instruct/qa run (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--init", choices=INITS, default="pretrained", help="pretrained weights, or the architecture with random weights (default: pretrained)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = cuda if available)")


def version_text() -> str:
    """peftlab's version and those of the libraries a run's numbers depend on (read without importing them)."""
    libraries = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "accelerate"))
    return f"peftlab {__version__} ({libraries})"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue prompts with a language model (W0)", description="Continue prompts with a language model (W0).")
    _add_model_options(generate)
    generate.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch of prompts")
    generate.add_argument("--prompt-file", help="UTF-8 file with one prompt per line (blank lines are ignored)")
    generate.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    generate.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = off (default: 200)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold; 1 = off (default: 0.95)")
    generate.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default: 1)")
    generate.add_argument("--seed", type=int, default=1337, help="random seed; same seed, same text (default: 1337)")
    generate.add_argument("--stream", action="store_true", help="print the text token by token as it is generated")
    generate.add_argument("--checkpoint", choices=("best", "last"), default="best",
                          help="with --model RUN_DIR: which checkpoint of the run (default: best)")
    generate.set_defaults(handler=_run_generate)

    train = commands.add_parser(
        "train", help="fine-tune a model on a task (W1: --task cola)",
        description="Fine-tune a model on a task. Settings come from the defaults, then --recipe, then --set, then "
        "the options; everything lands in the run directory's config.yaml. --dry-run prints the resolved plan.",
    )
    _add_train_options(train)
    train.set_defaults(handler=_run_train)

    add_distill_commands(commands)

    evaluate = commands.add_parser(
        "eval", help="evaluate a run's checkpoint, or an un-tuned model (zero-shot), on a split",
        description="Evaluate a run's checkpoint on a split. Without RUN_DIR: the un-tuned model given by --model, "
        "--task, --template ... (zero-shot; instruct tasks).")
    evaluate.add_argument("run_dir", nargs="?", help="a run directory written by `peftlab train`")
    evaluate.add_argument("--split", default="validation", help="data split (default: validation)")
    evaluate.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    evaluate.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    evaluate.add_argument("--predict", choices=("generate", "score", "both"),
                          help="instruct tasks: how to predict (default: the run's); both also reports the agreement")
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate N evenly spaced examples (default: all)")
    evaluate.add_argument("--predictions", metavar="FILE",
                          help="also write each example's prediction and reference to FILE (JSON lines)")
    add_options(evaluate, RUN_PLACE_OPTIONS, prefix="where to evaluate (a run: instead of its config.yaml's): ")
    add_options(evaluate, EVAL_BASE_OPTIONS, prefix="without RUN_DIR: ")
    evaluate.set_defaults(handler=_run_eval)

    export = commands.add_parser("export", help="export a run's adapter for Hugging Face peft, or a merged model")
    export.add_argument("run_dir", help="a run directory written by `peftlab train`")
    export.add_argument("output_dir", help="where to write the export")
    export.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                        "merged: a plain model for from_pretrained (default: peft)")
    export.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    add_options(export, RUN_PLACE_OPTIONS, prefix="instead of the run's config.yaml: ")
    export.add_argument("--overwrite", action="store_true",
                        help="replace what is at OUTPUT_DIR even if it is not an earlier export of this run (never the "
                        "run itself or a folder holding it)")
    export.set_defaults(handler=_run_export)

    sweep = commands.add_parser(
        "sweep", help="train a grid of runs, then one comparison table and one validation-loss plot",
        description="Train every point of a grid (finished runs are skipped, interrupted ones resumed), then write "
        "<folder>/report.md, <folder>/val_loss.png and <folder>/score_vs_parameters.png. See `peftlab.sweep` for the "
        "grid file format.")
    sweep.add_argument("grid", nargs="?", help="grid file (YAML: output_dir, base, grid)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                       help="an axis of the grid, e.g. adapter.rank=16,128 (repeatable)")
    sweep.add_argument("--output-dir", help="folder of the sweep's runs (default: the grid file's output_dir)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: one run after the other; ray: Ray Tune trials, as many at once as the resources "
                       "allow (needs `pip install 'peftlab[ray]'`) (default: local)")
    sweep.add_argument("--address", help="ray: the Ray cluster to use (default: a local Ray, started and stopped here)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1, help="ray: CPUs per trial (default: 1)")
    sweep.add_argument("--gpus-per-trial", type=float, default=0, help="ray: GPUs per trial (default: 0)")
    sweep.set_defaults(handler=_run_sweep)

    report = commands.add_parser(
        "report", help="comparison table and plots of runs, or of sweeps by method (--by-method)",
        description="report.md (a row per run: method, trainable parameters, best validation and test scores, "
        "seconds per epoch, validation examples/s), val_loss.png (validation loss of every run) and "
        "score_vs_parameters.png (score against trainable parameters, log x). With --by-method the arguments are "
        "sweep folders (a task's runs may span several, e.g. its extra seeds), runs of the same name are one row "
        "with a score column per task, and runs named <name>_seed<k> count as more seeds of <name>.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_OR_SWEEP",
                        help="run directories written by `peftlab train` (sweep folders with --by-method)")
    report.add_argument("--by-method", action="store_true",
                        help="one row per run name across the given sweep folders (e.g. a CoLA and an RT sweep)")
    report.add_argument("--output-dir", default=".", help="where report.md and the plots go (default: .)")
    report.add_argument("--html", metavar="OUT.html",
                        help="instead, one self-contained page: for each run its parameters, every evaluation, its "
                        "plots, config and command; for folders (a sweep, a distillation comparison) their tables and "
                        "plots too; several runs get the comparison table and plots")
    report.set_defaults(handler=_run_report)

    recipes = commands.add_parser("recipes", help="list the measured recipes for `peftlab train --recipe NAME`")
    recipes.set_defaults(handler=_run_recipes)

    templates = commands.add_parser("templates", help="list tasks, objectives, prompt templates and verbalizers")
    templates.set_defaults(handler=_run_templates)

    models = commands.add_parser("models", help="list known models and whether they are available here")
    models.set_defaults(handler=_run_models)

    prepare = commands.add_parser("prepare", help="convert SmolLM2-135M from its GGUF into the fp32 cache (once)")
    prepare.add_argument("--force", action="store_true", help="convert again even if the cache is current")
    prepare.set_defaults(handler=_run_prepare)
    return parser


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME|FILE",
                        help="start from a measured recipe (see `peftlab recipes`: cola, rotten_tomatoes, squad) or a "
                        "YAML file (a partial or whole config.yaml); --set and the options override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any config.yaml value by its name there, e.g. --set train.lr=3e-4 --set "
                        "adapter.targets=q,v (repeatable; the options below override it)")
    parser.add_argument("--output-dir", help="run directory (default: the recipe's, else runs/<task>-<model>-<method>)")
    add_options(parser, TRAIN_OPTIONS)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints/last")
    parser.add_argument("--stop-after-epoch", type=int, help="stop after this epoch as if interrupted (resume later)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model and read the data, print the parameter report and the resolved plan "
                        "(examples, steps, warm-up, device, precision, output directory), stop")


def train_config_from_args(args: argparse.Namespace):
    """The run configuration: --resume's config.yaml; else the defaults, --recipe, --set, then the given options."""
    from peftlab.config import parse_assignment, set_dotted
    from peftlab.recipes import recipe_values
    from peftlab.runs import RunDir

    if args.resume:
        return RunDir(args.resume).read_config()
    values = recipe_values(args.recipe) if args.recipe else {}
    values.pop("environment", None)  # a run's config.yaml as a recipe: where it ran is not a setting
    for option in args.set:
        key, value = parse_assignment(option)
        set_dotted(values, key, value, f"--set {option}")
    config = RunConfig.from_dict(values) if values else RunConfig()
    apply_options(config, args, TRAIN_OPTIONS)
    if args.output_dir:
        config.output_dir = args.output_dir
    elif "output_dir" not in values:
        model = config.model.name.rstrip("/").rsplit("/", 1)[-1]
        config.output_dir = f"runs/{config.task.name}-{model}-{config.adapter.method}"
    return config


def _run_train(args: argparse.Namespace) -> None:
    from peftlab.train import train

    given = [TRAIN_OPTIONS[dest].flag for dest in TRAIN_OPTIONS if getattr(args, dest) is not None]
    given += [flag for flag, value in (("--recipe", args.recipe), ("--set", args.set), ("--output-dir", args.output_dir))
              if value]
    if args.resume and given:
        raise PeftlabError(f"--resume continues the run as configured in its config.yaml; drop {given[0]}")
    train(train_config_from_args(args), resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
          dry_run=args.dry_run, command=args.command_line)


def _run_eval(args: argparse.Namespace) -> None:
    from peftlab.train import evaluate_run

    given = [dest for dest in EVAL_BASE_OPTIONS if getattr(args, dest) is not None]
    if args.run_dir and given:
        raise PeftlabError(f"{EVAL_BASE_OPTIONS[given[0]].flag} describes a model without RUN_DIR; a run uses its own "
                           "config.yaml")
    config = None
    if not args.run_dir:
        config = RunConfig()
        apply_options(config, args, EVAL_BASE_OPTIONS | RUN_PLACE_OPTIONS)
    evaluate_run(args.run_dir, args.split, args.checkpoint, args.batch_size, args.predict, args.limit, config,
                 args.predictions, place=_place(args) if args.run_dir else None)


def _place(args: argparse.Namespace) -> dict:
    """--device / --data-dir given for a run: where it is evaluated or exported now."""
    return {dest: getattr(args, dest) for dest in RUN_PLACE_OPTIONS if getattr(args, dest) is not None}


def _run_export(args: argparse.Namespace) -> None:
    from peftlab.train import export_run

    export_run(args.run_dir, args.output_dir, args.format, args.checkpoint, args.overwrite, place=_place(args))


def _run_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftlab.generate import generate, print_samples, read_prompt_file
    from peftlab.models import load_model, model_summary, resolve_device

    prompts = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise PeftlabError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    if (Path(args.model) / "config.yaml").is_file():  # a run: its base model with its adapter
        model, tokenizer = _run_language_model(args.model, args.checkpoint)
    else:
        device, dtype = resolve_device(args.device)
        model, tokenizer = load_model(args.model, init=args.init, dtype=dtype)
        model.to(device)
    print(model_summary(args.model, model), flush=True)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    if args.stream:
        for prompt in prompts:
            sys.stdout.write(f"--- {prompt!r} ---\n{prompt}")
            generate(model, tokenizer, [prompt], stream=sys.stdout, **settings)
        return
    print_samples(prompts, generate(model, tokenizer, prompts, **settings))


def _run_language_model(run_dir: str, checkpoint: str):
    """A run's language model (base + adapter) and tokenizer, for `peftlab generate --model RUN_DIR`."""
    from peftlab.workloads import load_run

    _, task, model = load_run(run_dir, checkpoint)
    if task.model_task != "causal-lm":
        raise PeftlabError(f"{run_dir} trained a {task.model_task} model; generate needs a language-model run "
                           "(instruct or qa)")
    return model, task.tokenizer


def _run_sweep(args: argparse.Namespace) -> None:
    from peftlab.sweep import run_sweep

    if not args.grid and not args.set:
        raise PeftlabError("nothing to sweep: give a grid file and/or --set KEY=V1,V2")
    run_sweep(args.grid, args.set, args.output_dir, args.backend, args.address, args.cpus_per_trial, args.gpus_per_trial)


def _run_report(args: argparse.Namespace) -> None:
    from peftlab.report import print_report, write_methods_report, write_report

    if args.html:
        from peftlab.report.html import write_html_report

        if args.by_method:
            raise PeftlabError("--html takes runs and folders as they are; drop --by-method (or --html)")
        print(f"page: {write_html_report(args.run_dirs, args.html)}")
        return
    write = write_methods_report if args.by_method else write_report
    print_report(*write(args.run_dirs, args.output_dir))


def _run_recipes(args: argparse.Namespace) -> None:
    from peftlab.recipes import recipe_names, recipe_path, recipe_summary

    for name in recipe_names():
        print(f"{name}: {recipe_summary(name)}\n  {recipe_path(name)}")
    print("Use: peftlab train --recipe NAME [--set SECTION.KEY=VALUE] [options]; --dry-run shows the resolved plan.")


def _run_templates(args: argparse.Namespace) -> None:
    from peftlab.data.datasets import DATASETS
    from peftlab.workloads.instruct import DEFAULT_VERBALIZERS, TEMPLATES

    for task, dataset in DATASETS.items():
        objectives = dataset.objectives
        print(f"{task}: objectives {', '.join(objectives)} (default: {objectives[0]})")
        for index, (name, text) in enumerate(TEMPLATES.get(task, {}).items()):
            print(f"  template {name}{' (default)' if index == 0 else ''}: {text!r}")
        if task in TEMPLATES:
            verbalizers = DEFAULT_VERBALIZERS.get(task)
            print(f"  verbalizers: {', '.join(verbalizers) if verbalizers else 'the label names'}")
    print("Your own template: --template 'TEXT {text} TEXT' (\\n = newline); the answer follows after one space "
          "unless the template ends in whitespace.")


def _run_models(args: argparse.Namespace) -> None:
    from peftlab.models import DEFAULT_MODEL, KNOWN_MODELS, model_availability

    width = max(len(name) for name in KNOWN_MODELS)
    print(f"{'model':<{width}}  {'available':<9}  source / how to get it")
    for name, spec in KNOWN_MODELS.items():
        availability = model_availability(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<{width}}  {'yes' if availability.available else 'no':<9}  {availability.source}  [{spec.description}]{default}")
    print("Any local Hugging Face model directory also works as --model PATH.")


def _run_prepare(args: argparse.Namespace) -> None:
    from peftlab.models import prepare_smollm2, smollm2_cache_is_current, smollm2_cache_path

    if not args.force and smollm2_cache_is_current():
        print(f"smollm2-135m: fp32 cache is current ({smollm2_cache_path()})")
        return
    print("smollm2-135m: converting the package's GGUF (Q4_1) to an fp32 checkpoint, once ...", flush=True)
    print(f"smollm2-135m: cached at {prepare_smollm2(force=args.force)}")


def _quiet_library_logs() -> None:
    """transformers' per-load progress bars and advice would drown peftlab's own output."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# The names transformers' TrainingArguments, peft and litgpt give some of our options, for "did you mean".
OTHER_TOOLS_NAMES = {"--learning-rate": "--lr", "--num-train-epochs": "--epochs", "--lora-r": "--rank",
                     "--lora-alpha": "--alpha", "--per-device-train-batch-size": "--batch-size",
                     "--per-device-eval-batch-size": "--eval-batch-size", "--gradient-accumulation-steps": "--grad-accum",
                     "--lr-scheduler-type": "--schedule", "--target-modules": "--targets", "--save-steps": "--save-every",
                     "--eval-steps": "--eval-every", "--report": "--report-to"}


def unrecognized(unknown: list[str], command_parser: argparse.ArgumentParser) -> str:
    """argparse's message for unknown arguments, with the closest option of the command ("did you mean")."""
    options = command_parser._option_string_actions
    hints = [f"{item} (did you mean {match}?)" if (match := _suggest(item.split("=")[0], options)) else item
             for item in unknown]
    return f"unrecognized arguments: {' '.join(hints)} (see `{command_parser.prog} --help`)"


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


def _suggest(name: str, options) -> str | None:
    """Our option for a misspelled one, one with underscores, or another tool's name for it."""
    if not name.startswith("--"):
        return None
    name = name.replace("_", "-")
    if name in options:
        return name
    alias = OTHER_TOOLS_NAMES.get(name) or OTHER_TOOLS_NAMES.get(closest(name, OTHER_TOOLS_NAMES) or "")
    return alias if alias in options else closest(name, options)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftlab` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = _command_parser(parser, args.command)
        command_parser.error(unrecognized(unknown, command_parser))
    args.command_line = shlex.join(["peftlab", *argv])
    _quiet_library_logs()
    try:
        args.handler(args)
    except Interrupted as error:
        print(f"peftlab {args.command}: interrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command stopped by Ctrl-C
    except PeftlabError as error:
        print(f"peftlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
