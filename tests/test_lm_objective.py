"""The plain-text causal-LM objective (`--objective lm`): its loss against a hand computation on a tiny model, its
perplexity, and a tiny run through `peftlab train` that `peftlab generate --model RUN` continues as raw text."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_data import write_rotten_tomatoes

from peftlab.cli import main
from peftlab.data import LabelledText
from peftlab.workloads.lm.workload import LanguageModelTask

TEXTS = ["the film is great .", "a movie with a plot , awful", "story"]


@pytest.fixture
def lm_task(gpt2_tokenizer):
    examples = [LabelledText(text, -1, f"x:{number}") for number, text in enumerate(TEXTS, 1)]
    return LanguageModelTask("rotten_tomatoes", ("negative", "positive"), lambda split: examples, gpt2_tokenizer, 64)


def test_the_loss_is_the_mean_token_cross_entropy_of_text_and_eos(lm_task, gpt2_tokenizer, make_tiny_gpt2):
    model = make_tiny_gpt2(seed=3)
    examples = lm_task.encode("train")
    with torch.no_grad():
        output = lm_task.forward(model, lm_task.collate(examples))
        # By hand: each text + EOS on its own, unpadded; every token but the first is predicted by the one before.
        losses, counts = [], []
        for text in TEXTS:
            ids = torch.tensor([gpt2_tokenizer(text)["input_ids"] + [gpt2_tokenizer.eos_token_id]])
            logits = model(ids).logits[0, :-1]
            losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="sum").item())
            counts.append(ids.shape[1] - 1)
    assert output.num_targets == sum(counts)
    assert output.loss_sum.item() / output.num_targets == pytest.approx(sum(losses) / sum(counts), rel=1e-5)
    assert [p["tokens"] for p in output.predictions] == counts
    assert [p["loss_sum"] for p in output.predictions] == pytest.approx(losses, rel=1e-5)
    metrics = lm_task.metrics(output.predictions, examples)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(losses) / sum(counts)), rel=1e-5)
    with torch.no_grad():
        guesses = [model(torch.tensor([e.input_ids])).logits[0, :-1].argmax(-1) for e in examples]
        right = [int((guess == torch.tensor(e.input_ids[1:])).sum()) for guess, e in zip(guesses, examples)]
    assert metrics["token_accuracy"] == pytest.approx(sum(right) / sum(counts))
    assert lm_task.select_metric_default == "loss" and "perplexity" not in lm_task.metric_names  # lower is better


def test_a_tiny_lm_run_trains_two_steps_and_generate_continues_raw_text(tiny_model_dir, tmp_path, capsys):
    data = write_rotten_tomatoes(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--task", "rotten_tomatoes", "--objective", "lm", "--method", "lora", "--model",
                 tiny_model_dir, "--data-dir", data, "--device", "cpu", "--max-steps", "2", "--batch-size", "4",
                 "--train-limit", "16", "--eval-limit", "8", "--test-limit", "8", "--output-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [row for row in rows if "val_perplexity" in row]
    assert validation and validation[-1]["val_perplexity"] == pytest.approx(math.exp(validation[-1]["val_loss"]),
                                                                              rel=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["select_metric"] == "loss"
    assert [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()] == [1, 2]
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "the film", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert "--- prompt 1, sample 1 ---\nthe film" in capsys.readouterr().out  # the raw prompt, no template
