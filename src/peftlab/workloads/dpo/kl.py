"""How far a policy has moved from its reference, measured on completions sampled from the policy (DPO's evaluation,
the x axis of the reward-KL frontier).

For completions y ~ π(·|x) (up to the same stopping rule for both models: EOS, the token limit, stop strings),

    KL(π‖π_ref)(x) = E_y[ Σ_t log π(y_t|x,y<t) − log π_ref(y_t|x,y<t) ]
                   = E_y[ Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)) ]            (tower rule, step by step)

`sequence_kl` returns one sample of each bracket: `log_ratio` (the sampled tokens only; unbiased but noisy, and
negative for some samples) and `kl` (the full next-token distributions at every sampled position; also unbiased,
never negative, with much less spread, since each step's expectation over the next token is taken exactly). Both are
sums over the completion's tokens, its EOS included when it was sampled.

The reference is given as a context-manager factory: `model` computes π_ref inside `with reference():` (DPO's
`reference.reference_model(model, state)`: its adapter disabled or frozen), so no second model is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from peftlab.generation import left_pad

ReferenceFactory = Callable[[], AbstractContextManager]  # `with reference():` the model computes the reference


class SequenceKL(NamedTuple):
    """Per completion, in nats: (N,) tensors on the model's device."""

    kl: torch.Tensor  # Σ_t KL of the full next-token distributions at the completion's positions
    log_ratio: torch.Tensor  # Σ_t log π(y_t) − log π_ref(y_t) of the sampled tokens


@torch.inference_mode()
def sequence_kl(model, reference: ReferenceFactory, prompts: Sequence[Sequence[int]],
                completions: Sequence[Sequence[int]], pad_id: int, temperature: float = 1.0) -> SequenceKL:
    """KL(π‖π_ref) estimates of each completion after its prompt (token ids), from one policy pass and one reference
    pass over the left-padded prompt + completion rows.

    `temperature`: the distributions compared are softmax(logits / temperature) of each model, those the completions
    were sampled from (1: the models themselves)."""
    rows = [list(prompt) + list(completion) for prompt, completion in zip(prompts, completions)]
    lengths = torch.tensor([len(completion) for completion in completions])
    longest = int(lengths.max()) if len(lengths) else 0
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, next(model.parameters()).device)

    def completion_log_probs() -> torch.Tensor:
        """(N, longest, V) log-probabilities of the next token at each of the last `longest` positions' predecessors:
        left padding puts every completion at the right end, so column j predicts the token of column j + 1."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=longest + 1).logits[:, :-1].float()
        return (logits / temperature).log_softmax(-1)

    policy = completion_log_probs()
    with reference():
        ref = completion_log_probs()
    lengths = lengths.to(input_ids.device)
    in_completion = torch.arange(longest, device=input_ids.device)[None, :] >= (longest - lengths)[:, None]  # (N, L)
    per_token_kl = (policy.exp() * (policy - ref)).sum(-1)  # (N, L)
    sampled = input_ids[:, input_ids.shape[1] - longest :, None]  # (N, L, 1): the tokens those positions predict
    per_token_ratio = (policy.gather(-1, sampled) - ref.gather(-1, sampled))[..., 0]  # (N, L)
    return SequenceKL(torch.where(in_completion, per_token_kl, 0.0).sum(-1),
                      torch.where(in_completion, per_token_ratio, 0.0).sum(-1))
