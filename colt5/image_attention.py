# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional attention over feature maps (images).

    y = A_light(x) + lambda_q * A_heavy(x_q, lambda_kv * x_kv)

Light branch: attention inside non-overlapping windows of `window_size x window_size` pixels, every pixel, few
heads. Heavy branch: routed queries attend to routed keys/values chosen across the whole image (not per window),
so a routed pixel can draw on any other routed pixel of its image. Both branches rotate queries and keys by each
pixel's (row, column) with two-axis rotary embeddings, so scores depend on the offset between two pixels (unless
`rotary_theta=None`: no positions, as in colt5-attention).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .masked_sdpa import masked_sdpa
from .rotary import RotaryEmbedding, apply_rotary
from .routed_attention import RoutedAttentionBase, light_projections, project
from .router import CoordinateDescentRouter, call_amount, router_layer_kwargs, validate_amount
from .spellings import one_spelling


class ConditionalRoutedImageAttention(RoutedAttentionBase):
    """Routed attention over a feature map (see the module docstring).

    Takes colt5-attention's keywords with its defaults, and colt5's own (the second name of a pair).

    Args:
        dim: channels of the feature map (and of the output).
        num_heavy_tokens_q: routed query pixels, int count or float fraction of each image's valid pixels.
        num_heavy_tokens_kv: routed key/value pixels per routing set, same convention.
        num_routed_kv: key/value routing sets; heavy heads are split evenly among them.
        light_dim_head, light_heads: light branch head width (divisible by 4 with positions: two rotary axes)
            and heads.
        light_window_size, window_size: the light branch attends within windows of this many pixels on each side;
            maps whose sides are not multiples of it get partial windows at the bottom and right edges.
        heavy_dim_head, heavy_heads: heavy branch head width (divisible by 4 with positions) and heads.
        router_straight_through, router_kwargs, use_triton: the routers' settings (see `ConditionalRoutedAttention`;
            router_kwargs may also hold `route_block_size`, blocks of pixels in row-major order).
        multiply_keys_by_score: scale routed keys by their router weight (values always are).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        use_null_q_tokens, learned_unrouted_output: a learned heavy output for pixels not routed as queries.
        use_flash_attn: see `RoutedAttentionBase`.
        channel_first, channels_first: feature maps are `(batch, dim, height, width)` (PyTorch's convolution
            layout); default `(batch, height, width, dim)`, as colt5-attention.
        rotary_theta: rotary base of both branches; None for no positions (colt5-attention's image attention
            has none).
        branch_norms: an RMSNorm before each branch, as colt5-attention's layer normalises its own input.
        null_kv: a learned null key/value per heavy head (colt5-attention's heavy attention has one).
        dropout: attention-probability dropout in both branches.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        num_routed_kv: int = 1,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int | None = None,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool | None = None,
        use_flash_attn: bool | None = None,
        channel_first: bool | None = None,
        window_size: int | None = None,
        channels_first: bool | None = None,
        learned_unrouted_output: bool | None = None,
        rotary_theta: float | None = 10000.0,
        branch_norms: bool = True,
        null_kv: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(
            dim,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=one_spelling(
                True, use_null_q_tokens=use_null_q_tokens, learned_unrouted_output=learned_unrouted_output
            ),
            rotary_theta=rotary_theta,
            rotary_axes=2,
            dropout=dropout,
            heavy_norm=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
        )
        validate_amount("num_heavy_tokens_q", num_heavy_tokens_q)
        validate_amount("num_heavy_tokens_kv", num_heavy_tokens_kv)
        window_size = one_spelling(128, light_window_size=light_window_size, window_size=window_size)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"light_window_size must be an int >= 1 (pixels per window side), got {window_size!r}.")
        self.dim, self.window_size = dim, window_size
        self.channels_first = one_spelling(False, channel_first=channel_first, channels_first=channels_first)
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.light_heads = light_heads
        self.light_norm = nn.RMSNorm(dim) if branch_norms else None
        self.light_q_proj, self.light_k_proj, self.light_v_proj, self.light_o_proj = light_projections(
            dim, light_heads, light_dim_head
        )
        self.light_rotary = None if rotary_theta is None else RotaryEmbedding(light_dim_head, rotary_theta, axes=2)
        router = router_layer_kwargs(router_kwargs, router_straight_through, use_triton)
        self.q_router = CoordinateDescentRouter(dim, num_sets=1, **router)
        self.kv_router = CoordinateDescentRouter(dim, num_sets=num_routed_kv, **router)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        num_heavy_tokens_q: int | float | None = None,
        num_heavy_tokens_kv: int | float | None = None,
    ) -> torch.Tensor:
        """`x` `(batch, height, width, dim)` (or `(batch, dim, height, width)` with `channel_first=True`), `mask`
        `(batch, height, width)` bool (False = padding pixels: never routed, never attended to) -> the output in
        x's layout. `num_heavy_tokens_q` / `_kv` override the layer's amounts for this call."""
        self._check_inputs(x, mask)
        if self.channels_first:
            # One channels-last copy, read by both branches (each would otherwise copy the strided view).
            x = rearrange(x, "b c y x -> b y x c").contiguous()
        height, width = x.shape[1:3]
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        positions = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (height, width, 2)

        amounts = (
            call_amount("num_heavy_tokens_q", num_heavy_tokens_q, self.num_heavy_tokens_q),
            call_amount("num_heavy_tokens_kv", num_heavy_tokens_kv, self.num_heavy_tokens_kv),
        )
        out = self._light(x, mask, positions) + self._heavy(x, mask, positions, *amounts)
        return rearrange(out, "b y x c -> b c y x") if self.channels_first else out

    def _light(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Window attention: `x` `(batch, height, width, dim)` -> same shape."""
        batch, height, width, _ = x.shape
        w = self.window_size
        light_x = x if self.light_norm is None else self.light_norm(x)
        q, k, v = (
            rearrange(t, "b y x (h e) -> b h y x e", h=self.light_heads)
            for t in project(light_x, self.light_q_proj, self.light_k_proj, self.light_v_proj)
        )
        if self.light_rotary is not None:
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
        out = masked_sdpa(q, k, v, allowed, self.dropout if self.training else 0.0, math_only=self.math_attention)
        out = rearrange(out, "(b ny nx) h (p q) e -> b (ny p) (nx q) (h e)", b=batch, nx=(width + pad_cols) // w, p=w)
        return self.light_o_proj(out[:, :height, :width])

    def _heavy(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        amount_q: int | float,
        amount_kv: int | float,
    ) -> torch.Tensor:
        """Routed attention across the whole image, `amount_q` query and `amount_kv` key/value pixels per image:
        `x` `(batch, height, width, dim)` -> same shape."""
        batch, height, width, dim = x.shape
        tokens = x.reshape(batch, height * width, dim)
        flat_mask = None if mask is None else mask.reshape(batch, height * width)
        flat_positions = positions.reshape(1, height * width, 2).expand(batch, -1, -1)
        routed_q = self.q_router(tokens, amount_q, flat_mask)
        routed_kv = self.kv_router(tokens, amount_kv, flat_mask)
        heavy = self._routed_heavy(
            tokens, routed_q, tokens, routed_kv, flat_mask is not None, flat_positions, flat_positions
        )
        return heavy.view(batch, height, width, dim)

    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        layout = "(batch, dim, height, width)" if self.channels_first else "(batch, height, width, dim)"
        if x.dim() != 4 or (x.shape[1] if self.channels_first else x.shape[-1]) != self.dim:
            other = (
                "channel_first=False (channels_first=False) for (batch, height, width, dim)"
                if self.channels_first
                else ("channel_first=True (channels_first=True) for (batch, dim, height, width)")
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
