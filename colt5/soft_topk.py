# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Entropic soft top-k (the CoLT5 router's normalisation), plain PyTorch.

For scores `s` of a row and an amount `k`, the soft top-k is

    lambda = argmax_{0 <= lambda_j <= 1, sum_j lambda_j = k}  <s, lambda> + eps * H(lambda)

and has the form `lambda_j = exp(min(s_j + a, 0) / eps)` with one scalar `a` per row (see
shared/design/router.md). Two modes:

- exact: `a` is the fixed point, found in closed form from one top-k, one log-sum-exp and one scan over k
  values; the gradient comes from implicit differentiation (one elementwise pass, one reduction).
- iterative: the paper's coordinate descent for a fixed number of iterations, optionally with a decaying eps.
  It reduces to a scalar recursion on `a`, so the backward pass replays that recursion: O(iterations * n) time,
  O(n + iterations) memory, no unrolled graph.

All arithmetic is done in float32 (float64 inputs stay float64). Rows are the leading dimensions of `scores`.

This module is the reference. CUDA tensors go to the Triton kernels of soft_topk_triton.py (imported only then),
unless the backend (argument, config.router_backend, or the environment variable COLT5_ROUTER_BACKEND when the
argument is "auto") says "torch".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch


ROUTER_BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saturated_rows(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows whose amount covers every valid token (or that have none): every valid token gets lambda = 1."""
    return k >= valid.sum(-1)


def exact_shift(
    z: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, max_amount: float | None = None
) -> torch.Tensor:
    """Fixed-point shift `alpha` (in units of eps) with `sum_j exp(min(z_j + alpha, 0)) = k`.

    Args:
        z: `(rows, n)` scores divided by eps, any value where `valid` is False.
        k: `(rows,)` amounts, `0 < k < number of valid tokens` for the rows that matter.
        valid: `(rows, n)` bool.
        max_amount: a bound on `k` known to the caller; without it `k.max()` is read from the device (a host
            synchronisation on GPUs).

    Returns:
        `(rows,)` alpha. Rows with `k >= valid count` get an arbitrary finite value (callers treat them apart).
    """
    rows, n = z.shape
    z = z.masked_fill(~valid, -math.inf)
    # m saturated entries (lambda = 1) are possible only for m < k, so the top ceil(k) scores are all we sort.
    num_candidates = max(1, min(n, math.ceil(k.max().item() if max_amount is None else max_amount)))
    top_z, top_idx = z.topk(num_candidates, dim=-1)
    in_top = torch.zeros_like(valid).scatter_(-1, top_idx, True)
    rest = torch.logsumexp(z.masked_fill(in_top, -math.inf), dim=-1, keepdim=True)
    # tail[m] = log sum_{i >= m} exp(z_(i)), summed without subtraction so saturated rows keep their precision.
    tail = torch.logaddexp(torch.logcumsumexp(top_z.flip(-1), dim=-1).flip(-1), rest)
    m = torch.arange(num_candidates, device=z.device, dtype=z.dtype)
    remaining = k.unsqueeze(-1) - m
    possible = remaining > 0
    alpha_m = torch.log(remaining.clamp_min(torch.finfo(z.dtype).tiny)) - tail
    # The fixed point has m saturated entries for the first m whose own entry does not saturate (water filling).
    consistent = possible & (top_z + alpha_m < 0)
    consistent[:, -1] |= ~consistent.any(-1)  # rounding at exact ties: fall back to the last candidate
    first = consistent.int().argmax(-1, keepdim=True)
    return alpha_m.gather(-1, first).squeeze(-1)


def _lambdas_at_shift(
    exponent: torch.Tensor, valid: torch.Tensor, saturated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lambda = exp(min(exponent, 0))` with `exponent = (s + a) / eps`; masked tokens get 0, saturated rows get 1
    on every valid token. Also returns where lambda is unsaturated (the tokens that carry gradient)."""
    exponent = exponent.masked_fill(~valid, -math.inf)
    lambdas = torch.exp(exponent.clamp_max(0.0))
    lambdas = torch.where(saturated.unsqueeze(-1), valid.to(lambdas.dtype), lambdas)
    return lambdas, valid & (exponent < 0) & ~saturated.unsqueeze(-1)


class _ExactSoftTopk(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, eps: float, max_amount: float | None
    ) -> torch.Tensor:
        z = scores / eps
        saturated = _saturated_rows(k, valid)
        alpha = exact_shift(z, torch.where(saturated, torch.zeros_like(k), k), valid, max_amount)
        lambdas, unsaturated = _lambdas_at_shift(z + alpha.unsqueeze(-1), valid, saturated)
        ctx.save_for_backward(lambdas, unsaturated)
        ctx.eps = eps
        return lambdas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lambdas: torch.Tensor):
        lambdas, unsaturated = ctx.saved_tensors
        weight = torch.where(unsaturated, lambdas / ctx.eps, torch.zeros_like(lambdas))
        total = weight.sum(-1, keepdim=True)
        mean_grad = (weight * grad_lambdas).sum(-1, keepdim=True) / total.clamp_min(torch.finfo(total.dtype).tiny)
        return weight * (grad_lambdas - mean_grad), None, None, None, None


