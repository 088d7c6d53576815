"""Plots (PNG) and tables from a run's metric history."""

from __future__ import annotations

import re
import statistics
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


METRIC_LABELS = {"accuracy": "accuracy", "mcc": "MCC", "score_accuracy": "accuracy by scoring",
                 "agreement": "generate/score agreement", "exact_match": "exact match", "f1": "F1"}


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


def method_settings(adapter: dict) -> str:
    """A run's method and its shape settings in a few characters, e.g. "lora r16 α32 all-linear", "prefix p10"."""
    method = adapter["method"]
    if method == "lora" and adapter["rank"] == 0:
        return "full"
    targets = ",".join(adapter["targets"])
    if method in ("lora", "dora"):
        return f"{method} r{adapter['rank']} α{adapter['alpha']:g} {targets}"
    if method == "ia3":
        return f"ia3 {targets}"
    if method == "adapter":
        return f"adapter {adapter['adapter_placement']} m{adapter['adapter_size']} {adapter['adapter_nonlinearity']}"
    if method == "prefix":
        projection = adapter.get("prefix_projection")
        return f"prefix p{adapter['prefix_length']}" + (f" H{projection}" if projection else "")
    return method


def run_numbers(run: dict) -> dict:
    """What the tables compare of one run: its selection metric, best validation score, test score (None when not
    tested), trainable parameters and their share of the model, seconds per training epoch (mean), validation
    examples/s (median over evaluations)."""
    config, summary, rows = run["config"], run["summary"], run["rows"]
    metric = summary.get("select_metric") or config["train"].get("select_metric") or "accuracy"
    val_scores = [row[f"val_{metric}"] for row in rows if row.get(f"val_{metric}") is not None]
    parameters = summary.get("parameters", {})
    epochs = [row["train_seconds"] for row in rows if row.get("final_of_epoch") and "train_seconds" in row]
    speeds = [row["val_examples_per_second"] for row in rows if row.get("val_examples_per_second")]
    trainable, total = parameters.get("trainable"), parameters.get("total")
    return {
        "metric": metric,
        "best_val": (min if metric == "loss" else max)(val_scores) if val_scores else None,
        "best_val_loss": min((row["val_loss"] for row in rows if row.get("val_loss") is not None), default=None),
        "test": (summary.get("test") or {}).get(metric),
        "test_split": (summary.get("test") or {}).get("split"),
        "trainable": trainable,
        "share": trainable / total if trainable and total else None,
        "seconds_per_epoch": statistics.fmean(epochs) if epochs else None,
        "eval_per_second": statistics.median(speeds) if speeds else None,
    }


def _count(value) -> str:
    return "—" if value is None else f"{value:,}"


def _share(value) -> str:
    return "—" if value is None else f"{100 * value:.3g}%"


