# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Sliding-window (local) attention for the light attention branch, two ways:

- `flex_sliding_window_attention`: FlexAttention with a block mask that lists, for each tile of 128 queries, the
  tiles of keys within the window; compiled on GPUs (a flash-attention kernel that skips every other tile), eager
  elsewhere (tests). No dropout.
- `sliding_window_attention`: one fused SDPA call over blocked windows (keys of neighbouring blocks copied next to
  each block); supports dropout, needs no compiler. The light branch on CPUs and with attention dropout.

Both equal, at every valid query, `local_attention.LocalAttention(window_size=window, causal=causal,
look_backward=1, look_forward=0 if causal else 1, exact_windowsize=True, autopad=True, use_rotary_pos_emb=False)`
called as `attn(q, k, v, mask=valid)`, the reference they are tested against (the light branch of
colt5-attention), without materialising the blocked similarity matrix.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .masked_sdpa import masked_sdpa

FLEX_TILE = 128  # FlexAttention's default block size: the block mask lists tiles of this many queries and keys
FLEX_MIN_HEAD_DIM = 16  # compiled FlexAttention refuses narrower heads
# Block sizes are multiples of this: the key span (2 or 3 blocks) is then a multiple of 16, which the
# memory-efficient kernel wants for the last dimension of its mask (otherwise it pads the mask itself, or falls back).
_BLOCK_MULTIPLE = 16


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled once per process. Eager, it computes the full score matrix; compiled, it is a fused
    kernel that visits only the listed tiles.

    Compiled with dynamic shapes, and the mask functions capture tensors rather than Python numbers, so that a new
    length or window is not a new compilation."""
    return torch.compile(flex_attention, dynamic=True)


def window_block_mask(
    length: int,
    window: int,
    causal: bool,
    valid: torch.Tensor | None,
    device: torch.device,
    valid_length: int | None = None,
) -> BlockMask:
    """FlexAttention block mask of a sliding window over `length` positions (a multiple of FLEX_TILE).

    Query tile i visits key tiles i - r .. i + r (causal: .. i), r = ceil(window / FLEX_TILE); the mask function
    then decides per position: |i - j| <= window (causal: 0 <= i - j <= window) and, with `valid` `(batch,
    length)`, key j not padding, or, with `valid_length`, j < valid_length (every sample).
    """
    tiles, reach = length // FLEX_TILE, math.ceil(window / FLEX_TILE)
    offsets = torch.arange(-reach, (0 if causal else reach) + 1, device=device)
    key_tiles = torch.arange(tiles, device=device).unsqueeze(-1) + offsets  # (tiles, candidates)
    inside = (key_tiles >= 0) & (key_tiles < tiles)
    # Listed tiles first: out-of-range candidates sit at both ends, a stable sort moves them behind.
    order = (~inside).to(torch.int8).sort(dim=-1, stable=True).indices
    kv_indices = key_tiles.gather(-1, order).clamp(0, tiles - 1).to(torch.int32)
    # BlockMask wants one column per key tile (the listed ones first, the rest unused).
    kv_indices = F.pad(kv_indices, (0, max(0, tiles - kv_indices.shape[-1])))[:, :tiles]
    kv_num_blocks = inside.sum(-1).to(torch.int32)
    # torch.full fills on the device; torch.tensor would copy from the host (a synchronisation in every forward).
    highest, lowest = (torch.full((), value, device=device) for value in (window, 0 if causal else -window))

    def window_mask(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance <= highest) & (distance >= lowest)

    def window_and_padding_mask(b, h, q_idx, kv_idx):
        return window_mask(b, h, q_idx, kv_idx) & valid[b, kv_idx]

    def window_and_length_mask(b, h, q_idx, kv_idx):
        return window_mask(b, h, q_idx, kv_idx) & (kv_idx < end)

    mask_mod = window_mask
    if valid is not None:
        mask_mod = window_and_padding_mask
    elif valid_length is not None and valid_length < length:
        end = torch.full((), valid_length, device=device)
        mask_mod = window_and_length_mask
    return BlockMask.from_kv_blocks(
        kv_num_blocks[None, None],
        kv_indices[None, None],
        BLOCK_SIZE=FLEX_TILE,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


@functools.lru_cache(maxsize=16)
def _unpadded_window_block_mask(length: int, window: int, causal: bool, device: torch.device) -> BlockMask:
    """The block mask of `length` valid tokens padded to whole tiles (the tail masked): it depends on the length
    only, so it is built once (training repeats one length)."""
    return window_block_mask(length + (-length % FLEX_TILE), window, causal, None, device, valid_length=length)


def flex_sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, window: int, causal: bool
) -> torch.Tensor:
    """Query i sees key j iff j is within `window` positions (causal: before or at i) and `valid[j]`.

    Args:
        q, k, v: `(batch, heads, n, head_dim)`, rotary embeddings already applied.
        valid: `(batch, n)` bool, False at padding keys; None when there is no padding.
        window: how far (in positions) a query may look, >= 1.
        causal: only look backward.

    Returns:
        `(batch, heads, n, head_dim)`; padding queries with no valid key in reach get zeros.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = q.shape[2]
    # Whole tiles: the mask function then never indexes `valid` past its end, and fewer shapes get compiled.
    tail = -n % FLEX_TILE
    q, k, v = (F.pad(t, (0, 0, 0, tail)) for t in (q, k, v))
    if valid is None:
        block_mask = _unpadded_window_block_mask(n, window, causal, q.device)
    else:
        valid = F.pad(valid.bool(), (0, tail), value=False)
        block_mask = window_block_mask(n + tail, window, causal, valid, q.device)
    if not q.is_cuda or torch.compiler.is_compiling():
        # Inside a compiled caller, the caller's compilation fuses flex_attention itself.
        return flex_attention(q, k, v, block_mask=block_mask)[:, :, :n]
    # The limit counts variants of the mask function, grad mode and autocast state in one process (training,
    # evaluation, generation, benchmarks); past it torch.compile would silently run the unfused implementation.
    with torch._dynamo.config.patch(recompile_limit=64):
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)[:, :, :n]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention in which query i sees key j iff `valid[j]` and j is within `window` positions of i.

    Not causal: |i - j| <= window; causal: 0 <= i - j <= window. Scale head_dim ** -0.5.

    The sequence is cut into blocks of B >= window positions; every key a query may see then lies in its own block
    or a neighbouring one, so each query block attends a span of 3 blocks (b-1, b, b+1), or 2 when causal (b-1, b),
    and the blocks are folded into the batch dimension of a single SDPA call.

    Args:
        q, k, v: `(batch, heads, n, head_dim)`, rotary embeddings already applied.
        valid: `(batch, n)` bool, False at padding tokens (masked out as keys).
        window: how far (in positions) a query may look, >= 1.
        causal: only look backward.
        dropout: attention-probability dropout (pass 0 in evaluation).

    Returns:
        `(batch, heads, n, head_dim)`. Rows of padding queries are finite but meaningless: callers ignore them.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batch, heads, n, head_dim = q.shape
    block = -(-window // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE
    blocks = -(-n // block)
    tail = blocks * block - n  # padding that makes the length a multiple of the block
    after = 0 if causal else block  # the extra block of keys that the last query block looks forward into
    span = (2 if causal else 3) * block

    # Queries: (batch, heads, blocks * B, d) -> (batch * blocks, heads, B, d).
    q = F.pad(q, (0, 0, 0, tail))
    q = q.view(batch, heads, blocks, block, head_dim).transpose(1, 2).reshape(batch * blocks, heads, block, head_dim)

    def windows(t: torch.Tensor) -> torch.Tensor:
        # One block of zeros in front (the keys of "block -1"), the tail padding and, when not causal, one block
        # behind; `unfold` then gives every query block its span of keys as a view, and the reshape makes the one copy.
        t = F.pad(t, (0, 0, block, tail + after))
        t = t.unfold(2, span, block)  # (batch, heads, blocks, d, span)
        return t.permute(0, 2, 1, 4, 3).reshape(batch * blocks, heads, span, head_dim)

    k, v = windows(k), windows(v)

    # Key validity per span slot, with the same padding as the keys (the padded keys are never valid).
    key_valid = F.pad(valid.bool(), (block, tail + after), value=False).unfold(1, span, block)  # (batch, blocks, span)

    # Query at row r of block b is position b * B + r; the key at slot s of its span is position (b - 1) * B + s, so
    # i - j = B + r - s does not depend on b: the window condition is one (B, span) pattern shared by all blocks.
    rel = block + torch.arange(block, device=q.device)[:, None] - torch.arange(span, device=q.device)[None, :]
    in_window = (rel <= window) & (rel >= (0 if causal else -window))

    # Always allow the diagonal (the query's own position): a padding query whose whole window is padding, and the
    # padded tail rows, would otherwise have no allowed key and give NaN outputs and gradients. Valid queries are
    # unaffected, since they are themselves valid keys within the window.
    mask = (key_valid[:, :, None, :] & in_window) | (rel == 0)
    mask = mask.reshape(batch * blocks, 1, block, span)  # broadcasts over heads

    out = masked_sdpa(q, k, v, mask, dropout)  # (batch * blocks, heads, B, d)
    out = out.view(batch, blocks, heads, block, head_dim).transpose(1, 2)
    out = out.reshape(batch, heads, blocks * block, head_dim)
    return out[:, :, :n]
