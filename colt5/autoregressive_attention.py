# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""colt5-attention's `ConditionalRoutedAutoregressiveAttention`, as a strictly causal `CausalRoutedAttention`.

colt5-attention cuts the sequence into heavy windows; the queries of each window are routed by a top-k over that
window (so whether a token is routed depends on the later tokens of its window: a causal leak), and attend to
keys/values routed from all earlier windows. Here every keyword keeps its role, on attention whose output at
position t depends on tokens <= t only:

- `heavy_window_size` (default `light_window_size`) is the block of the routed memory: the keys/values a routed
  query attends to are the `num_heavy_tokens_kv` best-scoring tokens before its block (re-routed once per block,
  which is what lets a cache decode with bounded state), plus the tokens of its own block up to itself;
- `num_heavy_tokens_q` out of every `heavy_window_size` tokens sets the share of tokens routed as heavy queries,
  decided per token by a running threshold on its own score, standardised by the scores before it
  (`ThresholdRouter`), not by a top-k over the window;
- `light_window_size`: each token attends to the `light_window_size` tokens before it and itself (colt5-attention
  sees its own window of that size up to the token plus the whole previous window: between `light_window_size`
  and `2 * light_window_size - 1` tokens back, depending on the position in the window).
"""

from __future__ import annotations

from typing import Any

import torch

from .cache_colt5 import CoLT5Cache
from .causal_attention import CausalRoutedAttention
from .router import router_layer_kwargs, with_default_schedule
from .spellings import one_spelling


class ConditionalRoutedAutoregressiveAttention(CausalRoutedAttention):
    """colt5-attention's autoregressive routed attention, strictly causal (see the module docstring).

    Takes colt5-attention's keywords with its defaults: its input is normalised inside the layer (as "prenorm is
    included" there), and `attn(x) + x` is the residual step.

    Args:
        dim: model width.
        num_heavy_tokens_q: heavy queries per `heavy_window_size` tokens (their share: the target fraction).
        num_heavy_tokens_kv: routed keys/values per block and routing set (the memory size).
        num_routed_kv: key/value routing sets; heavy heads are split evenly among them.
        light_dim_head, light_heads, light_window_size: light branch (see the module docstring).
        heavy_window_size: block of the routed memory (default `light_window_size`).
        heavy_dim_head, heavy_heads: heavy branch.
        router_straight_through, router_kwargs, use_triton: router settings (see `ConditionalRoutedAttention`).
        router_type: colt5-attention's (up to 0.5): "coor_descent", the only router here.
        multiply_keys_by_score, multiply_queries_by_score: routing options.
        use_null_q_tokens, learned_unrouted_output: a learned heavy output for tokens not routed as queries.
        use_flash_attn: see `RoutedAttentionBase`.
        rotary_emb: rotary positions in the heavy branch; light_rotary_emb: in the light branch (colt5's).
        branch_norms: the layer normalises its input (True, as colt5-attention's does).
        null_kv: a learned null key/value per heavy head (colt5-attention's heavy attention has one).
        **kwargs: the rest of `CausalRoutedAttention`'s settings (rotary_theta, dropout, router_momentum).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        num_routed_kv: int = 1,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_window_size: int | None = None,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        router_type: str = "coor_descent",
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool | None = None,
        use_flash_attn: bool | None = None,
        rotary_emb: bool = False,
        learned_unrouted_output: bool | None = None,
        light_rotary_emb: bool = True,
        branch_norms: bool = True,
        null_kv: bool = False,
        **kwargs: Any,
    ):
        heavy_window_size = light_window_size if heavy_window_size is None else heavy_window_size
        for name, value in (("heavy_window_size", heavy_window_size), ("num_heavy_tokens_q", num_heavy_tokens_q)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if num_heavy_tokens_q > heavy_window_size:
            raise ValueError(
                f"num_heavy_tokens_q ({num_heavy_tokens_q}) counts heavy queries per heavy window, so it can be at "
                f"most heavy_window_size ({heavy_window_size})."
            )
        # colt5-attention's router defaults (20 iterations at eps 0.03, eps-scaling, straight-through), under
        # whatever the caller set.
        router = {"n_iters": 20, "eps": 0.03, "straight_through": True}
        router.update(router_layer_kwargs(router_kwargs, router_straight_through, use_triton, router_type))
        router = with_default_schedule(router, (4.0, 0.7))
        super().__init__(
            dim,
            routed_query_fraction=num_heavy_tokens_q / heavy_window_size,
            memory_size=num_heavy_tokens_kv,
            block_size=heavy_window_size,
            light_heads=light_heads,
            light_dim_head=light_dim_head,
            light_window_size=light_window_size,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            # With every token of a window a heavy query no token is unrouted: the reference's null query token (on by
            # default) would never be used, so the layer has none.
            learned_unrouted_output=one_spelling(
                True, use_null_q_tokens=use_null_q_tokens, learned_unrouted_output=learned_unrouted_output
            )
            and num_heavy_tokens_q < heavy_window_size,
            router_kwargs=router,
            rotary_emb=rotary_emb,
            light_rotary_emb=light_rotary_emb,
            branch_norms=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
            **kwargs,
        )
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CoLT5Cache | None = None,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        random_route: bool = False,
    ) -> torch.Tensor:
        """Attend causally: `x` `(batch, n, dim)` -> `(batch, n, dim)`, as colt5-attention's layer returns it.

        With a `cache` (decoding, see `CausalRoutedAttention.forward`) it fills or extends the layer's
        `CoLT5CacheLayer`. `num_heavy_tokens_kv` sets the memory size for one call without a cache; `num_heavy_tokens_q`
        can only repeat the layer's own (the query router's running threshold is kept for that share);
        `random_route` routes this call by random scores (an ablation control; without a cache).
        """
        if num_heavy_tokens_q is not None and num_heavy_tokens_q != self.num_heavy_tokens_q:
            raise ValueError(
                f"num_heavy_tokens_q cannot change per call here ({num_heavy_tokens_q} against the layer's "
                f"{self.num_heavy_tokens_q}): the per-token query router keeps a running threshold for the share "
                "it was built with. Build a layer with the share you want."
            )
        if random_route and cache is not None:
            raise ValueError(
                "random_route cannot continue a cache: the cache carries the query router's prefix statistics, which "
                "random scores would change. Route at random without a cache."
            )
        if num_heavy_tokens_kv is not None and cache is not None:
            raise ValueError(
                "num_heavy_tokens_kv cannot change while decoding: the cached memory has the layer's size."
            )
        # The per-call settings are attributes that the parent layer and its routers read: set for this call and
        # restored whatever happens (a per-call override is colt5-attention's API, not the parent's).
        memory_size = self.memory_size
        randomised = [router for router in (self.q_router, self.kv_router) if router is not None]
        saved = [router.random_routing for router in randomised]
        try:
            if num_heavy_tokens_kv is not None:
                if (
                    isinstance(num_heavy_tokens_kv, bool)
                    or not isinstance(num_heavy_tokens_kv, int)
                    or num_heavy_tokens_kv < 1
                ):
                    raise ValueError(f"num_heavy_tokens_kv must be an int >= 1, got {num_heavy_tokens_kv!r}.")
                self.memory_size = num_heavy_tokens_kv
            for router in randomised:
                router.random_routing = router.random_routing or random_route
            out = super().forward(x, mask, position_ids, cache)
        finally:
            self.memory_size = memory_size
            for router, value in zip(randomised, saved):
                router.random_routing = value
            if random_route and self.q_router is not None:
                # Random scores say nothing about the learned ones: the query router's threshold must not learn them.
                self.q_router.discard_pending_statistics()
        return out
