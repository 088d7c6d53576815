"""Causal-LM tasks that learn a completion after a prompt: instruction tuning (W3) and generative QA (W4).

Shared here, once, by both:
- an example is `prompt tokens + completion tokens + EOS`, prompt and completion tokenized separately so the
  boundary is exact and the prompt at prediction time is token-for-token the training prompt;
- label masking: with `loss_on="answer"` every label outside the completion (and its EOS) is -100, with
  `loss_on="all"` every token after the first is learned;
- batches are left-padded with position ids from the attention mask, so every completion ends in the last
  column: the LM head (the largest single matrix of a small model) then runs only on the last columns that hold
  labels (`logits_to_keep`), not on the whole sequence;
- prediction: batched greedy generation with the KV cache (`generate_batch`) and exact likelihood scoring of a
  fixed set of answers (`score_choices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
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


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded rows; positions count real tokens from 0."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


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


def top_p_sampler(temperature: float, top_p: float, seed: int, top_k: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `pick_next` for `generate_batch`: sample from softmax(logits / temperature) among the `top_k` most likely
    tokens (0 = all), keeping the most likely ones up to probability mass `top_p` (nucleus sampling), with its own
    seeded generator. A top-k cut first also spares sorting the whole vocabulary at every step."""
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if 0 < top_k < logits.shape[-1]:
            logits, order = logits.topk(top_k, dim=-1)  # sorted, most likely first
        else:
            logits, order = logits.sort(dim=-1, descending=True)
        probabilities = torch.softmax(logits, dim=-1)
        outside = probabilities.cumsum(-1) - probabilities >= top_p  # the mass before it already reaches top_p
        choice = torch.multinomial(probabilities.masked_fill(outside, 0.0).cpu(), 1, generator=generator)
        return order.gather(-1, choice.to(order.device)).squeeze(-1)

    return pick


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int,
                   pick_next: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[list[int]]:
    """Continue each prompt as one left-padded batch with the KV cache; greedy unless `pick_next` is given.

    `pick_next` maps the (batch, vocabulary) logits of the last position to the next token ids (e.g. sampling).
    A row stops after emitting a token in `stop_ids` (included in its output); the batch stops when every row
    has stopped or after `max_new_tokens`. Only the last position's logits are computed at each step.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_id, device)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1)
    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in range(max_new_tokens):
        logits = output.logits[:, -1]
        next_tokens = pick_next(logits) if pick_next is not None else logits.argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if not stopped[row]:
                generated[row].append(token)
                stopped[row] = token in stop_ids
        if all(stopped) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        output = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1)
    return generated


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
