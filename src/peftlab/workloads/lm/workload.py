"""Plain-text causal language modelling: next-token prediction over a dataset's texts (`text + EOS`), no labels.

The shared causal-LM objective of `tasks/completion.py` with an empty prompt and the loss on every token: the
first token has nothing before it (no BOS is added, so a run continues raw text exactly as it was trained), every
later token and the EOS are learned. Validation reports the mean token cross-entropy (`loss`, which picks
checkpoints/best: lowest) and its exponential, the perplexity. `peftlab generate --model RUN` continues the raw
prompt text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from peftlab.tasks import Encoded, StepOutput
from peftlab.tasks.completion import Completion, CompletionTask, at_targets, target_logits
from peftlab.workloads.base import Workload


class LanguageModelTask(CompletionTask):
    select_metric_default = "loss"
    # Selectable metrics are higher-is-better: the next-token accuracy is; the perplexity, reported beside it, is
    # not, so `loss` (its logarithm, lowest wins) selects by default.
    metric_names = ("token_accuracy",)

    def __init__(self, name: str, label_names: Sequence[str], read_split, tokenizer, max_length: int):
        super().__init__(name, tokenizer, max_length, loss_on="all")
        self.read_split = read_split

    def completions(self, split: str) -> list[Completion]:
        return [Completion("", example.text, None, example.origin) for example in self.read_split(split)]

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed next-token cross-entropy over every learned token; each example's summed loss, tokens and tokens
        predicted right (argmax) are its prediction, so an evaluation's metrics need no second pass."""
        logits, targets, learned, _ = target_logits(model, batch)  # (N, V), (N,), (B, K)
        token_loss = F.cross_entropy(logits, targets, reduction="none")  # (N,)
        correct = logits.argmax(-1) == targets  # (N,)
        per_example = zip(at_targets(learned, token_loss.detach()).sum(-1).tolist(), learned.sum(-1).tolist(),
                          at_targets(learned, correct).sum(-1).tolist())
        predictions = [{"loss_sum": loss, "tokens": count, "correct": right} for loss, count, right in per_example]
        return StepOutput(token_loss.sum(), len(targets), predictions, int(correct.sum()))

    def metrics(self, predictions: list[dict], examples: Sequence[Encoded]) -> dict:
        tokens = sum(prediction["tokens"] for prediction in predictions)
        return {"token_accuracy": sum(prediction["correct"] for prediction in predictions) / tokens,
                "perplexity": math.exp(math.fsum(prediction["loss_sum"] for prediction in predictions) / tokens),
                "tokens": tokens}

    def format_metrics(self, metrics: dict) -> str:
        return (f"Perplexity: {metrics['perplexity']:.3f}, token accuracy: {metrics['token_accuracy']:.4f} over "
                f"{metrics['tokens']} tokens")


class LanguageModelWorkload(Workload):
    """Next-token prediction on a dataset's texts as plain text (e.g. Rotten Tomatoes reviews before DPO)."""

    name = "lm"

    def task_for(self, config, tokenizer) -> LanguageModelTask:
        return self.labelled_task(LanguageModelTask, config, tokenizer)

    def resolve(self, config, task: LanguageModelTask) -> None:
        super().resolve(config, task)
        config.task.loss_on = task.loss_on  # every token is learned, whatever --loss-on said

    def prompt_text(self, task: LanguageModelTask, fields) -> str:
        return fields["text"]
