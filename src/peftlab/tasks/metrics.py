"""Metrics more than one workload reports."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from sklearn.metrics import matthews_corrcoef


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, Matthews correlation and how often each label was predicted."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (>0), got {len(predictions)} and {len(labels)}")
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    counts = Counter(predictions)
    return {
        "accuracy": correct / len(labels),
        # sklearn defines MCC as 0 when a confusion-matrix margin is empty (e.g. a constant predictor).
        "mcc": float(matthews_corrcoef(labels, predictions)),
        "predicted_counts": {name: counts.get(index, 0) for index, name in enumerate(label_names)},
    }
