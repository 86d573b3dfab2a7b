# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Scaled dot-product attention with a boolean mask, for the routed branches.

Routed attention has a new shape on almost every call (the number of routed tokens depends on the data), and
PyTorch's cuDNN attention backend builds a graph per shape: about 0.5 s each on an H100 (torch 2.11), which made a
4k-token forward pass 6x slower. The memory-efficient and flash kernels have no per-shape set-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)` without the cuDNN backend.

    Args:
        q: `(batch, heads, queries, head_dim)`.
        k, v: `(batch, heads, keys, head_dim)`.
        mask: bool, broadcastable to `(batch, heads, queries, keys)`, True where attention is allowed; None: all.
        dropout: attention-probability dropout (pass 0 in evaluation).
    """
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