class _IterativeSoftTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, eps_steps: tuple[float, ...]):
        saturated = _saturated_rows(k, valid)
        log_k = torch.log(torch.where(saturated, torch.ones_like(k), k))
        count = valid.sum(-1).clamp_min(1).to(scores.dtype)
        # First step: b = -s makes every s_j + b_j zero, so the log-sum-exp is log(count).
        shifts = [eps_steps[0] * (log_k - torch.log(count))]
        for eps in eps_steps[1:]:
            capped = torch.minimum(scores, -shifts[-1].unsqueeze(-1)).masked_fill(~valid, -math.inf)
            shifts.append(eps * (log_k - torch.logsumexp(capped / eps, dim=-1)))
        exponent = (scores + shifts[-1].unsqueeze(-1)) / eps_steps[-1]
        lambdas, unsaturated = _lambdas_at_shift(exponent, valid, saturated)
        ctx.save_for_backward(scores, valid, lambdas, unsaturated, torch.stack(shifts, dim=-1))
        ctx.eps_steps = eps_steps
        return lambdas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lambdas: torch.Tensor):
        scores, valid, lambdas, unsaturated, shifts = ctx.saved_tensors
        eps_steps = ctx.eps_steps
        weight = torch.where(unsaturated, lambdas / eps_steps[-1], torch.zeros_like(lambdas))
        grad_scores = weight * grad_lambdas
        grad_shift = grad_scores.sum(-1)
        # Replay a_{t+1} = eps_t * (log k - LSE_j(min(s_j, -a_t) / eps_t)) backwards; a_1 does not depend on s.
        for step in range(len(eps_steps) - 1, 0, -1):
            eps = eps_steps[step]
            previous = shifts[..., step - 1].unsqueeze(-1)
            below = valid & (scores < -previous)
            capped = torch.minimum(scores, -previous).masked_fill(~valid, -math.inf)
            probs = torch.softmax(capped / eps, dim=-1).masked_fill(~valid, 0.0)  # fully masked rows: 0, not NaN
            grad_scores = grad_scores - grad_shift.unsqueeze(-1) * probs * below
            grad_shift = grad_shift * (probs * (valid & ~below)).sum(-1)
        return grad_scores, None, None, None


def eps_steps_for(n_iters: int, eps: float, eps_schedule: Sequence[float] | None = None) -> tuple[float, ...]:
    """The eps of each coordinate-descent iteration.

    Without a schedule every step uses `eps`; with `eps_schedule = (start, decay)` step t uses
    `max(start * decay**t, eps)`, i.e. eps-scaling that starts large and is floored at `eps`.
    """
    if eps_schedule is None:
        return (float(eps),) * n_iters
    start, decay = eps_schedule
    return tuple(max(start * decay**step, eps) for step in range(n_iters))


