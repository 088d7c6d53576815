"""Small student models that a fine-tuned transformer is distilled into (W2).

`DistilRNN`: token embedding -> (bi)directional RNN / GRU / LSTM -> linear classifier on the final hidden
state(s), as in Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks".
It has the classifier interface of `peftlab.models.SequenceClassifier`: `model(input_ids, attention_mask)`
returns logits (batch, num_labels), so the training engine and the checkpoints treat it like any model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from peftlab.errors import PeftlabError

RNN_KINDS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class DistilRNN(nn.Module):
    """Embedding -> RNN -> linear classifier.

    Args:
        vocab_size: rows of the embedding (the student's own, restricted vocabulary).
        num_labels: classes.
        kind: "rnn" (Elman, tanh), "gru" or "lstm".
        embedding_size: width of the token embedding.
        hidden_size: width of the RNN state per direction.
        layers: stacked RNN layers.
        bidirectional: also read the sentence right to left; the classifier sees both final states.
        dropout: on the embeddings, between RNN layers and before the classifier.
        padding_id: the embedding row of padding (kept at zero, never trained).

    Padding is skipped by packing the sequences with their lengths (from the attention mask), so a sentence
    gets the same logits alone or in a padded batch.
    """

    def __init__(self, vocab_size: int, num_labels: int, kind: str = "lstm", embedding_size: int = 128,
                 hidden_size: int = 256, layers: int = 1, bidirectional: bool = True, dropout: float = 0.0,
                 padding_id: int = 0):
        super().__init__()
        self.directions = 2 if bidirectional else 1
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=padding_id)
        self.rnn = RNN_KINDS[kind](embedding_size, hidden_size, num_layers=layers, bidirectional=bidirectional,
                                   dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.directions * hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_labels)."""
        lengths = attention_mask.long().sum(-1).cpu()  # (B,) pack_padded_sequence wants them on the CPU
        embedded = self.dropout(self.embedding(input_ids))  # (B, T, E)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        final = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n); (layers·D, B, H), batch order kept
        last_layer = final[-self.directions:]  # (D, B, H)
        pooled = last_layer.transpose(0, 1).reshape(input_ids.shape[0], -1)  # (B, D·H)
        return self.classifier(self.dropout(pooled))


def build_student(settings, vocabulary, num_labels: int) -> DistilRNN:
    """The student a run's `DistillConfig` describes, over a `peftlab.distill.StudentVocabulary`."""
    return DistilRNN(vocabulary.size, num_labels, settings.student, settings.embedding_size, settings.hidden_size,
                     settings.layers, settings.bidirectional, settings.dropout, vocabulary.padding_id)


def principal_components(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` (N, width) projected on their first `size` principal axes, scaled to unit variance overall (the
    scale of nn.Embedding's N(0, 1) init). Each axis's sign is fixed (largest loading positive), so the result
    does not depend on the SVD routine's sign choice."""
    if not 1 <= size <= min(rows.shape):
        raise PeftlabError(f"cannot project {rows.shape[0]} embeddings of width {rows.shape[1]} on {size} principal "
                           f"axes. Fix: --embedding-size at most {min(rows.shape)}")
    centered = rows.double() - rows.double().mean(0)
    _, _, axes = torch.linalg.svd(centered, full_matrices=False)  # (k, width), most variance first
    axes = axes[:size]
    axes = axes * axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()
    projected = centered @ axes.T  # (N, size)
    return (projected / projected.std()).float()
