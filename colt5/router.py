# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The CoLT5 router: scores tokens with learned vectors, normalises them with the soft top-k and selects the
top-k tokens of each routing set.

Selection needs no iterations: the k largest lambdas are the k largest raw scores (router.md, fact 1), so the
selected tokens are a plain top-k of the scores and only their weights come from the soft top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .soft_topk import soft_topk


class RouterOutput(NamedTuple):
    """Tokens chosen by a router, sorted by position within each row; invalid slots sort last.

    indices: `(batch, sets, k)` long, positions in the sequence (0 for invalid slots).
    weights: `(batch, sets, k)` the soft top-k weight of each chosen token (0 for invalid slots).
    mask: `(batch, sets, k)` bool, False for slots left empty (fewer valid tokens than k).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor


def validate_amount(name: str, amount: int | float) -> None:
    """Raise a ValueError unless `amount` is a count (int >= 1) or a fraction (float in (0, 1])."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError(f"{name} must be an int (a number of tokens) or a float (a fraction), got {amount!r}.")
    if isinstance(amount, int) and amount < 1:
        raise ValueError(f"{name} as a number of tokens must be >= 1, got {amount}.")
    if isinstance(amount, float) and not 0.0 < amount <= 1.0:
        raise ValueError(
            f"{name} as a fraction of the sequence must be in (0, 1], got {amount}; "
            "pass an int for a fixed number of tokens."
        )


def routed_amount(amount: int | float, length: int | torch.Tensor) -> int | torch.Tensor:
    """Number of tokens to route for a sequence (or per sample) of `length` valid tokens.

    An int is a fixed count (capped at the length); a float is a fraction of the length, rounded up.
    Monotone in `length`, so the amount for the padded length bounds every sample's amount.
    """
    if isinstance(amount, float):
        # The small margin keeps products like 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
        if isinstance(length, torch.Tensor):
            return torch.ceil(length.double() * amount - 1e-9).long()
        return math.ceil(length * amount - 1e-9)
    if isinstance(length, torch.Tensor):
        return length.clamp(max=amount)
    return min(amount, length)


