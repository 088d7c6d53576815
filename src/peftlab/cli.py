"""The `peftlab` command: subcommands map onto plain functions of the Python API; no logic of its own."""

from __future__ import annotations

import argparse
import sys

from peftlab.errors import Interrupted, PeftlabError

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from peftlab.models import DEFAULT_MODEL, INITS

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"known model name (see `peftlab models`), local Hugging Face directory, or (generate) a run directory of an instruct/qa run (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--init", choices=INITS, default="pretrained", help="pretrained weights, or the architecture with random weights (default: pretrained)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = cuda if available)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models.",
    )
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
        description="Fine-tune a model on a task. Options override --config; everything lands in the run "
        "directory's config.yaml.",
    )
    _add_train_options(train)
    train.set_defaults(handler=_run_train)

    distill = commands.add_parser(
        "distill", help="distil a fine-tuned classifier run into a small RNN student (W2)",
        description="Train a DistilRNN student (embedding -> RNN/GRU/LSTM -> linear) on the teacher run's task with "
        "loss alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE; --alpha 0 is the student without distillation. "
        "The run directory is an ordinary run: `peftlab eval` it, resume it with `peftlab train --resume RUN_DIR`.")
    distill.add_argument("--teacher", required=True, metavar="RUN_DIR", help="the teacher: a classification run of `peftlab train`")
    distill.add_argument("--output-dir", help="run directory (default: runs/distill-<teacher>; with --compare: a folder of runs)")
    for option, (_, _, kind, text) in DISTILL_OPTIONS.items():
        name = f"--{option.replace('_', '-')}"
        if kind is bool:
            distill.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        else:
            distill.add_argument(name, type=kind, choices=DISTILL_CHOICES.get(option), help=text)
    distill.add_argument("--compare", action="store_true",
                         help="train KD and no-KD students for --seeds seeds, evaluate them and the teacher, write one table")
    distill.add_argument("--seeds", type=int, default=3, help="with --compare: seeds per student, from --seed on (default: 3)")
    distill.add_argument("--dry-run", action="store_true", help="build the student, print its parameter count, stop")
    distill.set_defaults(handler=_run_distill)

    transfer = commands.add_parser(
        "transfer-set", help="sample unlabelled sentences for distillation with the teacher's base model (W2)",
        description="Write a transfer set for `peftlab distill --transfer-file`: the teacher run's base language model "
        "(without its adapter) continues the first words of a training sentence after a few other training sentences; "
        "lines that end a sentence and are neither duplicates nor training sentences are kept.")
    transfer.add_argument("--teacher", required=True, metavar="RUN_DIR", help="the teacher run (its model and task data)")
    transfer.add_argument("--output", required=True, help="the file to write, one sentence per line")
    from peftlab.workloads.distill.transfer import SamplingSettings

    defaults = SamplingSettings()
    for option, text in TRANSFER_OPTIONS:
        default = getattr(defaults, option)
        transfer.add_argument(f"--{option.replace('_', '-')}", type=type(default), default=default,
                              help=f"{text} (default: {default})")
    transfer.set_defaults(handler=_run_transfer_set)

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
    for option in EVAL_BASE_OPTIONS:
        section, name, kind, text = TRAIN_OPTIONS[option]
        evaluate.add_argument(f"--{option.replace('_', '-')}", type=str if kind == "list" else kind,
                              help=f"without RUN_DIR: {text}")
    evaluate.set_defaults(handler=_run_eval)

    export = commands.add_parser("export", help="export a run's adapter for Hugging Face peft, or a merged model")
    export.add_argument("run_dir", help="a run directory written by `peftlab train`")
    export.add_argument("output_dir", help="where to write the export")
    export.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                        "merged: a plain model for from_pretrained (default: peft)")
    export.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace what is at OUTPUT_DIR even if it is not an earlier export of this run (never the "
                        "run itself or a folder holding it)")
    export.set_defaults(handler=_run_export)

    sweep = commands.add_parser(
        "sweep", help="train a grid of runs, then one comparison table and one validation-loss plot",
        description="Train every point of a grid (finished runs are skipped, interrupted ones resumed), then write "
        "<folder>/report.md and <folder>/val_loss.png. See `peftlab.sweep` for the grid file format.")
    sweep.add_argument("grid", nargs="?", help="grid file (YAML: output_dir, base, grid)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                       help="an axis of the grid, e.g. adapter.rank=16,128 (repeatable)")
    sweep.add_argument("--output-dir", help="folder of the sweep's runs (default: the grid file's output_dir)")
    sweep.set_defaults(handler=_run_sweep)

    report = commands.add_parser("report", help="comparison table and overlaid validation-loss plot of runs")
    report.add_argument("run_dirs", nargs="+", help="run directories written by `peftlab train`")
    report.add_argument("--output-dir", default=".", help="where report.md and val_loss.png go (default: .)")
    report.set_defaults(handler=_run_report)

    templates = commands.add_parser("templates", help="list tasks, objectives, prompt templates and verbalizers")
    templates.set_defaults(handler=_run_templates)

    models = commands.add_parser("models", help="list known models and whether they are available here")
    models.set_defaults(handler=_run_models)

    prepare = commands.add_parser("prepare", help="convert SmolLM2-135M from its GGUF into the fp32 cache (once)")
    prepare.add_argument("--force", action="store_true", help="convert again even if the cache is current")
    prepare.set_defaults(handler=_run_prepare)
    return parser


# option -> (config section, field, parser); every option defaults to None so only given ones override --config
TRAIN_OPTIONS = {
    "task": ("task", "name", str, "task to train on: cola, rotten_tomatoes, squad (default: cola)"),
    "objective": ("task", "objective", str, "classification (a head on the last token) | instruct (generated labels) | qa (squad); "
                  "default: the task's own (see `peftlab templates`)"),
    "template": ("task", "template", str, "instruct prompt: a name from `peftlab templates` or a format string "
                 "with {text} (\\n = newline); default: the task's first"),
    "verbalizers": ("task", "verbalizers", "list", "instruct: comma-separated answer text per label, in label order "
                    "(default: the label names)"),
    "loss_on": ("task", "loss_on", str, "instruct, qa: learn the answer tokens only, or all tokens: answer | all "
                "(default: answer)"),
    "predict": ("task", "predict", str, "instruct: generate (greedy, parse the text) | score (likelihood of each "
                "verbalizer) | both (default: generate)"),
    "eval_limit": ("task", "eval_limit", int, "evaluate on N evenly spaced validation examples (default: all)"),
    "data_dir": ("task", "data_dir", str, "data directory (default: $PEFTLAB_DATA)"),
    "max_length": ("task", "max_length", int, "tokens per example at most; longer is an error, except squad contexts, which are cut (default: 128, squad 384)"),
    "train_limit": ("task", "train_limit", int, "use only N evenly spaced training examples (default: all)"),
    "model": ("model", "name", str, "model name or local directory (default: smollm2-135m)"),
    "init": ("model", "init", str, "pretrained | random (default: pretrained)"),
    "method": ("adapter", "method", str, "lora | full | bitfit | head (default: lora)"),
    "targets": ("adapter", "targets", "list", "comma-separated roles (q,k,v,o,mlp,all-linear), module names or regex (default: q,v)"),
    "rank": ("adapter", "rank", int, "LoRA rank; 0 = full fine-tuning (default: 8)"),
    "alpha": ("adapter", "alpha", float, "LoRA alpha; scaling = alpha/rank (default: 16)"),
    "lora_dropout": ("adapter", "dropout", float, "dropout on the LoRA branch (default: 0)"),
    "extra_trainable": ("adapter", "extra_trainable", "list", "also train: comma-separated head,biases,norms (default: the head of a classifier)"),
    "epochs": ("train", "epochs", int, "epochs (default: 3)"),
    "lr": ("train", "lr", float, "peak learning rate (default: 5e-4)"),
    "batch_size": ("train", "batch_size", int, "examples per optimizer step (default: 32)"),
    "grad_accum": ("train", "grad_accum", int, "micro-batches per optimizer step (default: 1)"),
    "eval_batch_size": ("train", "eval_batch_size", int, "evaluation batch size (default: 64)"),
    "warmup_ratio": ("train", "warmup_ratio", float, "share of steps for linear warm-up (default: 0.06)"),
    "schedule": ("train", "schedule", str, "linear | cosine | constant decay after warm-up (default: linear)"),
    "weight_decay": ("train", "weight_decay", float, "AdamW weight decay on matrices (default: 0.01)"),
    "max_grad_norm": ("train", "max_grad_norm", float, "gradient clipping norm; 0 = off (default: 1.0)"),
    "seed": ("train", "seed", int, "random seed (default: 0)"),
    "eval_every": ("train", "eval_every", int, "also evaluate every N steps (default: per epoch only)"),
    "select_metric": ("train", "select_metric", str, "validation metric choosing checkpoints/best; loss = lowest (default: the task's: mcc, accuracy or f1)"),
    "device": ("train", "device", str, "auto | cpu | cuda (default: auto)"),
}


# `peftlab distill`: the student and the loss, then the training options that make sense for a student
DISTILL_OPTIONS = {
    "teacher_checkpoint": ("distill", "teacher_checkpoint", str, "the teacher's checkpoint: best | last (default: best)"),
    "student": ("distill", "student", str, "rnn | gru | lstm (default: lstm)"),
    "layers": ("distill", "layers", int, "stacked RNN layers (default: 1)"),
    "hidden_size": ("distill", "hidden_size", int, "RNN state size per direction (default: 256)"),
    "embedding_size": ("distill", "embedding_size", int, "token embedding size (default: 128)"),
    "bidirectional": ("distill", "bidirectional", bool, "read both directions (default: yes)"),
    "dropout": ("distill", "dropout", float, "dropout on embeddings, between layers, before the classifier (default: 0.2)"),
    "alpha": ("distill", "alpha", float, "weight of the distillation term; 0 = no distillation (default: 0.5)"),
    "temperature": ("distill", "temperature", float, "softmax temperature T of the distillation term (default: 2)"),
    "augment": ("distill", "augment", int, "Tang et al. 2019 transfer set: N augmented copies per training sentence "
                "(word masking, n-gram sampling; seeded), labelled by the teacher (default: 0)"),
    "mask_probability": ("distill", "mask_probability", float, "augmentation: chance of masking a word (default: 0.1)"),
    "ngram_probability": ("distill", "ngram_probability", float, "augmentation: chance of keeping an n-gram only (default: 0.25)"),
    "edit_probability": ("distill", "edit_probability", float, "augmentation: chance of one word-order edit per copy "
                         "(swap neighbours, delete or move a word; default: 0)"),
    "embedding_init": ("distill", "embedding_init", str, "student embedding: random | teacher (PCA of the teacher's "
                       "token embeddings to --embedding-size; default: random)"),
    "transfer_file": ("distill", "transfer_file", str, "transfer set: a file of unlabelled sentences, one per line, "
                      "labelled by the teacher (see `peftlab transfer-set`; default: none)"),
    "epochs": ("train", "epochs", int, "epochs (default: 10)"),
    "lr": ("train", "lr", float, "peak learning rate (default: 2e-3)"),
} | {option: TRAIN_OPTIONS[option] for option in (
    "batch_size", "eval_batch_size", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm", "seed", "eval_every",
    "select_metric", "device", "data_dir", "train_limit", "eval_limit")}
DISTILL_CHOICES = {"teacher_checkpoint": ("best", "last"), "student": ("rnn", "gru", "lstm"),
                   "embedding_init": ("random", "teacher")}


TRANSFER_OPTIONS = (  # defaults: peftlab.transfer.SamplingSettings
    ("size", "sentences to write"),
    ("shots", "training sentences shown before each prefix"),
    ("prefix_words", "words of a training sentence that start each sample"),
    ("temperature", "sampling temperature"),
    ("top_p", "nucleus sampling threshold"),
    ("top_k", "sample among the k most likely tokens; 0 = all"),
    ("max_new_tokens", "tokens sampled per sentence at most"),
    ("batch_size", "prompts sampled together"),
    ("seed", "random seed; same seed, same sentences"),
)


EVAL_BASE_OPTIONS = ("task", "objective", "template", "verbalizers", "data_dir", "max_length", "model", "init", "device")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run configuration (e.g. a run's config.yaml); options override it")
    parser.add_argument("--output-dir", help="run directory (default: runs/<task>-<model>-<method>)")
    for option, (_, _, kind, text) in TRAIN_OPTIONS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=str if kind == "list" else kind, help=text)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints/last")
    parser.add_argument("--stop-after-epoch", type=int, help="stop after this epoch as if interrupted (resume later)")
    parser.add_argument("--dry-run", action="store_true", help="build the model, print the parameter report, stop")


def _apply_options(config, args: argparse.Namespace, options, table: dict = TRAIN_OPTIONS) -> None:
    """Set every given option of `options` (names in `table`) on the run configuration."""
    for option in options:
        section, name, kind, _ = table[option]
        value = getattr(args, option)
        if value is not None:
            if kind == "list":
                value = [item.strip() for item in value.split(",") if item.strip()]
            setattr(getattr(config, section), name, value)


def train_config_from_args(args: argparse.Namespace):
    """The run configuration: --resume's config.yaml, else --config, else defaults; then the given options."""
    from peftlab.config import RunConfig, load_config

    if args.resume:
        config = load_config(f"{args.resume}/config.yaml")
        config.output_dir = args.resume
        return config
    config = load_config(args.config) if args.config else RunConfig()
    _apply_options(config, args, TRAIN_OPTIONS)
    if args.output_dir:
        config.output_dir = args.output_dir
    elif not args.config:
        model = config.model.name.rstrip("/").rsplit("/", 1)[-1]
        config.output_dir = f"runs/{config.task.name}-{model}-{config.adapter.method}"
    return config


def _run_train(args: argparse.Namespace) -> None:
    from peftlab.train import train

    given = [option for option in TRAIN_OPTIONS if getattr(args, option) is not None]
    if args.resume and given:
        raise PeftlabError(f"--resume continues the run as configured; drop --{given[0].replace('_', '-')}")
    train(train_config_from_args(args), resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch, dry_run=args.dry_run)


def _run_eval(args: argparse.Namespace) -> None:
    from peftlab.config import RunConfig
    from peftlab.train import evaluate_run

    given = [option for option in EVAL_BASE_OPTIONS if getattr(args, option) is not None]
    if args.run_dir and given:
        raise PeftlabError(f"--{given[0].replace('_', '-')} describes a model without RUN_DIR; a run uses its own config.yaml")
    config = None
    if not args.run_dir:
        config = RunConfig()
        _apply_options(config, args, EVAL_BASE_OPTIONS)
    evaluate_run(args.run_dir, args.split, args.checkpoint, args.batch_size, args.predict, args.limit, config,
                 args.predictions)


def _run_distill(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftlab.workloads.distill.compare import compare_students, distill
    from peftlab.workloads.distill.task import distill_config

    config = distill_config(args.teacher, args.teacher_checkpoint or "best")
    _apply_options(config, args, DISTILL_OPTIONS, DISTILL_OPTIONS)
    if args.output_dir:
        config.output_dir = args.output_dir
    elif args.compare:
        config.output_dir = f"runs/distill-compare-{Path(args.teacher).name}"
    if args.compare:
        compare_students(config, args.seeds)
    else:
        distill(config, dry_run=args.dry_run)


def _run_transfer_set(args: argparse.Namespace) -> None:
    from peftlab.workloads.distill.transfer import SamplingSettings, write_transfer_set

    settings = SamplingSettings(**{option: getattr(args, option) for option, _ in TRANSFER_OPTIONS})
    write_transfer_set(args.teacher, args.output, settings)


def _run_export(args: argparse.Namespace) -> None:
    from peftlab.train import export_run

    export_run(args.run_dir, args.output_dir, args.format, args.checkpoint, args.overwrite)


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
    run_sweep(args.grid, args.set, args.output_dir)


def _run_report(args: argparse.Namespace) -> None:
    from peftlab.report import print_report, write_report

    print_report(*write_report(args.run_dirs, args.output_dir))


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftlab` console script; returns the process exit code."""
    args = _build_parser().parse_args(argv)
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
