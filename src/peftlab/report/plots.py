"""The PNG plots: a run's history (loss and metrics against steps), and comparisons of runs (validation loss,
score against trainable parameters, teacher vs students)."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

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
    """How a run's plots name it: its folder, task and method."""
    return f"{name} ({task}, {method})"


def plot_history(rows: list[dict], directory: Path, title: str, metric_names=("accuracy", "mcc"),
                 select: str = "loss", best_step: int | None = None, steps: list[dict] | None = None) -> list[Path]:
    """loss.png (training loss per step and per epoch, validation loss at every evaluation) and metrics.png (the
    task's validation metrics at every evaluation, training accuracy per epoch where accuracy is one of them), against
    optimizer steps; the best checkpoint (`best_step`, by `select`) is marked on both."""
    if not rows:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    epochs = [row for row in rows if row.get("final_of_epoch") and "train_loss" in row]
    written = []
    for name, y_label, series in (
        ("loss", "loss", [("validation loss", "val_loss", rows), ("train loss (epoch)", "train_loss", epochs)]),
        ("metrics", "score", [(f"validation {METRIC_LABELS.get(metric, metric)}", f"val_{metric}", rows)
                              for metric in metric_names]
                             # the training accuracy is on the validation metric's scale only where that is accuracy
                             + ([("train accuracy (epoch)", "train_accuracy", epochs)] if "accuracy" in metric_names
                                else [])),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
        if name == "loss" and steps:
            axes.plot([row["step"] for row in steps], [row["loss"] for row in steps], color="0.75", linewidth=0.8,
                      label="train loss (step)", zorder=1)
        for label, key, points in series:
            points = [row for row in points if isinstance(row.get(key), (int, float))]
            if points:
                axes.plot([row["step"] for row in points], [row[key] for row in points], marker="o", markersize=4,
                          label=label, zorder=2)
        best = next((row for row in rows if row["step"] == best_step), None)
        key = f"val_{select}"
        if best is not None and (name == "loss") == (select == "loss") and isinstance(best.get(key), (int, float)):
            axes.plot([best_step], [best[key]], marker="*", markersize=16, color="gold", markeredgecolor="black",
                      linestyle="none", label=f"best checkpoint (step {best_step}, {select} {best[key]:.4f})", zorder=3)
        if best is not None:
            axes.axvline(best_step, color="gold", linestyle="--", linewidth=1, zorder=0)
        for row in epochs:
            axes.axvline(row["step"], color="0.9", linewidth=0.8, zorder=0)  # epoch ends
        axes.set_xlabel("optimizer step (grey lines: epoch ends)")
        axes.set_ylabel(y_label)
        axes.set_title(f"{title}: {name}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        written.append(save_figure(figure, directory / f"{name}.png"))
    return written


def plot_score_vs_parameters(series: dict[str, list[dict]], path: Path) -> Path:
    """Score against trainable parameters (log x), one labelled point per run (the mean over a method's seeds)
    and one panel per series (e.g. per task, whose metrics differ): where each method sits between size and
    quality."""
    panels = {name: runs for name, runs in series.items() if runs}
    figure, axes_list = plt.subplots(1, max(len(panels), 1), figsize=(7.5 * max(len(panels), 1), 4.8), dpi=110,
                                     squeeze=False)
    for axes, (series_name, runs) in zip(axes_list[0], panels.items()):
        groups: dict[str, list[dict]] = {}
        for run in runs:
            groups.setdefault(method_name(run), []).append(run)
        points, labels = [], set()
        for name, group in groups.items():
            scores = scores_of(group)
            trainable = run_numbers(group[0])["trainable"]
            if scores and trainable:
                points.append((trainable, statistics.fmean(scores), name))
                labels.add(score_of(group[0])[1])
        axes.scatter([p[0] for p in points], [p[1] for p in points], s=28)
        for trainable, score, name in points:
            axes.annotate(name, (trainable, score), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axes.set_xscale("log")
        axes.set_xlabel("trainable parameters (log scale)")
        axes.set_ylabel(" / ".join(sorted(labels)) or "score")
        axes.set_title(f"{series_name}: score against trainable parameters" if len(panels) > 1
                       else "score against trainable parameters")
        axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_validation_loss(runs: list[dict], path: Path) -> Path:
    """Every run's validation loss in one PNG: curves over optimizer steps, or, when no run was evaluated more than
    once (a curve would be a lone dot), one bar per run with its value."""
    series = {run["name"]: [(row["step"], row["val_loss"]) for row in run["rows"] if "val_loss" in row] for run in runs}
    series = {name: points for name, points in series.items() if points}
    curves = any(len(points) > 1 for points in series.values())
    figure, axes = plt.subplots(figsize=(7, 4.5 if curves else 1.5 + 0.4 * len(series)), dpi=110)
    if curves:
        for name, points in series.items():
            axes.plot(*zip(*points), marker="o", markersize=3, label=name)
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
    axes.set_title("validation loss")
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
