"""Scoring k-shot prompts with the demonstrations computed once (SPEC 5.2).

All prompts of one demonstration set (every test example and the content-free inputs) begin with the same tokens:
the demonstrations. `shared_length` finds that common run of token ids (the prompts are tokenised whole, as
lm-evaluation-harness does, so a token that spans the demonstrations' end and the test input is handled exactly:
it is simply not shared), `generation.prefill` computes it once, and every batch of prompts continues from its
key/value cache (`PrefixCache.rows`: one expanded view, no copy per row).

Predictions from the verbalisers' log-likelihoods ll (examples, labels):
- raw: argmax ll (lm-eval's acc);
- length-normalised: argmax ll / len(verbaliser) in characters (lm-eval's acc_norm: `len(choice)` of the choice
  string without the target delimiter);
- calibrated (Zhao et al. 2021): p = softmax over the labels of ll, p_cf the mean of p over the content-free
  inputs after the same demonstrations, argmax p / p_cf.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from peftlab.generation import decode, prefill
from peftlab.shared_prefix import PrefixCache
from peftlab.tasks.completion import score_choices


def shared_length(rows: Sequence[Sequence[int]]) -> int:
    """The number of leading token ids all rows share, leaving every row at least one token of its own (the
    token whose logits score or start its answer)."""
    first = rows[0]
    length = min(len(row) for row in rows) - 1
    for row in rows[1:]:
        same = 0
        while same < length and row[same] == first[same]:
            same += 1
        length = same
    return max(length, 0)


class SharedRows:
    """Rows of token ids whose shared leading tokens are computed once (`prefill`, at construction); `batches`
    hands out the rows' own tokens after them with that cache expanded to the batch."""

    def __init__(self, model, rows: Sequence[Sequence[int]], pad_id: int):
        self.rows, self.shared = rows, shared_length(rows)
        self.prefix = prefill(model, [list(rows[0][: self.shared])], pad_id) if self.shared else None

    def batches(self, count: int, batch_size: int) -> Iterator[tuple[list[list[int]], PrefixCache | None]]:
        """(suffixes, prefix cache of as many rows, or None when the rows share nothing) for the first `count`
        rows, `batch_size` at a time."""
        for start in range(0, count, batch_size):
            suffixes = [list(row[self.shared :]) for row in self.rows[start : min(start + batch_size, count)]]
            yield suffixes, None if self.prefix is None else self.prefix.rows([0] * len(suffixes))


def choice_loglikelihoods(model, rows: SharedRows, choices: Sequence[Sequence[int]], pad_id: int,
                          batch_size: int) -> torch.Tensor:
    """(rows, choices) fp32 on the CPU: log p(choice tokens | row) for every row."""
    return torch.cat([score_choices(model, suffixes, choices, pad_id, prefix=prefix).cpu()
                      for suffixes, prefix in rows.batches(len(rows.rows), batch_size)])


def greedy_continuations(model, rows: SharedRows, count: int, max_new_tokens: int, stop_ids: set[int], pad_id: int,
                         batch_size: int) -> list[list[int]]:
    """The greedy continuation (token ids) of each of the first `count` rows."""
    return [tokens for suffixes, prefix in rows.batches(count, batch_size)
            for tokens in decode(model, suffixes, max_new_tokens, stop_ids, pad_id, prefix=prefix)]


def content_free_prior(loglikelihoods: torch.Tensor) -> torch.Tensor:
    """p_cf (labels,): the mean over the content-free inputs of their label probabilities (normalised over the
    verbalisers)."""
    return loglikelihoods.softmax(-1).mean(0)


def label_predictions(loglikelihoods: torch.Tensor, verbalizer_lengths: Sequence[int],
                      prior: torch.Tensor) -> dict[str, list[int]]:
    """Per example the label predicted raw, length-normalised and calibrated by `prior` (p_cf)."""
    lengths = torch.tensor([float(length) for length in verbalizer_lengths])
    return {
        "raw": loglikelihoods.argmax(-1).tolist(),
        "norm": (loglikelihoods / lengths).argmax(-1).tolist(),
        "calibrated": (loglikelihoods.softmax(-1) / prior).argmax(-1).tolist(),
    }
