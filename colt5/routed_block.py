# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""A CoLT5 transformer block: pre-norm routed attention and routed feedforward with residuals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .routed_attention import ConditionalRoutedAttention
from .routed_feedforward import ConditionalRoutedFeedForward


class ConditionalRoutedTransformerBlock(nn.Module):
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
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
            dropout=attention_dropout,
            router_kwargs=router_kwargs,
            **attention_kwargs,
        )
        self.feedforward_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.feedforward = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_hidden_dim=light_ff_hidden_dim,
            heavy_hidden_dim=heavy_ff_hidden_dim,
            activation=activation,
            router_kwargs=router_kwargs,
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, n, dim)`, `attention_mask` `(batch, n)` bool (False = padding),
        `position_ids` `(batch, n)` -> `(batch, n, dim)`."""
        attended = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids)
        hidden_states = hidden_states + self.dropout(attended)
        fed = self.feedforward(self.feedforward_norm(hidden_states), attention_mask)
        return hidden_states + self.dropout(fed)
