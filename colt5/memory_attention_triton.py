# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Triton kernels for the causal heavy attention over routed memories (memory_attention.py holds the PyTorch
reference and the dispatch).

A row is one block of one sample. Its queries attend to two lists of keys, both read by index from the layer's
keys and values of every token (no per-block copy is ever written):
- the block's routed memory: `slots` token indices (-1 for an empty slot) with one weight each, applied to the
  values (and, with `multiply_keys`, to the keys) as the tile is loaded;
- the block itself: `block` token indices (-1 past the block's valid tokens), causal by block slot (a query at
  slot g sees the block's slots <= g).

Forward: one program per (tile of queries, row, head) runs the online softmax over the memory tiles, then the block
tiles up to its last query, and stores the output and the log-sum-exp (base 2). Backward (the flash-attention
recurrences, recomputing the probabilities from the log-sum-exp): one program per (tile of queries, row, head)
computes delta = rowsum(output gradient x output); one program per (tile of keys, row, head) loops over the row's
queries, accumulates the gradients of its keys, values and weights and adds them, by index, to float32 buffers (a
token is in the memory of several blocks, hence atomics; summation order, and so the last bits, can differ between
runs), a few heads per launch so that the buffers stay small; one program per (tile of queries, row, head) computes
the queries' gradient.

The two passes are custom operators (`torch.library.custom_op`): torch.compile calls each as one opaque operation
and never traces the kernels (see the comment above `_NAMESPACE`). Float arguments (the softmax scales) are
compile-time constants (`tl.constexpr`): one value per head dimension, so no further compilations.
"""

from __future__ import annotations

import os
import re

import torch

try:  # transformers' remote-code check skips imports in try blocks: loading a model never requires triton.
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "The Triton memory attention needs the `triton` package (pip install triton); without it CoLT5 uses the "
        "PyTorch attention (memory_attention.py)."
    ) from error


def _tiles() -> dict[str, dict[str, int]]:
    """Tile sizes and launch settings of the three kernels (queries x keys per program)."""
    # Triton's CPU interpreter costs time per element of a tile: small tiles keep the CPU tests fast and let their
    # small shapes span several tiles.
    if os.environ.get("TRITON_INTERPRET") == "1":
        small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return dict(forward=small, keys=small, queries=small)
    return dict(TILES)


# Chosen on an H200 (bf16, the benchmark's 32k-token layer: 8 heads of 64, memory 4096, blocks of 1024) from a sweep
# of tile sizes, warps and pipeline stages; forward 2.65 ms against 4.34 ms for 128 x 64 tiles on 8 warps. On an H100
# (scripts/tune_memory_attention.py, the layer's 32k inputs with memory 2048) no other of 12 forward settings was
# more than 0.6% faster, and the fastest with other tile sizes (128 x 64) was 13% slower.
TILES = dict(
    forward=dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
    keys=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    queries=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
)
DELTA_QUERIES = 64  # queries per program of the delta kernel (a reduction over head_dim; any size will do)
# Heads per routing set per launch of the keys' backward. Its float32 buffers then hold KEY_GRADIENT_HEADS /
# heads_per_set of all heads' gradients (a quarter with 8 heads: 0.27 GB for a 131,072-token batch of 2 at width
# 512, beside the 0.54 GB of the half-precision gradients they are copied into, where all heads' float32 buffers
# took 1.07 GB and their casts 0.54 more), at the cost of one launch per group (the programs are the same).
KEY_GRADIENT_HEADS = 2
LOG2_E = 1.4426950408889634  # the kernels' softmax is base 2: scores are scaled by sm_scale * log2(e)


@triton.jit
def _load_keys(
    keys_ptr, values_ptr, weights_ptr, index_ptr, kv_base, offs_n, count, offs_e, features,
    HAS_WEIGHTS: tl.constexpr, MULTIPLY_KEYS: tl.constexpr,
):
    """A tile of keys and values read by index, as attended (weighted; rows of empty slots are zero), and where a
    slot holds a token."""
    index = tl.load(index_ptr + offs_n, mask=offs_n < count, other=-1)
    ok = index >= 0
    offsets = kv_base + tl.where(ok, index, 0).to(tl.int64)[:, None] * features + offs_e[None, :]
    k = tl.load(keys_ptr + offsets, mask=ok[:, None], other=0.0)
    v = tl.load(values_ptr + offsets, mask=ok[:, None], other=0.0)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * w[:, None]).to(v.dtype)
        if MULTIPLY_KEYS:
            k = (k.to(tl.float32) * w[:, None]).to(k.dtype)
    return k, v, ok


@triton.jit
def _kv_bases(row, head, blocks, n, slots, SETS: tl.constexpr, HEADS_PER_SET: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Offsets of a (row, head)'s keys and values (in `(batch, sets, n, features)`) and of its memory slots."""
    routing_set = head // HEADS_PER_SET
    kv_row = ((row // blocks) * SETS + routing_set).to(tl.int64) * n * (HEADS_PER_SET * HEAD_DIM)
    return kv_row + (head % HEADS_PER_SET) * HEAD_DIM, (row * SETS + routing_set).to(tl.int64) * slots


@triton.jit
def _load_queries(q_ptr, query_slot_ptr, row, head, offs_m, queries, heads, HEAD_DIM: tl.constexpr):
    """A tile of a (row, head)'s queries, their block slots and which of the tile's rows exist."""
    in_rows = offs_m < queries
    offsets = (row * heads + head).to(tl.int64) * queries * HEAD_DIM + offs_m[:, None] * HEAD_DIM
    q = tl.load(q_ptr + offsets + tl.arange(0, HEAD_DIM)[None, :], mask=in_rows[:, None], other=0.0)
    query_slot = tl.load(query_slot_ptr + row.to(tl.int64) * queries + offs_m, mask=in_rows, other=-1)
    return q, query_slot, in_rows


@triton.jit
def _output_offsets(row, head, offs_m, queries, heads, HEAD_DIM: tl.constexpr):
    """Offsets of a tile of outputs in `(rows, queries, heads, head_dim)`."""
    return ((row.to(tl.int64) * queries + offs_m[:, None]) * heads + head) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_gradient_rows(
    grad_out_ptr, lse_ptr, delta_ptr, row, head, offs_m, in_rows, queries, heads, HEAD_DIM: tl.constexpr
):
    """The output gradient, log-sum-exp and delta (rowsum of output gradient x output) of a tile of queries."""
    out_offsets = _output_offsets(row, head, offs_m, queries, heads, HEAD_DIM)
    do = tl.load(grad_out_ptr + out_offsets, mask=in_rows[:, None], other=0.0)
    stat_offsets = (row * heads + head).to(tl.int64) * queries + offs_m
    lse = tl.load(lse_ptr + stat_offsets, mask=in_rows, other=0.0)
    delta = tl.load(delta_ptr + stat_offsets, mask=in_rows, other=0.0)
    return do, lse, delta


@triton.jit
def _empty_slot_bias(ok):
    """0 for a memory slot that holds a token, -inf for an empty one: added to the scores, it masks a memory tile
    with the scaling's multiply-add (every query of the row sees the same memory slots)."""
    return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _block_key_slot(ok, start, offs_n, block):
    """The block slots of a tile of the block's keys, `block` (past every query's slot) for an invalid key: a query
    at slot g sees the keys whose slot is <= g, one comparison per score."""
    return tl.where(ok, start + offs_n, block)


@triton.jit
def _attend_scores(qk, v_att, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One step of the online softmax (base 2) over a tile of keys, from their scaled scores (-inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_att.dtype), v_att, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    q_ptr, keys_ptr, values_ptr, memory_index_ptr, memory_weights_ptr, block_index_ptr, query_slot_ptr,
    out_ptr, lse_ptr,
    blocks, n, slots, block, queries, qk_scale: tl.constexpr,
    SETS: tl.constexpr, HEADS_PER_SET: tl.constexpr, HEAD_DIM: tl.constexpr, MULTIPLY_KEYS: tl.constexpr,
    EVERY_QUERY: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    heads: tl.constexpr = SETS * HEADS_PER_SET
    features: tl.constexpr = HEADS_PER_SET * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q, query_slot, in_rows = _load_queries(q_ptr, query_slot_ptr, row, head, offs_m, queries, heads, HEAD_DIM)
    kv_base, memory_base = _kv_bases(row, head, blocks, n, slots, SETS, HEADS_PER_SET, HEAD_DIM)
    block_base = row.to(tl.int64) * block

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        k_att, v_att, ok = _load_keys(
            keys_ptr, values_ptr, memory_weights_ptr + memory_base + start, memory_index_ptr + memory_base + start,
            kv_base, offs_n, slots - start, offs_e, features, True, MULTIPLY_KEYS,
        )
        qk = tl.dot(q, tl.trans(k_att), input_precision=PRECISION) * qk_scale + _empty_slot_bias(ok)[None, :]
        m_i, l_i, acc = _attend_scores(qk, v_att, m_i, l_i, acc, PRECISION)
    # Every query: query g sits at block slot g, so the tiles after the program's last query are all masked.
    stop = tl.minimum(block, (pid_m + 1) * BLOCK_M) if EVERY_QUERY else block
    for start in range(0, stop, BLOCK_N):
        k_att, v_att, ok = _load_keys(
            keys_ptr, values_ptr, memory_weights_ptr, block_index_ptr + block_base + start,
            kv_base, offs_n, block - start, offs_e, features, False, False,
        )
        qk = tl.dot(q, tl.trans(k_att), input_precision=PRECISION) * qk_scale
        qk = tl.where(_block_key_slot(ok, start, offs_n, block)[None, :] <= query_slot[:, None], qk, float("-inf"))
        m_i, l_i, acc = _attend_scores(qk, v_att, m_i, l_i, acc, PRECISION)

    # A query slot with no key (an empty slot of a routed block) gets 0 and no gradient.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_offsets = _output_offsets(row, head, offs_m, queries, heads, HEAD_DIM)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=in_rows[:, None])
    tl.store(lse_ptr + (row * heads + head).to(tl.int64) * queries + offs_m, m_i + tl.log2(l_safe), mask=in_rows)


@triton.jit
def _probabilities(q, k_att, lse, allowed, qk_scale, PRECISION: tl.constexpr):
    qk = tl.dot(q, tl.trans(k_att), input_precision=PRECISION) * qk_scale
    return tl.where(allowed, tl.exp2(qk - lse[:, None]), 0.0)


# first_head is 0, then a multiple of the group: specialized (divisible by 16 or not, equal to 1), it would compile
# the largest backward kernel two or three times over.
@triton.jit(do_not_specialize=["first_head"])
def _bwd_keys_kernel(
    q_ptr, keys_ptr, values_ptr, memory_index_ptr, memory_weights_ptr, block_index_ptr, query_slot_ptr,
    grad_out_ptr, lse_ptr, delta_ptr, grad_keys_ptr, grad_values_ptr, grad_weights_ptr,
    blocks, n, slots, block, queries, memory_tiles, first_head, sm_scale: tl.constexpr, qk_scale: tl.constexpr,
    SETS: tl.constexpr, HEADS_PER_SET: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    MULTIPLY_KEYS: tl.constexpr, EVERY_QUERY: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    # This launch covers heads first_head .. first_head + GROUP - 1 of every routing set; its key and value
    # gradients go to float32 buffers of those heads' features, `(batch, sets, n, GROUP * head_dim)`.
    group_head = tl.program_id(2) % GROUP
    routing_set = tl.program_id(2) // GROUP
    head = routing_set * HEADS_PER_SET + first_head + group_head
    heads: tl.constexpr = SETS * HEADS_PER_SET
    features: tl.constexpr = HEADS_PER_SET * HEAD_DIM
    group_features: tl.constexpr = GROUP * HEAD_DIM
    offs_e = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    kv_base, memory_base = _kv_bases(row, head, blocks, n, slots, SETS, HEADS_PER_SET, HEAD_DIM)
    is_memory = pid_n < memory_tiles
    if is_memory:
        start = pid_n * BLOCK_N
        index_ptr = memory_index_ptr + memory_base + start
        count = slots - start
    else:
        start = (pid_n - memory_tiles) * BLOCK_N
        index_ptr = block_index_ptr + row.to(tl.int64) * block + start
        count = block - start
    index = tl.load(index_ptr + offs_n, mask=offs_n < count, other=-1)
    ok = index >= 0
    offsets = kv_base + tl.where(ok, index, 0).to(tl.int64)[:, None] * features + offs_e[None, :]
    k = tl.load(keys_ptr + offsets, mask=ok[:, None], other=0.0)
    v = tl.load(values_ptr + offsets, mask=ok[:, None], other=0.0)
    # Block keys have weight 1.
    w = tl.load(memory_weights_ptr + memory_base + start + offs_n, mask=ok & is_memory, other=1.0).to(tl.float32)
    v_att = (v.to(tl.float32) * w[:, None]).to(v.dtype)
    k_att = (k.to(tl.float32) * w[:, None]).to(k.dtype) if MULTIPLY_KEYS else k
    key_slot = start + offs_n

    grad_k_att = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v_att = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # Every query: the queries before this block tile's first slot see none of its keys.
    first = tl.where(is_memory, 0, (start // BLOCK_M) * BLOCK_M) if EVERY_QUERY else 0
    for q_start in range(first, queries, BLOCK_M):
        offs_m = q_start + tl.arange(0, BLOCK_M)
        q, query_slot, in_rows = _load_queries(q_ptr, query_slot_ptr, row, head, offs_m, queries, heads, HEAD_DIM)
        do, lse, delta = _load_gradient_rows(
            grad_out_ptr, lse_ptr, delta_ptr, row, head, offs_m, in_rows, queries, heads, HEAD_DIM
        )
        causal = is_memory | (key_slot[None, :] <= query_slot[:, None])
        p = _probabilities(q, k_att, lse, ok[None, :] & in_rows[:, None] & causal, qk_scale, PRECISION)
        grad_v_att += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v_att), input_precision=PRECISION) - delta[:, None])
        grad_k_att += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    grad_k_att = grad_k_att * sm_scale

    # Chain rule through the weights: v_att = w v (and k_att = w k with MULTIPLY_KEYS).
    grad_w = tl.sum(grad_v_att * v.to(tl.float32), 1)
    if MULTIPLY_KEYS:
        grad_w += tl.sum(grad_k_att * k.to(tl.float32), 1)
        grad_k_att = grad_k_att * w[:, None]
    tl.atomic_add(grad_weights_ptr + memory_base + start + offs_n, grad_w, mask=ok & is_memory)
    grad_base = ((row // blocks) * SETS + routing_set).to(tl.int64) * n * group_features + group_head * HEAD_DIM
    grad_offsets = grad_base + tl.where(ok, index, 0).to(tl.int64)[:, None] * group_features + offs_e[None, :]
    tl.atomic_add(grad_keys_ptr + grad_offsets, grad_k_att, mask=ok[:, None])
    tl.atomic_add(grad_values_ptr + grad_offsets, grad_v_att * w[:, None], mask=ok[:, None])


@triton.jit
def _delta_kernel(grad_out_ptr, out_ptr, delta_ptr, queries, heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(output gradient * output) of a tile of queries, `(rows, heads, queries)` float32: read once
    each, summed in float32 (no widened copies of the two `(rows, queries, heads, head_dim)` tensors)."""
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = offs_m < queries
    offsets = _output_offsets(row, head, offs_m, queries, heads, HEAD_DIM)
    do = tl.load(grad_out_ptr + offsets, mask=in_rows[:, None], other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offsets, mask=in_rows[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + (row * heads + head).to(tl.int64) * queries + offs_m, tl.sum(do * o, 1), mask=in_rows)


@triton.jit
def _bwd_queries_kernel(
    q_ptr, keys_ptr, values_ptr, memory_index_ptr, memory_weights_ptr, block_index_ptr, query_slot_ptr,
    grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    blocks, n, slots, block, queries, sm_scale: tl.constexpr, qk_scale: tl.constexpr,
    SETS: tl.constexpr, HEADS_PER_SET: tl.constexpr, HEAD_DIM: tl.constexpr, MULTIPLY_KEYS: tl.constexpr,
    EVERY_QUERY: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    heads: tl.constexpr = SETS * HEADS_PER_SET
    features: tl.constexpr = HEADS_PER_SET * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q, query_slot, in_rows = _load_queries(q_ptr, query_slot_ptr, row, head, offs_m, queries, heads, HEAD_DIM)
    do, lse, delta = _load_gradient_rows(
        grad_out_ptr, lse_ptr, delta_ptr, row, head, offs_m, in_rows, queries, heads, HEAD_DIM
    )
    kv_base, memory_base = _kv_bases(row, head, blocks, n, slots, SETS, HEADS_PER_SET, HEAD_DIM)
    block_base = row.to(tl.int64) * block

    grad_q = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        k_att, v_att, ok = _load_keys(
            keys_ptr, values_ptr, memory_weights_ptr + memory_base + start, memory_index_ptr + memory_base + start,
            kv_base, offs_n, slots - start, offs_e, features, True, MULTIPLY_KEYS,
        )
        p = _probabilities(q, k_att, lse, ok[None, :] & in_rows[:, None], qk_scale, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v_att), input_precision=PRECISION) - delta[:, None])
        grad_q += tl.dot(ds.to(k_att.dtype), k_att, input_precision=PRECISION)
    stop = tl.minimum(block, (pid_m + 1) * BLOCK_M) if EVERY_QUERY else block
    for start in range(0, stop, BLOCK_N):
        k_att, v_att, ok = _load_keys(
            keys_ptr, values_ptr, memory_weights_ptr, block_index_ptr + block_base + start,
            kv_base, offs_n, block - start, offs_e, features, False, False,
        )
        allowed = ok[None, :] & in_rows[:, None] & ((start + offs_n)[None, :] <= query_slot[:, None])
        p = _probabilities(q, k_att, lse, allowed, qk_scale, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v_att), input_precision=PRECISION) - delta[:, None])
        grad_q += tl.dot(ds.to(k_att.dtype), k_att, input_precision=PRECISION)
    grad_offsets = (row * heads + head).to(tl.int64) * queries * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_e[None, :]
    tl.store(grad_q_ptr + grad_offsets, (grad_q * sm_scale).to(grad_q_ptr.dtype.element_ty), mask=in_rows[:, None])


# The forward and backward passes are custom operators, each one opaque call to torch.compile. Traced instead,
# Inductor functionalizes what the kernels write in place and keeps copies: at the compiled layer's peak (H100,
# 131,072 tokens) a float32 copy of the buffer the keys' backward adds into (512 MB), and with the head groups the
# compiled peak rose from 738 to 859 MB at 32,768 tokens while the eager one fell from 1,026 to 898. Each module
# copy registers operators of its own (a checkpoint's remote code is a second copy of this file, maybe of another
# version): the namespace is the module's name. Inductor passes an operator's inputs with the strides they were
# traced with (custom operators' default layout constraint), so the kernels get them contiguous, as here.
_NAMESPACE = re.sub(r"\W", "_", __name__)


def _settings(q: torch.Tensor, keys: torch.Tensor, multiply_keys: bool, every_query: bool) -> dict:
    """The kernels' compile-time settings for these queries and keys."""
    sets = keys.shape[1]
    return dict(
        SETS=sets, HEADS_PER_SET=q.shape[1] // sets, HEAD_DIM=q.shape[-1], MULTIPLY_KEYS=multiply_keys,
        EVERY_QUERY=every_query, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@torch.library.custom_op(f"{_NAMESPACE}::memory_attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    memory_index: torch.Tensor,
    memory_weights: torch.Tensor,
    block_index: torch.Tensor,
    query_slot: torch.Tensor,
    multiply_keys: bool,
    every_query: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `(rows, queries, heads, head_dim)` and log-sum-exp (base 2) `(rows, heads, queries)` float32; the
    arguments as `memory_attention_triton` passes them (contiguous, indices int32)."""
    rows, heads, queries, head_dim = q.shape
    batch, _, n, _ = keys.shape
    slots, block = memory_index.shape[-1], block_index.shape[-1]
    tiles = _tiles()
    out = q.new_empty(rows, queries, heads, head_dim)
    lse = torch.empty(rows, heads, queries, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(queries, tiles["forward"]["BLOCK_M"]), rows, heads)
    _fwd_kernel[grid](
        q, keys, values, memory_index, memory_weights, block_index, query_slot, out, lse,
        rows // batch, n, slots, block, queries, head_dim**-0.5 * LOG2_E,
        **_settings(q, keys, multiply_keys, every_query), **tiles["forward"],
    )
    return out, lse


@_forward.register_fake
def _(q, keys, values, memory_index, memory_weights, block_index, query_slot, multiply_keys, every_query):
    rows, heads, queries, head_dim = q.shape
    return q.new_empty(rows, queries, heads, head_dim), q.new_empty(rows, heads, queries, dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::memory_attention_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    memory_index: torch.Tensor,
    memory_weights: torch.Tensor,
    block_index: torch.Tensor,
    query_slot: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    multiply_keys: bool,
    every_query: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the queries, keys, values and memory weights (their shapes and dtypes) from the output's
    gradient `grad_out` (contiguous, `out`'s shape) and the forward's `out` and `lse`."""
    rows, heads, queries, head_dim = q.shape
    batch, sets, n, _ = keys.shape
    slots, block = memory_index.shape[-1], block_index.shape[-1]
    tiles = _tiles()
    settings = _settings(q, keys, multiply_keys, every_query)
    delta = torch.empty(rows, heads, queries, dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(queries, DELTA_QUERIES), rows, heads)](
        grad_out, out, delta, queries, heads, HEAD_DIM=head_dim, BLOCK_M=DELTA_QUERIES
    )
    grad_keys, grad_values = torch.empty_like(keys), torch.empty_like(values)
    grad_weights = torch.zeros(memory_weights.shape, dtype=torch.float32, device=memory_weights.device)
    shape = (rows // batch, n, slots, block, queries)
    sm_scale = head_dim**-0.5
    scales = (sm_scale, sm_scale * LOG2_E)
    key_tile = tiles["keys"]["BLOCK_N"]
    memory_tiles = triton.cdiv(slots, key_tile)
    inputs = (q, keys, values, memory_index, memory_weights, block_index, query_slot, grad_out, lse, delta)
    # Key and value gradients are sums over every block whose memory holds the token (atomic float32 adds).
    # Float32 buffers of every head would hold twice the bytes of the half-precision gradients, the largest
    # tensors of the layer's backward pass: a few heads per launch bound them (see KEY_GRADIENT_HEADS).
    group = _key_gradient_group(heads // sets)
    group_keys = torch.empty(batch, sets, n, group * head_dim, dtype=torch.float32, device=keys.device)
    group_values = torch.empty_like(group_keys)
    for first_head in range(0, heads // sets, group):
        group_keys.zero_()
        group_values.zero_()
        _bwd_keys_kernel[(memory_tiles + triton.cdiv(block, key_tile), rows, sets * group)](
            *inputs, group_keys, group_values, grad_weights, *shape, memory_tiles, first_head, *scales,
            GROUP=group, **settings, **tiles["keys"],
        )
        features_of_group = slice(first_head * head_dim, (first_head + group) * head_dim)
        grad_keys[..., features_of_group] = group_keys
        grad_values[..., features_of_group] = group_values
    del group_keys, group_values  # before the queries' gradient is allocated: a lower peak
    grad_q = torch.empty_like(q)
    _bwd_queries_kernel[(triton.cdiv(queries, tiles["queries"]["BLOCK_M"]), rows, heads)](
        *inputs, grad_q, *shape, *scales, **settings, **tiles["queries"],
    )
    return grad_q, grad_keys, grad_values, grad_weights.to(memory_weights.dtype)


@_backward.register_fake
def _(grad_out, q, keys, values, memory_index, memory_weights, block_index, query_slot, out, lse, multiply_keys,
      every_query):
    return torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values), torch.empty_like(memory_weights)


class _MemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, keys, values, memory_index, memory_weights, block_index, query_slot, multiply_keys, every_query
    ):
        out, lse = _forward(
            q, keys, values, memory_index, memory_weights, block_index, query_slot, multiply_keys, every_query
        )
        ctx.save_for_backward(q, keys, values, memory_index, memory_weights, block_index, query_slot, out, lse)
        ctx.flags = multiply_keys, every_query
        rows, queries, heads, head_dim = out.shape
        return out.view(rows, queries, heads * head_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, keys, values, memory_index, memory_weights, block_index, query_slot, out, lse = ctx.saved_tensors
        grad_q, grad_keys, grad_values, grad_weights = _backward(
            grad_out.reshape(out.shape).contiguous(), q, keys, values, memory_index, memory_weights, block_index,
            query_slot, out, lse, *ctx.flags,
        )
        return grad_q, grad_keys, grad_values, None, grad_weights, None, None, None, None


def _key_gradient_group(heads_per_set: int) -> int:
    """Heads per routing set whose key and value gradients one launch of the keys' backward accumulates: the
    largest divisor of `heads_per_set` up to KEY_GRADIENT_HEADS."""
    group = min(KEY_GRADIENT_HEADS, heads_per_set)
    while heads_per_set % group:
        group -= 1
    return group


def memory_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    memory_index: torch.Tensor,
    memory_weights: torch.Tensor,
    block_index: torch.Tensor,
    query_slot: torch.Tensor,
    *,
    multiply_keys: bool,
    every_query: bool,
) -> torch.Tensor:
    """The kernels behind `memory_attention` (same arguments; see memory_attention.py). `every_query`: query g of
    each row sits at block slot g (lets the kernels skip the tiles that causality masks)."""
    int32 = dict(dtype=torch.int32)
    # One dtype for the matmuls (keys and values follow the queries; the cast is a no-op under autocast).
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    return _MemoryAttention.apply(
        q.contiguous(), keys.contiguous(), values.contiguous(), memory_index.to(**int32).contiguous(),
        memory_weights.contiguous(), block_index.to(**int32).contiguous(), query_slot.to(**int32).contiguous(),
        multiply_keys, every_query,
    )
