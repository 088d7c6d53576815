"""The PNG plots: a run's history (loss and metrics against steps), and comparisons of runs (validation loss,
score against trainable parameters, teacher vs students)."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from peftlab.fileio import atomic_write_file  # noqa: E402
from peftlab.report.tables import method_name, run_numbers, score_of, scores_of  # noqa: E402


def save_figure(figure, path: Path) -> Path:
    """Write `figure` as a PNG atomically (a crash never leaves half an image) and close it."""
    atomic_write_file(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return path


METRIC_LABELS = {"accuracy": "accuracy", "mcc": "MCC", "score_accuracy": "accuracy by scoring",
                 "agreement": "generate/score agreement", "exact_match": "exact match", "f1": "F1"}


def run_title(name: str, task: str, method: str) -> str:
    """How a run's plots name it: its folder, task and what it trains (`tables.method_label`)."""
    return f"{name} ({task}, {method})"


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def integer_steps(axes) -> None:
    """Optimizer steps are whole numbers: no 2.5 on the step axis (a short run's axis is widened to a step either
    side, where the locator would otherwise fall back to fractions)."""
    low, high = axes.get_xlim()
    if high - low < 2:
        middle = round((low + high) / 2)
        axes.set_xlim(middle - 1, middle + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def mark_best(axes, rows: list[dict], best_step: int | None, key: str | None) -> None:
    """The best checkpoint on a panel: a labelled dashed line at its step, and a star on its value where the panel
    plots the selection metric (`key`)."""
    best = next((row for row in rows if row["step"] == best_step), None)
    if best is None:
        return
    axes.axvline(best_step, color="goldenrod", linestyle="--", linewidth=1, zorder=0,
                 label=f"best checkpoint (step {best_step})")
    if key and isinstance(best.get(key), (int, float)):
        axes.plot([best_step], [best[key]], marker="*", markersize=16, color="gold", markeredgecolor="black",
                  linestyle="none", label=f"best {metric_label(key.removeprefix('val_'))} {best[key]:.4f}", zorder=3)


def _history_panel(axes, series, rows: list[dict], epochs: list[dict], y_label: str, best_step: int | None,
                   best_key: str | None, title: str) -> None:
    for label, key, points in series:
        points = [row for row in points if isinstance(row.get(key), (int, float))]
        if points:
            axes.plot([row["step"] for row in points], [row[key] for row in points], marker="o", markersize=4,
                      label=label, zorder=2)
    mark_best(axes, rows, best_step, best_key)
    for row in epochs:
        axes.axvline(row["step"], color="0.9", linewidth=0.8, zorder=0)  # epoch ends
    integer_steps(axes)
    axes.set_xlabel("optimizer step (grey lines: epoch ends)")
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def plot_history(rows: list[dict], directory: Path, title: str, metric_names=("accuracy", "mcc"),
                 select: str = "loss", best_step: int | None = None, steps: list[dict] | None = None) -> list[Path]:
    """loss.png (training loss per step and per epoch, validation loss at every evaluation) and metrics.png (a panel
    per validation metric, as metrics of different scales never share an axis; training accuracy per epoch on the
    accuracy panel), against optimizer steps; the best checkpoint (`best_step`, by `select`) is marked on every
    panel, with its value where the panel plots `select`."""
    if not rows:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    epochs = [row for row in rows if row.get("final_of_epoch") and "train_loss" in row]
    best_key = f"val_{select}"
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    if steps:
        axes.plot([row["step"] for row in steps], [row["loss"] for row in steps], color="0.75", linewidth=0.8,
                  label="train loss (step)", zorder=1)
    _history_panel(axes, [("validation loss", "val_loss", rows), ("train loss (epoch)", "train_loss", epochs)], rows,
                   epochs, "loss", best_step, best_key if select == "loss" else None, f"{title}: loss")
    figure.tight_layout()
    written = [save_figure(figure, directory / "loss.png")]
    metrics = [metric for metric in metric_names if any(isinstance(row.get(f"val_{metric}"), (int, float))
                                                        for row in rows)] or list(metric_names[:1])
    if not metrics:  # a task with no metric but its loss
        return written
    figure, axes_list = plt.subplots(1, len(metrics), figsize=(max(7, 5 * len(metrics)), 4.2), dpi=110,
                                     squeeze=False)
    for axes, metric in zip(axes_list[0], metrics):
        series = [(f"validation {metric_label(metric)}", f"val_{metric}", rows)]
        if metric == "accuracy":
            series.append(("train accuracy (epoch)", "train_accuracy", epochs))
        _history_panel(axes, series, rows, epochs, metric_label(metric), best_step,
                       best_key if metric == select else None, f"{title}: {metric_label(metric)}")
    figure.tight_layout()
    written.append(save_figure(figure, directory / "metrics.png"))
    return written


def score_panels(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs by task and by what their score is (e.g. "cola, test MCC"): one panel each, so MCC, accuracy and F1
    (0-100) never share an axis."""
    panels: dict[str, list[dict]] = {}
    for run in runs:
        panels.setdefault(f"{run['config']['task']['name']}, {score_label(run)}", []).append(run)
    return panels


def score_label(run: dict) -> str:
    """What `score_of` plots for a run, with the metric's own name: "test MCC", "best validation accuracy"."""
    _, label = score_of(run)
    where, _, metric = label.rpartition(" ")
    return f"{where} {metric_label(metric)}"


def plot_score_vs_parameters(runs: list[dict], path: Path) -> Path:
    """Score against trainable parameters (log x), one labelled point per method (the mean over its seeds), one
    panel per task and score (`score_panels`): where each method sits between size and quality."""
    panels = {name: group for name, group in score_panels(runs).items() if scores_of(group)}
    figure, axes_list = plt.subplots(1, max(len(panels), 1), figsize=(7.5 * max(len(panels), 1), 4.8), dpi=110,
                                     squeeze=False)
    for axes, (panel, panel_runs) in zip(axes_list[0], panels.items()):
        groups: dict[str, list[dict]] = {}
        for run in panel_runs:
            groups.setdefault(method_name(run), []).append(run)
        points = [(run_numbers(group[0])["trainable"], statistics.fmean(scores_of(group)), name)
                  for name, group in groups.items() if scores_of(group) and run_numbers(group[0])["trainable"]]
        axes.scatter([p[0] for p in points], [p[1] for p in points], s=28)
        for trainable, score, name in points:
            axes.annotate(name, (trainable, score), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axes.set_xscale("log")
        axes.set_xlabel("trainable parameters (log scale)")
        axes.set_ylabel(panel.partition(", ")[2])
        axes.set_title(f"{panel}: score against trainable parameters", fontsize=10)
        axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_validation_loss(runs: list[dict], path: Path) -> Path:
    """Every run's validation loss, one panel per task (their losses are not comparable): curves over optimizer
    steps, or, when no run was evaluated more than once (a curve would be a lone dot), one bar per run with its
    value."""
    tasks: dict[str, dict[str, list]] = {}
    for run in runs:
        points = [(row["step"], row["val_loss"]) for row in run["rows"] if "val_loss" in row]
        if points:
            tasks.setdefault(run["config"]["task"]["name"], {})[run["name"]] = points
    curves = any(len(points) > 1 for series in tasks.values() for points in series.values())
    longest = max((len(series) for series in tasks.values()), default=0)
    figure, axes_list = plt.subplots(1, max(len(tasks), 1), figsize=(7 * max(len(tasks), 1),
                                     4.5 if curves else 1.5 + 0.4 * longest), dpi=110, squeeze=False)
    for axes, (task, series) in zip(axes_list[0], tasks.items()):
        if curves:
            for name, points in series.items():
                axes.plot(*zip(*points), marker="o", markersize=3, label=name)
            integer_steps(axes)
            axes.set_xlabel("optimizer step")
            axes.set_ylabel("validation loss")
            axes.legend(fontsize=8)
        else:
            names = list(series)[::-1]  # first run on top
            losses = [series[name][0][1] for name in names]
            bars = axes.barh(names, losses)
            axes.bar_label(bars, fmt="%.4f", fontsize=8, padding=3)
            axes.set_xlim(0, max(losses, default=1) * 1.15)
            axes.set_xlabel("validation loss (one evaluation per run)")
            axes.tick_params(axis="y", labelsize=8)
        axes.set_title(f"{task}: validation loss" if len(tasks) > 1 else "validation loss")
        axes.grid(alpha=0.3, axis="both" if curves else "x")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_comparison(results: dict[str, list[dict]], path: Path) -> Path:
    """Validation accuracy and MCC per model (mean over its runs, error bar = std), as grouped bars in one PNG."""
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    width = 0.38
    for offset, label, key in ((-width / 2, "accuracy", "accuracy"), (width / 2, "MCC", "mcc")):
        values = [[run[key] for run in runs] for runs in results.values()]
        means = [statistics.fmean(items) for items in values]
        errors = [statistics.stdev(items) if len(items) > 1 else 0.0 for items in values]
        axes.bar([index + offset for index in range(len(values))], means, width, yerr=errors, capsize=4, label=label)
    axes.set_xticks(range(len(results)))
    axes.set_xticklabels([textwrap.fill(name, 34) for name in results], fontsize=7)  # long names: several lines
    axes.set_ylabel("validation score")
    axes.set_title("teacher vs students (mean ± std over seeds)")
    axes.grid(alpha=0.3, axis="y")
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)
