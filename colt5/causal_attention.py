# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional attention for causal models: the output at position t depends on tokens <= t only.

What a token at valid index t, in block j = t // block_size, sees:
- light branch (every token): the tokens t - light_window_size .. t (causal sliding window);
- heavy branch (every token when `routed_query_fraction` is 1, else the tokens routed by a per-token
  `ThresholdRouter`): the routed memory of block j (the `memory_size` best-scoring tokens before the block,
  weighted by the soft top-k over that prefix) plus every token of block j up to t.

Why every token is a heavy query by default in CoLT5ForCausalLM: a per-token query router learns which tokens need
the heavy attention only from the tokens it already routes (an unrouted token has no heavy output, hence no
gradient), and a causal router cannot look ahead to see which token will need the distant past. On passkey
retrieval the token that must read the key was routed in no example at all, in any layer, and the model stayed at
chance, while the same model with every token a heavy query retrieved the key in every example (README, "Retrieval").
The routed key/value memory keeps the heavy attention's cost at O(memory_size + block_size) per token.

Decoding a token costs O(light_window_size + memory_size + block_size) per layer whatever the context length;
at each block boundary the memory is re-routed from the stored router scores (O(context) scalars) and the keys
and values of the old memory and the finished block (the new memory is the top of those two). That state lives in
the layer's `CoLT5CacheLayer` (cache_colt5.py); this module computes tensors and attends.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .cache_colt5 import CoLT5Cache, CoLT5CacheLayer, RoutedMemorySettings
from .causal_router import GateOutput, ThresholdRouter, route_block_memory
from .decode_attention import decode_attention
from .memory_attention import memory_attention, tokens_at
from .rotary import apply_rotary
from .routed_attention import TwoBranchAttention, project
from .router import TokenScorer, route_settings, with_default_schedule