def _select(
    scores: torch.Tensor, valid: torch.Tensor, num_tokens: torch.Tensor, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`num_tokens` positions of each row (`(rows, max_tokens)` indices and slot mask), by raw score.

    Ties go to the earlier position (a stable sort): equal tokens score equally, and the causal model's cache must
    make the same choice as a full forward pass.
    """
    masked = scores.masked_fill(~valid, -math.inf)
    indices = masked.sort(dim=-1, descending=True, stable=True).indices[..., :max_tokens]
    slot_mask = torch.arange(max_tokens, device=scores.device) < num_tokens.unsqueeze(-1)
    return indices, slot_mask


def _sort_by_position(
    indices: torch.Tensor, slot_mask: torch.Tensor, length: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the slots of each row by position with empty slots last, and keep the first `keep`."""
    order = torch.where(slot_mask, indices, indices + length).argsort(dim=-1)[..., :keep]
    return indices.gather(-1, order), slot_mask.gather(-1, order)


def _share_among_blocks(num_tokens: torch.Tensor, capacity: torch.Tensor, block_size: int) -> torch.Tensor:
    """Split each row's amount as evenly as the blocks' valid tokens allow.

    Args:
        num_tokens: `(...)` amount per row, at most `capacity.sum(-1)`.
        capacity: `(..., blocks)` valid tokens per block.
        block_size: the largest possible capacity.

    Returns:
        `(..., blocks)` tokens per block, summing to `num_tokens`: every block gets `min(capacity, level)` for
        the lowest level that covers the amount, and the first blocks that can take one more share the rest.
    """
    levels = torch.arange(block_size + 1, device=capacity.device)
    covered = torch.minimum(capacity.unsqueeze(-2), levels.unsqueeze(-1)).sum(-1)  # (..., levels)
    level = (covered < num_tokens.unsqueeze(-1)).sum(-1, keepdim=True)  # lowest level covering the amount
    below = (level - 1).clamp_min(0)
    base = torch.minimum(capacity, below)
    rest = num_tokens.unsqueeze(-1) - base.sum(-1, keepdim=True)
    can_take_one_more = (capacity > below) & (level > 0)
    return base + (can_take_one_more & (can_take_one_more.cumsum(-1) <= rest))


def route(
    scores: torch.Tensor,
    amount: int | float,
    mask: torch.Tensor | None = None,
    *,
    fetch_ratio: float = 9 / 8,
    eps: float = 1.0,
    n_iters: int | None = None,
    eps_schedule: Sequence[float] | None = None,
    straight_through: bool = False,
    route_block_size: int | None = None,
    backend: str = "auto",
) -> RouterOutput:
    """Choose tokens from router scores.

    Args:
        scores: `(batch, sets, n)` router scores.
        amount: tokens to route per set, an int count or a float fraction of each sample's valid length.
        mask: `(batch, n)` bool, False for padding; padding is never routed while valid tokens remain.
        fetch_ratio: the soft top-k normalises over `fetch_ratio * k` tokens (the paper's 9/8).
        eps, n_iters, eps_schedule: soft top-k settings (see `soft_topk`).
        straight_through: weights are 1 in the forward pass and carry lambda's gradient in the backward pass.
        route_block_size: route evenly over blocks of this many tokens: each block gets an equal share of the
            amount (the first `amount % blocks` blocks one more; blocks with too few valid tokens pass the rest
            on to the others), so routed tokens spread over the sequence.
        backend: soft top-k implementation, "auto", "torch" or "triton" (see `soft_topk.uses_triton`).

    Returns:
        RouterOutput with `(batch, sets, k)` tensors, k = the amount for the padded length `n`.
    """
    batch, sets, length = scores.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=scores.device) if mask is None else mask.bool()
    valid = valid.unsqueeze(1).expand(batch, sets, length)
    max_tokens = routed_amount(amount, length)
    num_tokens = routed_amount(amount, valid.sum(-1))  # (batch, sets), per sample from its own valid length

    # One layout for both cases: (batch, sets, blocks, block_size), a single block when not block routing.
    if route_block_size is None or route_block_size >= length:
        blocks, block_size = 1, length
    else:
        blocks, block_size = math.ceil(length / route_block_size), route_block_size
    pad = blocks * block_size - length
    block_scores = nn.functional.pad(scores, (0, pad)).view(batch, sets, blocks, block_size)
    block_valid = nn.functional.pad(valid, (0, pad), value=False).view(batch, sets, blocks, block_size)
    if blocks == 1:
        block_tokens = num_tokens.unsqueeze(-1)  # already capped at the valid length
    else:
        block_tokens = _share_among_blocks(num_tokens, block_valid.sum(-1), block_size)

    lambdas = soft_topk(
        block_scores,
        fetch_ratio * block_tokens.to(torch.float64),
        block_valid,
        eps=eps,
        n_iters=n_iters,
        eps_schedule=eps_schedule,
        backend=backend,
    )

    # A block can take more than an even share when others are short of valid tokens: size for the worst case.
    per_block = min(block_size, max_tokens)
    indices, slot_mask = _select(block_scores, block_valid, block_tokens, per_block)
    indices = indices + torch.arange(blocks, device=scores.device).unsqueeze(-1) * block_size
    indices, slot_mask = _sort_by_position(
        indices.view(batch, sets, -1), slot_mask.view(batch, sets, -1), blocks * block_size, max_tokens
    )
    weights = lambdas.reshape(batch, sets, blocks * block_size).gather(-1, indices)
    if straight_through:
        weights = weights - weights.detach() + 1.0
    weights = weights * slot_mask
    indices = indices.masked_fill(~slot_mask, 0)
    return RouterOutput(indices, weights, slot_mask)


