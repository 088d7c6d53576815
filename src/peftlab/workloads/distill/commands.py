"""Distillation's commands, added to the `peftlab` command line by cli.py: `distill` (one student, or --compare)
and `transfer-set` (sample unlabelled sentences with the teacher's base model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab.config import DISTILL_TRAIN_DEFAULTS
from peftlab.options import TRAIN_OPTIONS, add_options, apply_options, documented_fields, settings_options
from peftlab.workloads.distill.compare import compare_students, distill
from peftlab.workloads.distill.task import distill_config
from peftlab.workloads.distill.transfer import SamplingSettings, write_transfer_set

# `peftlab distill`: the student and the loss (its teacher is --teacher), then the training settings of a student
DISTILL_OPTIONS = {dest: option for dest, option in settings_options(("distill",)).items() if dest != "teacher"} | {
    dest: TRAIN_OPTIONS[dest] for dest in (
        "epochs", "lr", "batch_size", "eval_batch_size", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm",
        "seed", "eval_every", "select_metric", "device", "data_dir", "train_limit", "eval_limit")}
TRANSFER_OPTIONS = documented_fields(SamplingSettings, None)


def add_distill_commands(commands) -> None:
    """The `distill` and `transfer-set` subcommands on cli.py's subparsers."""
    distill = commands.add_parser(
        "distill", help="distil a fine-tuned classifier run into a small RNN student (W2)",
        description="Train a DistilRNN student (embedding -> RNN/GRU/LSTM -> linear) on the teacher run's task with "
        "loss alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE; --alpha 0 is the student without distillation. "
        "The run directory is an ordinary run: `peftlab eval` it, resume it with `peftlab train --resume RUN_DIR`.")
    distill.add_argument("--teacher", required=True, metavar="RUN_DIR", help="the teacher: a classification run of `peftlab train`")
    distill.add_argument("--output-dir", help="run directory (default: runs/distill-<teacher>; with --compare: a folder of runs)")
    add_options(distill, DISTILL_OPTIONS, DISTILL_TRAIN_DEFAULTS)
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
    add_options(transfer, TRANSFER_OPTIONS)
    transfer.set_defaults(handler=_run_transfer_set)


def _run_distill(args: argparse.Namespace) -> None:
    config = distill_config(args.teacher, args.teacher_checkpoint or "best")
    apply_options(config, args, DISTILL_OPTIONS)
    if args.output_dir:
        config.output_dir = args.output_dir
    elif args.compare:
        config.output_dir = f"runs/distill-compare-{Path(args.teacher).name}"
    if args.compare:
        compare_students(config, args.seeds)
    else:
        distill(config, dry_run=args.dry_run)


def _run_transfer_set(args: argparse.Namespace) -> None:
    settings = SamplingSettings()
    apply_options(settings, args, TRANSFER_OPTIONS)
    write_transfer_set(args.teacher, args.output, settings)
