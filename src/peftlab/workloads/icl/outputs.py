"""What an icl run directory holds besides config.yaml, each file self-describing for `peftlab report`:

    predictions.jsonl   one line per (seed, k, test example): its log-likelihoods and predictions per mode
    results.json        "kind": "icl"; every demonstration set's metrics; per (k, mode, metric) mean ± std over seeds
    results.md          per metric a table: k × mode (raw, length-normalised, calibrated, generated), mean ± std
    plots/icl.png       per metric the mean against k with a ±1 std band, one line per mode
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from peftlab.fileio import finite_or_null, write_json_lines, write_text_atomic
from peftlab.report import METRIC_LABELS, RESULTS, RESULTS_TABLE, save_figure

MODE_LABELS = {"raw": "raw", "norm": "length-normalised", "calibrated": "calibrated", "generate": "generated"}
MODES_NOTE = ("raw: the verbaliser with the highest log-likelihood (lm-evaluation-harness's acc rule); "
              "length-normalised: log-likelihood per character of the verbaliser (its acc_norm rule); calibrated: "
              "label probabilities divided by those of the content-free inputs (Zhao et al. 2021); generated: greedy "
              "text, parsed (unparsable counts as wrong)")
TASK_METRICS = {"cola": ("mcc", "accuracy"), "rotten_tomatoes": ("accuracy",), "squad": ("f1", "exact_match"),
                "cot": ("accuracy",)}
PREDICTIONS, PLOT = "predictions.jsonl", "plots/icl.png"


def summary_rows(sets: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """Per (k, mode, metric): mean and sample std over the demonstration seeds (std 0 with one seed)."""
    rows = []
    for shots in sorted({item["shots"] for item in sets}):
        of_k = [item for item in sets if item["shots"] == shots]
        for mode in MODE_LABELS:
            for metric in metrics:
                values = [item["metrics"][mode][metric] for item in of_k if mode in item["metrics"]]
                if values:
                    rows.append({"shots": shots, "mode": mode, "metric": metric, "mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)})
    return rows


def results_table(header: str, rows: list[dict], metrics: tuple[str, ...]) -> str:
    modes = [mode for mode in MODE_LABELS if any(row["mode"] == mode for row in rows)]
    lines = [header, "", MODES_NOTE + ".", ""]
    for metric in metrics:
        lines += [f"### {METRIC_LABELS.get(metric, metric)} (mean ± std over demonstration seeds)", "",
                  "| k | " + " | ".join(MODE_LABELS[mode] for mode in modes) + " |",
                  "|---:|" + "---:|" * len(modes)]
        for shots in sorted({row["shots"] for row in rows}):
            cells = {row["mode"]: f"{row['mean']:.4f} ± {row['std']:.4f}" for row in rows
                     if row["shots"] == shots and row["metric"] == metric}
            lines.append(f"| {shots} | " + " | ".join(cells.get(mode, "") for mode in modes) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_against_shots(rows: list[dict], metrics: tuple[str, ...], title: str, path: Path) -> Path:
    """One axis per metric; k on an evenly spaced axis labelled with its values."""
    figure, axes_list = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.2), dpi=110, squeeze=False)
    shots = sorted({row["shots"] for row in rows})
    for axes, metric in zip(axes_list[0], metrics):
        for mode, label in MODE_LABELS.items():
            points = [row for row in rows if row["metric"] == metric and row["mode"] == mode]
            if not points:
                continue
            x = [shots.index(row["shots"]) for row in points]
            mean = [row["mean"] for row in points]
            std = [row["std"] for row in points]
            axes.plot(x, mean, marker="o", markersize=4, label=label)
            axes.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        axes.set_xticks(range(len(shots)), [str(k) for k in shots])
        axes.set_xlabel("demonstrations k")
        axes.set_ylabel(METRIC_LABELS.get(metric, metric))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(textwrap.fill(title, 60 * len(metrics)), fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, path)


def write_outputs(directory: Path, description: dict, sets: list[dict], records: list[dict]) -> list[Path]:
    """The files above; `description` says what was evaluated (task, model, format, ...)."""
    metrics = TASK_METRICS[description["task"]]
    rows = summary_rows(sets, metrics)
    results = {"kind": "icl", **description, "metrics": list(metrics), "modes": MODE_LABELS, "modes_note": MODES_NOTE,
               "sets": sets, "summary": rows}
    title = (f"{description['model']} on {description['task']} {description['split']} ({description['examples']} "
             f"examples), {description['demo_seeds']} demonstration seed(s), format {description['format_name']}")
    write_json_lines(directory / PREDICTIONS, records)
    write_text_atomic(directory / RESULTS, json.dumps(finite_or_null(results), indent=1) + "\n")
    write_text_atomic(directory / RESULTS_TABLE, results_table(f"# In-context learning: {title}", rows, metrics))
    plot = plot_against_shots(rows, metrics, title, directory / PLOT)
    return [directory / PREDICTIONS, directory / RESULTS, directory / RESULTS_TABLE, plot]
