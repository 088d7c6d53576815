"""Causal-LM tasks that learn a completion after a prompt: instruction tuning (W3) and generative QA (W4).

Shared here, once, by both:
- an example is `prompt tokens + completion tokens + EOS`, prompt and completion tokenized separately so the
  boundary is exact and the prompt at prediction time is token-for-token the training prompt;
- targets: every column carries the token it predicts; with `loss_on="answer"` only the completion (and its EOS)
  is learned, with `loss_on="all"` every token after the first;
- batches are left-padded (`peftlab.shared_prefix.collate_rows`) with the target columns last, so the LM head (the
  largest single matrix of a small model) runs only on the positions that have a target (`target_logits`), not on
  the whole sequence;
- shared prefixes (`Encoded.shared_length`, e.g. a SQuAD context): with `shares_prefixes`, the examples of a batch
  that start with the same prefix are one packed row in training and one prefix cache in prediction, computed
  once (`peftlab.shared_prefix`);
- prediction: generation through `peftlab.generation.decode` and exact likelihood scoring of a fixed set of
  answers (`score_choices`), both after a shared prefix too (`prompt_inputs`).
- per-sequence log-probabilities with gradient (`sequence_logprobs`: each example's summed log-prob of its
  completion given its prompt) from the same padded or packed batches, one pass for all (what DPO is made of).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
from peftlab.generation import left_pad, plain_output_head, prefill
from peftlab.shared_prefix import (IGNORE, PrefixCache, collate_rows, continuation_cache, continuation_inputs,
                                   model_attention_mask, pack, prefix_units, single)
from peftlab.tasks import Encoded, StepOutput, Task

LOSS_ON = ("answer", "all")


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
        self.shares_prefixes = False  # a task whose examples share prefixes turns it on (answer-only loss)

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
        """Left-padded rows whose every column carries the token it predicts (`targets`), the target columns last:
        input_ids, position_ids, targets (B, T) and the attention mask, (B, T) with one row per example. With
        `shares_prefixes`, examples with the same shared prefix become one packed row: a (B, 1, T, T) block mask,
        segments (B, T), and per suffix S its row, segment, prompt end and example (`continue_*`, (S,) each)."""
        if not self.shares_prefixes:
            rows = [single(example.input_ids, self.first_target(example)) for example in examples]
            return collate_rows(rows, self.tokenizer.pad_token_id, block_mask=False)
        rows = []
        units = prefix_units(examples, len(examples))
        for unit in units:
            shared = examples[unit[0]].shared_length
            suffixes = [examples[index].input_ids[shared:] for index in unit]
            firsts = [self.first_target(examples[index]) - shared for index in unit]
            rows.append(pack(examples[unit[0]].input_ids[:shared], suffixes, firsts))
        batch = collate_rows(rows, self.tokenizer.pad_token_id, block_mask=True)
        batch["continue_examples"] = torch.tensor([index for unit in units for index in unit])  # (S,) in packing order
        return batch

    def first_target(self, example: Encoded) -> int:
        """The index of the first learned token: the completion's first, or (loss on all) token 1."""
        return example.target.prompt_length if self.loss_on == "answer" else 1

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.skipped_per_split)

    def reference(self, example: Encoded) -> Any:
        return example.target.reference

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != IGNORE).sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed next-token cross-entropy over the target columns; predictions are left to `predict`."""
        return self.loss(model, batch)[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             use_cache: bool = False) -> tuple[StepOutput, Any]:
        """(StepOutput of the target columns, the pass's key/value cache when `use_cache`)."""
        logits, targets, _, output = target_logits(model, batch, use_cache)  # (N, V), (N,)
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return StepOutput(loss_sum, len(targets), None, int(correct)), output.cache if use_cache else None

    def generate_after_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                            continuations: dict[str, torch.Tensor],
                            generate: Callable[[list[list[int]], PrefixCache], list]) -> StepOutput:
        """The loss pass, kept with its key/value cache, then `generate(prompts, prefix)` continuing every example
        from its prompt's last token (`continuation_cache` re-cuts the cache; `continuations`: the batch's
        `continue_*` and `segments`), so each prompt is computed once for the loss and the prediction. The
        StepOutput carries the predictions in example order."""
        output, cache = self.loss(model, batch, use_cache=True)
        prefix, last_prompt_tokens = continuation_cache(cache, batch | continuations)
        generated = generate(last_prompt_tokens[:, None].tolist(), prefix)
        by_example = dict(zip(continuations["continue_examples"].tolist(), generated))
        output.predictions = [by_example[index] for index in range(len(generated))]
        return output

    def prompts(self, examples: Sequence[Encoded]) -> list[list[int]]:
        return [example.input_ids[: example.target.prompt_length] for example in examples]

    def prompt_inputs(self, model, examples: Sequence[Encoded]) -> tuple[list[list[int]], PrefixCache | None]:
        """What `decode` and `score_choices` continue: the prompts, or with `shares_prefixes` each distinct shared
        prefix computed once (`prefill`) and the prompts' rest after it."""
        if not self.shares_prefixes or not all(example.shared_length for example in examples):
            return self.prompts(examples), None
        units = prefix_units(examples, len(examples))
        prefixes, rows = [], [0] * len(examples)
        for number, unit in enumerate(units):
            prefixes.append(examples[unit[0]].input_ids[: examples[unit[0]].shared_length])
            for index in unit:
                rows[index] = number
        lengths = [len(prefixes[row]) for row in rows]
        prompts = [prompt[length:] for prompt, length in zip(self.prompts(examples), lengths)]
        return prompts, prefill(model, prefixes, self.tokenizer.pad_token_id).rows(rows)