def _at_block(t: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """`(batch, sets, blocks, ...)` -> `(batch, sets, ...)`: each sample's entry at its `(batch,)` block."""
    index = block.view(-1, 1, 1, *([1] * (t.dim() - 3))).expand(-1, t.shape[1], 1, *t.shape[3:])
    return t.gather(2, index).squeeze(2)


class CausalRoutedAttention(TwoBranchAttention):
    """Causal routed attention (see the module docstring).

    Args:
        dim: model width.
        routed_query_fraction: target share of tokens routed as heavy queries, in (0, 1]; at 1 every token is a
            heavy query (with weight 1) and there is no query router.
        memory_size: routed keys/values per block and routing set.
        block_size: the memory is re-routed every `block_size` valid tokens.
        light_heads, light_dim_head, light_window_size: light branch (each token sees the `light_window_size`
            tokens before it and itself).
        heavy_heads, heavy_dim_head: heavy branch; heads are split evenly among `num_routed_kv` routing sets.
        multiply_keys_by_score: scale memory keys by their router weight (values always are).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        learned_unrouted_output: add a learned vector to the heavy output of tokens that are not routed (needs
            `routed_query_fraction` < 1).
        rotary_theta: rotary base (positions from `position_ids` in both branches).
        dropout: attention-probability dropout.
        router_kwargs: soft top-k settings for the memory routing, in either package's keywords (see
            `CoordinateDescentRouter`; here the default is the exact soft top-k at eps 1 without straight-through);
            the query router uses fetch_ratio, eps and straight_through. `random_routing` (both routers score at
            random, an ablation control; see `TokenScorer`).
        router_prefix_normalization: the query router thresholds prefix-standardised scores (see `ThresholdRouter`).
        router_momentum: moving-average weight of the query router's statistics (None: the router's default).
        router_capacity_factor, router_capacity_burst: in training, each block has `ceil(router_capacity_factor *
            routed_query_fraction * block_size) + router_capacity_burst` heavy query slots (at most block_size;
            static shapes, no host synchronisation); routed tokens beyond them are dropped (see
            `ThresholdRouter`). Factor None: as many slots as routed tokens (a host synchronisation).
        rotary_emb, light_rotary_emb: rotary positions in the heavy and the light branch.
        layer_idx: the layer's index in a `CoLT5Cache` (its `CoLT5CacheLayer` holds this layer's decode state).
        branch_norms, null_kv, use_flash_attn: see `TwoBranchAttention` and `RoutedAttentionBase`
            (colt5-attention's autoregressive attention normalises its input and has a null key/value).
    """

    def __init__(
        self,
        dim: int,
        *,
        routed_query_fraction: float,
        memory_size: int,
        block_size: int,
        light_heads: int = 4,
        light_dim_head: int = 64,
        light_window_size: int = 127,
        heavy_heads: int = 8,
        heavy_dim_head: int = 64,
        num_routed_kv: int = 1,
        multiply_keys_by_score: bool = True,
        multiply_queries_by_score: bool = False,
        learned_unrouted_output: bool = False,
        rotary_theta: float = 10000.0,
        dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
        router_prefix_normalization: bool = True,
        router_momentum: float | None = None,
        router_capacity_factor: float | None = 1.5,
        router_capacity_burst: int = 64,
        rotary_emb: bool = True,
        light_rotary_emb: bool = True,
        layer_idx: int = 0,
        branch_norms: bool = False,
        null_kv: bool = False,
        use_flash_attn: bool | None = None,
    ):
        super().__init__(
            dim,
            causal=True,
            light_heads=light_heads,
            light_dim_head=light_dim_head,
            light_window_size=light_window_size,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=rotary_theta,
            dropout=dropout,
            light_rotary=light_rotary_emb,
            heavy_rotary=rotary_emb,
            branch_norms=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
        )
        for name, value in (("memory_size", memory_size), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        # colt5's causal default: the exact soft top-k (or, with iterations, a constant eps) at eps 1, without
        # straight-through.
        router_kwargs = {"n_iters": None, "eps": 1.0, "straight_through": False, **(router_kwargs or {})}
        router_kwargs = with_default_schedule(router_kwargs, (router_kwargs["eps"], 1.0))
        if router_kwargs.pop("route_block_size", None) is not None:
            raise ValueError("route_block_size does not apply to causal attention: its memory is routed per block.")
        cosine = router_kwargs.pop("cosine_sim_routing", False)
        cosine_scale = router_kwargs.pop("cosine_sim_scale", 8.0)
        scoring = dict(
            random_routing=router_kwargs.pop("random_routing", False), cosine_sim_scale=cosine_scale if cosine else None
        )
        self.memory_route_kwargs = route_settings(**router_kwargs)
        self.memory_size, self.block_size, self.layer_idx = memory_size, block_size, layer_idx
        if routed_query_fraction == 1 and learned_unrouted_output:
            raise ValueError(
                "learned_unrouted_output needs routed_query_fraction < 1: with 1 every token is a heavy query, so "
                "there is no unrouted token to give the learned output to."
            )
        # With every token a heavy query there is nothing to decide: no router (and no parameters without gradient).
        self.q_router = None if routed_query_fraction == 1 else ThresholdRouter(
            dim,
            routed_query_fraction,
            fetch_ratio=self.memory_route_kwargs["fetch_ratio"],
            eps=self.memory_route_kwargs["eps"],
            straight_through=self.memory_route_kwargs["straight_through"],
            prefix_normalization=router_prefix_normalization,
            momentum=router_momentum,
            capacity_factor=router_capacity_factor,
            capacity_burst=router_capacity_burst,
            **scoring,
        )
        self.kv_router = TokenScorer(dim, num_routed_kv, batch_invariant=True, **scoring)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CoLT5Cache | None = None,
    ) -> torch.Tensor:
        """Attend causally.

        Args:
            x: `(batch, n, dim)` the new tokens.
            mask: `(batch, n)` bool, False for padding (default all valid). Once the cache holds tokens, new
                tokens must be valid (the model checks this).
            position_ids: `(batch, n)` rotary positions (default: the valid index, so padding shifts nothing).
            cache: the decode state of the previous tokens, in `cache.layers[layer_idx]`, which this call fills
                (the first call) or extends, in place. None: a plain forward pass that keeps nothing.

        Returns:
            `(batch, n, dim)` output.
        """
        batch, length, _ = x.shape
        valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        cache_layer = None if cache is None else cache.layers[self.layer_idx]
        if cache_layer is not None and cache_layer.is_filled:
            if position_ids is None:
                position_ids = cache_layer.counts.unsqueeze(-1) + torch.arange(length, device=x.device)
            # One token at a time: the memory may re-route between two new tokens.
            outputs = [
                self._decode_token(x[:, offset : offset + 1], position_ids[:, offset : offset + 1], cache_layer)
                for offset in range(length)
            ]
            return torch.cat(outputs, dim=1)
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
        light, (light_keys, light_values) = self._light_full(x, mask, position_ids)
        heavy, kept = self._heavy_full(x, valid, position_ids, cache_layer, padded=mask is not None)
        if cache_layer is not None:
            cache_layer.prefill(
                self.cache_settings(), light_keys=light_keys, light_values=light_values, valid=valid, **kept
            )
        return light + heavy

    def cache_settings(self) -> RoutedMemorySettings:
        """What this layer's `CoLT5CacheLayer` needs to keep and re-route the routed memory."""
        return RoutedMemorySettings(
            memory_size=self.memory_size,
            block_size=self.block_size,
            light_window_size=self.light_window_size,
            heads_per_set=self.heads_per_set,
            multiply_keys_by_score=self.multiply_keys_by_score,
            route_kwargs=self.memory_route_kwargs,
        )

    def _gate(self, x: torch.Tensor, valid: torch.Tensor, cache_layer: CoLT5CacheLayer | None) -> GateOutput:
        """The heavy queries among `(batch, n, dim)` tokens (`valid` `(batch, n)` bool): the query router's
        decisions (continuing the prefix statistics `cache_layer` carries), or every valid token with weight 1
        when there is no router."""
        if self.q_router is None:
            return GateOutput(valid, valid.to(x.dtype))
        statistics = None
        if cache_layer is not None and self.q_router.prefix_normalization:
            statistics = cache_layer.router_statistics("query", x.shape[0], x.device)
        return self.q_router(x, valid, statistics)

    # ------------------------------------------------------------------------------------------------ light
    def _light_full(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor):
        q, k, v = self._light_qkv(x, position_ids)
        out = self._local_attention(q, k, v, mask)
        return self.light_o_proj(rearrange(out, "b h n e -> b n (h e)")), (k, v)

    # ------------------------------------------------------------------------------------------------ heavy
    def _keys_values(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated heavy keys and values of every token: `(batch, sets, n, heads_per_set * head_dim)` each."""
        split = "b n (s h e) -> b n s h e"
        keys, values = project(self._heavy_input(x), self.heavy_k_proj, self.heavy_v_proj)
        keys = rearrange(keys, split, s=self.num_routed_kv, h=self.heads_per_set)
        if self.heavy_rotary is not None:
            cos, sin = self.heavy_rotary(position_ids[:, :, None, None], keys.dtype)
            keys = apply_rotary(keys, cos, sin)
        keys = rearrange(keys, "b n s h e -> b s n (h e)")
        return keys, rearrange(values, "b n (s f) -> b s n f", s=self.num_routed_kv)

    def _routed_queries(
        self, x: torch.Tensor, tokens: torch.Tensor | None, position_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Heavy queries of the tokens at `(batch, m)` indices (None: every token, in order), of `(batch, m)` router
        weights -> `(batch, heads, m, head_dim)`."""
        if tokens is not None:
            x = x.gather(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            position_ids = position_ids.gather(1, tokens)
        q = rearrange(self.heavy_q_proj(self._heavy_input(x)), "b m (h e) -> b h m e", h=self.heavy_heads)
        if self.heavy_rotary is not None:
            cos, sin = self.heavy_rotary(position_ids.unsqueeze(1), q.dtype)
            q = apply_rotary(q, cos, sin)
        if self.multiply_queries_by_score:
            q = q * weights.to(q.dtype).unsqueeze(1).unsqueeze(-1)
        return q

    def _heavy_full(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        position_ids: torch.Tensor,
        cache_layer: CoLT5CacheLayer | None,
        padded: bool,
    ):
        batch, length, dim = x.shape
        block, blocks = self.block_size, math.ceil(length / self.block_size)
        keys, values = self._keys_values(x, position_ids)
        scores = self.kv_router.scores(x)
        memory = route_block_memory(scores, valid, block, self.memory_size, **self.memory_route_kwargs)

        # The tokens of each block in valid-index order: padding sorts last, blocks are then plain slices.
        if padded:
            order = (~valid).to(torch.int8).sort(dim=-1, stable=True).indices
        else:
            order = torch.arange(length, device=x.device).expand(batch, length)
        order = F.pad(order, (0, blocks * block - length)).view(batch, blocks, block)
        # Every token a query, no padding, whole blocks: each block's queries are its tokens in order, so they are
        # x's own rows and their outputs land in place (no gather of x, no scatter of the outputs).
        in_place = self.q_router is None and not padded and length % block == 0
        in_block = (torch.arange(blocks * block, device=x.device) < valid.sum(-1, keepdim=True)).view_as(order)

        gate = self._gate(x, valid, cache_layer)
        routed_in_block = gate.routed.gather(1, order.flatten(1)).view_as(order) & in_block
        capacity = None if self.q_router is None else self.q_router.capacity(block)
        if self.q_router is None:
            # Every slot of a block is a query, in order (a block's valid tokens come first): no count, no sort.
            num_queries = block
            query_slot = torch.arange(block, device=x.device).expand_as(order)
        else:
            if capacity is not None:
                # Training: a fixed number of query slots per block (static shapes, no host synchronisation).
                routed_in_block = self.q_router.keep_within_capacity(routed_in_block, in_block)
                num_queries = capacity
                # Back in positions (the slots past the end point at position 0 and add nothing), a token dropped
                # for capacity is an unrouted one.
                kept = valid.new_zeros(batch, length, dtype=torch.long).scatter_add(
                    1, order.flatten(1), routed_in_block.flatten(1).long()
                ).bool()
                gate = GateOutput(kept, gate.weights * kept)
            else:
                # Query slots per block: a power of two >= 64 (within the block), so that the attention below meets
                # few shapes (cuDNN builds a graph per shape); the extra slots are empty.
                most = int(routed_in_block.sum(-1).max())
                num_queries = min(block, max(64, 1 << (most - 1).bit_length())) if most else 0
            # The routed tokens come first.
            query_slot = (~routed_in_block).to(torch.int8).sort(dim=-1, stable=True).indices[..., :num_queries]
        heavy = None if in_place else x.new_zeros(batch, length, dim)
        if in_place:
            q = self._routed_queries(x, None, position_ids, gate.weights)
        elif num_queries > 0:
            query_valid = routed_in_block.gather(-1, query_slot)  # (b, j, g)
            query_tokens = order.gather(-1, query_slot).flatten(1)  # (b, j * g)
            query_weights = gate.weights.gather(1, query_tokens)
            q = self._routed_queries(x, query_tokens, position_ids, query_weights)
        if num_queries > 0:
            out = memory_attention(
                rearrange(q, "b h (j g) e -> (b j) h g e", j=blocks),
                keys,
                values,
                memory.indices.masked_fill(~memory.mask, -1),
                memory.weights,
                order.masked_fill(~in_block, -1),
                query_slot,
                multiply_keys=self.multiply_keys_by_score,
                every_query=self.q_router is None,
                null_kv=self.heavy_null_kv,
                dropout=self.dropout if self.training else 0.0,
                math_only=self.math_attention,
            )
            out = self.heavy_o_proj(out).view(batch, -1, dim)
            if in_place:  # every weight is 1
                heavy = out
            else:
                out = out * (query_weights * query_valid.flatten(1)).to(out.dtype).unsqueeze(-1)
                heavy = heavy.scatter_add(1, query_tokens.unsqueeze(-1).expand_as(out), out)
        if self.unrouted_output is not None:
            heavy = heavy + self._unrouted(gate.routed, x.dtype)
        if cache_layer is None:
            return heavy, None

        # The decode state continues from each sample's last block (the one its next token may still belong to).
        counts = valid.sum(-1)
        current = (counts - 1).clamp_min(0) // block
        memory_index = _at_block(rearrange(memory.indices, "b j s m -> b s j m"), current)  # (b, s, m)
        block_index = _at_block(order.unsqueeze(1), current).squeeze(1)  # (b, block)
        current_block = block_index.unsqueeze(1).expand(-1, keys.shape[1], -1)
        kept = dict(
            scores=scores.detach(),
            memory_keys=tokens_at(keys, memory_index),
            memory_values=tokens_at(values, memory_index),
            memory_weights=_at_block(rearrange(memory.weights, "b j s m -> b s j m"), current),
            memory_mask=_at_block(rearrange(memory.mask, "b j s m -> b s j m"), current),
            memory_index=memory_index,
            block_keys=tokens_at(keys, current_block),
            block_values=tokens_at(values, current_block),
            block_index=block_index,
            block_fill=counts - current * block,
        )
        return heavy, kept

    def _decode_token(self, x: torch.Tensor, position_ids: torch.Tensor, cache_layer: CoLT5CacheLayer) -> torch.Tensor:
        """One new (valid) token per sample, `x` `(batch, 1, dim)` at `(batch, 1)` positions: append it to the
        cache layer, then attend to what it holds. After `begin_token` (host bookkeeping and re-routing) only
        device operations with fixed shapes: a CUDA graph can replay this."""
        cache_layer.begin_token()
        light_q, light_k, light_v = self._light_qkv(x, position_ids)
        heavy_k, heavy_v = self._keys_values(x, position_ids)
        cache_layer.append(light_k, light_v, heavy_k, heavy_v, self.kv_router.scores(x))

        light = decode_attention(
            light_q, cache_layer.light_keys, cache_layer.light_values, cache_layer.light_mask[:, None, None]
        )
        light = self.light_o_proj(rearrange(light, "b h n e -> b n (h e)"))
        gate = self._gate(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), cache_layer)
        q = self._routed_queries(x, None, position_ids, gate.weights)
        heavy = decode_attention(
            q, cache_layer.heavy_keys, cache_layer.heavy_values, cache_layer.heavy_mask.unsqueeze(2), self.heavy_null_kv
        )
        heavy = self.heavy_o_proj(rearrange(heavy, "b h n e -> b n (h e)")) * gate.weights.to(x.dtype).unsqueeze(-1)
        return light + heavy + self._unrouted(gate.routed, x.dtype)
