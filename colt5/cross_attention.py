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
from .router import CoordinateDescentRouter, validate_amount


class ConditionalRoutedCrossAttention(RoutedAttentionBase):
    """Routed cross attention (see the module docstring).

    Args:
        dim: width of `x` and of the output.
        num_heavy_tokens_q: routed queries of `x`, int count or float fraction of each sample's valid length
            (1.0 routes every query, each with weight 1).
        num_heavy_tokens_kv: routed keys/values per routing set, int count or float fraction of each sample's
            valid context length.
        context_dim: width of the context's tokens (default `dim`).
        heads, dim_head: attention heads and head width; heads are split evenly among `num_routed_kv` sets.
        num_routed_kv: key/value routing sets, each routed with its own routing vector.
        route_block_size: route keys/values evenly over blocks of this many context tokens (any number of
            blocks, the last one may be partial); None routes over the whole context.
        multiply_keys_by_score: scale routed keys by their router weight (values always are).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        learned_unrouted_output: a learned output for queries that were not routed (else 0).
        dropout: attention-probability dropout.
        router_kwargs: settings of both `CoordinateDescentRouter`s (soft top-k settings, backend,
            random_routing); block routing is `route_block_size`, for the keys/values only.

    There are no position embeddings: x and the context are separate sequences.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        num_routed_kv: int = 1,
        route_block_size: int | None = None,
        multiply_keys_by_score: bool = True,
        multiply_queries_by_score: bool = False,
        learned_unrouted_output: bool = False,
        dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(
            dim,
            context_dim=context_dim,
            heavy_heads=heads,
            heavy_dim_head=dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=None,
            dropout=dropout,
        )
        router_kwargs = dict(router_kwargs or {})
        if "route_block_size" in router_kwargs:
            raise ValueError(
                "Pass route_block_size to ConditionalRoutedCrossAttention itself, not in router_kwargs: it applies "
                "to the keys/values routed from the context only."
            )
        validate_amount("num_heavy_tokens_q", num_heavy_tokens_q)
        validate_amount("num_heavy_tokens_kv", num_heavy_tokens_kv)
        if route_block_size is not None and (isinstance(route_block_size, bool) or route_block_size < 1):
            raise ValueError(f"route_block_size must be None or an int >= 1, got {route_block_size!r}.")
        self.num_heavy_tokens_q = num_heavy_tokens_q
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        self.context_dim = self.heavy_k_proj.in_features
        self.q_router = CoordinateDescentRouter(dim, 1, **router_kwargs)
        self.kv_router = CoordinateDescentRouter(
            self.context_dim, num_routed_kv, route_block_size=route_block_size, **router_kwargs
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from routed queries of `x` to keys/values routed from `context`.

        Args:
            x: `(batch, n, dim)` the queries' tokens.
            context: `(batch, m, context_dim)` the memories.
            mask: `(batch, n)` bool, False for padding in x (never routed while valid queries remain).
            context_mask: `(batch, m)` bool, False for padding in the context (never routed while valid tokens
                remain; the routed queries of a sample whose context is all padding get 0, its unrouted queries the
                learned unrouted output as usual).

        Returns:
            `(batch, n, dim)`: the attention output times the router weight at routed queries, the learned
            unrouted output (or 0) elsewhere.
        """
        self._check_inputs(x, context, mask, context_mask)
        routed_q = self.q_router(x, self.num_heavy_tokens_q, mask)
        routed_kv = self.kv_router(context, self.num_heavy_tokens_kv, context_mask)
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
