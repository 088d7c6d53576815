"""Causal-LM tasks that learn a completion after a prompt: instruction tuning (W3) and generative QA (W4).

Shared here, once, by both:
- an example is `prompt tokens + completion tokens + EOS`, prompt and completion tokenized separately so the
  boundary is exact and the prompt at prediction time is token-for-token the training prompt;
- label masking: with `loss_on="answer"` every label outside the completion (and its EOS) is -100, with
  `loss_on="all"` every token after the first is learned;
- batches are left-padded with position ids from the attention mask, so every completion ends in the last
  column: the LM head (the largest single matrix of a small model) then runs only on the last columns that hold
  labels (`logits_to_keep`), not on the whole sequence;
- prediction: generation through `peftlab.generation.decode` and exact likelihood scoring of a fixed set of
  answers (`score_choices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
from peftlab.generation import left_pad
from peftlab.tasks import Encoded, StepOutput, Task

LOSS_ON = ("answer", "all")
IGNORE = -100  # label of a position that is not learned (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Completion:
    """A prompt and the completion the model learns after it (EOS is appended to its tokens)."""

    prompt: str
    completion: str
    reference: Any  # what predictions are scored against: a label index, or the gold answer strings
    origin: str  # file:line or file + question id


@dataclass(frozen=True)
class CompletionTarget:
    prompt_length: int  # tokens of the prompt; the completion and EOS follow
    reference: Any


class CompletionTask(Task):
    """The causal-LM objective over `Completion`s. Subclasses provide `completions(split)`, `predict` and
    `metrics`; they may override `encode_one` (e.g. to shorten a context so that the answer fits)."""

    model_task = "causal-lm"

    def __init__(self, name: str, tokenizer, max_length: int, loss_on: str):
        if loss_on not in LOSS_ON:
            raise PeftlabError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got '{loss_on}'")
        self.name, self.tokenizer, self.max_length, self.loss_on = name, tokenizer, max_length, loss_on
        self.skipped_per_split: dict[str, int] = {}  # split -> examples that could not be encoded (encode_one)

    def completions(self, split: str) -> list[Completion]:
        raise NotImplementedError

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_one(self, example: Completion) -> Encoded | None:
        """Prompt + completion + EOS; longer than --max-length is an error (nothing is cut silently)."""
        prompt, completion = self.tokens(example.prompt), self.tokens(example.completion)
        ids = prompt + completion + [self.tokenizer.eos_token_id]
        if len(ids) > self.max_length:
            raise PeftlabError(
                f"{example.origin}: {len(ids)} tokens with the prompt template, more than --max-length "
                f"{self.max_length}. Fix: raise --max-length (nothing is cut silently)."
            )
        return Encoded(ids, CompletionTarget(len(prompt), example.reference), example.origin)

    def encode(self, split: str) -> list[Encoded]:
        encoded = [self.encode_one(example) for example in self.completions(split)]
        kept = [example for example in encoded if example is not None]
        self.skipped_per_split[split] = len(encoded) - len(kept)
        if not kept:
            raise PeftlabError(f"{self.name} {split}: no example could be encoded (all {len(encoded)} skipped)")
        return kept

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, position_ids = left_pad([e.input_ids for e in examples], self.tokenizer.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE)
        width = input_ids.shape[1]
        for row, example in enumerate(examples):
            first = example.target.prompt_length if self.loss_on == "answer" else 1  # token 0 has no context
            start = width - example.length
            labels[row, start + first :] = torch.tensor(example.input_ids[first:], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.skipped_per_split)

    def reference(self, example: Encoded) -> Any:
        return example.target.reference

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed next-token cross-entropy over the labelled tokens; predictions are left to `predict`."""
        labels = batch["labels"]
        labelled_columns = (labels != IGNORE).any(0).nonzero()
        first = int(labelled_columns[0]) if len(labelled_columns) else labels.shape[1] - 1
        # Logits at columns first-1 .. T-1 predict the tokens first .. T (the last one predicts past the end).
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=labels.shape[1] - first + 1)
        logits, targets = output.logits[:, :-1].float(), labels[:, first:]
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        learned = targets != IGNORE
        correct = ((logits.argmax(-1) == targets) & learned).sum()
        return StepOutput(loss_sum, int(learned.sum()), None, int(correct))

    def prompts(self, examples: Sequence[Encoded]) -> list[list[int]]:
        return [example.input_ids[: example.target.prompt_length] for example in examples]


def line_stop_ids(tokenizer) -> set[int]:
    """EOS and every token whose text contains a newline: generation that must stay on one line stops there."""
    vocabulary = tokenizer.get_vocab()
    return {tokenizer.eos_token_id} | {
        index for token, index in vocabulary.items() if "\n" in tokenizer.convert_tokens_to_string([token])
    }


@torch.inference_mode()
def score_choices(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Log-likelihood of each choice's tokens after each prompt: a (prompts, choices) tensor, exact.

    Single-token choices take one forward pass over the prompts (the next-token distribution); longer ones one
    forward pass over every prompt + choice pair.
    """
    device = next(model.parameters()).device
    if all(len(choice) == 1 for choice in choices):
        input_ids, attention_mask, position_ids = left_pad(prompts, pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1).logits[:, -1].float()
        return logits.log_softmax(-1)[:, [choice[0] for choice in choices]]
    rows = [list(prompt) + list(choice) for prompt in prompts for choice in choices]
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, device)
    longest = max(len(choice) for choice in choices)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=longest + 1).logits[:, :-1].float()  # predicts the last `longest` tokens
    log_probs = logits.log_softmax(-1).gather(-1, input_ids[:, -longest:, None])[..., 0]  # (rows, longest)
    lengths = torch.tensor([len(choice) for choice in choices] * len(prompts), device=device)
    in_choice = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
    return torch.where(in_choice, log_probs, 0.0).sum(-1).view(len(prompts), len(choices))
