"""Distillation's commands, run when given (`peftlab distill`, `peftlab transfer-set`). This module orchestrates
runs: it sits above the run service (`peftlab.train`), and nothing in the workload below imports it."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab.options import apply_options, sampling_options
from peftlab.workloads.distill.command_line import distill_options, transfer_set_options
from peftlab.workloads.distill.compare import compare_students, distill
from peftlab.workloads.distill.task import distill_config
from peftlab.workloads.distill.transfer import write_transfer_set
from peftlab.workloads.distill.transfer_settings import TransferSettings


def run_distill(args: argparse.Namespace) -> None:
    config = distill_config(args.teacher, args.teacher_checkpoint or "best")
    apply_options(config, args, distill_options())
    if args.output_dir:
        config.output_dir = args.output_dir
    elif args.compare:
        config.output_dir = f"runs/distill-compare-{Path(args.teacher).name}"
    if args.compare:
        compare_students(config, args.seeds)
    else:
        distill(config, dry_run=args.dry_run)


def run_transfer_set(args: argparse.Namespace) -> None:
    settings = TransferSettings()
    apply_options(settings, args, transfer_set_options())
    apply_options(settings.sampling, args, sampling_options())
    write_transfer_set(args.teacher, args.output, settings)
