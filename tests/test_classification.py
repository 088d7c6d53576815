import math

import pytest

from peftlab.tasks.metrics import classification_metrics


def test_constant_predictor_has_majority_accuracy_and_zero_mcc():
    metrics = classification_metrics([1, 1, 1, 1], [1, 0, 1, 1], ("unacceptable", "acceptable"))
    assert metrics == {"accuracy": 0.75, "mcc": 0.0, "predicted_counts": {"unacceptable": 0, "acceptable": 4}}


def test_mcc_hand_computed():
    # TP=2, TN=1, FP=1, FN=0: MCC = (2*1 - 1*0) / sqrt(3*2*2*1)
    metrics = classification_metrics([1, 1, 0, 1], [1, 1, 0, 0], ("no", "yes"))
    assert metrics["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert metrics["accuracy"] == 0.75


def test_collate_pads_right_and_masks(gpt2_tokenizer):
    from peftlab.tasks import Encoded
    from peftlab.workloads.classification.workload import ClassificationTask

    task = ClassificationTask("t", ("a", "b"), lambda split: [], gpt2_tokenizer, 16)
    batch = task.collate([Encoded([5, 50256], 1, "x:1"), Encoded([7, 8, 9], 0, "x:2")])
    assert batch["input_ids"].tolist() == [[5, 50256, 50256], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]  # the real EOS is kept, the pad is not
    assert batch["labels"].tolist() == [1, 0]
