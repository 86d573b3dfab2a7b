# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Routing for causal (decoder) models, where every decision may depend on the prefix only.

- `ThresholdRouter` (heavy queries, heavy feedforward): a per-token decision. A token is routed when its score
  reaches a running threshold, and weighted by the soft top-k formula `min(1, exp((s + a) / eps))` at a running
  shift `a`. Both statistics are buffers, estimated in training as moving averages of what the soft top-k of the
  whole batch gives, so the routed fraction tracks the target while no decision looks at a later token.
  In training the heavy branch has a fixed capacity (`within_capacity`), so that its shapes are static and a
  training step needs no host synchronisation.
- Prefix standardisation (`prefix_standardised_scores`, the default): the threshold and shift apply to each score
  standardised by the mean and variance of the sample's own scores up to that token, not to the raw score. Why:
  in training the token representations move along the routing vector as a whole (the batch's mean score by 1-2
  standard deviations within a few steps, its spread 3x, measured on the main job), faster than any running
  threshold follows, so a threshold on raw scores routed between 1% and 86% of the tokens against a 12.5% target.
  A standardised score is invariant to such a shift and scale of the sample's scores, and still causal: it looks
  at the prefix only. Decoding carries each sample's (count, sum, sum of squares) in the cache.
- `route_block_memory` (heavy keys/values): for each block of `block_size` tokens, the `memory_size` tokens with
  the highest scores among the tokens before the block, weighted by the soft top-k over that prefix. With a fixed
  memory size the memory of block j + 1 is the top of (memory of block j + block j), which is what lets the cache
  re-route from a bounded state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .router import RouterOutput, TokenScorer, route, routed_amount
from .soft_topk import exact_shift

# Quantiles of the standard normal distribution stand in for scores before any training: tokens are RMS-normalised
# and routing vectors start with norm ~1, so initial scores are close to N(0, 1).
_REFERENCE_SCORES = 4096

# Pseudo-tokens at the running mean and variance of the raw scores that open every prefix, so that the first
# tokens of a sample are standardised by a sensible estimate rather than by one or two scores (4 kept every
# logging step of the tiny model's drift test within its target; 16 did worse, the prior then lagging the drift).
_PRIOR_TOKENS = 4


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


