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

from .cache_colt5 import CoLT5Cache
from .causal_router import ThresholdRouter
from .router import (
    CoordinateDescentRouter,
    call_amount,
    gather_tokens,
    router_layer_kwargs,
    scatter_tokens,
    validate_amount,
)


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


class GeluMLP(nn.Module):
    """`down(act(up(x)))` with biases and the exact GELU: colt5-attention's feedforward (without its norm)."""

    def __init__(self, dim: int, hidden_dim: int, activation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.down_proj = nn.Linear(hidden_dim, dim)
        self.act_fn = activation if activation is not None else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., dim)` -> `(..., dim)`."""
        return self.down_proj(self.act_fn(self.up_proj(x)))


MLPS = {"gated": GatedMLP, "gelu": GeluMLP}


def hidden_width(
    dim: int, name: str, hidden_dim: int | None, mult_name: str, mult: float | None, default: float
) -> int:
    """An MLP's width from colt5's `hidden_dim` or colt5-attention's multiple of `dim` (`int(dim * mult)`)."""
    if hidden_dim is not None and mult is not None:
        raise ValueError(f"{name} and {mult_name} both set the MLP's width: pass one of them.")
    width = hidden_dim if hidden_dim is not None else int(dim * (default if mult is None else mult))
    if width < 1:
        raise ValueError(f"The MLP needs a width >= 1, got {width} ({name}={hidden_dim}, {mult_name}={mult}).")
    return width


class ConditionalRoutedFeedForward(nn.Module):
    """Light MLP on every token, heavy MLP on the routed `num_heavy_tokens` (an int count or a float fraction of
    each sample's valid length), its output scaled by the router weight.

    Takes colt5-attention's keywords with its defaults, and colt5's own.

    Args:
        dim: model width.
        num_heavy_tokens: tokens routed to the heavy MLP, int count or float fraction in (0, 1].
        light_ff_mult, heavy_ff_mult: MLP widths as multiples of dim (default 0.5 and 4, the paper's ratios); or
            light_hidden_dim, heavy_hidden_dim in units.
        router_straight_through, router_kwargs, use_triton: the `CoordinateDescentRouter`'s settings (see
            `ConditionalRoutedAttention`).
        router_type: colt5-attention's (up to 0.5): "coor_descent", the only router here.
        activation: the MLPs' activation (default: tanh-approximated GELU in the gated MLP, exact GELU in "gelu").
        mlp: "gated" (`GatedMLP`, bias-free, as T5 v1.1 and Llama) or "gelu" (`GeluMLP`, colt5-attention's).
        branch_norms: an RMSNorm before each MLP (the router sees the input itself), as colt5-attention's
            feedforward normalises its own input; False where a block normalises before the layer.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens: int | float,
        light_ff_mult: float | None = None,
        heavy_ff_mult: float | None = None,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        router_type: str = "coor_descent",
        use_triton: bool | None = None,
        light_hidden_dim: int | None = None,
        heavy_hidden_dim: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mlp: str = "gated",
        branch_norms: bool = True,
    ):
        super().__init__()
        validate_amount("num_heavy_tokens", num_heavy_tokens)
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {mlp!r}.")
        self.num_heavy_tokens = num_heavy_tokens
        light = hidden_width(dim, "light_hidden_dim", light_hidden_dim, "light_ff_mult", light_ff_mult, 0.5)
        heavy = hidden_width(dim, "heavy_hidden_dim", heavy_hidden_dim, "heavy_ff_mult", heavy_ff_mult, 4)
        self.light_norm = nn.RMSNorm(dim) if branch_norms else None
        self.heavy_norm = nn.RMSNorm(dim) if branch_norms else None
        self.light_mlp = MLPS[mlp](dim, light, activation)
        self.heavy_mlp = MLPS[mlp](dim, heavy, activation)
        router = router_layer_kwargs(router_kwargs, router_straight_through, use_triton, router_type)
        self.router = CoordinateDescentRouter(dim, num_sets=1, **router)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, num_heavy_tokens: int | float | None = None
    ) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding) -> `(batch, n, dim)`;
        `num_heavy_tokens` overrides the layer's amount for this call."""
        amount = call_amount("num_heavy_tokens", num_heavy_tokens, self.num_heavy_tokens)
        routed = self.router(x, amount, mask)
        indices, weights = routed.indices[:, 0], routed.weights[:, 0]
        light_x = x if self.light_norm is None else self.light_norm(x)
        heavy_x = gather_tokens(x, routed.indices)[:, 0]
        if self.heavy_norm is not None:
            heavy_x = self.heavy_norm(heavy_x)
        heavy = self.heavy_mlp(heavy_x) * weights.unsqueeze(-1).to(x.dtype)
        return self.light_mlp(light_x) + scatter_tokens(heavy, indices, x.shape[1])


class CausalRoutedFeedForward(nn.Module):
    """Light MLP on every token, heavy MLP on the tokens a per-token `ThresholdRouter` routes (a target
    `fraction` of them), its output scaled by the router weight. Each output depends on its own token only.

    Args:
        dim: model width.
        fraction: target share of tokens routed to the heavy MLP, in (0, 1].
        light_hidden_dim, heavy_hidden_dim: MLP widths (default dim / 2 and 4 * dim).
        activation: the MLPs' activation (default tanh-approximated GELU).
        router_kwargs: `ThresholdRouter` settings (fetch_ratio, eps, straight_through, prefix_normalization,
            momentum, capacity_factor, capacity_burst, random_routing). In training the heavy MLP takes at most
            `ceil(capacity_factor * fraction * n) + capacity_burst` tokens per sample (see `ThresholdRouter`).
        layer_idx: the layer's index in a `CoLT5Cache`: with prefix normalization its `CoLT5CacheLayer` carries
            the router's prefix statistics from one call to the next.
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
        layer_idx: int = 0,
    ):
        super().__init__()
        self.light_mlp = GatedMLP(dim, light_hidden_dim or dim // 2, activation)
        self.heavy_mlp = GatedMLP(dim, heavy_hidden_dim or 4 * dim, activation)
        self.router = ThresholdRouter(dim, fraction, **(router_kwargs or {}))
        self.layer_idx = layer_idx

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: CoLT5Cache | None = None
    ) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding, never routed) -> `(batch, n, dim)`.

        `cache`: the state of the previous tokens (`cache.layers[layer_idx]` carries the router's prefix
        statistics, updated in place); None: the sequences start here."""
        statistics = None
        if cache is not None and self.router.prefix_normalization:
            statistics = cache.layers[self.layer_idx].router_statistics("feedforward", x.shape[0], x.device)
        gate = self.router(x, mask, statistics)
        light = self.light_mlp(x)
        if x.shape[1] == 1:
            # Decoding: one token per sample. Weighting all of them (0 where not routed) avoids the device sync of
            # selecting the routed ones, and reads the same weights.
            return light + self.heavy_mlp(x) * gate.weights.unsqueeze(-1).to(x.dtype)
        slots = self.router.capacity(x.shape[1])
        if slots is None:
            # Every routed token; their number varies, hence the flat selection (a host synchronisation).
            tokens = gate.routed.flatten().nonzero().squeeze(-1)
            flat = x.reshape(-1, x.shape[-1])
            heavy = self.heavy_mlp(flat[tokens]) * gate.weights.to(x.dtype).view(-1, 1)[tokens]
            return light.to(heavy.dtype).reshape(flat.shape).index_add(0, tokens, heavy).view_as(x)
        # Training: `slots` per sample (static shapes). The kept tokens come first, in order; empty slots weigh 0.
        valid = torch.ones_like(gate.routed) if mask is None else mask.bool()
        kept = self.router.keep_within_capacity(gate.routed, valid)
        tokens = (~kept).to(torch.int8).sort(dim=-1, stable=True).indices[:, :slots]
        weights = (gate.weights * kept).gather(1, tokens).unsqueeze(-1).to(x.dtype)
        positions = tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        heavy = self.heavy_mlp(x.gather(1, positions)) * weights
        # Into the light output directly (the slots hold distinct tokens): no zeros and no sum. Under autocast the
        # sum has the weights' dtype, as light + heavy would.
        return light.to(heavy.dtype).scatter_add(1, positions, heavy)
