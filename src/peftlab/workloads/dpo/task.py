"""The DPO objective (Rafailov et al. 2023) over preference pairs.

An example is one pair: the prompt and each completion tokenised separately, each completion + EOS the target (as
`CompletionTask.encode_one` with answer-only loss); a completion marked truncated (cut at its sampling length, not
ended) gets no EOS, which would teach the policy to stop where the sampler cut. Chosen and rejected share the
prompt, so a batch packs them into one row (`peftlab.shared_prefix.pack`: the prompt computed once for both;
padded rows when the attention backend cannot take a block mask). Per pair, with π and π_ref the summed log-probs
of a completion under the policy and the reference (`tasks.completion.sequence_logprobs`):

    Δ = (π_c − π_ref,c) − (π_r − π_ref,r),   loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)

(ε = label_smoothing, conservative DPO; ε = 0 is DPO's −log σ(β·Δ)). The rewards are β·(π − π_ref) of each
completion. What a step logs besides the loss, under TRL's names: rewards/chosen, rewards/rejected,
rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected.

The reference log-probs come from the same model switched to its reference (`reference.reference_model`), live
in every step, or once per split into the compute-once cache (`precompute_reference`), keyed by the reference's
weights (`reference.reference_digest`), the tokenised pairs and the model and tokenizer names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from peftlab.cache import cached_tensors
from peftlab.data.preferences import PreferencePair
from peftlab.errors import PeftlabError
from peftlab.tasks import Encoded, StepOutput
from peftlab.tasks.completion import CompletionTarget, CompletionTask, sequence_logprobs
from peftlab.workloads.dpo.reference import DISABLED, ReferenceState, reference_digest, reference_model

PRECOMPUTE_PAIRS = 16  # pairs per reference pass when precomputing


@dataclass(frozen=True)
class PairTarget:
    """What a pair's example carries: each completion as a prompt + completion + EOS sequence (sharing the prompt
    but its last token, which predicts the completion's first inside its own packed suffix), and the reference
    log-probs (chosen, rejected) once precomputed."""

    chosen: Encoded
    rejected: Encoded
    reference: tuple[float, float] | None = None


@dataclass(frozen=True)
class Precompute:
    """Where and for what the reference log-probs are precomputed (set by the workload once the model exists)."""

    model: torch.nn.Module
    directory: Path  # RUN/cache
    model_name: str


def clear_pairs(pairs: list[PreferencePair], min_gap: float) -> list[PreferencePair]:
    """The pairs whose chosen_score - rejected_score is at least `min_gap` (all of them when it is 0); a pair
    without scores cannot be judged, so it is an error then (nothing is dropped silently)."""
    if min_gap == 0:
        return pairs
    unscored = next((pair for pair in pairs if pair.chosen_score is None or pair.rejected_score is None), None)
    if unscored is not None:
        raise PeftlabError(f"{unscored.origin}: --min-score-gap {min_gap} needs chosen_score and rejected_score on "
                           "every pair. Fix: score the pairs (`peftlab preferences` writes both) or drop the option")
    kept = [pair for pair in pairs if pair.chosen_score - pair.rejected_score >= min_gap]
    if not kept:
        largest = max(pair.chosen_score - pair.rejected_score for pair in pairs)
        raise PeftlabError(f"--min-score-gap {min_gap} keeps none of the {len(pairs)} training pairs (the largest gap "
                           f"is {largest:.4g}). Fix: a smaller gap")
    return kept


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float,
               label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (P,), rewards (P, 2) without gradient) from (P, 2) log-probs of (chosen, rejected)."""
    log_ratios = policy - reference  # (P, 2)
    delta = log_ratios[:, 0] - log_ratios[:, 1]  # (P,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * log_ratios.detach()