class TokenScorer(nn.Module):
    """Scores tokens with `num_sets` learned routing vectors.

    Scores are computed in float32 (float64 inputs stay float64), also under autocast, since the soft top-k
    needs the precision.

    With `random_routing` the scores are fresh standard-normal draws on every call instead, which say nothing
    about the tokens: an ablation control for learned routing. Draws follow torch's random number generator
    (`torch.manual_seed` makes them repeatable, and activation checkpointing replays them), and keep the spread
    of scores at initialisation, so routed amounts and the causal routers' thresholds mean the same as with
    learned scores. The routing vectors then get no gradient.
    """

    def __init__(self, dim: int, num_sets: int = 1, *, batch_invariant: bool = False, random_routing: bool = False):
        super().__init__()
        self.routing_vectors = nn.Parameter(torch.randn(num_sets, dim) * dim**-0.5)
        self.batch_invariant = batch_invariant
        self.random_routing = random_routing

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, n, dim)` tokens -> `(batch, sets, n)` scores.

        With `batch_invariant`, float32 scores are summed in float64 and rounded: a token then gets the same bits
        whether it is scored alone (decoding) or with others (a full forward pass, whose matmul sums in another
        order), which keeps ties between equal tokens broken alike in both.
        """
        if self.random_routing:
            batch, length, _ = x.shape
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            return torch.randn(batch, self.routing_vectors.shape[0], length, device=x.device, dtype=dtype)
        dtype = torch.float64 if x.dtype == torch.float64 or self.batch_invariant else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            vectors = self.routing_vectors.to(dtype)
            if x.dtype == dtype:
                scores = x @ vectors.T
            else:
                scores = _WideScores.apply(x, vectors)
        return scores.transpose(1, 2) if x.dtype == torch.float64 else scores.transpose(1, 2).float()


class _WideScores(torch.autograd.Function):
    """`x @ vectors.T` computed in the vectors' (wider) dtype without a wide copy of x.

    `x.to(float32) @ v.T` would make, and keep for the backward pass, a float32 copy of the whole sequence: 2 GiB per
    router for a million bf16 tokens of width 512. Here x is widened a chunk of tokens at a time, both ways.
    """

    # Widened elements at a time: 256 MiB in float32, few enough chunks (8 for a million tokens of width 512) that
    # launches cost less than the bytes moved.
    CHUNK_ELEMENTS = 1 << 26

    @staticmethod
    def forward(ctx, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `vectors` `(sets, dim)` -> `(batch, n, sets)` in the vectors' dtype."""
        ctx.save_for_backward(x, vectors)
        scores = [chunk.to(vectors.dtype) @ vectors.T for chunk in _WideScores._chunks(x)]
        return scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, vectors = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_vectors = torch.zeros_like(vectors) if ctx.needs_input_grad[1] else None
        start = 0
        for chunk in _WideScores._chunks(x):
            chunk_grad = grad[:, start : start + chunk.shape[1]]
            if grad_x is not None:
                grad_x[:, start : start + chunk.shape[1]] = chunk_grad @ vectors
            if grad_vectors is not None:
                grad_vectors += torch.einsum("bns,bnd->sd", chunk_grad, chunk.to(vectors.dtype))
            start += chunk.shape[1]
        return grad_x, grad_vectors

    @staticmethod
    def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = max(1, _WideScores.CHUNK_ELEMENTS // (x.shape[0] * x.shape[2]))
        return x.split(tokens, dim=1)


class CoordinateDescentRouter(TokenScorer):
    """Scores tokens with `num_sets` learned vectors and routes each set's top tokens (CoLT5 section 3.1).

    Keyword arguments are those of `route` (fetch_ratio, eps, n_iters, eps_schedule, straight_through,
    route_block_size, backend) and `random_routing` (see `TokenScorer`).
    """

    def __init__(
        self,
        dim: int,
        num_sets: int = 1,
        *,
        fetch_ratio: float = 9 / 8,
        eps: float = 1.0,
        n_iters: int | None = None,
        eps_schedule: Sequence[float] | None = None,
        straight_through: bool = False,
        route_block_size: int | None = None,
        backend: str = "auto",
        random_routing: bool = False,
    ):
        super().__init__(dim, num_sets, random_routing=random_routing)
        if fetch_ratio < 1:
            raise ValueError(f"fetch_ratio must be >= 1, got {fetch_ratio}.")
        self.route_kwargs = dict(
            fetch_ratio=fetch_ratio,
            eps=eps,
            n_iters=n_iters,
            eps_schedule=tuple(eps_schedule) if eps_schedule is not None else None,
            straight_through=straight_through,
            route_block_size=route_block_size,
            backend=backend,
        )

    def forward(self, x: torch.Tensor, amount: int | float, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route `amount` tokens (int count or float fraction) of `x` `(batch, n, dim)`; mask `(batch, n)`."""
        return route(self.scores(x), amount, mask, **self.route_kwargs)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`(batch, n, dim)` tokens at `(batch, sets, k)` indices -> `(batch, sets, k, dim)`."""
    batch, sets, k = indices.shape
    flat = indices.reshape(batch, sets * k, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).view(batch, sets, k, x.shape[-1])


def scatter_tokens(values: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """Add `(batch, k, dim)` values into a zero `(batch, length, dim)` tensor at `(batch, k)` indices."""
    out = values.new_zeros(values.shape[0], length, values.shape[-1])
    return out.scatter_add(1, indices.unsqueeze(-1).expand_as(values), values)
