# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The generation cache of `CoLT5ForCausalLM`.

Each `CoLT5CacheLayer` holds one causal routed attention layer's decode state (light sliding window, router scores,
routed key/value memory, the current block, token counts), not the growing key/value tensors of dense attention,
and does the state's bookkeeping: prefill, append and re-routing at block boundaries. The attention layer computes
the tensors and attends to what the cache layer holds; the model only creates the cache and passes it on.

Token counts are kept twice: on the host (where blocks end, decided without a device synchronisation) and on the
device (positions and write slots, so that a decode step is a fixed sequence of kernels a CUDA graph can replay).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .memory_attention import scale_memory
from .router import route

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


class RoutedMemorySettings(NamedTuple):
    """What the cache needs to know of its attention layer to keep and re-route the routed memory."""

    memory_size: int
    block_size: int
    light_window_size: int
    heads_per_set: int
    multiply_keys_by_score: bool
    route_kwargs: dict[str, Any]


# The tensors of a filled cache layer (batch-first; see CoLT5CacheLayer).
_STATE_TENSORS = (
    "light_keys", "light_values", "light_mask", "scores", "token_mask", "memory_keys", "memory_values",
    "memory_weights", "memory_mask", "memory_index", "block_index", "block_fill", "heavy_keys", "heavy_values",
    "heavy_mask", "counts", "seen",
)
# Made by the per-token routers at their first call (`router_statistics`), None for routers on raw scores.
_ROUTER_STATISTICS = ("query_router_statistics", "feedforward_router_statistics")


