# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""colt5-attention's `ConditionalRoutedViT`: a plain ViT (patch embedding, fixed 2-D sin-cos positions, mean pooling)
whose layers are CoLT5's routed image attention and routed feedforward, each normalising its own input."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from .image_attention import ConditionalRoutedImageAttention
from .routed_feedforward import ConditionalRoutedFeedForward


def sincos_positions_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """`(height, width, dim)` fixed positions: sin and cos of the column, then of the row, at `dim // 4`
    frequencies each (the "Better plain ViT baselines" embedding)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}.")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frequencies = temperature ** -(torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    rows = rows.flatten()[:, None] * frequencies
    cols = cols.flatten()[:, None] * frequencies
    return torch.cat((cols.sin(), cols.cos(), rows.sin(), rows.cos()), dim=1).view(height, width, dim)


class ConditionalRoutedViT(nn.Module):
    """Image classifier: patches -> `depth` pairs of routed image attention and routed feedforward (residual) ->
    mean over patches -> LayerNorm -> linear head. colt5-attention's keywords and defaults.

    Args:
        image_size, patch_size: int or (height, width); the image sides must be multiples of the patch sides.
        num_classes, dim, depth, channels: classes, width, layers, input channels.
        attn_num_heavy_tokens_q, attn_num_heavy_tokens_kv: routed query and key/value patches per image.
        attn_heavy_dim_head, attn_heavy_heads, attn_light_dim_head, attn_light_heads: heads of both branches.
        attn_light_window_size: the light branch's window, in patches per side.
        attn_num_routed_kv: key/value routing sets.
        ff_num_heavy_tokens, ff_heavy_mult, ff_light_mult: the routed feedforward.
        router_straight_through, router_kwargs, router_use_triton: the routers' settings (see
            `ConditionalRoutedAttention`); `default_coor_descent_eps` is their eps unless router_kwargs set one.
        flash_attn: SDPA's fastest kernels (True) or its math kernel (False).
        mlp: the feedforward's MLP kind (see `ConditionalRoutedFeedForward`).
        **layer_kwargs: further settings of every `ConditionalRoutedImageAttention` (rotary_theta, null_kv, ...).
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        attn_num_heavy_tokens_q: int | float,
        attn_num_heavy_tokens_kv: int | float,
        attn_heavy_dim_head: int,
        attn_heavy_heads: int,
        attn_light_dim_head: int,
        attn_light_heads: int,
        attn_light_window_size: int,
        ff_num_heavy_tokens: int | float,
        ff_heavy_mult: float,
        ff_light_mult: float,
        channels: int = 3,
        router_straight_through: bool = True,
        router_kwargs: dict[str, Any] | None = None,
        router_use_triton: bool | None = None,
        flash_attn: bool = True,
        attn_num_routed_kv: int = 1,
        default_coor_descent_eps: float = 1.0,
        mlp: str = "gated",
        **layer_kwargs: Any,
    ):
        super().__init__()
        (image_height, image_width), (patch_height, patch_width) = (
            size if isinstance(size, tuple) else (size, size) for size in (image_size, patch_size)
        )
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"The image sides {(image_height, image_width)} must be multiples of the patch sides "
                f"{(patch_height, patch_width)}."
            )
        self.patch_height, self.patch_width = patch_height, patch_width
        patch_dim = channels * patch_height * patch_width
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        if dim % 4:
            raise ValueError(f"dim must be divisible by 4 (the 2-D sin-cos positions), got {dim}.")
        self.image_size = (image_height, image_width)
        router_kwargs = {"eps": default_coor_descent_eps, **(router_kwargs or {})}
        routing = dict(
            router_straight_through=router_straight_through, router_kwargs=router_kwargs, use_triton=router_use_triton
        )
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attention = ConditionalRoutedImageAttention(
                dim,
                num_heavy_tokens_q=attn_num_heavy_tokens_q,
                num_heavy_tokens_kv=attn_num_heavy_tokens_kv,
                num_routed_kv=attn_num_routed_kv,
                light_dim_head=attn_light_dim_head,
                light_heads=attn_light_heads,
                light_window_size=attn_light_window_size,
                heavy_dim_head=attn_heavy_dim_head,
                heavy_heads=attn_heavy_heads,
                use_flash_attn=flash_attn,
                channel_first=False,
                **routing,
                **layer_kwargs,
            )
            feedforward = ConditionalRoutedFeedForward(
                dim,
                num_heavy_tokens=ff_num_heavy_tokens,
                light_ff_mult=ff_light_mult,
                heavy_ff_mult=ff_heavy_mult,
                mlp=mlp,
                **routing,
            )
            self.layers.append(nn.ModuleList([attention, feedforward]))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, height, width)` images -> `(batch, num_classes)` logits."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"Expected images of height x width {self.image_size}, got {tuple(images.shape[-2:])}.")
        patches = rearrange(images, "b c (y p) (x q) -> b y x (p q c)", p=self.patch_height, q=self.patch_width)
        x = self.embedding_norm(self.patch_proj(self.patch_norm(patches)))
        x = x + sincos_positions_2d(*x.shape[1:3], x.shape[-1]).to(x)
        for attention, feedforward in self.layers:
            x = attention(x) + x
            tokens = x.flatten(1, 2)
            x = (feedforward(tokens) + tokens).view_as(x)
        return self.head(self.head_norm(x.mean(dim=(1, 2))))
