# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Scaled dot-product attention with a boolean mask, for the routed branches.

Routed attention can have a new shape on every call (the number of routed tokens depends on the data), and
PyTorch's cuDNN attention backend builds a graph per shape: about 0.5 s each on an H100 (torch 2.11), which made a
4k-token forward pass 6x slower. The memory-efficient and flash kernels have no per-shape set-up, so cuDNN is only
used where a caller keeps the shapes few and needs it: with a mask that differs per query the memory-efficient
kernel's backward pass is slow (the causal heavy branch at 32k tokens on an H100: 18.9 ms forward+backward
against 2.5 ms with cuDNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
    *,
    prefer_cudnn: bool = False,
    math_only: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)`, by default without the cuDNN
    backend.

    Args:
        q: `(batch, heads, queries, head_dim)`.
        k, v: `(batch, heads, keys, head_dim)`.
        mask: bool, broadcastable to `(batch, heads, queries, keys)`, True where attention is allowed; None: all.
        dropout: attention-probability dropout (pass 0 in evaluation).
        prefer_cudnn: try cuDNN first (it takes bf16/fp16 only; other inputs go to the other kernels). For callers
            whose shapes repeat: each new shape costs cuDNN a graph build.
        math_only: SDPA's plain math kernel only (colt5-attention's `use_flash_attn=False`).
    """
    if math_only:
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if prefer_cudnn:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *_BACKENDS], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def prepend_null_kv(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, null_kv: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prepend a learned null key/value `(2, heads, head_dim)` (None: nothing) to `(rows, heads, slots, head_dim)`
    keys and values, and an always-allowed slot to a `(rows, heads, queries, slots)`-broadcastable mask."""
    if null_kv is None:
        return k, v, mask
    null_k, null_v = (t.to(k.dtype)[None, :, None].expand(k.shape[0], -1, 1, -1) for t in null_kv)
    mask = None if mask is None else F.pad(mask, (1, 0), value=True)
    return torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2), mask
