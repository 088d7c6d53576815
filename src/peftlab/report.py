"""Plots (PNG) and tables from a run's metric history."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.fileio import atomic_write_file, read_text, write_text_atomic  # noqa: E402
from peftlab.runs import METRICS, SUMMARY, RunDir  # noqa: E402


def save_figure(figure, path: Path) -> Path:
    """Write `figure` as a PNG atomically (a crash never leaves half an image) and close it."""
    atomic_write_file(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return path


def plot_history(rows: list[dict], directory: Path, title: str) -> list[Path]:
    """loss.png (train and validation loss per epoch) and accuracy.png (accuracy, plus MCC when present)."""
    epochs = [row for row in rows if row.get("final_of_epoch")]
    if not epochs:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    x = [row["epoch"] for row in epochs]
    written = []
    for name, y_label, series in (
        ("loss", "loss", [("train loss", "train_loss"), ("validation loss", "val_loss")]),
        ("accuracy", "accuracy / MCC", [("train accuracy", "train_accuracy"),
                                        ("validation accuracy", "val_accuracy"), ("validation MCC", "val_mcc")]),
    ):
        figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
        for label, key in series:
            if all(key in row for row in epochs):
                axes.plot(x, [row[key] for row in epochs], marker="o", label=label)
        axes.set_xlabel("epoch")
        axes.set_ylabel(y_label)
        axes.set_title(f"{title}: {name} per epoch")
        axes.set_xticks(x)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        written.append(save_figure(figure, directory / f"{name}.png"))
    return written


# ----------------------------------------------------------------------------------------------------------
# Comparing runs (`peftlab report`, `peftlab sweep`)


def read_run(run_dir: str | Path) -> dict:
    """A finished or interrupted run's config (as a dict), history and summary (if written yet), for comparison."""
    run = RunDir(run_dir)
    if not (run.path / METRICS).is_file():
        raise PeftlabError(f"{run} is not a run directory with results (expected config.yaml and {METRICS})")
    config = run.read_config()
    summary = run.read_summary() if (run.path / SUMMARY).is_file() else {}
    return {"name": run.path.name, "path": str(run), "config": config.to_dict(), "rows": run.read_metrics(),
            "summary": summary}


def _number(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def runs_table(runs: list[dict]) -> str:
    """One markdown table: a row per run with its method, size, best validation numbers, test score and time."""
    lines = ["| run | method | rank | alpha | targets | trainable params | best val loss | best val (metric) | "
             "test (split, metric) | train time |", "|---" * 10 + "|"]
    for run in runs:
        config, summary, rows = run["config"], run["summary"], run["rows"]
        adapter = config["adapter"]
        lora = adapter["method"] == "lora" and adapter["rank"] > 0
        method = "full" if adapter["method"] == "lora" and not lora else adapter["method"]
        metric = summary.get("select_metric") or config["train"].get("select_metric") or "accuracy"
        val_losses = [row["val_loss"] for row in rows if "val_loss" in row]
        val_scores = [row[f"val_{metric}"] for row in rows if f"val_{metric}" in row]
        best_val = (min if metric == "loss" else max)(val_scores) if val_scores else None
        test = summary.get("test") or {}
        test_text = f"{_number(test.get(metric))} ({test['split']}, {metric})" if test else "—"
        trainable = summary.get("parameters", {}).get("trainable")
        seconds = sum(row.get("train_seconds", 0.0) for row in rows if row.get("final_of_epoch"))
        lines.append(
            f"| {run['name']} | {method} | "
            f"{adapter['rank'] if lora else '—'} | {adapter['alpha'] if lora else '—'} | "
            f"{','.join(adapter['targets']) if lora else '—'} | {f'{trainable:,}' if trainable else '—'} | "
            f"{_number(min(val_losses) if val_losses else None)} | {_number(best_val)} ({metric}) | {test_text} | "
            f"{seconds / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


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


REPORT_MARKER = "<!-- peftlab report -->"  # report.md's first line: only such a report (and its plot) is replaced


def write_report(run_dirs: list[str], output_dir: str | Path) -> tuple[Path, Path]:
    """report.md (the table) and val_loss.png (curves or bars) for `run_dirs`, written into `output_dir`.

    An earlier peftlab report there is replaced; a report.md or val_loss.png of anyone else is never overwritten.
    """
    output = Path(output_dir)
    table, plot = output / "report.md", output / "val_loss.png"
    ours = table.is_file() and read_text(table, "report").startswith(REPORT_MARKER)
    if not ours and (table.exists() or plot.exists()):
        raise PeftlabError(f"{output} already has a {'report.md' if table.exists() else 'val_loss.png'} that peftlab did "
                           "not write; nothing was changed. Fix: choose another --output-dir")
    runs = [read_run(run_dir) for run_dir in run_dirs]
    write_text_atomic(table, f"{REPORT_MARKER}\n{runs_table(runs)}")
    return table, plot_validation_loss(runs, plot)


def print_report(table: Path, plot: Path) -> None:
    """What `write_report` wrote, for the terminal."""
    print(read_text(table, "report").removeprefix(f"{REPORT_MARKER}\n") + f"\ntable: {table}\nplot: {plot}")


def plot_comparison(results: dict[str, list[dict]], path: Path) -> Path:
    """Validation accuracy and MCC per model (mean over its runs, error bar = std), as grouped bars in one PNG."""
    import statistics

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
