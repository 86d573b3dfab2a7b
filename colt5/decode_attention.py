# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Attention of one query per (sample, head) over a cache: PyTorch reference and dispatch (the Triton kernels in
decode_attention_triton.py).

A decode step of the causal model attends twice per layer with a single query: the light branch to its ring
buffer of recent tokens, the heavy branch to the routed memory and the current block (a few thousand keys). SDPA's
fused kernels split the work over (sample, head, tiles of 64 queries) only, so one query leaves most of the GPU
idle while a few thread blocks walk every key: 89 us per heavy attention for 3,072 keys on an H100 (bf16), 58%
of the compiled decode step. Its math kernel, on the other hand, widens the keys and values of half-precision
inputs to float32 copies first. The kernels here split the keys instead (flash decoding): one program per (sample,
head, tile of keys) computes that tile's softmax statistics and weighted values in float32, and one program per
(sample, head) combines the tiles.
"""

from __future__ import annotations

import torch

from .masked_sdpa import masked_sdpa, prepend_null_kv

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def decode_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, null_kv: torch.Tensor | None = None
) -> torch.Tensor:
    """`decode_attention` with SDPA (differentiable; see `decode_attention` for the arguments)."""
    keys, values, mask = prepend_null_kv(keys, values, mask, null_kv)
    return masked_sdpa(q, keys, values, mask)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, null_kv: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention (scale head_dim^-0.5) of one query per sample and head.

    Args:
        q: `(batch, heads, 1, head_dim)`.
        keys, values: `(batch, heads, n, head_dim)`.
        mask: bool `(batch, heads or 1, 1, n)`, True where a key may be attended to.
        null_kv: a learned key and value `(2, heads, head_dim)` every query may attend to, or None.

    Returns:
        `(batch, heads, 1, head_dim)` in the dtype of `q`; zeros where a query may attend to nothing.

    CUDA tensors in float32, bfloat16 or float16 go to the Triton kernels when no gradient is asked for (they have
    no backward pass); everything else to SDPA.
    """
    batch, heads, queries, head_dim = q.shape
    if queries != 1 or keys.shape != (batch, heads, keys.shape[2], head_dim) or values.shape != keys.shape:
        raise ValueError(
            f"decode_attention takes one query per sample and head, q (batch, heads, 1, head_dim) and keys and values "
            f"(batch, heads, n, head_dim); got q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}."
        )
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, keys, values, null_kv)
    )
    if q.is_cuda and q.dtype in KERNEL_DTYPES and not wants_grad:
        from .decode_attention_triton import decode_attention_triton

        return decode_attention_triton(q, keys, values, mask, null_kv)
    return decode_attention_reference(q, keys, values, mask, null_kv)


__all__ = ["decode_attention", "decode_attention_reference"]
