"""Plots (PNG) and tables from a run's metric history."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


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
        path = directory / f"{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
