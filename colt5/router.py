# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""The CoLT5 router: scores tokens with learned vectors, normalises them with the soft top-k and selects the
top-k tokens of each routing set.

Selection needs no iterations: the k largest lambdas are the k largest raw scores (router.md, fact 1), so the
selected tokens are a plain top-k of the scores and only their weights come from the soft top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .soft_topk import reference_eps_schedule, soft_topk
from .spellings import one_spelling, reject


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


def call_amount(name: str, override: int | float | None, amount: int | float) -> int | float:
    """The amount to route in one call: a layer's `amount`, or the `override` passed for this call (validated)."""
    if override is None:
        return amount
    validate_amount(name, override)
    return override


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

    # A block can take more than an even share when others are short of valid tokens: size for the worst case.
    per_block = min(block_size, max_tokens)
    lambdas = soft_topk(
        block_scores,
        fetch_ratio * block_tokens.to(torch.float64),
        block_valid,
        eps=eps,
        n_iters=n_iters,
        eps_schedule=eps_schedule,
        backend=backend,
        max_amount=fetch_ratio * per_block,
    )

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
    needs the precision. With `cosine_sim_scale` a score is the cosine similarity of token and vector times that
    scale (colt5-attention's `cosine_sim_routing`), else their dot product.

    With `random_routing` the scores are fresh standard-normal draws on every call instead, which say nothing
    about the tokens: an ablation control for learned routing. Draws follow torch's random number generator
    (`torch.manual_seed` makes them repeatable, and activation checkpointing replays them), and keep the spread
    of scores at initialisation, so routed amounts and the causal routers' thresholds mean the same as with
    learned scores. The routing vectors then get no gradient.
    """

    def __init__(
        self,
        dim: int,
        num_sets: int = 1,
        *,
        batch_invariant: bool = False,
        random_routing: bool = False,
        cosine_sim_scale: float | None = None,
    ):
        super().__init__()
        self.routing_vectors = nn.Parameter(torch.randn(num_sets, dim) * dim**-0.5)
        self.batch_invariant = batch_invariant
        self.random_routing = random_routing
        self.cosine_sim_scale = cosine_sim_scale

    def scores(self, x: torch.Tensor, random: bool = False) -> torch.Tensor:
        """`(batch, n, dim)` tokens -> `(batch, sets, n)` scores (random ones with `random` or `random_routing`).

        With `batch_invariant`, float32 scores are summed in float64 and rounded: a token then gets the same bits
        whether it is scored alone (decoding) or with others (a full forward pass, whose matmul sums in another
        order), which keeps ties between equal tokens broken alike in both.
        """
        if self.random_routing or random:
            batch, length, _ = x.shape
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            return torch.randn(batch, self.routing_vectors.shape[0], length, device=x.device, dtype=dtype)
        dtype = torch.float64 if x.dtype == torch.float64 or self.batch_invariant else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            vectors = self.routing_vectors.to(dtype)
            if self.cosine_sim_scale is not None:
                x = nn.functional.normalize(x, dim=-1)
                vectors = nn.functional.normalize(vectors, dim=-1) * self.cosine_sim_scale
            if x.dtype == dtype:
                scores = x @ vectors.T
            elif x.shape[:-1].numel() <= FEW_SCORED_TOKENS:
                # A decode step: cuBLAS's float64 matrix-vector kernels took 25 us for one token on an H100, a
                # product and a sum (one fused kernel under torch.compile) take a few.
                scores = (x.unsqueeze(-2).to(dtype) * vectors).sum(-1)
            else:
                scores = _WideScores.apply(x, vectors)
        return scores.transpose(1, 2) if x.dtype == torch.float64 else scores.transpose(1, 2).float()


# Tokens (of all samples) up to which wide scores are a product and a sum rather than a matrix product.
FEW_SCORED_TOKENS = 64

# Widened elements at a time: 256 MiB in float32, few enough chunks (8 for a million tokens of width 512) that
# launches cost less than the bytes moved.
WIDE_SCORE_CHUNK_ELEMENTS = 1 << 26


class _WideScores(torch.autograd.Function):
    """`x @ vectors.T` summed in the vectors' (wider) dtype without a wide copy of x, rounded to float32.

    `x.to(float32) @ v.T` would make, and keep for the backward pass, a float32 copy of the whole sequence: 2 GiB per
    router for a million bf16 tokens of width 512. Here x is widened a chunk of tokens at a time, both ways. Traced by
    torch.compile, the forward is a product and a sum instead, which Inductor fuses into one reduction that reads x
    once: the chunked product ran float64 cuBLAS kernels on widened copies, 4.4 of the 120 ms of device time of a
    compiled 32k-token training step of the benchmark's model (H100).

    The gradients are float32 products (only the forward's sums need float64, for batch invariance). With float64
    ones, Inductor fused the float64 gradient of x into a float32 reduction of the RMSNorm's backward and failed to
    build the kernel ("loop-carried variable ... fp32 ... re-assigned to fp64", torch 2.11).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `vectors` `(sets, dim)` -> `(batch, n, sets)` float32."""
        ctx.save_for_backward(x, vectors)
        if torch.compiler.is_compiling():
            return (x.unsqueeze(-2).to(vectors.dtype) * vectors).sum(-1).float()
        scores = [(chunk.to(vectors.dtype) @ vectors.T).float() for chunk in _WideScores._chunks(x)]
        return scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, vectors = ctx.saved_tensors
        narrow = vectors.float()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_vectors = torch.zeros_like(narrow) if ctx.needs_input_grad[1] else None
        start = 0
        for chunk in _WideScores._chunks(x):
            chunk_grad = grad[:, start : start + chunk.shape[1]].float()
            if grad_x is not None:
                grad_x[:, start : start + chunk.shape[1]] = chunk_grad @ narrow
            if grad_vectors is not None:
                grad_vectors += torch.einsum("bns,bnd->sd", chunk_grad, chunk.float())
            start += chunk.shape[1]
        return grad_x, None if grad_vectors is None else grad_vectors.to(vectors.dtype)

    @staticmethod
    def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = max(1, WIDE_SCORE_CHUNK_ELEMENTS // (x.shape[0] * x.shape[2]))
        return x.split(tokens, dim=1)


class RouterReturn(NamedTuple):
    """What `CoordinateDescentRouter` returns when called with colt5-attention's `num_tokens=` (its layout: the
    set axis only with several routing sets or `keep_one_route_dim`).

    indices: `(batch, [sets,] k)` positions, sorted by position; None when the sequence has at most `num_tokens`
        tokens (then every token is routed, as in colt5-attention).
    scores: `(batch, [sets,] k)` the routed tokens' weights (`(batch, [sets,] n)` ones when nothing was routed).
    routed_tokens: `(batch, [sets,] k, dim)` the routed tokens (the input itself when nothing was routed).
    routed_mask: `(batch, [sets,] k)` bool, False for slots left empty (None without a mask).
    """

    indices: torch.Tensor | None
    scores: torch.Tensor
    routed_tokens: torch.Tensor
    routed_mask: torch.Tensor | None


def _eps_schedule(
    n_iters: int | None,
    eps: float,
    eps_schedule: Sequence[float] | None,
    eps_init: float | None,
    eps_decay: float | None,
) -> tuple[float, float] | None:
    """One eps schedule from colt5's `eps_schedule=(start, decay)` or colt5-attention's `eps_init`/`eps_decay`
    (each defaulting to colt5-attention's 4.0 and 0.7 when the other is given, or both with iterations). None means
    a constant eps; `eps_schedule=(eps, 1.0)` asks for one."""
    if eps_schedule is not None and (eps_init is not None or eps_decay is not None):
        raise ValueError(
            "eps_schedule=(start, decay) and eps_init/eps_decay name the same schedule: pass one spelling."
        )
    if eps_schedule is not None:
        eps_init, eps_decay = eps_schedule
    elif eps_init is None and eps_decay is None and n_iters is None:
        return None
    else:  # colt5-attention's defaults for what is not given
        eps_init = 4.0 if eps_init is None else eps_init
        eps_decay = 0.7 if eps_decay is None else eps_decay
    schedule = reference_eps_schedule(eps, eps_init, eps_decay)
    if schedule is not None and n_iters is None:
        raise ValueError(
            f"An eps schedule (start {schedule[0]}, decay {schedule[1]}) needs iterations: set n_iters, or leave "
            "eps_init, eps_decay and eps_schedule unset for the exact soft top-k (n_iters=None)."
        )
    return schedule


def _backend(backend: str | None, use_triton: bool | None) -> str:
    """colt5's `backend` from it or from colt5-attention's `use_triton` (True: Triton on CUDA and PyTorch on other
    devices, never an error; False: PyTorch)."""
    if backend is not None and use_triton is not None and (backend == "torch") == bool(use_triton):
        raise ValueError(f"backend={backend!r} and use_triton={use_triton!r} disagree: pass one of them.")
    if backend is not None:
        return backend
    return "auto" if use_triton is None or use_triton else "torch"


def route_settings(
    *,
    straight_through: bool = True,
    n_iters: int | None = 20,
    fetch_ratio: float | None = None,
    eps: float = 0.03,
    eps_schedule: Sequence[float] | None = None,
    route_block_size: int | None = None,
    backend: str | None = None,
    fetch_k_ratio: float | None = None,
    eps_init: float | None = None,
    eps_decay: float | None = None,
    use_triton: bool | None = None,
    learned_routing_tokens: bool = False,
    triton_checkpoint_segments: int | None = None,
) -> dict[str, Any]:
    """`route`'s keyword arguments from soft top-k settings in either package's keywords (see
    `CoordinateDescentRouter`; the defaults are colt5-attention's)."""
    reject(
        "learned_routing_tokens",
        learned_routing_tokens,
        False,
        "the router learns its own routing vectors; routing tokens passed at call time are not supported.",
    )
    reject(
        "triton_checkpoint_segments",
        triton_checkpoint_segments,
        None,
        "the iterative soft top-k's backward pass replays the iterations from O(n + iterations) saved state, "
        "so there is nothing to checkpoint; remove it.",
    )
    fetch_ratio = one_spelling(9 / 8, fetch_ratio=fetch_ratio, fetch_k_ratio=fetch_k_ratio)
    if fetch_ratio < 1:
        raise ValueError(f"fetch_ratio must be >= 1, got {fetch_ratio}.")
    return dict(
        fetch_ratio=fetch_ratio,
        eps=eps,
        n_iters=n_iters,
        eps_schedule=_eps_schedule(n_iters, eps, eps_schedule, eps_init, eps_decay),
        straight_through=straight_through,
        route_block_size=route_block_size,
        backend=_backend(backend, use_triton),
    )


def with_default_schedule(router_kwargs: dict[str, Any], schedule: tuple[float, float]) -> dict[str, Any]:
    """`router_kwargs` with `eps_schedule=schedule` unless they set a schedule in either spelling."""
    if {"eps_schedule", "eps_init", "eps_decay"} & router_kwargs.keys():
        return router_kwargs
    return {**router_kwargs, "eps_schedule": schedule}


def router_layer_kwargs(
    router_kwargs: dict[str, Any] | None,
    straight_through: bool | None = None,
    use_triton: bool | None = None,
    router_type: str = "coor_descent",
) -> dict[str, Any]:
    """A layer's router settings: its `router_kwargs` (either package's keywords) with the layer-level
    `router_straight_through` and `use_triton` of colt5-attention folded in; `router_type` (colt5-attention up to
    0.5) must be its "coor_descent"."""
    reject(
        "router_type",
        router_type,
        "coor_descent",
        "the routers use the soft top-k, the fixed point of coordinate descent (router_type='coor_descent'); "
        "colt5-attention's 'sinkhorn' and 'cum_softmax' routers, which it removed after 0.5, are not here.",
    )
    kwargs = dict(router_kwargs or {})
    if "num_routing_tokens" in kwargs or "num_sets" in kwargs:
        raise ValueError(
            "A layer's key/value routing sets are its num_routed_kv (kv_routing_tokens in the cross attention), not "
            "router_kwargs['num_routing_tokens']: the query router has one set."
        )
    for name, value in (("straight_through", straight_through), ("use_triton", use_triton)):
        resolved = one_spelling(None, **{f"layer's {name}": value, f"router_kwargs['{name}']": kwargs.pop(name, None)})
        if resolved is not None:
            kwargs[name] = resolved
    return kwargs


class CoordinateDescentRouter(TokenScorer):
    """Scores tokens with `num_sets` learned vectors and routes each set's top tokens (CoLT5 section 3.1).

    Takes colt5-attention's arguments, in its order and with its defaults (20 iterations of coordinate descent at
    eps 0.03 with eps-scaling from 4.0 by 0.7 per step, over 9/8 of the amount, straight-through weights), and
    colt5's, by keyword.

    Args:
        dim: width of the tokens.
        num_sets, num_routing_tokens: routing sets (routing vectors), default 1.
        straight_through: weights are 1 in the forward pass and carry the soft top-k's gradient backward.
        n_iters: coordinate-descent iterations; None for the exact fixed point (colt5's faster default in
            CoLT5Config).
        fetch_ratio, fetch_k_ratio: the soft top-k normalises over this times the amount (default 9/8).
        eps: the soft top-k's entropy weight (the final one under eps-scaling).
        eps_schedule: `(start, decay)`: step t uses `max(start * decay**t, eps)`; or colt5-attention's `eps_init`
            (start) and `eps_decay`.
        route_block_size: route an equal share from every block of this many tokens.
        backend: soft top-k kernels, "auto" (Triton on CUDA), "torch" or "triton"; or colt5-attention's
            `use_triton` (True: "auto", False: "torch").
        cosine_sim_routing, cosine_sim_scale: score by cosine similarity times the scale (default 8).
        random_routing: route by random scores, an ablation control (see `TokenScorer`).
        learned_routing_tokens, triton_checkpoint_segments: colt5-attention's; they have no meaning here and
            raise an error unless left at their defaults.
    """

    def __init__(
        self,
        dim: int,
        straight_through: bool = True,
        n_iters: int | None = 20,
        fetch_k_ratio: float | None = None,
        eps: float = 0.03,
        eps_decay: float | None = None,
        eps_init: float | None = None,
        num_routing_tokens: int | None = None,
        learned_routing_tokens: bool = False,
        use_triton: bool | None = None,
        cosine_sim_routing: bool = False,
        cosine_sim_scale: float = 8.0,
        route_block_size: int | None = None,
        triton_checkpoint_segments: int | None = None,
        *,
        num_sets: int | None = None,
        fetch_ratio: float | None = None,
        eps_schedule: Sequence[float] | None = None,
        backend: str | None = None,
        random_routing: bool = False,
    ):
        if not isinstance(straight_through, bool):
            raise ValueError(
                f"straight_through must be True or False, got {straight_through!r}: the second argument follows "
                "colt5-attention's order (dim, straight_through, n_iters, ...); pass routing sets as num_sets=..."
            )
        num_sets = one_spelling(1, num_sets=num_sets, num_routing_tokens=num_routing_tokens)
        cosine_sim_scale = cosine_sim_scale if cosine_sim_routing else None
        super().__init__(dim, num_sets, random_routing=random_routing, cosine_sim_scale=cosine_sim_scale)
        self.route_kwargs = route_settings(
            straight_through=straight_through,
            n_iters=n_iters,
            fetch_ratio=fetch_ratio,
            eps=eps,
            eps_schedule=eps_schedule,
            route_block_size=route_block_size,
            backend=backend,
            fetch_k_ratio=fetch_k_ratio,
            eps_init=eps_init,
            eps_decay=eps_decay,
            use_triton=use_triton,
            learned_routing_tokens=learned_routing_tokens,
            triton_checkpoint_segments=triton_checkpoint_segments,
        )

    def forward(
        self,
        x: torch.Tensor,
        amount: int | float | None = None,
        mask: torch.Tensor | None = None,
        *,
        num_tokens: int | None = None,
        random_route: bool = False,
        routing_tokens: torch.Tensor | None = None,
        keep_one_route_dim: bool = False,
    ) -> RouterOutput | RouterReturn:
        """Route tokens of `x` `(batch, n, dim)`; `mask` `(batch, n)` bool, False for padding.

        Args:
            amount: tokens per set, an int count or a float fraction of each sample's valid length; returns a
                `RouterOutput`.
            num_tokens: colt5-attention's spelling (an int); returns a `RouterReturn`, laid out as it does.
            random_route: route this call by random scores (an ablation control).
            routing_tokens: colt5-attention's call-time routing tokens: not supported (an error).
            keep_one_route_dim: with `num_tokens` and one routing set, keep the set axis.
        """
        if routing_tokens is not None:
            raise ValueError("routing_tokens are not supported: the router learns its own routing vectors.")
        if (amount is None) == (num_tokens is None):
            raise ValueError(
                "Pass the amount to route once: as `amount` (colt5) or as `num_tokens=` (colt5-attention)."
            )
        if num_tokens is None:
            return route(self.scores(x, random=random_route), amount, mask, **self.route_kwargs)
        return self._route_as_reference(x, num_tokens, mask, random_route, keep_one_route_dim)

    def _route_as_reference(
        self, x: torch.Tensor, num_tokens: int, mask: torch.Tensor | None, random: bool, keep_set_axis: bool
    ) -> RouterReturn:
        sets = self.routing_vectors.shape[0]
        squeeze = sets == 1 and not keep_set_axis
        batch, length, _ = x.shape
        if length <= num_tokens:  # nothing to choose: every token, weight 1, as colt5-attention returns it
            x_sets = x.unsqueeze(1).expand(batch, sets, length, x.shape[-1])
            mask_sets = None if mask is None else mask.bool().unsqueeze(1).expand(batch, sets, length)
            ones = x.new_ones(batch, sets, length)
            if squeeze:
                return RouterReturn(None, ones[:, 0], x, None if mask is None else mask.bool())
            return RouterReturn(None, ones, x_sets, mask_sets)
        routed = route(self.scores(x, random=random), num_tokens, mask, **self.route_kwargs)
        tokens = gather_tokens(x, routed.indices)
        routed_mask = None if mask is None else routed.mask
        if squeeze:
            first_mask = None if routed_mask is None else routed_mask[:, 0]
            return RouterReturn(routed.indices[:, 0], routed.weights[:, 0], tokens[:, 0], first_mask)
        return RouterReturn(routed.indices, routed.weights, tokens, routed_mask)

    @staticmethod
    def route_back(src: torch.Tensor, routed_tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Write `(batch, k, dim)` routed tokens into `src` `(batch, n, dim)` at their `(batch, k)` indices (in
        place, as colt5-attention does) and return it."""
        rows = torch.arange(src.shape[0], device=src.device).unsqueeze(-1)
        src[rows, indices] = routed_tokens.to(src.dtype)
        return src


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`(batch, n, dim)` tokens at `(batch, sets, k)` indices -> `(batch, sets, k, dim)`."""
    batch, sets, k = indices.shape
    flat = indices.reshape(batch, sets * k, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).view(batch, sets, k, x.shape[-1])


def scatter_tokens(values: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """Add `(batch, k, dim)` values into a zero `(batch, length, dim)` tensor at `(batch, k)` indices."""
    out = values.new_zeros(values.shape[0], length, values.shape[-1])
    return out.scatter_add(1, indices.unsqueeze(-1).expand_as(values), values)