class CoLT5CacheLayer(CacheLayerMixin):
    """One causal routed attention layer's decode state. Positions are indices into everything the layer has seen
    (padding included).

    light_keys, light_values: `(batch, light_heads, window + 1, head_dim)` a ring buffer of the last tokens
        (position p at slot p % (window + 1)), rotated keys; light_mask `(batch, window + 1)` filled valid slots.
    scores: `(batch, sets, capacity)` key/value router scores of every token seen, for re-routing (capacity grows
        by doubling); token_mask `(batch, capacity)` False for padding and unused capacity.
    memory_keys, memory_values: `(batch, sets, memory_size, heads_per_set * head_dim)` the current block's routed
        memory (rotated keys, not scaled by the router weights), the candidates of the next re-routing;
        memory_weights, memory_mask, memory_index `(batch, sets, memory_size)` weights, filled slots, positions.
    block_index: `(batch, block_size)` positions of the current block's tokens; block_fill `(batch,)` their count.
    heavy_keys, heavy_values: `(batch, heavy_heads, memory_size + block_size, head_dim)` what a heavy query
        attends to: the memory scaled by its weights, then the current block; heavy_mask
        `(batch, heavy_heads, memory_size + block_size)` the slots a query may attend to.
    counts: `(batch,)` valid tokens seen per sample; seen: `()` tokens seen (device copies of `valid_counts` and
        `seen_tokens`, the host's).
    query_router_statistics, feedforward_router_statistics: `(batch, 3)` float64 (count, sum, sum of squares)
        of the per-token routers' raw scores over each sample's valid tokens, which prefix-standardised routing
        continues from (see `router_statistics`); None for a router on raw scores or without one.
    version: changes whenever a tensor is replaced rather than written in place (a captured CUDA graph that
        reads the old tensors is then stale).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.settings: RoutedMemorySettings | None = None
        self.valid_counts: list[int] = []
        self.seen_tokens = 0
        self.version = 0
        # Set by a CUDA-graph runner that does the host part of each step (`begin_token`) itself.
        self.tokens_begun_outside = False
        for name in _STATE_TENSORS + _ROUTER_STATISTICS:
            setattr(self, name, None)

    # --------------------------------------------------------------------------------- transformers' interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise TypeError("CoLT5CacheLayer keeps a routed attention state; its attention layer fills it with prefill().")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError(
            "CoLT5CacheLayer has no key/value tensors to update: CoLT5's causal attention keeps a sliding window "
            "and a routed memory, which it writes with prefill() and append()."
        )

    @property
    def is_filled(self) -> bool:
        return self.settings is not None

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_filled:
            return
        # In place: the batch keeps its size, and a captured decode graph keeps reading the same tensors.
        for name in _STATE_TENSORS + _ROUTER_STATISTICS:
            tensor = getattr(self, name)
            if tensor is not None and tensor.dim() > 0:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))
        self.valid_counts = [self.valid_counts[i] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda counts: [
            count for count in counts for _ in range(repeats)
        ])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        kept = torch.as_tensor(indices).tolist()
        self._replace_batch(lambda t: t[indices], lambda counts: [counts[i] for i in kept])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "CoLT5Cache cannot be cropped: its routed memory is re-routed at block boundaries and the old one is "
            "not kept. Generate without assisted decoding or prompt lookup."
        )

    def _replace_batch(self, batch_fn: Callable[[torch.Tensor], torch.Tensor], counts_fn) -> None:
        if not self.is_filled:
            return
        for name in _STATE_TENSORS + _ROUTER_STATISTICS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, batch_fn(tensor) if tensor.dim() > 0 else tensor)
        self.valid_counts = counts_fn(self.valid_counts)
        self.version += 1

    # --------------------------------------------------------------------------------- the decode state
    def router_statistics(self, router: str, batch: int, device: torch.device) -> torch.Tensor:
        """The `(batch, 3)` float64 prefix statistics of the layer's "query" or "feedforward" router, which the
        router updates in place; zeros (no token yet) at the first call."""
        name = f"{router}_router_statistics"
        if name not in _ROUTER_STATISTICS:
            raise ValueError(f"router must be 'query' or 'feedforward', got {router!r}.")
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(batch, 3, dtype=torch.float64, device=device))
        return getattr(self, name)

    def prefill(
        self,
        settings: RoutedMemorySettings,
        *,
        light_keys: torch.Tensor,
        light_values: torch.Tensor,
        valid: torch.Tensor,
        scores: torch.Tensor,
        memory_keys: torch.Tensor,
        memory_values: torch.Tensor,
        memory_weights: torch.Tensor,
        memory_mask: torch.Tensor,
        memory_index: torch.Tensor,
        block_keys: torch.Tensor,
        block_values: torch.Tensor,
        block_index: torch.Tensor,
        block_fill: torch.Tensor,
    ) -> None:
        """Keep the state after a forward pass over a whole prompt of n tokens.

        Args:
            settings: the attention layer's memory settings.
            light_keys, light_values: `(batch, light_heads, n, head_dim)` every token's light keys/values.
            valid: `(batch, n)` bool, False for padding.
            scores: `(batch, sets, n)` key/value router scores.
            memory_*: the routed memory of each sample's last block, `(batch, sets, m, features)` keys and values
                and `(batch, sets, m)` weights, filled slots and positions, m <= memory_size.
            block_keys, block_values: `(batch, sets, block_size, features)` that block's keys/values;
                block_index `(batch, block_size)` its positions, block_fill `(batch,)` its count.
        """
        self.settings = settings
        memory, block = settings.memory_size, settings.block_size
        length, ring = valid.shape[1], settings.light_window_size + 1
        last = torch.arange(max(0, length - ring), length, device=valid.device)
        slots = last % ring
        self.light_keys = light_keys.new_zeros(*light_keys.shape[:2], ring, light_keys.shape[-1]).index_copy_(
            2, slots, light_keys[:, :, last]
        )
        self.light_values = torch.zeros_like(self.light_keys).index_copy_(2, slots, light_values[:, :, last])
        self.light_mask = valid.new_zeros(valid.shape[0], ring).index_copy_(1, slots, valid[:, last])

        # Spare capacity for the tokens to come (a power of two: few re-allocations, each a new graph).
        capacity = 1 << length.bit_length()
        self.scores = F.pad(scores, (0, capacity - length))
        self.token_mask = F.pad(valid, (0, capacity - length))
        pad = memory - memory_keys.shape[2]
        self.memory_keys, self.memory_values = (F.pad(t, (0, 0, 0, pad)) for t in (memory_keys, memory_values))
        self.memory_weights, self.memory_mask, self.memory_index = (
            F.pad(t, (0, pad)) for t in (memory_weights, memory_mask, memory_index)
        )
        heavy_keys, heavy_values, heavy_mask = self._heavy_memory(
            self.memory_keys, self.memory_values, self.memory_weights, self.memory_mask
        )
        split = "b s m (h e) -> b (s h) m e"
        block_filled = torch.arange(block, device=valid.device) < block_fill.unsqueeze(-1)
        self.heavy_keys = torch.cat((heavy_keys, rearrange(block_keys, split, h=settings.heads_per_set)), dim=2)
        self.heavy_values = torch.cat((heavy_values, rearrange(block_values, split, h=settings.heads_per_set)), dim=2)
        self.heavy_mask = torch.cat((heavy_mask, block_filled.unsqueeze(1).expand(-1, heavy_mask.shape[1], -1)), 2)
        self.block_index, self.block_fill = block_index, block_fill
        self.counts = valid.sum(-1)
        self.seen = torch.tensor(length, device=valid.device)
        # Copies without autograd history: the state outlives this forward pass and must not pin its tensors.
        for name in _STATE_TENSORS:
            setattr(self, name, getattr(self, name).detach().clone())
        self.valid_counts = self.counts.tolist()
        self.seen_tokens = length
        self.version += 1

    def begin_token(self) -> None:
        """The host part of appending one token to every sample, before its tensors are computed: re-route the
        memory of the samples whose block is full, make room for its score, count it."""
        if self.tokens_begun_outside:
            return
        block = self.settings.block_size
        full = [sample for sample, count in enumerate(self.valid_counts) if count > 0 and count % block == 0]
        if full:
            self._reroute(torch.tensor(full, device=self.counts.device))
        if self.seen_tokens == self.scores.shape[-1]:  # grow by doubling: amortised O(1) per token
            self.scores = torch.cat((self.scores, torch.zeros_like(self.scores)), dim=-1)
            self.token_mask = torch.cat((self.token_mask, torch.zeros_like(self.token_mask)), dim=-1)
            self.version += 1
        self.valid_counts = [count + 1 for count in self.valid_counts]
        self.seen_tokens += 1

    def append(
        self,
        light_key: torch.Tensor,
        light_value: torch.Tensor,
        heavy_key: torch.Tensor,
        heavy_value: torch.Tensor,
        score: torch.Tensor,
    ) -> None:
        """Write one new (valid) token per sample, after `begin_token`. Only device operations at device indices:
        a CUDA graph can replay this.

        Args:
            light_key, light_value: `(batch, light_heads, 1, head_dim)` (rotated key).
            heavy_key, heavy_value: `(batch, sets, 1, heads_per_set * head_dim)` (rotated key).
            score: `(batch, sets, 1)` its key/value router scores.
        """
        slot = (self.seen % self.light_keys.shape[2]).view(1)
        self.light_keys.index_copy_(2, slot, light_key.to(self.light_keys.dtype))
        self.light_values.index_copy_(2, slot, light_value.to(self.light_values.dtype))
        self.light_mask.index_fill_(1, slot, True)
        rows = torch.arange(self.block_fill.shape[0], device=self.block_fill.device)
        column = self.settings.memory_size + self.block_fill
        split = "b s n (h e) -> b n (s h) e"
        heads_per_set = self.settings.heads_per_set
        self.heavy_keys[rows, :, column] = rearrange(heavy_key, split, h=heads_per_set)[:, 0].to(self.heavy_keys.dtype)
        self.heavy_values[rows, :, column] = rearrange(heavy_value, split, h=heads_per_set)[:, 0].to(
            self.heavy_values.dtype
        )
        heads = self.heavy_mask.shape[1]
        # A scatter of a constant, not an assignment of `True`: that would copy a host tensor (not capturable).
        self.heavy_mask.scatter_(2, column.view(-1, 1, 1).expand(-1, heads, 1), True)
        self.block_index[rows, self.block_fill] = self.seen
        self.block_fill += 1
        self.scores.index_copy_(2, self.seen.view(1), score.to(self.scores.dtype))
        self.token_mask.index_fill_(1, self.seen.view(1), True)
        self.counts += 1
        self.seen += 1

    def _heavy_memory(self, keys, values, weights, mask):
        """The memory part of `heavy_keys/values/mask` from `(c, sets, memory, features)` memory tensors."""
        settings = self.settings
        scaled_keys, scaled_values = scale_memory(keys, values, weights, settings.multiply_keys_by_score)
        split = "c s m (h e) -> c (s h) m e"
        return (
            rearrange(scaled_keys, split, h=settings.heads_per_set),
            rearrange(scaled_values, split, h=settings.heads_per_set),
            mask.repeat_interleave(settings.heads_per_set, dim=1),
        )

    def _reroute(self, samples: torch.Tensor) -> None:
        """Replace the memory of `samples` (whose current block just filled up) by the memory of the next block:
        the top of the old memory and the finished block, weighted by the soft top-k over the whole prefix."""
        seen, memory = self.seen_tokens, self.settings.memory_size
        routed = route(
            self.scores[samples, :, :seen], memory, self.token_mask[samples, :seen], **self.settings.route_kwargs
        )
        pad = memory - routed.indices.shape[-1]
        indices, weights, filled = (F.pad(t, (0, pad)) for t in routed)
        old_index = self.memory_index[samples].masked_fill(~self.memory_mask[samples], -1)
        block_index = self.block_index[samples].unsqueeze(1).expand(-1, old_index.shape[1], -1)
        candidates = torch.cat((old_index, block_index), dim=-1)  # (c, sets, memory + block)
        source = (indices.unsqueeze(-1) == candidates.unsqueeze(-2)).int().argmax(-1)
        source = source.unsqueeze(-1).expand(-1, -1, -1, self.memory_keys.shape[-1])
        merge = "c (s h) m e -> c s m (h e)"
        sets = self.memory_keys.shape[1]
        new_memory = []
        for name in ("keys", "values"):
            finished_block = rearrange(getattr(self, f"heavy_{name}")[samples, :, memory:], merge, s=sets)
            pool = torch.cat((getattr(self, f"memory_{name}")[samples], finished_block), dim=2)
            new_memory.append(pool.gather(2, source))
        self.memory_keys[samples], self.memory_values[samples] = new_memory
        self.memory_index[samples] = indices
        self.memory_weights[samples] = weights.to(self.memory_weights.dtype)
        self.memory_mask[samples] = filled
        heavy_keys, heavy_values, heavy_mask = self._heavy_memory(*new_memory, weights, filled)
        self.heavy_keys[samples, :, :memory] = heavy_keys.to(self.heavy_keys.dtype)
        self.heavy_values[samples, :, :memory] = heavy_values.to(self.heavy_values.dtype)
        self.heavy_mask[samples] = F.pad(heavy_mask, (0, self.settings.block_size))
        self.block_fill[samples] = 0


class CoLT5Cache(Cache):
    """Generation cache for `CoLT5ForCausalLM`: one `CoLT5CacheLayer` per causal layer.

    Args:
        config: the model's config (its `num_hidden_layers`), or None with `num_hidden_layers` (a cache for
            standalone causal attention layers, each built with its `layer_idx`).
    """

    def __init__(self, config=None, *, num_hidden_layers: int | None = None):
        if (config is None) == (num_hidden_layers is None):
            raise ValueError("CoLT5Cache takes a config or num_hidden_layers (one of them).")
        layers = config.num_hidden_layers if config is not None else num_hidden_layers
        super().__init__(layers=[CoLT5CacheLayer() for _ in range(layers)])
        # A captured decode step (see cuda_graph_decoding.py), bound to this cache's tensors.
        self.decode_graph = None

    @property
    def valid_counts(self) -> list[int]:
        """Valid tokens seen per sample (on the host); empty before the first forward pass."""
        return self.layers[0].valid_counts

    def device_counts(self) -> torch.Tensor | None:
        """`(batch,)` valid tokens seen per sample, on the device (None before the first forward pass)."""
        return self.layers[0].counts

    def reset(self) -> None:
        super().reset()
        self.decode_graph = None


__all__ = ["CACHE_NAME", "CoLT5Cache", "CoLT5CacheLayer", "RoutedMemorySettings"]
