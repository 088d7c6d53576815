"""Metrics more than one workload reports."""

from __future__ import annotations

import re
import string
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


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(reference)) for reference in references)


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Token-overlap F1 after normalisation, best over the references (official v1.1 definition)."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        gold = normalize_answer(reference).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
