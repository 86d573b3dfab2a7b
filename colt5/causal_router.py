# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Routing for causal (decoder) models, where every decision may depend on the prefix only.

- `ThresholdRouter` (heavy queries, heavy feedforward): a per-token decision. A token is routed when its score
  reaches a running threshold, and weighted by the soft top-k formula `min(1, exp((s + a) / eps))` at a running
  shift `a`. Both statistics are buffers, estimated in training as moving averages of what the soft top-k of the
  whole batch gives, so the routed fraction tracks the target while no decision looks at another token.
- `route_block_memory` (heavy keys/values): for each block of `block_size` tokens, the `memory_size` tokens with
  the highest scores among the tokens before the block, weighted by the soft top-k over that prefix. With a fixed
  memory size the memory of block j + 1 is the top of (memory of block j + block j), which is what lets the cache
  re-route from a bounded state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .router import RouterOutput, TokenScorer, route, routed_amount
from .soft_topk import exact_shift

# Quantiles of the standard normal distribution stand in for scores before any training: tokens are RMS-normalised
# and routing vectors start with norm ~1, so initial scores are close to N(0, 1).
_REFERENCE_SCORES = 4096


class GateOutput(NamedTuple):
    """Per-token routing decisions.

    routed: `(batch, n)` bool, the tokens that take the heavy branch.
    weights: `(batch, n)` their weights (0 where not routed).
    """

    routed: torch.Tensor
    weights: torch.Tensor


