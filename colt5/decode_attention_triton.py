# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Triton kernels for the attention of one query per (sample, head) over a cache (decode_attention.py holds the
PyTorch reference and the dispatch).

Split over keys (flash decoding): one program per (tile of keys, sample and head) computes, in float32, the tile's
largest logit m_t, its sum of exponentials l_t = sum exp(s - m_t) and its weighted values a_t = sum exp(s - m_t) v;
one program per (sample and head) then combines the tiles, with M = max_t m_t (and the null key's logit, if any):
out = sum_t exp(m_t - M) a_t / sum_t exp(m_t - M) l_t. A tile with no allowed key has m_t = -inf and weighs
nothing; a query with none at all gets zeros, as SDPA gives.

Float arguments (the softmax scale) are compile-time constants (`tl.constexpr`): Inductor passes a Python float to a
kernel it launches as float64 (eager Triton, as float32), which would widen the arithmetic around it.
"""

from __future__ import annotations

import os

import torch

try:  # transformers' remote-code check skips imports in try blocks: loading a model never requires triton.
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "The Triton decode attention needs the `triton` package (pip install triton); without it CoLT5 uses SDPA "
        "(decode_attention.py)."
    ) from error


# Keys per program of the first kernel and tiles per step of the second. Triton's CPU interpreter costs time per
# element of a tile: small tiles keep the CPU tests fast and let their small shapes span several tiles (and the
# combining loop several steps). On a GPU, 128 keys a program: 24 programs per (sample, head) for the benchmark's
# 3,072 heavy keys, so that one sample's 8 heads already fill more than an H100's 132 multiprocessors. (Read once,
# at import: torch.compile traces the launch below as it is.)
TILES = (
    dict(BLOCK_N=16, BLOCK_T=4) if os.environ.get("TRITON_INTERPRET") == "1" else dict(BLOCK_N=128, BLOCK_T=32)
)


@triton.jit
def _tile_kernel(
    q_ptr, keys_ptr, values_ptr, mask_ptr, max_ptr, sum_ptr, acc_ptr,
    heads, n, head_dim, scale: tl.constexpr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    row = tl.program_id(1)  # sample * heads + head
    tiles = tl.num_programs(0)
    sample = (row // heads).to(tl.int64)
    head = (row % heads).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < n
    in_d = offs_d < head_dim
    in_tile = in_n[:, None] & in_d[None, :]

    q = tl.load(q_ptr + sample * stride_qb + head * stride_qh + offs_d, mask=in_d, other=0.0).to(tl.float32)
    k_offsets = sample * stride_kb + head * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(keys_ptr + k_offsets, mask=in_tile, other=0.0).to(tl.float32)
    m_offsets = sample * stride_mb + head * stride_mh + offs_n.to(tl.int64) * stride_mn
    allowed = (tl.load(mask_ptr + m_offsets, mask=in_n, other=0) != 0) & in_n
    logits = tl.where(allowed, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
    top = tl.max(logits, 0)
    p = tl.exp(logits - tl.where(top == float("-inf"), 0.0, top))  # exp(-inf) = 0 for masked keys
    v_offsets = sample * stride_vb + head * stride_vh + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    v = tl.load(values_ptr + v_offsets, mask=in_tile, other=0.0).to(tl.float32)

    out = row.to(tl.int64) * tiles + tile
    tl.store(max_ptr + out, top)
    tl.store(sum_ptr + out, tl.sum(p, 0))
    tl.store(acc_ptr + out * BLOCK_D + offs_d, tl.sum(p[:, None] * v, 0))


@triton.jit
def _combine_kernel(
    max_ptr, sum_ptr, acc_ptr, q_ptr, null_ptr, out_ptr,
    heads, tiles, head_dim, scale: tl.constexpr,
    stride_qb, stride_qh, stride_null,
    HAS_NULL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * tiles
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim

    running = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for start in range(0, tiles, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        running = tl.maximum(running, tl.load(max_ptr + base + offs_t, mask=offs_t < tiles, other=float("-inf")))
    top = tl.max(running, 0)
    if HAS_NULL:
        sample = row // heads
        head = row % heads
        q = tl.load(q_ptr + sample.to(tl.int64) * stride_qb + head * stride_qh + offs_d, mask=in_d, other=0.0)
        null_key = tl.load(null_ptr + head * head_dim + offs_d, mask=in_d, other=0.0).to(tl.float32)
        null_logit = tl.sum(q.to(tl.float32) * null_key, 0) * scale
        top = tl.maximum(top, null_logit)
    top = tl.where(top == float("-inf"), 0.0, top)

    total = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for start in range(0, tiles, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        in_t = offs_t < tiles
        weight = tl.exp(tl.load(max_ptr + base + offs_t, mask=in_t, other=float("-inf")) - top)
        total += weight * tl.load(sum_ptr + base + offs_t, mask=in_t, other=0.0)
        tile_acc = tl.load(acc_ptr + (base + offs_t)[:, None] * BLOCK_D + offs_d[None, :], mask=in_t[:, None], other=0.0)
        acc += weight[:, None] * tile_acc
    denominator = tl.sum(total, 0)
    numerator = tl.sum(acc, 0)
    if HAS_NULL:
        null_weight = tl.exp(null_logit - top)
        null_value = tl.load(null_ptr + stride_null + head * head_dim + offs_d, mask=in_d, other=0.0).to(tl.float32)
        denominator += null_weight
        numerator += null_weight * null_value
    out = tl.where(denominator > 0, numerator / tl.where(denominator > 0, denominator, 1.0), 0.0)
    tl.store(out_ptr + row.to(tl.int64) * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=in_d)


def decode_attention_triton(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, null_kv: torch.Tensor | None = None
) -> torch.Tensor:
    """`decode_attention` (see there for the arguments) by the kernels above; no gradient."""
    batch, heads, _, head_dim = q.shape
    n = keys.shape[2]
    q, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, keys, values))
    mask = mask.expand(batch, heads, 1, n)[:, :, 0]  # broadcast heads get stride 0
    block_n, block_d = TILES["BLOCK_N"], triton.next_power_of_2(head_dim)
    tiles = triton.cdiv(n, block_n)
    rows = batch * heads
    tile_max = torch.empty(rows, tiles, device=q.device, dtype=torch.float32)
    tile_sum = torch.empty_like(tile_max)
    tile_acc = torch.empty(rows, tiles, block_d, device=q.device, dtype=torch.float32)
    scale = head_dim**-0.5
    _tile_kernel[(tiles, rows)](
        q, keys, values, mask, tile_max, tile_sum, tile_acc,
        heads, n, head_dim, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        mask.stride(0), mask.stride(1), mask.stride(2),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    out = torch.empty(batch, heads, 1, head_dim, device=q.device, dtype=q.dtype)
    null = null_kv.contiguous() if null_kv is not None else tile_max  # any pointer when there is none
    _combine_kernel[(rows,)](
        tile_max, tile_sum, tile_acc, q, null, out,
        heads, tiles, head_dim, scale,
        q.stride(0), q.stride(1), heads * head_dim,
        HAS_NULL=null_kv is not None, BLOCK_T=TILES["BLOCK_T"], BLOCK_D=block_d, num_warps=1,
    )
    return out


__all__ = ["decode_attention_triton"]
