# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The generation cache of `CoLT5ForCausalLM`.

Each layer keeps a `CausalAttentionState` (light sliding window, router scores, routed key/value memory and the
current block), not the growing key/value tensors of dense attention. The cache also counts each sample's valid
tokens on the host, so that layers know where blocks end without a device synchronisation per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .causal_attention import CausalAttentionState

# The name under which generate() passes the cache to forward() and reads it back from the outputs: transformers 5.24
# renamed it from `past_key_values` (5.17-5.23) to `cache`, in the keyword and in every ModelOutput field at once.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_NAME = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def accepts_past_key_values(forward: Callable) -> Callable:
    """Decorates a `forward(..., cache=None, ...)` so that it also takes the cache as `past_key_values`."""
    if CACHE_NAME == "cache":
        # As transformers' own models do from 5.24 on: the old name still works, with transformers' FutureWarning.
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_taking_past_key_values(*args, past_key_values: Cache | None = None, **kwargs):
        # Before 5.24 `past_key_values` is the release's own name, the one its generate() passes: taken silently.
        # A cache given to generate() as `cache=` reaches forward() under both names, as the same object; two
        # different ones follow 5.24's rule: `cache` wins, with a warning.
        if kwargs.get("cache") is None:
            kwargs["cache"] = past_key_values
        elif past_key_values is not None and past_key_values is not kwargs["cache"]:
            warnings.warn(
                f"Both `past_key_values` and `cache` are set for `{forward.__qualname__}`: using `cache`.",
                FutureWarning,
                stacklevel=2,
            )
        return forward(*args, **kwargs)

    return forward_taking_past_key_values


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


__all__ = ["CACHE_NAME", "CoLT5Cache", "CoLT5CacheLayer"]
