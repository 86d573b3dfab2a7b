# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Routed cross attention: routed queries of `x` attend to keys/values routed from a long context (memories).

Only the heavy branch exists here: the context is far longer than `x` (up to millions of tokens), and neither
the context's tokens nor `x`'s unrouted queries are ever projected. Keys/values are routed per sample from that
sample's own context, never from padding while valid tokens remain; with `route_block_size` they are routed
evenly over blocks of the context, so the memory covers the whole context instead of its highest-scoring region.
"""

from __future__ import annotations

from typing import Any

import torch

from .routed_attention import RoutedAttentionBase
from .router import CoordinateDescentRouter, call_amount, router_layer_kwargs, validate_amount
from .spellings import one_spelling


class ConditionalRoutedCrossAttention(RoutedAttentionBase):
    """Routed cross attention (see the module docstring).

    Takes colt5-attention's keywords with its defaults, and colt5's own (the second name of a pair).

    Args:
        dim: width of `x` and of the output.
        num_tokens_q, num_heavy_tokens_q: routed queries of `x`, int count or float fraction of each sample's valid
            length (1.0 routes every query, each with weight 1).
        num_tokens_kv, num_heavy_tokens_kv: routed keys/values per routing set, int count or float fraction of each
            sample's valid context length.
        num_sets_kv, kv_routing_tokens, num_routed_kv: key/value routing sets, each routed with its own routing
            vector; heads are split evenly among them.
        dim_head, heads: attention head width and heads.
        router_straight_through, router_kwargs, use_triton: the routers' settings (see
            `ConditionalRoutedAttention`); block routing is `route_block_size`, for the keys/values only.
        router_type: colt5-attention's (up to 0.5): "coor_descent", the only router here.
        multiply_keys_by_score: scale routed keys by their router weight (values always are).
        use_null_q_tokens, learned_unrouted_output: a learned output for queries that were not routed (else 0).
        use_flash_attn: see `RoutedAttentionBase`.
        route_block_size: route keys/values evenly over blocks of this many context tokens (any number of blocks,
            the last one may be partial); None routes over the whole context.
        context_dim: width of the context's tokens (default `dim`).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        branch_norms: an RMSNorm before the projections of the routed queries and context tokens (shared when
            the context is as wide as x), as colt5-attention normalises them.
        null_kv: a learned null key/value per head (colt5-attention's attention has one).
        dropout: attention-probability dropout.

    There are no position embeddings: x and the context are separate sequences.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_tokens_q: int | float | None = None,
        num_tokens_kv: int | float | None = None,
        num_sets_kv: int | None = None,
        dim_head: int = 64,
        heads: int = 8,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        router_type: str = "coor_descent",
        kv_routing_tokens: int | None = None,
        multiply_keys_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool | None = None,
        use_flash_attn: bool | None = None,
        route_block_size: int | None = None,
        num_heavy_tokens_q: int | float | None = None,
        num_heavy_tokens_kv: int | float | None = None,
        num_routed_kv: int | None = None,
        context_dim: int | None = None,
        multiply_queries_by_score: bool = False,
        learned_unrouted_output: bool | None = None,
        branch_norms: bool = True,
        null_kv: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(
            dim,
            context_dim=context_dim,
            heavy_heads=heads,
            heavy_dim_head=dim_head,
            num_routed_kv=one_spelling(
                1, num_sets_kv=num_sets_kv, kv_routing_tokens=kv_routing_tokens, num_routed_kv=num_routed_kv
            ),
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=one_spelling(
                True, use_null_q_tokens=use_null_q_tokens, learned_unrouted_output=learned_unrouted_output
            ),
            rotary_theta=None,
            dropout=dropout,
            heavy_norm=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
        )
        router_kwargs = router_layer_kwargs(router_kwargs, router_straight_through, use_triton, router_type)
        if "route_block_size" in router_kwargs:
            raise ValueError(
                "Pass route_block_size to ConditionalRoutedCrossAttention itself, not in router_kwargs: it applies "
                "to the keys/values routed from the context only."
            )
        self.num_heavy_tokens_q = one_spelling(None, num_tokens_q=num_tokens_q, num_heavy_tokens_q=num_heavy_tokens_q)
        self.num_heavy_tokens_kv = one_spelling(
            None, num_tokens_kv=num_tokens_kv, num_heavy_tokens_kv=num_heavy_tokens_kv
        )
        validate_amount("num_tokens_q (num_heavy_tokens_q)", self.num_heavy_tokens_q)
        validate_amount("num_tokens_kv (num_heavy_tokens_kv)", self.num_heavy_tokens_kv)
        if route_block_size is not None and (isinstance(route_block_size, bool) or route_block_size < 1):
            raise ValueError(f"route_block_size must be None or an int >= 1, got {route_block_size!r}.")
        self.context_dim = self.heavy_k_proj.in_features
        self.q_router = CoordinateDescentRouter(dim, num_sets=1, **router_kwargs)
        self.kv_router = CoordinateDescentRouter(
            self.context_dim, num_sets=self.num_routed_kv, route_block_size=route_block_size, **router_kwargs
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        *,
        num_tokens_q: int | float | None = None,
        num_tokens_kv: int | float | None = None,
    ) -> torch.Tensor:
        """Attend from routed queries of `x` to keys/values routed from `context`.

        Args:
            x: `(batch, n, dim)` the queries' tokens.
            context: `(batch, m, context_dim)` the memories.
            mask: `(batch, n)` bool, False for padding in x (never routed while valid queries remain).
            context_mask: `(batch, m)` bool, False for padding in the context (never routed while valid tokens
                remain; the routed queries of a sample whose context is all padding get 0, or with `null_kv` the
                null value; its unrouted queries the learned unrouted output as usual).
            num_tokens_q, num_tokens_kv: the layer's amounts, overridden for this call.

        Returns:
            `(batch, n, dim)`: the attention output times the router weight at routed queries, the learned
            unrouted output (or 0) elsewhere.
        """
        self._check_inputs(x, context, mask, context_mask)
        routed_q = self.q_router(x, call_amount("num_tokens_q", num_tokens_q, self.num_heavy_tokens_q), mask)
        amount_kv = call_amount("num_tokens_kv", num_tokens_kv, self.num_heavy_tokens_kv)
        routed_kv = self.kv_router(context, amount_kv, context_mask)
        return self._routed_heavy(x, routed_q, context, routed_kv, context_mask is not None)

    def _check_inputs(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None, context_mask: torch.Tensor | None
    ) -> None:
        if x.dim() != 3 or context.dim() != 3:
            raise ValueError(
                f"x and context must be (batch, length, features), got shapes {tuple(x.shape)} and "
                f"{tuple(context.shape)}."
            )
        if x.shape[1] == 0 or context.shape[1] == 0:
            raise ValueError(
                f"x and context need at least one token each, got lengths {x.shape[1]} and {context.shape[1]}."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and context must have the same batch size (each sample attends to its own context), got "
                f"{x.shape[0]} and {context.shape[0]}."
            )
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has {context.shape[-1]} features but the layer was built with context_dim="
                f"{self.context_dim}; pass context_dim=... when the memories are wider or narrower than x."
            )
        for name, tensor, reference in (("mask", mask, x), ("context_mask", context_mask, context)):
            if tensor is not None and tuple(tensor.shape) != tuple(reference.shape[:2]):
                raise ValueError(
                    f"{name} must be (batch, length) = {tuple(reference.shape[:2])}, got {tuple(tensor.shape)}."
                )
