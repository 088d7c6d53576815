"""The command line of distillation's commands (light: settings and options only, so `--help` starts fast)."""

from __future__ import annotations

import argparse

from peftlab.options import add_options, documented_fields, sampling_options, settings_options, train_options
from peftlab.workloads.distill.transfer_settings import TRANSFER_SAMPLING, TransferSettings
from peftlab.workloads.distill import DISTILL_TRAIN_DEFAULTS

STUDENT_TRAIN_SETTINGS = ("epochs", "lr", "batch_size", "eval_batch_size", "warmup_ratio", "schedule", "weight_decay",
                          "max_grad_norm", "seed", "eval_every", "select_metric", "device", "data_dir", "train_limit",
                          "eval_limit")


def distill_options() -> dict:
    """`peftlab distill`: the student and the loss (its teacher is --teacher), then the training settings of a
    student."""
    training = train_options()
    return ({dest: option for dest, option in settings_options(("distill",)).items() if dest != "teacher"}
            | {dest: training[dest] for dest in STUDENT_TRAIN_SETTINGS})


def transfer_set_options() -> dict:
    """`peftlab transfer-set`'s own settings (its sampling settings are `sampling_options()`)."""
    return documented_fields(TransferSettings, None)


def distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="RUN_DIR",
                        help="the teacher: a classification run of `peftlab train`")
    parser.add_argument("--output-dir",
                        help="run directory (default: runs/distill-<teacher>; with --compare: a folder of runs)")
    add_options(parser, distill_options(), DISTILL_TRAIN_DEFAULTS)
    parser.add_argument("--compare", action="store_true",
                        help="train KD and no-KD students for --seeds seeds, evaluate them and the teacher, write one "
                        "table")
    parser.add_argument("--seeds", type=int, default=3,
                        help="with --compare: seeds per student, from --seed on (default: 3)")
    parser.add_argument("--dry-run", action="store_true", help="build the student, print its parameter count, stop")


def transfer_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="RUN_DIR", help="the teacher run (its model and task data)")
    parser.add_argument("--output", required=True, help="the file to write, one sentence per line")
    add_options(parser, transfer_set_options())
    add_options(parser, sampling_options(), TRANSFER_SAMPLING)
