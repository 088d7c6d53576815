"""Distillation's commands (registered by `peftlab.workloads.distill`'s spec; orchestration, so they live here
above the run service, as DESIGN.md asks): train one student (`peftlab distill`), compare teacher, KD and no-KD
students over seeds (`peftlab distill --compare`, through the sweep runner: same skip/resume rules), and write a
transfer set (`peftlab transfer-set`)."""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

from peftlab.config import RunConfig
from peftlab.workloads.distill import DistillConfig
from peftlab.engine import evaluate
from peftlab.errors import PeftlabError
from peftlab.fileio import write_text_atomic
from peftlab.models import count_parameters
from peftlab.options import apply_options, sampling_options
from peftlab.report import plot_comparison
from peftlab.commands.sweep import train_points
from peftlab.train import train
from peftlab.workloads.loading import load_run
from peftlab.workloads.distill.command_line import distill_options, transfer_set_options
from peftlab.workloads.distill.task import CACHE_DIR, TRANSFER_SET_FIELDS, distill_config
from peftlab.workloads.distill.transfer import write_transfer_set
from peftlab.workloads.distill.transfer_settings import TransferSettings


def distill(config: RunConfig, resume: bool = False, stop_after_epoch: int | None = None, dry_run: bool = False,
            command: str | None = None) -> dict:
    """Train the student a run configuration describes (see `distill_config`); returns the run's summary.
    `command`: the command line, recorded in the run's config.yaml."""
    if config.distill is None or not config.distill.teacher:
        raise PeftlabError("no teacher: set distill.teacher to the teacher's run directory (peftlab distill --teacher RUN_DIR)")
    return train(config, resume=resume, stop_after_epoch=stop_after_epoch, dry_run=dry_run, command=command)


def compare_students(config: RunConfig, seeds: int = 3, command: str | None = None) -> Path:
    """Teacher vs KD student vs no-KD student, over `seeds` seeds (the config's seed, +1, ...).

    Trains the students not trained yet into <output_dir>/kd-seed<S> and <output_dir>/no-kd-seed<S> (the no-KD
    student: alpha 0, no augmentation), evaluates the teacher and every student's best checkpoint on the validation
    split, prints one table and writes it to <output_dir>/comparison.md (plot: comparison.png). Returns the table's path.
    `command`: the command line, recorded in every student's config.yaml.
    """
    if seeds < 1:
        raise PeftlabError(f"--seeds must be >= 1, got {seeds}")
    folder = Path(config.output_dir)
    settings, batch_size = config.distill, config.train.eval_batch_size
    teacher = evaluate_checkpoint(settings.teacher, settings.teacher_checkpoint, batch_size)
    transfer = f", transfer {Path(settings.transfer_file).name}" if settings.transfer_file else ""
    edits = f", edits {settings.edit_probability:g}" if settings.augment and settings.edit_probability else ""
    embedding = ", teacher embeddings" if settings.embedding_init == "teacher" else ""
    kd_name = (f"KD student ({settings.student}{embedding}, alpha {settings.alpha:g}, T {settings.temperature:g}, "
               f"augment {settings.augment}{edits}{transfer})")
    no_kd_name = f"no-KD student ({settings.student}{embedding}, alpha 0)"
    results = {f"teacher {Path(settings.teacher).name} ({config.model.name})": [teacher], kd_name: [], no_kd_name: []}
    points = [(name, _seed_config(config, seed, kind)) for seed in range(config.train.seed, config.train.seed + seeds)
              for name, kind in ((kd_name, "kd"), (no_kd_name, "no-kd"))]
    # The first KD student computes the teacher's logits; the other KD students start from its cache.
    first_kd = points[0][1]
    train_points([first_kd], command)
    for name, point in points[1:]:
        if name == kd_name:
            _share_teacher_logits(Path(first_kd.output_dir), Path(point.output_dir))
    train_points([point for _, point in points], command)
    for name, point in points:
        results[name].append(evaluate_checkpoint(point.output_dir, "best", batch_size))
    table = comparison_table(results)
    path, plot = folder / "comparison.md", folder / "comparison.png"
    write_text_atomic(path, table)
    plot_comparison(results, plot)
    print(f"\n{table}\ntable: {path}\nplot: {plot}")
    return path


def _seed_config(config: RunConfig, seed: int, kind: str) -> RunConfig:
    run_config = copy.deepcopy(config)
    run_config.train.seed = seed
    run_config.output_dir = str(Path(config.output_dir) / f"{kind}-seed{seed}")
    if kind == "no-kd":  # the same student without its teacher: no soft targets, no transfer set of any kind
        defaults = DistillConfig()
        run_config.distill = replace(
            run_config.distill, alpha=0.0, **{field: getattr(defaults, field) for field in TRANSFER_SET_FIELDS})
    return run_config


def _share_teacher_logits(source_run: Path, target_run: Path) -> None:
    """Seed a run's logit cache with another run's; its fingerprint decides whether the copy is used."""
    source, target = source_run / CACHE_DIR, target_run / CACHE_DIR
    if source_run != target_run and source.is_dir() and not target.exists():
        shutil.copytree(source, target)


def evaluate_checkpoint(run_dir: str, checkpoint: str, batch_size: int) -> dict:
    """Validation metrics, inference speed (examples_per_second) and parameter count of a run's checkpoint."""
    _, task, model = load_run(run_dir, checkpoint)
    metrics = evaluate(model, task, task.encode("validation"), batch_size)
    return metrics | {"parameters": count_parameters(model)}


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def comparison_table(results: dict[str, list[dict]]) -> str:
    """Markdown: a row per model (the first is the reference for the speed-up) with mean ± std over its runs."""
    lines = ["| model | runs | parameters | accuracy | MCC | sentences/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    reference = None
    for name, runs in results.items():
        speed = statistics.fmean(run["examples_per_second"] for run in runs)
        reference = reference or speed
        lines.append(f"| {name} | {len(runs)} | {runs[0]['parameters']:,} | {_mean_std([run['accuracy'] for run in runs])} | "
                     f"{_mean_std([run['mcc'] for run in runs])} | {speed:,.1f} | {speed / reference:.1f}× |")
    return "\n".join(lines) + "\n"


def run_distill(args: argparse.Namespace) -> None:
    config = distill_config(args.teacher, args.teacher_checkpoint or "best")
    apply_options(config, args, distill_options())
    if args.output_dir:
        config.output_dir = args.output_dir
    elif args.compare:
        config.output_dir = f"runs/distill-compare-{Path(args.teacher).name}"
    if args.compare:
        compare_students(config, args.seeds, getattr(args, "command_line", None))
    else:
        distill(config, dry_run=args.dry_run, command=getattr(args, "command_line", None))


def run_transfer_set(args: argparse.Namespace) -> None:
    settings = TransferSettings()
    apply_options(settings, args, transfer_set_options())
    apply_options(settings.sampling, args, sampling_options())
    write_transfer_set(args.teacher, args.output, settings)