def target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  use_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """The model's pass over a collated batch (`CompletionTask.collate`) with the LM head on the positions that have
    a target only: (their logits (N, V) in fp32, in row-major order; their targets (N,); `where` (B, K): which of each
    row's last K columns they are; the pass's output, for its cache). The target columns are the last K of every
    row (`collate_rows` puts them there), K counted from the first column where any row has a target. GPT-2 and
    Llama (`plain_output_head`) run their body, then the head on those N hidden states, so neither padding nor a
    short row's prompt columns reach the head or the softmax; other models run whole on the last K columns."""
    targets = batch["targets"]  # (B, T): the token each column predicts, IGNORE where none
    has_target = targets != IGNORE  # (B, T)
    target_columns = has_target.any(0).nonzero()  # (columns with a target in some row, 1)
    kept = targets.shape[1] - int(target_columns[0]) if len(target_columns) else 1  # K
    where = has_target[:, -kept:]  # (B, K)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": use_cache,
              "attention_mask": model_attention_mask(model, batch["attention_mask"])}
    head = plain_output_head(model)
    if head is None:
        output = model(**inputs, logits_to_keep=kept)
        logits = output.logits[where]
    else:
        output = model.base_model(**inputs)
        logits = head(output.last_hidden_state[:, -kept:][where])
    return logits.float(), targets[:, -kept:][where], where, output


def at_targets(where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, K): `values` (N,), one per True of `where` in row-major order, in their places; 0 elsewhere."""
    return torch.zeros(where.shape, dtype=values.dtype, device=values.device).masked_scatter(where, values)


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's summed log-probability of its target tokens, with gradient, from one pass over a collated
    batch: padded (one row per example) or packed (examples sharing a prefix in one row, block attention mask).

        log p(y | x) = sum_t log softmax(z_t)[y_t],   z_t the logits of the column that predicts target y_t

    With `loss_on="answer"` the targets are the completion and its EOS, so this is log p(completion + EOS |
    prompt) with the prompt and the completion tokenized separately (`CompletionTask.encode_one`): what DPO's
    loss is made of. Packing (`shares_prefixes`) needs each completion's first token predicted inside its own
    suffix: share at most the prompt but its last token (`Encoded.shared_length < prompt_length`).

    Returns a (examples,) fp32 tensor in the order of the examples given to `collate`.
    """
    logits, targets, where, _ = target_logits(model, batch)  # (N, V), (N,), (B, K)
    token_logprobs = at_targets(where, -F.cross_entropy(logits, targets, reduction="none"))  # (B, K)
    if "continue_examples" not in batch:
        return token_logprobs.sum(-1)  # (B,): row b is example b
    rows = batch["continue_rows"]  # (S,): the row of each suffix (one per example), in packing order
    segments = batch["segments"][rows, -where.shape[1]:]  # (S, K): which suffix each target column belongs to
    own = segments == batch["continue_segments"][:, None]  # (S, K)
    per_suffix = torch.where(own, token_logprobs[rows], 0.0).sum(-1)  # (S,)
    return torch.zeros_like(per_suffix).index_copy(0, batch["continue_examples"], per_suffix)  # (examples,)


def line_stop_ids(tokenizer) -> set[int]:
    """EOS and every token whose text contains a newline: generation that must stay on one line stops there."""
    vocabulary = tokenizer.get_vocab()
    return {tokenizer.eos_token_id} | {
        index for token, index in vocabulary.items() if "\n" in tokenizer.convert_tokens_to_string([token])
    }


@torch.inference_mode()
def score_choices(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id: int,
                  prefix: PrefixCache | None = None) -> torch.Tensor:
    """Log-likelihood of each choice's tokens after each prompt: a (prompts, choices) tensor, exact.

    Single-token choices take one forward pass over the prompts (the next-token distribution); longer ones one
    forward pass over every prompt + choice pair. `prefix`: the prompts continue these prefixes (one row each).
    """
    device = next(model.parameters()).device
    single_token = all(len(choice) == 1 for choice in choices)
    rows = prompts if single_token else [list(prompt) + list(choice) for prompt in prompts for choice in choices]
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, device)
    cache = None
    if prefix is not None:
        row_prefix = prefix if single_token else prefix.rows([i for i in range(len(prompts)) for _ in choices])
        attention_mask, position_ids, cache = continuation_inputs(row_prefix, input_ids, attention_mask, position_ids)
    longest = 0 if single_token else max(len(choice) for choice in choices)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   logits_to_keep=longest + 1).logits.float()
    if single_token:
        return logits[:, -1].log_softmax(-1)[:, [choice[0] for choice in choices]]
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, -longest:, None])[..., 0]  # (rows, longest)
    lengths = torch.tensor([len(choice) for choice in choices] * len(prompts), device=device)
    in_choice = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
    return torch.where(in_choice, log_probs, 0.0).sum(-1).view(len(prompts), len(choices))
