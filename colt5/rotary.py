# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Rotary position embeddings from absolute token positions.

Routed tokens are gathered out of order, so both attention branches rotate queries and keys by each token's
absolute position (not its index in a window or in the routed set); the dot product then depends only on the
distance between the two tokens. Positions with several axes (the row and column of a pixel) rotate separate
frequency bands, one per axis, so the dot product depends on the offset along each axis.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for arbitrary position tensors. The frequencies are a plain attribute, not a buffer, so that
    meta-device loading has nothing to re-create; they are recomputed when the device changes."""

    def __init__(self, head_dim: int, theta: float = 10000.0, axes: int = 1):
        super().__init__()
        if head_dim % (2 * axes):
            raise ValueError(
                f"rotary embeddings over {axes} position axes need a head dimension divisible by {2 * axes} (a pair "
                f"of features per frequency, the same number of frequencies per axis), got {head_dim}."
            )
        self.head_dim = head_dim
        self.theta = theta
        self.axes = axes
        self._inv_freq: torch.Tensor | None = None

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        # Cached because decoding calls this once per token and layer; meta tensors are never cached.
        if self._inv_freq is None or self._inv_freq.device != device:
            band = self.head_dim // self.axes
            exponents = torch.arange(0, band, 2, device=device, dtype=torch.float32) / band
            self._inv_freq = self.theta**-exponents
        return self._inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer positions, `(...)` for one axis or `(..., axes)`, -> cos, sin of shape `(..., head_dim)` in `dtype`
        (computed in float32)."""
        inv_freq = self._frequencies(positions.device)
        if self.axes == 1:
            positions = positions.unsqueeze(-1)
        elif positions.shape[-1] != self.axes:
            raise ValueError(f"expected positions of shape (..., {self.axes}), got {tuple(positions.shape)}.")
        with torch.autocast(device_type=positions.device.type, enabled=False):
            angles = (positions.float().unsqueeze(-1) * inv_freq).flatten(-2)
            angles = torch.cat((angles, angles), dim=-1)
            return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in PyTorch operations."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `(..., n, head_dim)` by cos/sin broadcastable to it (rotate-half convention: the feature pairs are
    (i, i + head_dim / 2)). CUDA tensors go to the Triton kernel (rotary_triton.py) when cos and sin have x's
    dtype and need no gradient; everything else, and a function torch.compile traces (it fuses the reference
    itself), to the PyTorch reference."""
    if (
        x.is_cuda
        and not torch.compiler.is_compiling()
        and x.dim() <= 5
        and x.shape[-1] % 2 == 0
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and cos.dtype == sin.dtype == x.dtype
        and not (cos.requires_grad or sin.requires_grad)
        and torch.broadcast_shapes(x.shape, cos.shape, sin.shape) == x.shape
    ):
        from .rotary_triton import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)