def gate_statistics(
    scores: torch.Tensor,
    fraction: float,
    *,
    valid: torch.Tensor | None = None,
    fetch_ratio: float = 9 / 8,
    eps: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold and soft top-k shift of a pool of scores, computed on the device without host synchronisation
    (the number of valid scores stays a device tensor; every shape depends on N only).

    Args:
        scores: `(N,)` scores, N >= 1.
        fraction: the share of valid tokens to route.
        valid: `(N,)` bool, the scores that belong to the pool (default all); at least one for the result to mean
            anything (callers ignore the result of an empty pool).
        fetch_ratio, eps: soft top-k settings (it normalises over `fetch_ratio * fraction * count` tokens).

    Returns:
        `(threshold, shift)` as 0-dim tensors: the score of the `ceil(fraction * count)`-th best valid token, and
        `a` with `sum_j min(1, exp((s_j + a) / eps)) = fetch_ratio * fraction * count` over the valid scores (when
        that is below count; else a shift that saturates every valid token).
    """
    size = scores.numel()
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    count = valid.sum()
    # At most routed_amount(fraction, N) scores are ranked (count <= N), so the ranking has a fixed size.
    best = scores.masked_fill(~valid, -math.inf).topk(routed_amount(fraction, size)).values
    threshold = best.gather(0, (routed_amount(fraction, count) - 1).clamp_min(0).view(1))[0]
    soft_amount = fetch_ratio * fraction * count.to(scores.dtype)
    z = (scores / eps).unsqueeze(0)
    shift = eps * exact_shift(z, soft_amount.view(1), valid.unsqueeze(0), max_amount=fetch_ratio * fraction * size)[0]
    saturating = -scores.masked_fill(~valid, math.inf).min()
    return threshold, torch.where(soft_amount >= count, saturating, shift)


class ThresholdRouter(TokenScorer):
    """Per-token causal router for `fraction` of the tokens (see the module docstring).

    Args:
        dim: model width.
        fraction: target share of routed tokens, in (0, 1].
        fetch_ratio, eps: soft top-k settings used for the weights.
        straight_through: weights are 1 in the forward pass and carry the gradient of the soft weight backward.
        momentum: weight of each training batch in the moving averages of threshold and shift.
        random_routing: route by random scores, an ablation control (see `TokenScorer`).
        cosine_sim_scale: score by cosine similarity times this scale (see `TokenScorer`).
    """

    def __init__(
        self,
        dim: int,
        fraction: float,
        *,
        fetch_ratio: float = 9 / 8,
        eps: float = 1.0,
        straight_through: bool = False,
        momentum: float = 0.05,
        random_routing: bool = False,
        cosine_sim_scale: float | None = None,
    ):
        super().__init__(dim, 1, batch_invariant=True, random_routing=random_routing, cosine_sim_scale=cosine_sim_scale)
        if isinstance(fraction, bool) or not isinstance(fraction, float) or not 0 < fraction <= 1:
            raise ValueError(
                f"A causal router routes a fraction of the tokens, a float in (0, 1]; got {fraction!r}."
            )
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}.")
        self.fraction, self.fetch_ratio, self.eps = fraction, fetch_ratio, eps
        self.straight_through, self.momentum = straight_through, momentum
        threshold, shift = self.reference_statistics()
        self.threshold = nn.Buffer(torch.tensor(threshold))
        self.shift = nn.Buffer(torch.tensor(shift))
        # This batch's (threshold, shift), folded into the buffers at the next call; see forward.
        self._pending_statistics: tuple | None = None
        # Tokens routed and valid tokens seen by training calls since `take_routed_fraction`, kept on the device so
        # that counting them costs no host synchronisation.
        self._routed_count: torch.Tensor | None = None
        self._valid_count: torch.Tensor | None = None

    def reference_statistics(self) -> tuple[float, float]:
        """Threshold and shift for standard normal scores: the values before any training."""
        quantiles = (torch.arange(_REFERENCE_SCORES, dtype=torch.float64, device="cpu") + 0.5) / _REFERENCE_SCORES
        threshold, shift = gate_statistics(
            torch.special.ndtri(quantiles), self.fraction, fetch_ratio=self.fetch_ratio, eps=self.eps
        )
        return float(threshold), float(shift)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> GateOutput:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding, never routed) -> GateOutput.

        In training the batch's statistics are folded into the running ones at the next call (or at `train()`,
        `eval()` and `state_dict()`), not at once: activation checkpointing runs this forward again during the backward pass, and
        that recomputation must route exactly as the first pass did. A call made inside a backward pass is such a
        recomputation and changes nothing."""
        recomputing = torch._C._current_graph_task_id() != -1  # the test FSDP uses for "inside a backward pass"
        if not recomputing:
            self._apply_pending_statistics()
        scores = self.scores(x)[:, 0]
        routed = scores >= self.threshold
        if mask is not None:
            routed = routed & mask.bool()
        weights = torch.exp(((scores + self.shift) / self.eps).clamp_max(0.0))
        if self.straight_through:
            weights = weights - weights.detach() + 1.0
        if self.training and not recomputing:
            self._pending_statistics = self._batch_statistics(scores.detach(), mask)
            self._count_routed(routed, mask)
        return GateOutput(routed, weights * routed)

    @torch.no_grad()
    def _count_routed(self, routed: torch.Tensor, mask: torch.Tensor | None) -> None:
        routed_count = routed.sum()
        # torch.full fills on the device; a tensor made from a Python number would be copied from the host (a sync).
        everything = torch.full((), routed.numel(), dtype=torch.long, device=routed.device)
        valid_count = everything if mask is None else mask.bool().sum()
        if self._routed_count is None:
            self._routed_count, self._valid_count = routed_count, valid_count
        else:
            self._routed_count, self._valid_count = self._routed_count + routed_count, self._valid_count + valid_count

    def take_routed_fraction(self) -> float | None:
        """The share of valid tokens routed by training calls since the last call of this method (None if there
        were none), and start counting anew. Reads the count from the device: call it at logging steps."""
        if self._routed_count is None:
            return None
        fraction = float(self._routed_count) / max(1, int(self._valid_count))
        self._routed_count = self._valid_count = None
        return fraction

    def train(self, mode: bool = True) -> "ThresholdRouter":
        self._apply_pending_statistics()
        return super().train(mode)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # A checkpoint holds the statistics of every batch seen so far, so a resumed run routes as the
        # uninterrupted one would.
        self._apply_pending_statistics()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def _batch_statistics(self, scores: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        """This batch's (threshold, shift, whether it had a valid token), all on the device."""
        valid = None if mask is None else mask.bool().flatten()
        statistics = gate_statistics(
            scores.flatten(), self.fraction, valid=valid, fetch_ratio=self.fetch_ratio, eps=self.eps
        )
        had_tokens = torch.ones((), dtype=torch.bool, device=scores.device) if valid is None else valid.any()
        return (*statistics, had_tokens)

    def discard_pending_statistics(self) -> None:
        """Forget the statistics of the last training call (one whose scores must not move the running ones)."""
        self._pending_statistics = None

    @torch.no_grad()
    def _apply_pending_statistics(self) -> None:
        pending, self._pending_statistics = self._pending_statistics, None
        if pending is not None:
            threshold, shift, had_tokens = pending
            # A batch of padding only leaves the statistics as they were (a device-side choice: no synchronisation).
            for running, new in ((self.threshold, threshold), (self.shift, shift)):
                running.copy_(torch.where(had_tokens, running.lerp(new.to(running), self.momentum), running))


def route_block_memory(
    scores: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    memory_size: int,
    **route_kwargs,
) -> RouterOutput:
    """The routed key/value memory of every block.

    Blocks count valid tokens: block j holds the valid tokens with `j * block_size <= valid index < (j + 1) *
    block_size`, so a left-padded sample has the same blocks as the sample alone.

    Args:
        scores: `(batch, sets, n)` key/value router scores.
        valid: `(batch, n)` bool, False for padding.
        block_size: tokens per block.
        memory_size: tokens routed for each block (fewer while the prefix is shorter).
        **route_kwargs: soft top-k settings of `route` (fetch_ratio, eps, n_iters, eps_schedule, straight_through).

    Returns:
        RouterOutput with `(batch, blocks, sets, min(memory_size, n))` tensors, blocks = ceil(n / block_size):
        the memory of block j holds only tokens before the block.
    """
    batch, sets, length = scores.shape
    blocks = math.ceil(length / block_size)
    valid_index = valid.long().cumsum(-1) - 1
    block_start = torch.arange(blocks, device=scores.device) * block_size
    prefix = valid.unsqueeze(1) & (valid_index.unsqueeze(1) < block_start[:, None])  # (batch, blocks, n)
    rows = scores.unsqueeze(1).expand(batch, blocks, sets, length).reshape(batch * blocks, sets, length)
    routed = route(rows, memory_size, prefix.reshape(batch * blocks, length), **route_kwargs)
    return RouterOutput(*(t.view(batch, blocks, sets, -1) for t in routed))
