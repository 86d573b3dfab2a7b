# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The causal heavy attention over routed memories: PyTorch reference and dispatch (Triton kernels in
memory_attention_triton.py).

A row is one block of `block` tokens of one sample. Its queries attend to
- the block's routed memory: `slots` tokens before the block per routing set, each with a router weight that
  scales its value (and, with `multiply_keys`, its key);
- the block's own tokens, causally: a query at block slot g sees slots 0..g.

Consecutive blocks share most of their memory, so materialising each block's memory (the reference below) writes
`blocks * slots` key and value vectors per routing set, kept for the backward pass: at 32k tokens with memory n/8
and blocks of 1024, 32 copies of a quarter of the sequence. The kernels read keys, values and weights by index
instead and compute the same attention (same keys, same weights, same FLOPs) with no copy.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .masked_sdpa import masked_sdpa, prepend_null_kv

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_memory(
    keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, multiply_keys: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply routed-memory weights `(..., m)` to its keys (when `multiply_keys`) and values `(..., m, features)`."""
    weights = weights.to(values.dtype).unsqueeze(-1)
    return (keys * weights if multiply_keys else keys), values * weights


def tokens_at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(batch, sets, n, features)` at `(batch, sets, ...)` indices (-1 reads token 0) ->
    `(batch, sets, ..., features)`."""
    flat = index.clamp_min(0).flatten(2)
    gathered = t.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
    return gathered.view(*index.shape, t.shape[-1])


def memory_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    memory_index: torch.Tensor,
    memory_weights: torch.Tensor,
    block_index: torch.Tensor,
    query_slot: torch.Tensor,
    *,
    multiply_keys: bool,
    null_kv: torch.Tensor | None = None,
    dropout: float = 0.0,
    math_only: bool = False,
) -> torch.Tensor:
    """`memory_attention` by copying each block's keys and values and one masked SDPA (see the module docstring).
    Also takes what the kernels do not: a learned null key/value `(2, heads, head_dim)` every query may attend
    to, attention dropout, and SDPA's math kernel only (`math_only`)."""
    _, heads, queries, head_dim = q.shape
    sets, block = keys.shape[1], block_index.shape[-1]
    memory_index = rearrange(memory_index, "b j s m -> b s j m")
    memory_keys, memory_values = scale_memory(
        tokens_at(keys, memory_index),
        tokens_at(values, memory_index),
        rearrange(memory_weights, "b j s m -> b s j m"),
        multiply_keys,
    )
    block_index = block_index.unsqueeze(1).expand(-1, sets, -1, -1)
    merge = "b s j m f -> (b j) s m f"
    all_keys = torch.cat((rearrange(memory_keys, merge), rearrange(tokens_at(keys, block_index), merge)), dim=2)
    all_values = torch.cat(
        (rearrange(memory_values, merge), rearrange(tokens_at(values, block_index), merge)), dim=2
    )

    memory_allowed = rearrange(memory_index >= 0, "b s j m -> (b j) s 1 m").expand(-1, -1, queries, -1)
    causal = torch.arange(block, device=q.device) <= query_slot.unsqueeze(-1)  # (b, j, g, block)
    block_allowed = (causal & (block_index[:, 0] >= 0).unsqueeze(2)).flatten(0, 1).unsqueeze(1)
    allowed = torch.cat((memory_allowed, block_allowed.expand(-1, sets, -1, -1)), dim=-1)

    split = "r s m (h e) -> r (s h) m e"
    all_keys = rearrange(all_keys, split, s=sets, e=head_dim)
    all_values = rearrange(all_values, split, s=sets, e=head_dim)
    # Query slots left empty (no routed token) have nothing to attend to: let them see everything, unused.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    allowed = allowed.repeat_interleave(heads // sets, dim=1) if sets > 1 else allowed
    all_keys, all_values, allowed = prepend_null_kv(all_keys, all_values, allowed, null_kv)
    # A mask that differs per query: the memory-efficient kernel's backward pass is 7x slower than cuDNN's here.
    out = masked_sdpa(q, all_keys, all_values, allowed, dropout, prefer_cudnn=True, math_only=math_only)
    return rearrange(out, "r h m e -> r m (h e)")


def memory_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    memory_index: torch.Tensor,
    memory_weights: torch.Tensor,
    block_index: torch.Tensor,
    query_slot: torch.Tensor,
    *,
    multiply_keys: bool,
    every_query: bool = False,
    null_kv: torch.Tensor | None = None,
    dropout: float = 0.0,
    math_only: bool = False,
) -> torch.Tensor:
    """Each block's queries attend to the block's routed memory and, causally, to the block.

    Args:
        q: `(batch * blocks, heads, queries, head_dim)` the queries of each block (sample-major rows).
        keys, values: `(batch, sets, n, heads_per_set * head_dim)` of every token; heads are split evenly among
            the routing sets (head h reads set h // heads_per_set).
        memory_index: `(batch, blocks, sets, slots)` token indices of each block's memory, -1 for an empty slot.
        memory_weights: `(batch, blocks, sets, slots)` their router weights.
        block_index: `(batch, blocks, block)` token index at each slot of the block, -1 past its valid tokens.
        query_slot: `(batch, blocks, queries)` the block slot of each query (it sees the block's slots <= it).
        multiply_keys: scale memory keys by their weight too (values always are).
        every_query: query g of every block is at slot g (`queries == block`), which lets the kernels skip what
            causality masks.
        null_kv, dropout, math_only: see `memory_attention_reference` (they run there).

    Returns:
        `(batch * blocks, queries, heads * head_dim)`; a query slot that sees no key gets an unspecified finite
        output (its caller gives it weight 0).

    CUDA tensors in float32, bfloat16 or float16 go to the Triton kernels, unless one of the reference's extra
    options is asked for.
    """
    if q.is_cuda and q.dtype in KERNEL_DTYPES and null_kv is None and dropout == 0 and not math_only:
        from .memory_attention_triton import memory_attention_triton

        return memory_attention_triton(
            q, keys, values, memory_index, memory_weights, block_index, query_slot,
            multiply_keys=multiply_keys, every_query=every_query,
        )
    return memory_attention_reference(
        q, keys, values, memory_index, memory_weights, block_index, query_slot,
        multiply_keys=multiply_keys, null_kv=null_kv, dropout=dropout, math_only=math_only,
    )
