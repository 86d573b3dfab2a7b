# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The generation cache of `CoLT5ForCausalLM`.

Each layer keeps a `CausalAttentionState` (light sliding window, router scores, routed key/value memory and the
current block), not the growing key/value tensors of dense attention. The cache also counts each sample's valid
tokens on the host, so that layers know where blocks end without a device synchronisation per layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .causal_attention import CausalAttentionState


class CoLT5CacheLayer(CacheLayerMixin):
    """One layer's `CausalAttentionState` (None before the first forward pass)."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: CausalAttentionState | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise TypeError("CoLT5CacheLayer keeps a routed attention state; the model's layers fill it themselves.")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError(
            "CoLT5CacheLayer has no key/value tensors to update: CoLT5's causal attention keeps a sliding window "
            "and a routed memory, which its layers update themselves."
        )

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        self.state = None

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "CoLT5Cache cannot be cropped: its routed memory is re-routed at block boundaries and the old one is "
            "not kept. Generate without assisted decoding or prompt lookup."
        )


class CoLT5Cache(Cache):
    """Generation cache for `CoLT5ForCausalLM`: one `CoLT5CacheLayer` per layer plus each sample's count of valid
    tokens seen (`valid_counts`, on the host)."""

    def __init__(self, config):
        super().__init__(layers=[CoLT5CacheLayer() for _ in range(config.num_hidden_layers)])
        self.valid_counts: list[int] = []

    def reset(self) -> None:
        super().reset()
        self.valid_counts = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.valid_counts = [self.valid_counts[i] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.valid_counts = [count for count in self.valid_counts for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.valid_counts = [self.valid_counts[i] for i in torch.as_tensor(indices).tolist()]


__all__ = ["CoLT5Cache", "CoLT5CacheLayer"]
