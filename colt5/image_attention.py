# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional attention over feature maps (images).

    y = A_light(x) + lambda_q * A_heavy(x_q, lambda_kv * x_kv)

Light branch: attention inside non-overlapping windows of `window_size x window_size` pixels, every pixel, few
heads. Heavy branch: routed queries attend to routed keys/values chosen across the whole image (not per window),
so a routed pixel can draw on any other routed pixel of its image. Both branches rotate queries and keys by each
pixel's (row, column) with two-axis rotary embeddings, so scores depend on the offset between two pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .masked_sdpa import masked_sdpa
from .rotary import RotaryEmbedding, apply_rotary
from .routed_attention import RoutedAttentionBase, light_projections, project
from .router import CoordinateDescentRouter, validate_amount


class ConditionalRoutedImageAttention(RoutedAttentionBase):
    """Routed attention over a feature map (see the module docstring).

    Args:
        dim: channels of the feature map (and of the output).
        num_heavy_tokens_q: routed query pixels, int count or float fraction of each image's valid pixels.
        num_heavy_tokens_kv: routed key/value pixels per routing set, same convention.
        window_size: the light branch attends within windows of this many pixels on each side; maps whose
            sides are not multiples of it get partial windows at the bottom and right edges.
        light_heads, light_dim_head: light branch heads and head width (divisible by 4: two rotary axes).
        heavy_heads, heavy_dim_head: heavy branch heads and head width (divisible by 4); heavy heads are split
            evenly among `num_routed_kv` key/value routing sets.
        num_routed_kv: key/value routing sets.
        multiply_keys_by_score: scale routed keys by their router weight (values always are).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        learned_unrouted_output: a learned heavy output for pixels not routed as queries (else 0).
        channels_first: feature maps are `(batch, dim, height, width)` (PyTorch's convolution layout); False
            for `(batch, height, width, dim)`.
        rotary_theta: rotary base of both branches.
        dropout: attention-probability dropout in both branches.
        router_kwargs: settings of the `CoordinateDescentRouter`s: soft top-k settings, backend,
            `route_block_size` (route evenly over blocks of pixels in row-major order) and `random_routing`.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        window_size: int = 8,
        light_heads: int = 4,
        light_dim_head: int = 64,
        heavy_heads: int = 8,
        heavy_dim_head: int = 64,
        num_routed_kv: int = 1,
        multiply_keys_by_score: bool = True,
        multiply_queries_by_score: bool = False,
        learned_unrouted_output: bool = False,
        channels_first: bool = True,
        rotary_theta: float = 10000.0,
        dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(
            dim,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=rotary_theta,
            rotary_axes=2,
            dropout=dropout,
        )
        validate_amount("num_heavy_tokens_q", num_heavy_tokens_q)
        validate_amount("num_heavy_tokens_kv", num_heavy_tokens_kv)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1 (pixels per window side), got {window_size!r}.")
        self.dim, self.window_size, self.channels_first = dim, window_size, channels_first
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.light_heads = light_heads
        self.light_q_proj, self.light_k_proj, self.light_v_proj, self.light_o_proj = light_projections(
            dim, light_heads, light_dim_head
        )
        self.light_rotary = RotaryEmbedding(light_dim_head, rotary_theta, axes=2)
        self.q_router = CoordinateDescentRouter(dim, 1, **(router_kwargs or {}))
        self.kv_router = CoordinateDescentRouter(dim, num_routed_kv, **(router_kwargs or {}))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `(batch, dim, height, width)` (or `(batch, height, width, dim)` with `channels_first=False`), `mask`
        `(batch, height, width)` bool (False = padding pixels: never routed, never attended to) -> the output in
        x's layout."""
        self._check_inputs(x, mask)
        if self.channels_first:
            # One channels-last copy, read by both branches (each would otherwise copy the strided view).
            x = rearrange(x, "b c y x -> b y x c").contiguous()
        height, width = x.shape[1:3]
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        positions = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (height, width, 2)

        out = self._light(x, mask, positions) + self._heavy(x, mask, positions)
        return rearrange(out, "b y x c -> b c y x") if self.channels_first else out

    def _light(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Window attention: `x` `(batch, height, width, dim)` -> same shape."""
        batch, height, width, _ = x.shape
        w = self.window_size
        q, k, v = (
            rearrange(t, "b y x (h e) -> b h y x e", h=self.light_heads)
            for t in project(x, self.light_q_proj, self.light_k_proj, self.light_v_proj)
        )
        cos, sin = self.light_rotary(positions, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        # Partial windows at the bottom and right: pad to whole windows, and mask the padding as keys.
        pad_rows, pad_cols = -height % w, -width % w
        valid = mask
        if pad_rows or pad_cols:
            q, k, v = (F.pad(t, (0, 0, 0, pad_cols, 0, pad_rows)) for t in (q, k, v))
            if valid is None:
                valid = torch.ones(batch, height, width, dtype=torch.bool, device=x.device)
            valid = F.pad(valid, (0, pad_cols, 0, pad_rows), value=False)
        to_windows = "b h (ny p) (nx q) e -> (b ny nx) h (p q) e"
        q, k, v = (rearrange(t, to_windows, p=w, q=w) for t in (q, k, v))
        allowed = None
        if valid is not None:
            allowed = rearrange(valid, "b (ny p) (nx q) -> (b ny nx) 1 1 (p q)", p=w, q=w)
            # A window of padding only has no key: let its (discarded) queries see its padding instead of NaN.
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        out = masked_sdpa(q, k, v, allowed, self.dropout if self.training else 0.0)
        out = rearrange(out, "(b ny nx) h (p q) e -> b (ny p) (nx q) (h e)", b=batch, nx=(width + pad_cols) // w, p=w)
        return self.light_o_proj(out[:, :height, :width])

    def _heavy(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Routed attention across the whole image: `x` `(batch, height, width, dim)` -> same shape."""
        batch, height, width, dim = x.shape
        tokens = x.reshape(batch, height * width, dim)
        flat_mask = None if mask is None else mask.reshape(batch, height * width)
        flat_positions = positions.reshape(1, height * width, 2).expand(batch, -1, -1)
        routed_q = self.q_router(tokens, self.num_heavy_tokens_q, flat_mask)
        routed_kv = self.kv_router(tokens, self.num_heavy_tokens_kv, flat_mask)
        heavy = self._routed_heavy(
            tokens, routed_q, tokens, routed_kv, flat_mask is not None, flat_positions, flat_positions
        )
        return heavy.view(batch, height, width, dim)

    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        layout = "(batch, dim, height, width)" if self.channels_first else "(batch, height, width, dim)"
        if x.dim() != 4 or (x.shape[1] if self.channels_first else x.shape[-1]) != self.dim:
            other = (
                "channels_first=False for (batch, height, width, dim)"
                if self.channels_first
                else ("channels_first=True for (batch, dim, height, width)")
            )
            raise ValueError(
                f"expected a feature map {layout} with dim={self.dim} channels, got shape {tuple(x.shape)}; "
                f"set {other} maps."
            )
        spatial = tuple(x.shape[2:]) if self.channels_first else tuple(x.shape[1:3])
        if 0 in spatial:
            raise ValueError(f"the feature map needs at least one pixel, got height x width = {spatial}.")
        if mask is not None and tuple(mask.shape) != (x.shape[0], *spatial):
            raise ValueError(
                f"mask must be (batch, height, width) = {(x.shape[0], *spatial)}, got {tuple(mask.shape)}."
            )