class DPOTask(CompletionTask):
    """Preference pairs trained with the DPO loss; validation reports the same quantities on held-out prompts."""

    select_metric_default = "loss"
    metric_names = ("rewards/accuracies", "rewards/margins")

    def __init__(self, read_split: Callable[[str], list[PreferencePair]], tokenizer, max_length: int, beta: float,
                 label_smoothing: float, min_score_gap: float = 0.0):
        super().__init__("preferences", tokenizer, max_length, "answer")
        if not beta > 0:
            raise PeftlabError(f"--beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise PeftlabError(f"--label-smoothing must be in [0, 0.5) (the share of pairs assumed flipped), got "
                               f"{label_smoothing}")
        if not min_score_gap >= 0:
            raise PeftlabError(f"--min-score-gap must be >= 0, got {min_score_gap}")
        self.read_split, self.beta, self.label_smoothing = read_split, beta, label_smoothing
        self.min_score_gap = min_score_gap
        self.shares_prefixes = True  # chosen and rejected in one packed row; the workload turns it off if it must
        self.reference_state: ReferenceState = DISABLED  # the workload sets the run's
        self.precompute: Precompute | None = None

    # Examples

    def encode(self, split: str) -> list[Encoded]:
        read = self.read_split(split)
        kept = clear_pairs(read, self.min_score_gap) if split == "train" else read  # validation: every pair
        pairs = [self.encode_pair(pair) for pair in kept]
        if not pairs:
            raise PeftlabError(f"preferences {split}: no pairs")
        return self.with_reference(split, pairs) if self.precompute else pairs

    def encode_pair(self, pair: PreferencePair) -> Encoded:
        """The pair as one example; its input_ids are the tokens of its packed row (the prompt once, then each
        completion + EOS, or without EOS when truncated), which is what batching by length reads."""
        prompt = self.tokens(pair.prompt)
        if not prompt:
            raise PeftlabError(f"{pair.origin}: the prompt is empty; a completion's first token needs a prompt token "
                               "to predict it")
        eos = self.tokenizer.eos_token_id
        sequences = []
        for text, truncated in ((pair.chosen, pair.chosen_truncated), (pair.rejected, pair.rejected_truncated)):
            ids = prompt + self.tokens(text) + ([] if truncated else [eos])  # a cut completion did not end there
            if len(ids) > self.max_length:
                raise PeftlabError(f"{pair.origin}: {len(ids)} tokens with the prompt, more than --max-length "
                                   f"{self.max_length}. Fix: raise --max-length (nothing is cut silently)")
            sequences.append(Encoded(ids, CompletionTarget(len(prompt), None), pair.origin,
                                     shared_length=len(prompt) - 1))
        chosen, rejected = sequences
        row = prompt + chosen.input_ids[len(prompt):] + rejected.input_ids[len(prompt):]
        return Encoded(row, PairTarget(chosen, rejected), pair.origin)

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """`CompletionTask.collate` of the 2P sequences (chosen, rejected, chosen, ...): each pair packed into one
        row with `shares_prefixes`, else padded rows; plus `reference_logps` (2P,) when precomputed."""
        sequences = [sequence for example in examples for sequence in (example.target.chosen, example.target.rejected)]
        batch = super().collate(sequences)
        batch["pairs"] = torch.tensor(len(examples))
        if all(example.target.reference is not None for example in examples):
            batch["reference_logps"] = torch.tensor([value for example in examples for value in example.target.reference])
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pairs"])

    # The loss

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        policy = sequence_logprobs(model, batch).view(-1, 2)  # (P, 2): chosen, rejected; with gradient
        if "reference_logps" in batch:
            reference = batch["reference_logps"].view(-1, 2).to(policy)
        else:
            with reference_model(model, self.reference_state):
                reference = sequence_logprobs(model, batch).view(-1, 2)
        losses, rewards = dpo_losses(policy, reference, self.beta, self.label_smoothing)
        chosen_wins = rewards[:, 0] > rewards[:, 1]
        logps = policy.detach()
        pairs = len(losses)
        sums = {"rewards/chosen": rewards[:, 0].sum(), "rewards/rejected": rewards[:, 1].sum(),
                "rewards/accuracies": chosen_wins.sum(), "rewards/margins": (rewards[:, 0] - rewards[:, 1]).sum(),
                "logps/chosen": logps[:, 0].sum(), "logps/rejected": logps[:, 1].sum()}
        predictions = [{"reward_chosen": chosen, "reward_rejected": rejected} for chosen, rejected in rewards.tolist()]
        return StepOutput(losses.sum(), pairs, predictions, int(chosen_wins.sum()),
                          {name: (value, pairs) for name, value in sums.items()})

    # Precomputed reference log-probs

    def with_reference(self, split: str, pairs: list[Encoded]) -> list[Encoded]:
        """The pairs with their reference log-probs, from RUN/cache/reference-<split>.safetensors when it was computed
        for this reference, these tokens, model and tokenizer; else computed now (inference mode) and stored."""
        model = self.precompute.model
        weights = reference_digest(model, self.reference_state)
        tokens = hashlib.sha256(json.dumps([[pair.target.chosen.input_ids, pair.target.chosen.target.prompt_length,
                                             pair.target.rejected.input_ids] for pair in pairs]).encode()).hexdigest()
        fingerprint = {"what": "DPO reference log-probs (chosen, rejected) per pair", "reference_weights": weights,
                       "reference": self.reference_state.source, "pairs": tokens, "model": self.precompute.model_name,
                       "tokenizer": getattr(self.tokenizer, "name_or_path", "")}
        path = self.precompute.directory / f"reference-{split}.safetensors"
        values = cached_tensors(path, fingerprint, lambda: {"logps": self.reference_logps(model, pairs)})["logps"]
        return [replace(pair, target=replace(pair.target, reference=tuple(row)))
                for pair, row in zip(pairs, values.view(-1, 2).tolist())]

    def reference_logps(self, model: torch.nn.Module, pairs: list[Encoded]) -> torch.Tensor:
        """(2P,) fp32 CPU: each pair's (chosen, rejected) reference log-probs, in order."""
        device = next(model.parameters()).device
        values = []
        with torch.inference_mode(), reference_model(model, self.reference_state):
            for start in range(0, len(pairs), PRECOMPUTE_PAIRS):
                batch = {key: value.to(device) for key, value in self.collate(pairs[start:start + PRECOMPUTE_PAIRS]).items()}
                values.append(sequence_logprobs(model, batch).cpu())
        return torch.cat(values)

    # Evaluation

    def reference(self, example: Encoded) -> str:
        return "chosen"

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict:
        return {}  # the rewards are the task's own sums, which the engine adds

    def format_metrics(self, metrics: dict) -> str:
        return (f"Reward accuracy: {metrics['rewards/accuracies']:.4f}, margin: {metrics['rewards/margins']:.4f}, "
                f"rewards chosen {metrics['rewards/chosen']:.4f} / rejected {metrics['rewards/rejected']:.4f}")
