"""A key/value cache written in place, for decoding (`generation.decode`).

transformers' DynamicLayer grows its keys and values by `torch.cat`, which copies the whole cache at every
generated token. `InPlaceLayer` allocates its buffers once, wide enough for everything a decoding call will add,
writes each step's keys and values into the next free columns, and shows the model `keys`/`values` as views of
the filled columns: the same values, in the same shape, as the concatenating layer, so attention is unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """One layer's keys and values (rows, kv heads, columns, head size) in preallocated buffers.

    The buffers are allocated at the first update, as wide as that update plus `reserve` columns (the caller's
    bound on what follows); a call past that bound reallocates (one copy), so a wrong bound costs time, never
    tokens."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self.length = 0  # columns filled
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.key_buffer is None or self.length + new > self.key_buffer.shape[2]:
            self._allocate(key_states, value_states, self.length + new + self.reserve)
        end = self.length + new
        self.key_buffer[:, :, self.length : end].copy_(key_states)  # broadcasts an expanded (stride 0) batch
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, width: int) -> None:
        """Buffers `width` columns wide, keeping the columns filled so far."""
        rows, heads = key_states.shape[0], key_states.shape[1]
        buffers = [states.new_empty((rows, heads, width, states.shape[-1])) for states in (key_states, value_states)]
        if self.length:
            buffers[0][:, :, : self.length].copy_(self.keys)
            buffers[1][:, :, : self.length].copy_(self.values)
        self.key_buffer, self.value_buffer = buffers

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`: one copy of their filled columns into buffers as wide as before."""
        if self.key_buffer is None:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            kept = old.new_empty((len(indices), *old.shape[1:]))
            kept[:, :, : self.length].copy_(old[indices, :, : self.length])
            setattr(self, name, kept)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def in_place_cache(reserve: int, start: Cache | None = None) -> Cache:
    """A cache of InPlaceLayers (one per model layer, made as the model first writes to it) that will hold
    `reserve` more columns than its first update; or than `start`, a prefix's cache whose keys and values it
    copies in (`start` stays untouched)."""
    cache = Cache(layer_class_to_replicate=partial(InPlaceLayer, reserve))
    if start is not None:
        for index, layer in enumerate(start.layers):
            cache.update(layer.keys, layer.values, index)
    return cache