@functools.lru_cache(maxsize=64)
def _constant_amounts(k: float, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only `(rows,)` tensor of k, made once per (k, rows, dtype, device): filling it on the device each call
    costs a launch, and copying it from the host waits for the GPU. Made outside inference mode, so a first call
    under torch.inference_mode() does not leave an inference tensor for later autograd use."""
    with torch.inference_mode(False):
        return torch.full((rows,), k, dtype=dtype, device=device)


def uses_triton(scores: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `soft_topk(scores, ..., backend=backend)` runs the Triton kernels.

    "auto" (unless COLT5_ROUTER_BACKEND says otherwise): CUDA tensors in float32/bfloat16/float16 do; "torch":
    never; "triton": always, which needs CUDA tensors or TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests).
    """
    if backend not in ROUTER_BACKENDS:
        raise ValueError(f"router backend must be one of {ROUTER_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = os.environ.get("COLT5_ROUTER_BACKEND", "auto")
        if backend not in ROUTER_BACKENDS:
            raise ValueError(f"COLT5_ROUTER_BACKEND must be one of {ROUTER_BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return False
    if backend == "auto":
        return scores.is_cuda and scores.dtype in KERNEL_DTYPES
    if scores.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"The Triton router takes float32, bfloat16 or float16 scores, got {scores.dtype}; use the "
            "'torch' or 'auto' router backend for float64."
        )
    if not scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"The Triton router needs CUDA tensors, got scores on {scores.device}; use the 'auto' or 'torch' "
            "router backend, or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter."
        )
    return True


def soft_topk(
    scores: torch.Tensor,
    k: torch.Tensor | float,
    valid: torch.Tensor | None = None,
    eps: float = 1.0,
    n_iters: int | None = None,
    eps_schedule: Sequence[float] | None = None,
    backend: str = "auto",
    max_amount: float | None = None,
) -> torch.Tensor:
    """Soft top-k weights of each row of `scores`.

    Args:
        scores: `(..., n)` router scores, any float dtype (computed in float32, float64 stays float64).
        k: amount per row, a number or a tensor of shape `(...)`; rows with `k >=` their valid count get
            lambda = 1 on every valid token (and zero gradient).
        valid: `(..., n)` bool, False for tokens that take no part (they get lambda = 0); None = all valid.
        eps: entropy weight (the final eps when a schedule is given).
        n_iters: None for the exact fixed point, else the number of coordinate-descent iterations.
        eps_schedule: `(start, decay)` for eps-scaling over the iterations (iterative mode only).
        backend: "auto", "torch" or "triton" (see `uses_triton`).
        max_amount: a bound on the amounts `k` known to the caller. The PyTorch exact mode sorts that many top
            scores; without it (and with a tensor `k`) it reads `k.max()` from the device, a host synchronisation
            and a break in a torch.compile graph.

    Returns:
        `(..., n)` lambdas in [0, 1] summing to `min(k, valid count)` per row (exactly in exact mode), in the
        compute dtype. Fully masked rows give zeros.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}.")
    if n_iters is None and eps_schedule is not None:
        raise ValueError("eps_schedule needs n_iters: the exact mode has no iterations to schedule.")
    if n_iters is not None and n_iters < 1:
        raise ValueError(f"n_iters must be None (exact) or >= 1, got {n_iters}.")
    dtype = _compute_dtype(scores.dtype)
    *batch_shape, n = scores.shape
    if torch.is_tensor(k):
        k_rows = k.to(device=scores.device, dtype=dtype).expand(batch_shape).reshape(-1)
    else:
        k_rows = _constant_amounts(float(k), math.prod(batch_shape), dtype, scores.device)
    if uses_triton(scores, backend):
        from .soft_topk_triton import ExactSoftTopk, IterativeSoftTopk

        rows = scores.reshape(-1, n).contiguous()
        valid_rows = None if valid is None else valid.expand_as(scores).reshape(-1, n).contiguous()
        if n_iters is None:
            lambdas = ExactSoftTopk.apply(rows, k_rows.contiguous(), valid_rows, float(eps))
        else:
            steps = eps_steps_for(n_iters, eps, eps_schedule)
            lambdas = IterativeSoftTopk.apply(rows, k_rows.contiguous(), valid_rows, steps)
        return lambdas.reshape(*batch_shape, n)
    rows = scores.reshape(-1, n).to(dtype)
    valid_rows = (
        torch.ones_like(rows, dtype=torch.bool) if valid is None else valid.expand_as(scores).reshape(-1, n)
    )
    if n_iters is None:
        bound = max_amount if max_amount is not None or torch.is_tensor(k) else float(k)
        lambdas = _ExactSoftTopk.apply(rows, k_rows, valid_rows, float(eps), bound)
    else:
        lambdas = _IterativeSoftTopk.apply(rows, k_rows, valid_rows, eps_steps_for(n_iters, eps, eps_schedule))
    return lambdas.reshape(*batch_shape, n)


def reference_eps_schedule(eps: float, eps_init: float | None, eps_decay: float) -> tuple[float, float] | None:
    """colt5-attention's eps-scaling (`eps_init`, default eps, and `eps_decay`) as an `eps_schedule`; None where
    every step would use eps itself."""
    start = eps if eps_init is None else eps_init
    return None if start <= eps and eps_decay <= 1.0 else (float(start), float(eps_decay))


def coor_descent(
    s: torch.Tensor,
    *,
    n_iters: int,
    k: torch.Tensor | float,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """colt5-attention's `coor_descent`: the soft top-k of each row of `s` `(..., n)` after `n_iters` coordinate-
    descent iterations, eps-scaled from `eps_init` by `eps_decay` per step down to `eps`.

    Args:
        s: `(..., n)` scores.
        n_iters: iterations, >= 1.
        k: amount per row, a number or a `(...)` tensor.
        eps, eps_init, eps_decay: the entropy weight, floored at `eps`.
        mask: `(..., n)` bool, False for entries that take no part (they get 0).

    Returns:
        `(..., n)` weights in [0, 1], in float32 (float64 stays float64). They equal colt5-attention's once the
        schedule has reached `eps` by the last iteration; before that, colt5-attention divides the final weights
        by one more decayed eps than its last iteration used, and this function by the last iteration's.
    """
    schedule = reference_eps_schedule(eps, eps_init, eps_decay)
    return soft_topk(s, k, mask, eps=eps, n_iters=n_iters, eps_schedule=schedule, backend="torch")


class TopkReturn(NamedTuple):
    """colt5-attention's `topk` result: `values` (the inputs at `indices`, times the straight-through gates),
    `indices`, and the soft top-k weights (`coor_descent_values`) and straight-through `gates` there (None for a
    non-differentiable top-k)."""

    values: torch.Tensor
    indices: torch.Tensor
    coor_descent_values: torch.Tensor | None
    gates: torch.Tensor | None


def topk(
    x: torch.Tensor,
    k: int,
    coor_descent_k_ratio: float = 9 / 8,
    n_iters: int = 20,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: torch.Tensor | None = None,
    fused: bool = False,
    non_differentiable: bool = False,
) -> TopkReturn:
    """colt5-attention's differentiable top-k over the last dimension of `x` `(..., n)`.

    The top k entries are chosen by value (entries where `mask` is False never are); their gates are 1 in the
    forward pass and carry the gradient of the soft top-k over `coor_descent_k_ratio * k` entries (`coor_descent`
    settings), so `values` are differentiable. `fused` runs the soft top-k's Triton kernels where x is on CUDA.
    """
    if k < 1 or k > x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}] (the last dimension of x), got {k}.")
    if coor_descent_k_ratio < 1:
        raise ValueError(f"coor_descent_k_ratio must be >= 1, got {coor_descent_k_ratio}.")
    candidates = x if mask is None else x.masked_fill(~mask.bool(), -math.inf)
    if non_differentiable:
        values, indices = candidates.topk(k, dim=-1)
        return TopkReturn(x.gather(-1, indices), indices, None, None)
    lambdas = soft_topk(
        x,
        min(k * coor_descent_k_ratio, x.shape[-1]),
        mask,
        eps=eps,
        n_iters=n_iters,
        eps_schedule=reference_eps_schedule(eps, eps_init, eps_decay),
        backend="auto" if fused else "torch",
    )
    gates = lambdas + (1.0 - lambdas).detach()
    indices = candidates.topk(k, dim=-1).indices
    gates_at = gates.gather(-1, indices)
    return TopkReturn(x.gather(-1, indices) * gates_at.to(x.dtype), indices, lambdas.gather(-1, indices), gates_at)