def prefix_standardised_scores(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    prior_mean: torch.Tensor,
    prior_var: torch.Tensor,
    carried: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each score standardised by the mean and variance of its sample's valid scores up to and including it:

        z_t = (s_t - m_t) / sqrt(v_t),
        m_t = (S_t + n0 mu) / (c_t + n0),
        v_t = (Q_t + n0 (sigma^2 + mu^2)) / (c_t + n0) - m_t^2

    with c_t, S_t, Q_t the count, sum and sum of squares of the valid scores up to t (plus `carried`, those of
    the tokens before this call), and n0 = `_PRIOR_TOKENS` pseudo-tokens of mean mu = `prior_mean` and variance
    sigma^2 = `prior_var`. Sums in float64 (sums of squares over 10^5 tokens); gradients flow through the prefix
    statistics too (z_t is a function of the scores up to t, hence still causal).

    Args:
        scores: `(batch, n)` raw router scores.
        valid: `(batch, n)` bool, False for padding (counts for nothing; its z is meaningless), or None.
        prior_mean, prior_var: 0-dim tensors.
        carried: `(batch, 3)` float64 (count, sum, sum of squares) of each sample's earlier valid scores, or None
            (the sequence starts here).

    Returns:
        `(z, totals)`: `(batch, n)` standardised scores in the dtype of `scores`, and `(batch, 3)` float64 the
        statistics of this call's valid scores (what to add to `carried`).
    """
    weights = torch.ones_like(scores, dtype=torch.float64) if valid is None else valid.to(torch.float64)
    wide = scores.to(torch.float64)
    # Scanned along the last dimension: CUDA scans an inner dimension in parallel, an outer one in one thread
    # per row (2.5x the time of the whole feedforward layer at 32k tokens, measured on an H200).
    terms = (weights, wide * weights, wide * wide * weights)
    if torch.compiler.is_compiling():
        # Inductor (torch 2.11) fails to generate the split scan of a stacked operand at 32k tokens; three scans
        # of plain operands compile, and fuse with the products.
        moments = torch.stack([term.cumsum(-1) for term in terms])
    else:
        moments = torch.stack(terms).cumsum(-1)  # (3, batch, n)
    totals = moments[..., -1].T
    if carried is not None:
        moments = moments + carried.T.unsqueeze(-1)
    mean, var = prior_mean.to(torch.float64), prior_var.to(torch.float64)
    count = moments[0] + _PRIOR_TOKENS
    prefix_mean = (moments[1] + _PRIOR_TOKENS * mean) / count
    prefix_var = (moments[2] + _PRIOR_TOKENS * (var + mean * mean)) / count - prefix_mean * prefix_mean
    # The prior keeps the variance positive up to rounding; the floor only guards a degenerate prior.
    z = (wide - prefix_mean) * prefix_var.clamp_min(1e-12).rsqrt()
    return z.to(scores.dtype), totals.detach()


def within_capacity(routed: torch.Tensor, valid: torch.Tensor, rate: float, burst: int = 0) -> torch.Tensor:
    """The routed tokens a token bucket lets through, along the last dimension: the token at valid index i is kept
    when it is routed and fewer than `ceil(rate * (i + 1)) + burst` tokens before it were kept.

    So at most `ceil(rate * valid count) + burst` tokens are kept (a static bound for the heavy branch's shapes),
    whether a token is kept depends on the tokens before it only (causal), and budget left unused carries over: a
    run of routed tokens denser than the rate uses up what is left before it loses any, `burst` at the row's start
    (routing is bursty: on code, a trained router's decisions cluster in runs of tokens).

    Computed without a loop: with R_t the routed tokens up to t and B_t the (never decreasing) budget, the kept
    count K_t = min(K_{t-1} + routed_t, B_t) has the closed form K_t = R_t + min(0, min_{s <= t} (B_s - R_s)).

    Args:
        routed: `(..., n)` bool, the router's decisions.
        valid: `(..., n)` bool, False for padding (never kept, counts for no budget).
        rate: budget per valid token (capacity factor times the target fraction).
        burst: budget given at the start.

    Returns:
        `(..., n)` bool, the kept tokens (a subset of `routed & valid`).
    """
    routed = routed & valid
    routed_count = routed.long().cumsum(-1)
    # float64, as math.ceil in `ThresholdRouter.capacity`, so the bound holds exactly.
    budget = torch.ceil(rate * valid.to(torch.float64).cumsum(-1)).long() + burst
    kept_count = routed_count + (budget - routed_count).cummin(-1).values.clamp_max(0)
    before = torch.nn.functional.pad(kept_count, (1, 0))[..., :-1]
    return routed & (kept_count > before)


class ThresholdRouter(TokenScorer):
    """Per-token causal router for `fraction` of the tokens (see the module docstring).

    Args:
        dim: model width.
        fraction: target share of routed tokens, in (0, 1].
        fetch_ratio, eps: soft top-k settings used for the weights.
        straight_through: weights are 1 in the forward pass and carry the gradient of the soft weight backward.
        prefix_normalization: threshold and shift apply to prefix-standardised scores (see the module docstring
            and `prefix_standardised_scores`); decoding then needs the `(batch, 3)` statistics the layer's cache
            carries (`forward`'s `prefix_statistics`). False: to raw scores (routers saved before this option).
        momentum: weight of each training batch in the moving averages of threshold and shift (and, with prefix
            normalization, of the raw scores' mean and variance); None: 1.0 with prefix normalization (the last
            training batch's statistics: prefix-standardised scores move little from batch to batch, so averaging
            only adds lag, and with 0.2 the routed share left its target by over 25% while the learning rate
            rose), 0.05 without. With prefix normalization the first batches are averaged with equal weights
            (weight max(momentum, 1 / (k + 1)) for the k-th), so the statistics of an untrained model settle at
            once.
        capacity_factor, capacity_burst: in training, the heavy branch takes at most `ceil(capacity_factor *
            fraction * n) + capacity_burst` tokens of a row of n (see `within_capacity`): static shapes, no host
            synchronisation. capacity_factor None: no limit (the layer then selects the routed tokens with a host
            synchronisation). Evaluation and generation keep every routed token.
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
        prefix_normalization: bool = True,
        momentum: float | None = None,
        capacity_factor: float | None = 1.5,
        capacity_burst: int = 64,
        random_routing: bool = False,
        cosine_sim_scale: float | None = None,
    ):
        super().__init__(dim, 1, batch_invariant=True, random_routing=random_routing, cosine_sim_scale=cosine_sim_scale)
        if isinstance(fraction, bool) or not isinstance(fraction, float) or not 0 < fraction <= 1:
            raise ValueError(
                f"A causal router routes a fraction of the tokens, a float in (0, 1]; got {fraction!r}."
            )
        if momentum is None:
            momentum = 1.0 if prefix_normalization else 0.05
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}.")
        validate_capacity("capacity_factor", capacity_factor, "capacity_burst", capacity_burst)
        self.fraction, self.fetch_ratio, self.eps = fraction, fetch_ratio, eps
        self.capacity_factor, self.capacity_burst = capacity_factor, capacity_burst
        self.straight_through, self.momentum = straight_through, momentum
        self.prefix_normalization = prefix_normalization
        threshold, shift = self.reference_statistics()
        self.threshold = nn.Buffer(torch.tensor(threshold))
        self.shift = nn.Buffer(torch.tensor(shift))
        # The running statistics, in the order `_store_batch_statistics` computes them.
        self._statistics = ("threshold", "shift")
        if prefix_normalization:
            # The prior of the prefix statistics (untrained scores are close to N(0, 1), see _REFERENCE_SCORES)
            # and the number of batches folded in (for the equal-weight start).
            self.score_mean = nn.Buffer(torch.tensor(0.0))
            self.score_var = nn.Buffer(torch.tensor(1.0))
            self.updates = nn.Buffer(torch.tensor(0))
            self._statistics += ("score_mean", "score_var")
        # Training state, made at the first training call on its device and then only updated in place, so that a
        # training step captured in a CUDA graph replays it (and reading it costs no host synchronisation):
        # the last batch's statistics and whether it had a valid token, folded into the buffers at the next
        # call (see forward), and the tokens routed, dropped for capacity and valid since `take_fractions`.
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._counts: torch.Tensor | None = None

    def reference_statistics(self) -> tuple[float, float]:
        """Threshold and shift for standard normal scores: the values before any training."""
        quantiles = (torch.arange(_REFERENCE_SCORES, dtype=torch.float64, device="cpu") + 0.5) / _REFERENCE_SCORES
        threshold, shift = gate_statistics(
            torch.special.ndtri(quantiles), self.fraction, fetch_ratio=self.fetch_ratio, eps=self.eps
        )
        return float(threshold), float(shift)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, prefix_statistics: torch.Tensor | None = None
    ) -> GateOutput:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding, never routed) -> GateOutput.

        `prefix_statistics`: with prefix normalization, `(batch, 3)` float64 statistics of each sample's raw scores
        before these tokens (a cache's, see `prefix_standardised_scores`), to which this call adds its own, in
        place; None: the sequences start here. Ignored without prefix normalization.

        In training the batch's statistics are folded into the running ones at the next call (or at `train()`,
        `eval()` and `state_dict()`), not at once: activation checkpointing runs this forward again during the
        backward pass, and that recomputation must route exactly as the first pass did. A call made inside a
        backward pass is such a recomputation and changes nothing."""
        recomputing = _recomputing()
        if not recomputing:
            self._apply_pending_statistics()
        scores = self.scores(x)[:, 0]
        if self.prefix_normalization:
            scores, totals = prefix_standardised_scores(
                scores, None if mask is None else mask.bool(), self.score_mean, self.score_var, prefix_statistics
            )
            if prefix_statistics is not None:
                if recomputing:
                    # The first pass has added these tokens to the statistics already, so a recomputation would
                    # standardise by different ones and route differently.
                    raise RuntimeError(
                        "A ThresholdRouter with prefix normalization cannot be recomputed by activation checkpointing "
                        "while it continues a cache: train without a cache (transformers' gradient checkpointing "
                        "drops it), or without checkpointing."
                    )
                prefix_statistics.add_(totals)
        routed = scores >= self.threshold
        if mask is not None:
            routed = routed & mask.bool()
        weights = torch.exp(((scores + self.shift) / self.eps).clamp_max(0.0))
        if self.straight_through:
            weights = weights - weights.detach() + 1.0
        if self.training and not recomputing:
            self._store_batch_statistics(scores.detach(), totals if self.prefix_normalization else None, mask)
            with torch.no_grad():
                counts = self._counter(routed.device)
                counts[0].add_(routed.sum())
                # torch.full fills on the device; a tensor made from a Python number would be copied from the host
                # (a synchronisation).
                everything = torch.full((), routed.numel(), dtype=torch.long, device=routed.device)
                counts[2].add_(everything if mask is None else mask.bool().sum())
        return GateOutput(routed, weights * routed)

    def capacity(self, length: int) -> int | None:
        """The heavy branch's slots for a row of `length` tokens: `ceil(capacity_factor * fraction * length) +
        capacity_burst` (at most `length`) in training, None (every routed token) in evaluation or without a
        capacity factor."""
        if not self.training or self.capacity_factor is None:
            return None
        return min(length, math.ceil(self.capacity_factor * self.fraction * length) + self.capacity_burst)

    def keep_within_capacity(self, routed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`within_capacity` of this router's `(..., n)` decisions along rows of n valid-ordered tokens (the layer
        chooses the rows: a sample, or a block), counting the dropped tokens. Use it when `capacity` is not None."""
        kept = within_capacity(routed, valid, self.capacity_factor * self.fraction, self.capacity_burst)
        if not _recomputing():
            with torch.no_grad():
                self._counter(routed.device)[1].add_((routed & valid & ~kept).sum())
        return kept

    def _counter(self, device: torch.device) -> torch.Tensor:
        """The `(3,)` counts (routed, dropped, valid) on `device`."""
        if self._counts is None or self._counts.device != device:
            self._counts = torch.zeros(3, dtype=torch.long, device=device)
        return self._counts

    def take_fractions(self) -> tuple[float, float] | None:
        """The shares of valid tokens that training calls since the last call of this method routed, and dropped
        for capacity (`keep_within_capacity`); None if they saw no valid token. Starts counting anew. Reads the
        counts from the device: call it at logging steps."""
        if self._counts is None:
            return None
        routed, dropped, valid = self._counts.tolist()
        self._counts.zero_()
        return None if valid == 0 else (routed / valid, dropped / valid)

    def train(self, mode: bool = True) -> "ThresholdRouter":
        self._apply_pending_statistics()
        return super().train(mode)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # A checkpoint holds the statistics of every batch seen so far, so a resumed run routes as the
        # uninterrupted one would.
        self._apply_pending_statistics()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def _store_batch_statistics(
        self, scores: torch.Tensor, totals: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        """Keep this batch's statistics (threshold and shift of the `(batch, n)` scores routed on; with prefix
        normalization the mean and variance of the raw ones, from their `(batch, 3)` `totals` of
        `prefix_standardised_scores`) and whether it had a valid token on the device, in place."""
        valid = None if mask is None else mask.bool().flatten()
        statistics = gate_statistics(
            scores.flatten(), self.fraction, valid=valid, fetch_ratio=self.fetch_ratio, eps=self.eps
        )
        if totals is not None:
            count, total, squares = totals.sum(0)
            mean = total / count.clamp_min(1.0)
            statistics += (mean, squares / count.clamp_min(1.0) - mean * mean)
        had_tokens = torch.ones((), dtype=torch.bool, device=scores.device) if valid is None else valid.any()
        if self._pending is None or self._pending[0].device != self.threshold.device:
            self._pending = (*(torch.empty_like(getattr(self, name)) for name in self._statistics), had_tokens.clone())
        for kept, new in zip(self._pending, (*statistics, had_tokens)):
            kept.copy_(new)

    def discard_pending_statistics(self) -> None:
        """Forget the statistics of the last training call (one whose scores must not move the running ones)."""
        if self._pending is not None:
            self._pending[-1].fill_(False)

    @torch.no_grad()
    def _apply_pending_statistics(self, weight: float | None = None) -> None:
        # In training mode always (a replayed CUDA graph stores statistics without this Python code running; the
        # device flag says whether any are pending), never in evaluation: `train(False)` has folded them already (it
        # runs this while still in training mode), and decoding steps skip the work. `weight`: the batch's weight
        # in the running statistics, None for the momentum's (see the class docstring).
        if self._pending is None or not self.training:
            return
        if self._pending[0].device != self.threshold.device:  # the module moved since the last training call
            self._pending = tuple(t.to(self.threshold.device) for t in self._pending)
        *statistics, pending = self._pending
        if weight is None:
            weight = self.momentum
            if self.prefix_normalization:
                weight = (1.0 / (self.updates + 1)).clamp_min(self.momentum)
        if self.prefix_normalization:
            self.updates.add_(pending.long())
        # A batch of padding only (or none since the last fold) leaves the statistics as they were: a device-side
        # choice, no synchronisation.
        for name, new in zip(self._statistics, statistics):
            running = getattr(self, name)
            step = weight.to(running.dtype) if torch.is_tensor(weight) else weight
            running.copy_(torch.where(pending, running.lerp(new.to(running), step), running))
        pending.fill_(False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A router saved with the other routing would load into this one with missing or unexpected buffers; say
        # which setting it needs instead.
        saved_with = prefix + "score_mean" in state_dict
        if prefix + "threshold" in state_dict and saved_with != self.prefix_normalization:
            error_msgs.append(
                f"{prefix[:-1] or 'ThresholdRouter'} was saved with prefix_normalization={saved_with} and is built "
                f"with prefix_normalization={self.prefix_normalization}: build it with prefix_normalization="
                f"{saved_with} (CoLT5Config: causal_router_prefix_normalization={saved_with}; layers: "
                f"router_prefix_normalization={saved_with})."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@torch.no_grad()
def calibrate_causal_routers(model: nn.Module, forward: Callable[[int], object], batches: int) -> int:
    """Give the prefix-normalised `ThresholdRouter`s of `model` that have seen no training batch the mean
    statistics of a few batches before training starts, so that the first trained batch routes close to the
    target fraction.

    Why: untrained statistics assume standard normal standardised scores; on real data those of an untrained model
    are not (on the main job the first training step routed 5% to 28% of the tokens against a 12.5% target). The
    first batch cannot set its own statistics, as a later token would then move an earlier token's routing;
    batches that are not trained on at that step can (batch normalisation's data-dependent start is the same idea).

    Args:
        model: the model whose routers to set; run in training mode for `forward`, then put back in its mode.
        forward: `forward(i)` runs one forward pass of `model` on calibration batch i (under the training step's
            precision).
        batches: how many calibration batches; each router's statistics become their mean over them.

    Returns:
        How many routers were set (0: every router has statistics, as after resuming or from a trained checkpoint;
        then `forward` does not run).
    """
    routers = [module for module in model.modules() if isinstance(module, ThresholdRouter)]
    fresh = {id(router) for router in routers if router.prefix_normalization and not router.updates.item()}
    if not fresh:
        return 0
    training = model.training
    model.train()
    for index in range(batches):
        forward(index)
        for router in routers:
            if id(router) in fresh:
                router._apply_pending_statistics(weight=1 / (index + 1))  # the running mean over the batches
            else:
                router.discard_pending_statistics()
    for router in routers:
        router.take_fractions()  # calibration batches are no training steps: their counts are not logged
    model.train(training)
    return len(fresh)


def validate_capacity(factor_name: str, factor: float | None, burst_name: str, burst: int) -> None:
    """A capacity factor is None (no limit) or a number >= 1 (below 1 the heavy branch could never take the
    target fraction); a burst is an int >= 0."""
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1):
        raise ValueError(
            f"{factor_name} must be None (no capacity limit) or a number >= 1 (the heavy branch's slots as a "
            f"multiple of the routed fraction), got {factor!r}."
        )
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise ValueError(f"{burst_name} must be an int >= 0 (extra heavy-branch slots per row), got {burst!r}.")


def _recomputing() -> bool:
    """Whether this call runs inside a backward pass (activation checkpointing recomputing a forward), the test
    FSDP uses: such a call must route as the first pass did and count nothing. A recomputation always has gradients
    on, so a call without them is none (and a compiled decode step never asks the autograd engine). Neither is a
    call being traced by torch.compile: a compiled backward replays the traced graph and never calls this Python."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


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
