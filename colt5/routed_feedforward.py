# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional feedforward: a narrow MLP for every token plus a wide MLP for routed tokens only.

    y = FF_light(x) + lambda * FF_heavy(x)      (heavy term only at routed positions)

The encoder routes the top tokens of each sample (`ConditionalRoutedFeedForward`); the causal model decides per
token with a `ThresholdRouter` (`CausalRoutedFeedForward`), so no output depends on a later token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .causal_router import ThresholdRouter
from .router import CoordinateDescentRouter, gather_tokens, scatter_tokens, validate_amount


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, the gated MLP of T5 v1.1 and Llama, without biases."""

    def __init__(self, dim: int, hidden_dim: int, activation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.act_fn = activation if activation is not None else nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., dim)` -> `(..., dim)`."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ConditionalRoutedFeedForward(nn.Module):
    """Light MLP on every token, heavy MLP on the routed `num_heavy_tokens` (an int count or a float fraction of
    each sample's valid length), its output scaled by the router weight.

    Args:
        dim: model width.
        num_heavy_tokens: tokens routed to the heavy MLP, int count or float fraction in (0, 1].
        light_hidden_dim, heavy_hidden_dim: MLP widths (default dim / 2 and 4 * dim, the paper's ratios).
        activation: the MLPs' activation (default tanh-approximated GELU).
        router_kwargs: settings of the `CoordinateDescentRouter` (fetch_ratio, eps, n_iters, ..., random_routing).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens: int | float,
        light_hidden_dim: int | None = None,
        heavy_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        validate_amount("num_heavy_tokens", num_heavy_tokens)
        self.num_heavy_tokens = num_heavy_tokens
        self.light_mlp = GatedMLP(dim, light_hidden_dim or dim // 2, activation)
        self.heavy_mlp = GatedMLP(dim, heavy_hidden_dim or 4 * dim, activation)
        self.router = CoordinateDescentRouter(dim, 1, **(router_kwargs or {}))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding) -> `(batch, n, dim)`."""
        routed = self.router(x, self.num_heavy_tokens, mask)
        indices, weights = routed.indices[:, 0], routed.weights[:, 0]
        heavy = self.heavy_mlp(gather_tokens(x, routed.indices)[:, 0]) * weights.unsqueeze(-1).to(x.dtype)
        return self.light_mlp(x) + scatter_tokens(heavy, indices, x.shape[1])


class CausalRoutedFeedForward(nn.Module):
    """Light MLP on every token, heavy MLP on the tokens a per-token `ThresholdRouter` routes (a target
    `fraction` of them), its output scaled by the router weight. Each output depends on its own token only.

    Args:
        dim: model width.
        fraction: target share of tokens routed to the heavy MLP, in (0, 1].
        light_hidden_dim, heavy_hidden_dim: MLP widths (default dim / 2 and 4 * dim).
        activation: the MLPs' activation (default tanh-approximated GELU).
        router_kwargs: `ThresholdRouter` settings (fetch_ratio, eps, straight_through, momentum, random_routing).
    """

    def __init__(
        self,
        dim: int,
        *,
        fraction: float,
        light_hidden_dim: int | None = None,
        heavy_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.light_mlp = GatedMLP(dim, light_hidden_dim or dim // 2, activation)
        self.heavy_mlp = GatedMLP(dim, heavy_hidden_dim or 4 * dim, activation)
        self.router = ThresholdRouter(dim, fraction, **(router_kwargs or {}))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding, never routed) -> `(batch, n, dim)`."""
        gate = self.router(x, mask)
        weights = gate.weights.unsqueeze(-1).to(x.dtype)
        if x.shape[1] == 1:
            # Decoding: one token per sample. Weighting all of them (0 where not routed) avoids the device sync of
            # selecting the routed ones, and reads the same weights.
            return self.light_mlp(x) + self.heavy_mlp(x) * weights
        # Only the routed tokens go through the heavy MLP (their number varies, hence the flat selection).
        tokens = gate.routed.flatten().nonzero().squeeze(-1)
        flat = x.reshape(-1, x.shape[-1])
        heavy = self.heavy_mlp(flat[tokens]) * weights.view(-1, 1)[tokens]
        return self.light_mlp(x) + torch.zeros_like(flat).index_add(0, tokens, heavy).view_as(x)
