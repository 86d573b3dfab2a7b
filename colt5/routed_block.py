# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 transformer blocks: pre-norm routed attention and routed feedforward with residuals, for encoders
(`ConditionalRoutedTransformerBlock`) and causal models (`CausalRoutedTransformerBlock`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .causal_attention import CausalAttentionState, CausalRoutedAttention
from .routed_attention import ConditionalRoutedAttention
from .routed_feedforward import CausalRoutedFeedForward, ConditionalRoutedFeedForward


class _PreNormResidualBlock(nn.Module):
    """The scaffolding both blocks share: an RMSNorm before each branch, dropout on each branch's output, residual
    adds. Subclasses build the two branches and run the attention (whose signature differs)."""

    def __init__(self, dim: int, norm_eps: float, dropout: float, attention: nn.Module, feedforward: nn.Module):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.feedforward_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.feedforward = feedforward
        self.dropout = nn.Dropout(dropout)

    def _add_branches(
        self, hidden_states: torch.Tensor, attended: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`x + dropout(attended)`, then `x + dropout(FF(norm(x)))`."""
        hidden_states = hidden_states + self.dropout(attended)
        fed = self.feedforward(self.feedforward_norm(hidden_states), attention_mask)
        return hidden_states + self.dropout(fed)


class ConditionalRoutedTransformerBlock(_PreNormResidualBlock):
    """`x + A(norm(x))`, then `x + FF(norm(x))`, with CoLT5's routed attention and feedforward.

    Args:
        dim: model width.
        num_heavy_tokens_q, num_heavy_tokens_kv, num_heavy_ff_tokens: routed amounts (int count or float fraction).
        light_ff_hidden_dim, heavy_ff_hidden_dim: MLP widths (default dim / 2 and 4 * dim).
        activation: MLP activation.
        norm_eps: RMSNorm epsilon.
        dropout: dropout on each branch's output before the residual add.
        attention_dropout: attention-probability dropout.
        router_kwargs: settings shared by all routers of the block.
        **attention_kwargs: the rest of `ConditionalRoutedAttention`'s settings (heads, window, routing options).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        num_heavy_ff_tokens: int | float,
        light_ff_hidden_dim: int | None = None,
        heavy_ff_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
        **attention_kwargs: Any,
    ):
        attention = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
            dropout=attention_dropout,
            router_kwargs=router_kwargs,
            **attention_kwargs,
        )
        feedforward = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_hidden_dim=light_ff_hidden_dim,
            heavy_hidden_dim=heavy_ff_hidden_dim,
            activation=activation,
            router_kwargs=router_kwargs,
        )
        super().__init__(dim, norm_eps, dropout, attention, feedforward)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, n, dim)`, `attention_mask` `(batch, n)` bool (False = padding),
        `position_ids` `(batch, n)` -> `(batch, n, dim)`."""
        attended = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids)
        return self._add_branches(hidden_states, attended, attention_mask)


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
        router_momentum: moving-average weight of the per-token routers' statistics.
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
        router_momentum: float = 0.05,
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
            router_momentum=router_momentum,
            **attention_kwargs,
        )
        feedforward = CausalRoutedFeedForward(
            dim,
            fraction=routed_ff_fraction,
            light_hidden_dim=light_ff_hidden_dim,
            heavy_hidden_dim=heavy_ff_hidden_dim,
            activation=activation,
            router_kwargs={
                **{key: router_kwargs[key] for key in ("fetch_ratio", "eps", "straight_through", "random_routing") if key in router_kwargs},
                "momentum": router_momentum,
            },
        )
        super().__init__(dim, norm_eps, dropout, attention, feedforward)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        state: CausalAttentionState | None = None,
        valid_counts: list[int] | None = None,
    ) -> tuple[torch.Tensor, CausalAttentionState | None]:
        """`hidden_states` `(batch, n, dim)`, `attention_mask` `(batch, n)` bool (False = padding),
        `position_ids` `(batch, n)`; `state`/`valid_counts` as in `CausalRoutedAttention.forward`.
        Returns the `(batch, n, dim)` output and the attention state."""
        attended, state = self.attention(
            self.attention_norm(hidden_states), attention_mask, position_ids, state, valid_counts
        )
        return self._add_branches(hidden_states, attended, attention_mask), state