def runs_table(runs: list[dict]) -> str:
    """One markdown table: a row per run with its method, size, best validation numbers, test score and speed."""
    lines = ["| run | method | trainable params | % of model | best val loss | best val (metric) | "
             "test (split, metric) | s / epoch | val examples/s |", "|---" * 9 + "|"]
    for run in runs:
        numbers = run_numbers(run)
        metric = numbers["metric"]
        test_text = (f"{_number(numbers['test'])} ({numbers['test_split']}, {metric})"
                     if numbers["test_split"] else "—")
        lines.append(
            f"| {run['name']} | {method_settings(run['config']['adapter'])} | {_count(numbers['trainable'])} | "
            f"{_share(numbers['share'])} | {_number(numbers['best_val_loss'])} | {_number(numbers['best_val'])} "
            f"({metric}) | {test_text} | {_number(numbers['seconds_per_epoch'], 0)} | "
            f"{_number(numbers['eval_per_second'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def score_of(run: dict) -> tuple[float | None, str]:
    """The score a comparison plots: the test score when the run was tested, else its best validation score."""
    numbers = run_numbers(run)
    if numbers["test"] is not None:
        return numbers["test"], f"test {numbers['metric']}"
    return numbers["best_val"], f"best validation {numbers['metric']}"


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
            scores = _scores(group)
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


REPORT_MARKER = "<!-- peftlab report -->"  # report.md's first line: only such a report (and its plot) is replaced


REPORT_PLOTS = ("val_loss.png", "score_vs_parameters.png")


def _check_report_folder(output: Path) -> Path:
    """report.md in `output`, after making sure no report or plot there is anyone else's."""
    table = output / "report.md"
    ours = table.is_file() and read_text(table, "report").startswith(REPORT_MARKER)
    theirs = [name for name in ("report.md", *REPORT_PLOTS) if (output / name).exists()]
    if not ours and theirs:
        raise PeftlabError(f"{output} already has a {theirs[0]} that peftlab did not write; nothing was changed. "
                           "Fix: choose another --output-dir")
    return table


def write_report(run_dirs: list[str], output_dir: str | Path) -> tuple[Path, list[Path]]:
    """report.md (the table), val_loss.png (curves or bars) and score_vs_parameters.png for `run_dirs`, written
    into `output_dir`.

    An earlier peftlab report there is replaced; a report.md or plot of anyone else is never overwritten.
    """
    output = Path(output_dir)
    table = _check_report_folder(output)
    runs = [read_run(run_dir) for run_dir in run_dirs]
    write_text_atomic(table, f"{REPORT_MARKER}\n{runs_table(runs)}")
    return table, [plot_validation_loss(runs, output / REPORT_PLOTS[0]),
                   plot_score_vs_parameters({"runs": runs}, output / REPORT_PLOTS[1])]


SEED_SUFFIX = re.compile(r"_seed\d+$")  # lora, lora_seed1, lora_seed2: one method, three seeds


def method_name(run: dict) -> str:
    return SEED_SUFFIX.sub("", run["name"])


def _scores(runs: list[dict]) -> list[float]:
    return [score for score, _ in map(score_of, runs) if score is not None]


def _score_cell(runs: list[dict]) -> str:
    """One run's score, or mean ± sample std over the seeds of a method."""
    scores = _scores(runs)
    if len(scores) < 2:
        return _number(scores[0]) if scores else "—"
    return f"{statistics.fmean(scores):.4f} ± {statistics.stdev(scores):.4f} ({len(scores)} seeds)"


def _median_of(runs: list[dict], key: str):
    values = [value for value in (run_numbers(run)[key] for run in runs) if value is not None]
    return statistics.median(values) if values else None


def methods_table(tasks: dict[str, list[dict]]) -> str:
    """A row per method across task sweeps, fewest trainable parameters first (runs of the same name;
    `<name>_seed<k>` runs are more seeds of `<name>`): size, each task's score (test when tested, else best validation; mean ± std over seeds), and the
    median seconds per epoch and validation examples/s per task."""
    names = list(dict.fromkeys(method_name(run) for runs in tasks.values() for run in runs))
    size = {name: run_numbers(run)["trainable"] or 0 for runs in tasks.values() for run in runs[::-1]
            for name in [method_name(run)]}
    names.sort(key=lambda name: size[name])  # smallest first: size against quality reads down the table
    by_task = {task: {name: [run for run in runs if method_name(run) == name] for name in names}
               for task, runs in tasks.items()}
    header = ["run", "method", "trainable params", "% of model"]
    header += [f"{task} {score_of(runs[0])[1]}" for task, runs in tasks.items()]
    header += [f"{task} {what}" for task in tasks for what in ("s / epoch", "val examples/s")]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in names:
        first = next(group[0] for groups in by_task.values() for group in [groups[name]] if group)
        numbers = run_numbers(first)
        cells = [name, method_settings(first["config"]["adapter"]), _count(numbers["trainable"]),
                 _share(numbers["share"])]
        cells += [_score_cell(groups[name]) for groups in by_task.values()]
        for groups in by_task.values():
            cells += [_number(_median_of(groups[name], "seconds_per_epoch"), 0),
                      _number(_median_of(groups[name], "eval_per_second"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_methods_report(folders: list[str], output_dir: str | Path) -> tuple[Path, list[Path]]:
    """report.md (`methods_table`) and score_vs_parameters.png over sweep folders (a task's runs may span several,
    e.g. its comparison and its extra seeds), matching runs by name; a folder's runs are its subdirectories with
    results."""
    output = Path(output_dir)
    table = _check_report_folder(output)
    tasks = {}
    for folder in folders:
        run_dirs = sorted(path for path in Path(folder).iterdir() if (path / METRICS).is_file())
        if not run_dirs:
            raise PeftlabError(f"{folder} holds no runs with results (subdirectories with {METRICS})")
        runs = [read_run(path) for path in run_dirs]
        tasks.setdefault(runs[0]["config"]["task"]["name"], []).extend(runs)  # several folders may share a task
    write_text_atomic(table, f"{REPORT_MARKER}\n{methods_table(tasks)}")
    return table, [plot_score_vs_parameters(tasks, output / REPORT_PLOTS[1])]


def print_report(table: Path, plots: list[Path]) -> None:
    """What `write_report` wrote, for the terminal."""
    print(read_text(table, "report").removeprefix(f"{REPORT_MARKER}\n") + f"\ntable: {table}\n"
          + "".join(f"plot: {plot}\n" for plot in plots), end="")


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
