# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 transformer blocks: pre-norm routed attention and routed feedforward with residuals, for encoders
(`ConditionalRoutedTransformerBlock`) and causal models (`CausalRoutedTransformerBlock`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cache_colt5 import CoLT5Cache
from .causal_attention import CausalRoutedAttention
from .routed_attention import ConditionalRoutedAttention
from .routed_feedforward import CausalRoutedFeedForward, ConditionalRoutedFeedForward
from .router import router_layer_kwargs
from .spellings import one_spelling


class _PreNormResidualBlock(nn.Module):
    """The scaffolding both blocks share: an RMSNorm before each branch (unless the branches normalise their own
    input), dropout on each branch's output, residual adds. Subclasses build the two branches and run the attention
    (whose signature differs)."""

    def __init__(
        self,
        dim: int,
        norm_eps: float,
        dropout: float,
        attention: nn.Module,
        feedforward: nn.Module,
        branch_norms: bool = False,
    ):
        super().__init__()
        self.attention_norm = nn.Identity() if branch_norms else nn.RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.feedforward_norm = nn.Identity() if branch_norms else nn.RMSNorm(dim, eps=norm_eps)
        self.feedforward = feedforward
        self.dropout = nn.Dropout(dropout)

    def _add_branches(
        self,
        hidden_states: torch.Tensor,
        attended: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **feedforward_kwargs: Any,
    ) -> torch.Tensor:
        """`x + dropout(attended)`, then `x + dropout(FF(norm(x)))`."""
        hidden_states = hidden_states + self.dropout(attended)
        fed = self.feedforward(self.feedforward_norm(hidden_states), attention_mask, **feedforward_kwargs)
        return hidden_states + self.dropout(fed)


class ConditionalRoutedTransformerBlock(_PreNormResidualBlock):
    """`x + A(x)`, then `x + FF(x)`, with CoLT5's routed attention and feedforward, each normalising its own input
    (`branch_norms=True`, as colt5-attention's block), or `x + A(norm(x))`, then `x + FF(norm(x))` with an RMSNorm
    before each layer (`branch_norms=False`, CoLT5Config's encoder).

    Takes colt5-attention's keywords with its defaults, and colt5's own (the second name of a pair).

    Args:
        dim: model width.
        num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv (or num_heavy_tokens_q, num_heavy_tokens_kv),
            num_heavy_ff_tokens: routed amounts (int count or float fraction).
        num_routed_kv, light_dim_head, light_heads, light_window_size, heavy_dim_head, heavy_heads,
            multiply_keys_by_score, multiply_queries_by_score, use_null_q_tokens, use_flash_attn: the attention's
            (see `ConditionalRoutedAttention`).
        light_ff_mult, heavy_ff_mult (or light_ff_hidden_dim, heavy_ff_hidden_dim): MLP widths, as multiples of
            dim (default 0.5 and 4) or in units.
        activation, mlp: the MLPs' activation and kind (see `ConditionalRoutedFeedForward`).
        norm_eps: epsilon of the block's RMSNorms (without branch norms).
        dropout: dropout on each branch's output before the residual add.
        attention_dropout: attention-probability dropout.
        router_straight_through, router_kwargs, use_triton: settings shared by all routers of the block.
        router_type: colt5-attention's (up to 0.5): "coor_descent", the only router here.
        branch_norms: where the norms are (above).
        **attention_kwargs: the rest of `ConditionalRoutedAttention`'s settings (has_light_attn, rotary_emb,
            light_rotary_emb, rotary_theta, null_kv, learned_unrouted_output).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_attn_tokens_q: int | float | None = None,
        num_heavy_attn_tokens_kv: int | float | None = None,
        num_routed_kv: int = 1,
        num_heavy_ff_tokens: int | float,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        light_ff_mult: float | None = None,
        heavy_ff_mult: float | None = None,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        router_type: str = "coor_descent",
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool | None = None,
        use_flash_attn: bool | None = None,
        num_heavy_tokens_q: int | float | None = None,
        num_heavy_tokens_kv: int | float | None = None,
        light_ff_hidden_dim: int | None = None,
        heavy_ff_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mlp: str = "gated",
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        branch_norms: bool = True,
        **attention_kwargs: Any,
    ):
        amounts = {}
        for ours, theirs, value, reference_value in (
            ("num_heavy_tokens_q", "num_heavy_attn_tokens_q", num_heavy_tokens_q, num_heavy_attn_tokens_q),
            ("num_heavy_tokens_kv", "num_heavy_attn_tokens_kv", num_heavy_tokens_kv, num_heavy_attn_tokens_kv),
        ):
            amounts[ours] = one_spelling(None, **{theirs: reference_value, ours: value})
            if amounts[ours] is None:
                raise ValueError(f"ConditionalRoutedTransformerBlock needs {theirs} (or {ours}).")
        router_kwargs = router_layer_kwargs(router_kwargs, router_straight_through, use_triton, router_type)
        attention = ConditionalRoutedAttention(
            dim,
            **amounts,
            num_routed_kv=num_routed_kv,
            light_dim_head=light_dim_head,
            light_heads=light_heads,
            light_window_size=light_window_size,
            heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            use_null_q_tokens=use_null_q_tokens,
            use_flash_attn=use_flash_attn,
            dropout=attention_dropout,
            router_kwargs=router_kwargs,
            branch_norms=branch_norms,
            **attention_kwargs,
        )
        feedforward = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_ff_mult=light_ff_mult,
            heavy_ff_mult=heavy_ff_mult,
            light_hidden_dim=light_ff_hidden_dim,
            heavy_hidden_dim=heavy_ff_hidden_dim,
            activation=activation,
            mlp=mlp,
            router_kwargs=router_kwargs,
            branch_norms=branch_norms,
        )
        super().__init__(dim, norm_eps, dropout, attention, feedforward, branch_norms)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_heavy_attn_tokens_q: int | float | None = None,
        num_heavy_attn_tokens_kv: int | float | None = None,
        num_heavy_ff_tokens: int | float | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, n, dim)`, `attention_mask` (or colt5-attention's `mask`) `(batch, n)` bool (False
        = padding), `position_ids` `(batch, n)` -> `(batch, n, dim)`. The `num_heavy_*` amounts override the
        layers' for this call; they come before `position_ids`, in colt5-attention's order."""
        if mask is not None and attention_mask is not None:
            raise ValueError("attention_mask and mask are the same padding mask: pass one of them.")
        attention_mask = mask if attention_mask is None else attention_mask
        attended = self.attention(
            self.attention_norm(hidden_states),
            attention_mask,
            position_ids,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
        )
        return self._add_branches(hidden_states, attended, attention_mask, num_heavy_tokens=num_heavy_ff_tokens)


class CausalRoutedTransformerBlock(_PreNormResidualBlock):
    """`x + A(norm(x))`, then `x + FF(norm(x))`, with CoLT5's causal routed attention and feedforward: the output
    at position t depends on tokens <= t only.

    Args:
        dim: model width.
        routed_query_fraction, routed_ff_fraction: target shares of tokens routed as heavy queries and to the
            heavy MLP, decided per token.
        memory_size, block_size: routed keys/values per block, and the block length (see `CausalRoutedAttention`).
        light_ff_hidden_dim, heavy_ff_hidden_dim: MLP widths (default dim / 2 and 4 * dim).
        activation: MLP activation.
        norm_eps: RMSNorm epsilon.
        dropout: dropout on each branch's output before the residual add.
        attention_dropout: attention-probability dropout.
        router_kwargs: soft top-k settings (fetch_ratio, eps, n_iters, eps_schedule, straight_through) and
            random_routing.
        router_prefix_normalization: the per-token routers threshold prefix-standardised scores (see
            `ThresholdRouter`).
        router_momentum: moving-average weight of the per-token routers' statistics (None: the routers' default).
        router_capacity_factor, router_capacity_burst: in training, the per-token routers' heavy branches take at
            most `ceil(factor * fraction * n) + burst` tokens of a row (see `ThresholdRouter`); factor None: no
            limit.
        layer_idx: the block's index in a `CoLT5Cache` (its `CoLT5CacheLayer` holds the block's decode state).
        **attention_kwargs: the rest of `CausalRoutedAttention`'s settings (heads, window, routing options).
    """

    def __init__(
        self,
        dim: int,
        *,
        routed_query_fraction: float,
        routed_ff_fraction: float,
        memory_size: int,
        block_size: int,
        light_ff_hidden_dim: int | None = None,
        heavy_ff_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
        router_prefix_normalization: bool = True,
        router_momentum: float | None = None,
        router_capacity_factor: float | None = 1.5,
        router_capacity_burst: int = 64,
        layer_idx: int = 0,
        **attention_kwargs: Any,
    ):
        router_kwargs = dict(router_kwargs or {})
        attention = CausalRoutedAttention(
            dim,
            routed_query_fraction=routed_query_fraction,
            memory_size=memory_size,
            block_size=block_size,
            dropout=attention_dropout,
            router_kwargs=router_kwargs,
            router_prefix_normalization=router_prefix_normalization,
            router_momentum=router_momentum,
            router_capacity_factor=router_capacity_factor,
            router_capacity_burst=router_capacity_burst,
            layer_idx=layer_idx,
            **attention_kwargs,
        )
        feedforward = CausalRoutedFeedForward(
            dim,
            fraction=routed_ff_fraction,
            light_hidden_dim=light_ff_hidden_dim,
            heavy_hidden_dim=heavy_ff_hidden_dim,
            activation=activation,
            # The attention's router settings as it resolved them (either package's keywords): one for both.
            router_kwargs=dict(
                fetch_ratio=attention.memory_route_kwargs["fetch_ratio"],
                eps=attention.memory_route_kwargs["eps"],
                straight_through=attention.memory_route_kwargs["straight_through"],
                random_routing=attention.kv_router.random_routing,
                cosine_sim_scale=attention.kv_router.cosine_sim_scale,
                prefix_normalization=router_prefix_normalization,
                momentum=router_momentum,
                capacity_factor=router_capacity_factor,
                capacity_burst=router_capacity_burst,
            ),
            layer_idx=layer_idx,
        )
        super().__init__(dim, norm_eps, dropout, attention, feedforward)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CoLT5Cache | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, n, dim)`, `attention_mask` `(batch, n)` bool (False = padding),
        `position_ids` `(batch, n)`, `cache` as in `CausalRoutedAttention.forward` -> `(batch, n, dim)`."""
        attended = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids, cache=cache)
        return self._add_branches(hidden_states, attended, attention_mask, cache=cache)
