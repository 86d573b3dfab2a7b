# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Triton kernels for the soft top-k (soft_topk.py holds the PyTorch reference and the dispatch).

Rows up to FUSED_MAX_TOKENS run in one program per row (one launch forward, one backward). Longer rows are split
into chunks, one program per (row, chunk), so a row of any length uses the whole GPU and no program ever holds a
whole row.

Exact mode: find the threshold `t = -alpha` with `F(t) = sum_j min(exp(z_j - t), 1) = k` (z = scores / eps).
F falls as t rises, and every pass over a row measures, at THRESHOLDS trial thresholds at once, the count of
z_j >= t and the sum of exp(z_j - t) below it: F exactly at each trial. The trials keep a bracket [lo, hi] around
the answer with F(hi) <= k <= F(lo). F is concave in u = exp(-t), so Newton's step from hi never overshoots (an
upper bound on t) and the secant through lo and hi never undershoots (a lower bound); the next trials are those
two bounds and points between them. A row is done when the bounds are 4e-6 (plus two float32 ulps of t) apart,
or no token lies between lo and hi (then Newton's step is exact). Chunked launches: row maxima and
log-sum-exps; REFINE_PASSES parallel trial passes (normal scores of std 1 settle in the first); one program per
row that finishes any row still open (heavy-tailed scores) by serial passes; the write of lambda. The backward
is the implicit gradient `w * (g - sum(w g) / sum(w))` with `w = lambda / eps` where 0 < lambda < 1: a
reduction and a write.

Iterative mode: the coordinate descent is a recursion on one shift per row (soft_topk.py), so one program per row
runs it (a pass over the row per iteration, served from L2 for long rows) and stores each iteration's shift,
log-sum-exp and count of capped tokens. The backward replays that scalar recursion in every program and needs one
reduction and one write pass, whatever the iteration count.

All arithmetic is float32; scores may be float32, bfloat16 or float16. The float argument eps is a compile-time
constant (`tl.constexpr`): Inductor passes a Python float to a kernel it launches as float64 (eager Triton, as
float32), which would widen the arithmetic around it, and stops a kernel from building where a float32 loop
variable meets it.
"""

from __future__ import annotations

import functools

import torch


try:  # transformers' remote-code check skips imports in try blocks: loading a model never requires triton.
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "The Triton router needs the `triton` package (pip install triton). Without it, route with the PyTorch "
        "router: config.router_backend='torch' or the environment variable COLT5_ROUTER_BACKEND=torch."
    ) from error


BLOCK = 1024  # elements per loop step of a program
NUM_WARPS = 4  # warps per program of the chunked kernels
PROGRAMS_PER_MULTIPROCESSOR = 4  # chunked rows: aim for this many programs per multiprocessor
THRESHOLDS = 8  # trial thresholds per pass
REFINE_PASSES = 2  # parallel trial passes before the per-row finish
MAX_SPAN = tl.constexpr(40.0)  # trials within this many units of z share one exp per token
FINISH_PASSES = 96  # bound on the serial passes of a row (each narrows its bracket several-fold)
STATE_SLOTS = 24  # per-row solver state: 12 scalars (see _load_state) and the THRESHOLDS trials
STATE = tl.constexpr(STATE_SLOTS)
RESIDENT_MAX_TOKENS = 65536  # the iterative forward keeps rows up to this length in registers


@triton.jit
def _load_z(scores_ptr, valid_ptr, row, idx, n, eps, HAS_MASK: tl.constexpr):
    inside = idx < n
    z = tl.load(scores_ptr + row * n + idx, mask=inside, other=0.0).to(tl.float32) / eps
    ok = inside
    if HAS_MASK:
        ok = ok & (tl.load(valid_ptr + row * n + idx, mask=inside, other=0) != 0)
    return z, ok


@triton.jit
def _span_stats(scores_ptr, valid_ptr, row, start, stop, n, eps, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Max of z, sum of exp(z - max) and valid count over tokens start..stop of a row. The running max is a
    scalar updated once per block, so a token costs one exp."""
    offs = tl.arange(0, BLOCK)
    running_max = tl.full([], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    lane_count = tl.zeros([BLOCK], tl.float32)
    for block_start in range(start, stop, BLOCK):
        z, ok = _load_z(scores_ptr, valid_ptr, row, block_start + offs, n, eps, HAS_MASK)
        z = tl.where(ok, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 0))
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(running_max - finite_max) + tl.exp(z - finite_max)
        running_max = new_max
        lane_count += ok.to(tl.float32)
    return running_max, tl.sum(lane_sum, 0), tl.sum(lane_count, 0)


@triton.jit
def _row_stats_kernel(scores_ptr, valid_ptr, stats_ptr, n, chunk, eps: tl.constexpr, HAS_MASK: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    span_max, span_sum, span_count = _span_stats(
        scores_ptr, valid_ptr, row, part * chunk, part * chunk + chunk, n, eps, HAS_MASK, BLOCK
    )
    base = stats_ptr + (row * tl.num_programs(1) + part) * 3
    tl.store(base, span_max)
    tl.store(base + 1, span_sum)
    tl.store(base + 2, span_count)


@triton.jit
def _start_state(row_max, total, count, k):
    """Row mode and first bracket: hi = t0 = logsumexp(z) - log k, the threshold with no saturated token, an
    upper bound on t (F(t0) <= k); lo unknown. Modes: 0 normal, 1 k >= valid count (lambda = 1 on valid
    tokens), 2 k <= 0 (lambda = 0); rows of modes 1 and 2 start settled."""
    finite_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    mode = tl.where(k >= count, 1.0, tl.where(k <= 0.0, 2.0, 0.0))
    t0 = finite_max + tl.log(tl.maximum(total, 1e-30) / tl.maximum(k, 1e-30))
    # First trials just below t0: for normal scores of std 1, t0 - t is under 1% of t0 (little mass above t0),
    # and trials that close settle such rows in one parallel pass.
    step = 2e-3 * tl.maximum(tl.abs(t0), 1.0)
    zero = tl.full([], 0.0, tl.float32)
    return t0, zero, zero, zero, t0, zero, zero, zero, step, (mode != 0.0).to(tl.float32), mode


@triton.jit
def _initial_state(stats_ptr, row, parts, k, P2: tl.constexpr):
    """`_start_state` from the per-chunk statistics of a row."""
    p = tl.arange(0, P2)
    inside = p < parts
    base = stats_ptr + (row * parts + p) * 3
    chunk_max = tl.load(base, mask=inside, other=float("-inf"))
    row_max = tl.max(chunk_max, 0)
    finite_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(tl.load(base + 1, mask=inside, other=0.0) * tl.exp(chunk_max - finite_max), 0)
    count = tl.sum(tl.load(base + 2, mask=inside, other=0.0), 0)
    return _start_state(row_max, total, count, k)


@triton.jit
def _load_state(state_ptr, row):
    base = state_ptr + row * STATE
    return (
        tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),  # hi: t, count, sum, known
        tl.load(base + 4), tl.load(base + 5), tl.load(base + 6), tl.load(base + 7),  # lo: t, count, sum, known
        tl.load(base + 8), tl.load(base + 9), tl.load(base + 11),  # step, done, mode
    )


@triton.jit
def _store_state(state_ptr, row, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, t, mode, trials,
                 T: tl.constexpr):
    base = state_ptr + row * STATE
    tl.store(base, hi_t)
    tl.store(base + 1, hi_c)
    tl.store(base + 2, hi_s)
    tl.store(base + 3, hi_known)
    tl.store(base + 4, lo_t)
    tl.store(base + 5, lo_c)
    tl.store(base + 6, lo_s)
    tl.store(base + 7, lo_known)
    tl.store(base + 8, step)
    tl.store(base + 9, done)
    tl.store(base + 10, t)
    tl.store(base + 11, mode)
    tl.store(base + 12 + tl.arange(0, T), trials)


@triton.jit
def _update_bracket(trials, counts, sums, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, done,
                    T: tl.constexpr):
    """Tighten [lo, hi] with F measured at the trials (sorted descending; sums relative to each trial). Settled
    rows keep their bracket (their trials were not measured)."""
    j = tl.arange(0, T)
    f = counts + sums
    last_hi = tl.max(tl.where(f <= k, j, -1), 0)  # smallest trial threshold with F <= k
    first_lo = tl.min(tl.where(f >= k, j, T), 0)  # largest trial threshold with F >= k
    new_hi = (last_hi >= 0) & (done == 0.0)
    new_lo = (first_lo < T) & (done == 0.0)
    hi_t = tl.where(new_hi, tl.sum(tl.where(j == last_hi, trials, 0.0), 0), hi_t)
    hi_c = tl.where(new_hi, tl.sum(tl.where(j == last_hi, counts, 0.0), 0), hi_c)
    hi_s = tl.where(new_hi, tl.sum(tl.where(j == last_hi, sums, 0.0), 0), hi_s)
    hi_known = tl.where(new_hi, 1.0, hi_known)
    lo_t = tl.where(new_lo, tl.sum(tl.where(j == first_lo, trials, 0.0), 0), lo_t)
    lo_c = tl.where(new_lo, tl.sum(tl.where(j == first_lo, counts, 0.0), 0), lo_c)
    lo_s = tl.where(new_lo, tl.sum(tl.where(j == first_lo, sums, 0.0), 0), lo_s)
    lo_known = tl.where(new_lo, 1.0, lo_known)
    return hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known


@triton.jit
def _next_trials(k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, max_span,
                 T: tl.constexpr):
    """Bounds from the bracket, whether they settle the row, and the next trial thresholds (descending)."""
    newton_ok = (hi_known != 0.0) & (hi_s > 0.0) & (k > hi_c)
    # (Logs taken apart: hi_s can be subnormal, and hi_s / (k - hi_c) would flush to zero.)
    newton = hi_t + tl.log(tl.where(newton_ok, hi_s, 1.0)) - tl.log(tl.where(newton_ok, k - hi_c, 1.0))
    upper = tl.where(newton_ok, tl.minimum(newton, hi_t), hi_t)
    upper = tl.where(lo_known != 0.0, tl.maximum(upper, lo_t), upper)  # rounding must not leave the bracket
    # Secant in u = exp(hi_t - t) through F(hi) at u = 1 and F(lo) at u_lo.
    f_hi = hi_c + hi_s
    f_lo = lo_c + lo_s
    # (Beyond a gap of 80, exp(gap) leaves float32: the bracket end itself is the bound.)
    secant = (lo_known != 0.0) & (f_lo > f_hi) & (hi_t - lo_t < 80.0)
    u_lo = tl.exp(tl.where(secant, hi_t - lo_t, 0.0))
    u = 1.0 + (k - f_hi) * (u_lo - 1.0) / tl.where(secant, f_lo - f_hi, 1.0)
    lower = tl.where(secant, hi_t - tl.log(tl.maximum(u, 1.0)), lo_t)
    lower = tl.minimum(tl.maximum(lower, lo_t), upper)
    no_token_between = (hi_known != 0.0) & (lo_c == hi_c)
    # Settled when the bounds pin t to 4e-6 plus two float32 ulps of t: lambda = exp(z - t) at the midpoint then has
    # relative error <= 2e-6 beyond what float32 can resolve of z.
    settled = (lo_known != 0.0) & (no_token_between | (upper - lower <= 4e-6 + 2.4e-7 * tl.abs(upper)))
    done = tl.where(settled, 1.0, done)
    threshold = tl.where(no_token_between, upper, 0.5 * (upper + lower))
    j = tl.arange(0, T).to(tl.float32)
    between = upper + (lower - upper) * j / (T - 1)
    # Below `upper` with no lower bound yet: offsets 0 and step * sqrt(2)^(j - 1); the step grows past the last.
    search = upper - step * tl.where(j == 0.0, 0.0, tl.exp2(0.5 * (j - 1.0)))
    search = tl.maximum(search, upper - max_span)
    trials = tl.where(lo_known != 0.0, between, search)
    step = tl.where(lo_known != 0.0, step, tl.minimum(step * tl.exp2(0.5 * (T - 1)), max_span))
    return trials, threshold, step, done


@triton.jit
def _trial_sums(scores_ptr, valid_ptr, row, start, stop, n, eps, trials, HAS_MASK: tl.constexpr,
                SHARED_EXP: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """Count of z >= trial and sum of exp(z - trial) over z < trial, for tokens start..stop of a row.

    SHARED_EXP computes one exp per token, relative to the largest trial (exact while the trials span less than
    MAX_SPAN); otherwise one exp per token and trial, for any span."""
    offs = tl.arange(0, BLOCK)
    top = tl.max(trials, 0)
    lane_counts = tl.zeros([BLOCK, T], tl.float32)
    lane_sums = tl.zeros([BLOCK, T], tl.float32)
    for block_start in range(start, stop, BLOCK):
        z, ok = _load_z(scores_ptr, valid_ptr, row, block_start + offs, n, eps, HAS_MASK)
        above = z[:, None] >= trials[None, :]
        lane_counts += tl.where(ok[:, None] & above, 1.0, 0.0)
        if SHARED_EXP:
            e = tl.exp(tl.minimum(z - top, 0.0))
            lane_sums += tl.where(ok[:, None] & ~above, e[:, None], 0.0)
        else:
            lane_sums += tl.where(ok[:, None] & ~above, tl.exp(tl.minimum(z[:, None] - trials[None, :], 0.0)), 0.0)
    sums = tl.sum(lane_sums, 0)
    if SHARED_EXP:
        sums = sums * tl.exp(top - trials)
    return tl.sum(lane_counts, 0), sums


@triton.jit
def _refine_kernel(scores_ptr, valid_ptr, k_ptr, stats_ptr, state_in_ptr, sums_in_ptr, state_out_ptr, sums_out_ptr,
                   n, chunk, eps: tl.constexpr, FIRST: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                   T: tl.constexpr, P2: tl.constexpr):
    """One parallel trial pass: every program of a row combines the previous pass (same result in each), picks
    the trials, and measures them on its chunk. Program 0 of the row records the state for the next launch."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    k = tl.load(k_ptr + row)
    if FIRST:
        hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, mode = _initial_state(
            stats_ptr, row, parts, k, P2
        )
    else:
        hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, mode = _load_state(state_in_ptr, row)
        counts, sums = _combine_sums(sums_in_ptr, row, parts, T, P2)
        trials = tl.load(state_in_ptr + row * STATE + 12 + tl.arange(0, T))
        hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known = _update_bracket(
            trials, counts, sums, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, done, T
        )
    trials, threshold, step, done = _next_trials(
        k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, MAX_SPAN, T
    )
    if part == 0:
        _store_state(state_out_ptr, row, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, threshold,
                     mode, trials, T)
    if done == 0.0:
        counts, sums = _trial_sums(scores_ptr, valid_ptr, row, part * chunk, part * chunk + chunk, n, eps, trials,
                                   HAS_MASK, True, BLOCK, T)
        base = sums_out_ptr + (row * parts + part) * 2 * T + tl.arange(0, T)
        tl.store(base, counts)
        tl.store(base + T, sums)


@triton.jit
def _combine_sums(sums_ptr, row, parts, T: tl.constexpr, P2: tl.constexpr):
    p = tl.arange(0, P2)[:, None]
    j = tl.arange(0, T)[None, :]
    inside = (p < parts) & (j < T)
    base = sums_ptr + (row * parts + p) * 2 * T + j
    counts = tl.sum(tl.load(base, mask=inside, other=0.0), 0)
    sums = tl.sum(tl.load(base + T, mask=inside, other=0.0), 0)
    return counts, sums


@triton.jit
def _settle(scores_ptr, valid_ptr, row, n, eps, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step,
            done, trials, threshold, max_passes, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """Serial trial passes over a whole row until it is settled; returns the threshold and the pass count.
    A pass shares one exp per token when the trials span less than MAX_SPAN, else takes one per trial."""
    passes = 0
    while (done == 0.0) & (passes < max_passes):
        if tl.max(trials, 0) - tl.min(trials, 0) < MAX_SPAN:
            counts, sums = _trial_sums(scores_ptr, valid_ptr, row, 0, n, n, eps, trials, HAS_MASK, True, BLOCK, T)
        else:
            counts, sums = _trial_sums(scores_ptr, valid_ptr, row, 0, n, n, eps, trials, HAS_MASK, False, BLOCK, T)
        hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known = _update_bracket(
            trials, counts, sums, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, done, T
        )
        trials, threshold, step, done = _next_trials(
            k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, float("inf"), T
        )
        passes += 1
    return threshold, passes


@triton.jit
def _finish_kernel(scores_ptr, valid_ptr, k_ptr, state_ptr, sums_ptr, final_ptr, n, eps: tl.constexpr, parts,
                   max_passes, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr, P2: tl.constexpr):
    """One program per row: takes the last parallel pass in and settles rows still open by serial passes.
    Writes the threshold, the row mode and the serial pass count."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(k_ptr + row)
    hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, mode = _load_state(state_ptr, row)
    threshold = tl.load(state_ptr + row * STATE + 10)
    passes = 0
    if done == 0.0:
        counts, sums = _combine_sums(sums_ptr, row, parts, T, P2)
        trials = tl.load(state_ptr + row * STATE + 12 + tl.arange(0, T))
        hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known = _update_bracket(
            trials, counts, sums, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, done, T
        )
        trials, threshold, step, done = _next_trials(
            k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, float("inf"), T
        )
        threshold, passes = _settle(scores_ptr, valid_ptr, row, n, eps, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c,
                                lo_s, lo_known, step, done, trials, threshold, max_passes, HAS_MASK, BLOCK, T)
    tl.store(final_ptr + row * 3, threshold)
    tl.store(final_ptr + row * 3 + 1, mode)
    tl.store(final_ptr + row * 3 + 2, passes.to(tl.float32))


@triton.jit
def _write_lambdas(scores_ptr, valid_ptr, lambdas_ptr, row, start, stop, n, eps, threshold, mode,
                   HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for block_start in range(start, stop, BLOCK):
        z, ok = _load_z(scores_ptr, valid_ptr, row, block_start + offs, n, eps, HAS_MASK)
        lam = tl.exp(tl.minimum(z - threshold, 0.0))
        lam = tl.where(mode == 1.0, 1.0, tl.where(mode == 2.0, 0.0, lam))
        tl.store(lambdas_ptr + row * n + block_start + offs, tl.where(ok, lam, 0.0), mask=block_start + offs < n)


@triton.jit
def _write_lambdas_kernel(scores_ptr, valid_ptr, final_ptr, lambdas_ptr, n, chunk, eps: tl.constexpr,
                          HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    threshold = tl.load(final_ptr + row * 3)
    mode = tl.load(final_ptr + row * 3 + 1)
    _write_lambdas(scores_ptr, valid_ptr, lambdas_ptr, row, part * chunk, part * chunk + chunk, n, eps, threshold,
                   mode, HAS_MASK, BLOCK)


@triton.jit
def _exact_row_kernel(scores_ptr, valid_ptr, k_ptr, lambdas_ptr, final_ptr, n, eps: tl.constexpr, max_passes,
                      HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """The whole exact forward of a row in one program (rows short enough, or enough rows, to fill the GPU):
    statistics, serial trial passes, lambda."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(k_ptr + row)
    row_max, total, count = _span_stats(scores_ptr, valid_ptr, row, 0, n, n, eps, HAS_MASK, BLOCK)
    hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, mode = _start_state(
        row_max, total, count, k
    )
    trials, threshold, step, done = _next_trials(
        k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s, lo_known, step, done, float("inf"), T
    )
    threshold, passes = _settle(scores_ptr, valid_ptr, row, n, eps, k, hi_t, hi_c, hi_s, hi_known, lo_t, lo_c, lo_s,
                            lo_known, step, done, trials, threshold, max_passes, HAS_MASK, BLOCK, T)
    tl.store(final_ptr + row * 3, threshold)
    tl.store(final_ptr + row * 3 + 1, mode)
    tl.store(final_ptr + row * 3 + 2, passes.to(tl.float32))
    _write_lambdas(scores_ptr, valid_ptr, lambdas_ptr, row, 0, n, n, eps, threshold, mode, HAS_MASK, BLOCK)


@triton.jit
def _capped_terms(s, ok, cap, eps, ref):
    """Lane terms of one coordinate-descent step: exp(s / eps - ref) below the cap, and the capped count."""
    below = s < cap
    return tl.where(ok & below, tl.exp(s / eps - ref), 0.0), tl.where(ok & ~below, 1.0, 0.0)


@triton.jit
def _iterative_forward_kernel(scores_ptr, valid_ptr, k_ptr, eps_ptr, lambdas_ptr, shifts_ptr, lse_ptr, capped_ptr,
                              n, n_steps, HAS_MASK: tl.constexpr, RESIDENT: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the paper's coordinate descent as its recursion on the shift a (see soft_topk.py),
    a_{t+1} = eps_t * (log k - logsumexp_j(min(s_j, -a_t) / eps_t)). Stores a_t, the log-sum-exp and the count of
    capped tokens of each iteration for the backward pass. Rows with k >= valid count (or k <= 0) store
    a = 0, logsumexp = inf, count = 0, which makes their backward terms vanish. RESIDENT: the row fits one
    BLOCK and stays in registers across the iterations; otherwise every iteration re-reads it (from L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    k = tl.load(k_ptr + row)
    if RESIDENT:
        s_row, ok_row = _load_z(scores_ptr, valid_ptr, row, offs, n, 1.0, HAS_MASK)
        row_max = tl.max(tl.where(ok_row, s_row, float("-inf")), 0)
        count = tl.sum(ok_row.to(tl.float32), 0)
    else:
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_count = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            s, ok = _load_z(scores_ptr, valid_ptr, row, start + offs, n, 1.0, HAS_MASK)
            lane_max = tl.maximum(lane_max, tl.where(ok, s, float("-inf")))
            lane_count += ok.to(tl.float32)
        row_max = tl.max(lane_max, 0)
        count = tl.sum(lane_count, 0)
    normal = (k < count) & (k > 0.0)
    log_k = tl.log(tl.where(normal, k, 1.0))
    shift = tl.where(normal, tl.load(eps_ptr) * (log_k - tl.log(tl.maximum(count, 1.0))), 0.0)
    tl.store(shifts_ptr + row * n_steps, shift)
    tl.store(lse_ptr + row * n_steps, float("inf"))
    tl.store(capped_ptr + row * n_steps, 0.0)
    for step in range(1, n_steps):
        eps = tl.load(eps_ptr + step)
        cap = -shift
        ref = tl.minimum(row_max, cap) / eps
        if RESIDENT:
            lane_sum, lane_capped = _capped_terms(s_row, ok_row, cap, eps, ref)
        else:
            lane_sum = tl.zeros([BLOCK], tl.float32)
            lane_capped = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n, BLOCK):
                s, ok = _load_z(scores_ptr, valid_ptr, row, start + offs, n, 1.0, HAS_MASK)
                block_sum, block_capped = _capped_terms(s, ok, cap, eps, ref)
                lane_sum += block_sum
                lane_capped += block_capped
        capped = tl.sum(lane_capped, 0)
        lse = ref + tl.log(tl.sum(lane_sum, 0) + capped * tl.exp(cap / eps - ref))
        shift = tl.where(normal, eps * (log_k - lse), 0.0)
        tl.store(shifts_ptr + row * n_steps + step, shift)
        tl.store(lse_ptr + row * n_steps + step, tl.where(normal, lse, float("inf")))
        tl.store(capped_ptr + row * n_steps + step, tl.where(normal, capped, 0.0))
    last_eps = tl.load(eps_ptr + n_steps - 1)
    for start in range(0, n, BLOCK):
        s, ok = _load_z(scores_ptr, valid_ptr, row, start + offs, n, 1.0, HAS_MASK)
        lam = tl.exp(tl.minimum((s + shift) / last_eps, 0.0))
        lam = tl.where(normal, lam, tl.where(k > 0.0, 1.0, 0.0))
        tl.store(lambdas_ptr + row * n + start + offs, tl.where(ok, lam, 0.0), mask=start + offs < n)


@triton.jit
def _span_weighted_sums(lambdas_ptr, grad_ptr, row, start, stop, n, eps, BLOCK: tl.constexpr):
    """Sums of w * g and of w over tokens start..stop, w = lambda / eps where 0 < lambda < 1 (the tokens whose
    lambda moves with the scores; masked tokens have lambda 0, saturated ones 1)."""
    offs = tl.arange(0, BLOCK)
    lane_wg = tl.zeros([BLOCK], tl.float32)
    lane_w = tl.zeros([BLOCK], tl.float32)
    for block_start in range(start, stop, BLOCK):
        idx = block_start + offs
        inside = idx < n
        lam = tl.load(lambdas_ptr + row * n + idx, mask=inside, other=0.0)
        g = tl.load(grad_ptr + row * n + idx, mask=inside, other=0.0).to(tl.float32)
        w = tl.where(lam < 1.0, lam, 0.0) / eps
        lane_wg += w * g
        lane_w += w
    return tl.sum(lane_wg, 0), tl.sum(lane_w, 0)


@triton.jit
def _weighted_sums_kernel(lambdas_ptr, grad_ptr, sums_ptr, n, chunk, eps: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    total_wg, total_w = _span_weighted_sums(lambdas_ptr, grad_ptr, row, part * chunk, part * chunk + chunk, n, eps,
                                            BLOCK)
    tl.store(sums_ptr + (row * tl.num_programs(1) + part) * 2, total_wg)
    tl.store(sums_ptr + (row * tl.num_programs(1) + part) * 2 + 1, total_w)


@triton.jit
def _row_weighted_sums(lambdas_ptr, grad_ptr, sums_ptr, row, n, eps, FUSED: tl.constexpr, BLOCK: tl.constexpr,
                       P2: tl.constexpr):
    """The row's sums of w * g and w: computed here (FUSED: one program per row) or from the chunk sums."""
    if FUSED:
        total_wg, total_w = _span_weighted_sums(lambdas_ptr, grad_ptr, row, 0, n, n, eps, BLOCK)
    else:
        parts = tl.num_programs(1)
        p = tl.arange(0, P2)
        base = sums_ptr + (row * parts + p) * 2
        total_wg = tl.sum(tl.load(base, mask=p < parts, other=0.0), 0)
        total_w = tl.sum(tl.load(base + 1, mask=p < parts, other=0.0), 0)
    return total_wg, total_w


@triton.jit
def _exact_backward_kernel(lambdas_ptr, grad_ptr, sums_ptr, out_ptr, n, chunk, eps: tl.constexpr, FUSED: tl.constexpr,
                           BLOCK: tl.constexpr, P2: tl.constexpr):
    """dL/ds = w * (g - sum(w g) / sum(w)) (implicit gradient of the fixed point)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    total_wg, total_w = _row_weighted_sums(lambdas_ptr, grad_ptr, sums_ptr, row, n, eps, FUSED, BLOCK, P2)
    mean = tl.where(total_w > 0.0, total_wg / tl.where(total_w > 0.0, total_w, 1.0), 0.0)
    offs = tl.arange(0, BLOCK)
    for start in range(part * chunk, part * chunk + chunk, BLOCK):
        idx = start + offs
        inside = idx < n
        lam = tl.load(lambdas_ptr + row * n + idx, mask=inside, other=0.0)
        g = tl.load(grad_ptr + row * n + idx, mask=inside, other=0.0).to(tl.float32)
        w = tl.where(lam < 1.0, lam, 0.0) / eps
        grad = w * (g - mean)
        tl.store(out_ptr + row * n + idx, grad.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _iterative_backward_kernel(scores_ptr, valid_ptr, lambdas_ptr, grad_ptr, sums_ptr, eps_ptr, shifts_ptr, lse_ptr,
                               capped_ptr, out_ptr, n, chunk, n_steps, last_eps: tl.constexpr, HAS_MASK: tl.constexpr,
                               FUSED: tl.constexpr, BLOCK: tl.constexpr, P2: tl.constexpr):
    """Backward through the shift recursion: the last shift carries G = sum(w g); step t (from the last down)
    takes G_t * softmax_t(j) from every token below its cap and passes G_{t-1} = G_t * (softmax mass of the
    capped tokens) = G_t * capped_t * exp(-a_{t-1} / eps_t - lse_t) on."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    total_wg, _ = _row_weighted_sums(lambdas_ptr, grad_ptr, sums_ptr, row, n, last_eps, FUSED, BLOCK, P2)
    offs = tl.arange(0, BLOCK)
    for start in range(part * chunk, part * chunk + chunk, BLOCK):
        idx = start + offs
        inside = idx < n
        s, ok = _load_z(scores_ptr, valid_ptr, row, idx, n, 1.0, HAS_MASK)
        lam = tl.load(lambdas_ptr + row * n + idx, mask=inside, other=0.0)
        g = tl.load(grad_ptr + row * n + idx, mask=inside, other=0.0).to(tl.float32)
        grad = tl.where(lam < 1.0, lam, 0.0) / last_eps * g
        carried = total_wg
        for back in range(0, n_steps - 1):
            step = n_steps - 1 - back
            eps = tl.load(eps_ptr + step)
            previous = tl.load(shifts_ptr + row * n_steps + step - 1)
            lse = tl.load(lse_ptr + row * n_steps + step)
            below = ok & (s < -previous)
            grad -= tl.where(below, carried * tl.exp(s / eps - lse), 0.0)
            carried = carried * tl.load(capped_ptr + row * n_steps + step) * tl.exp(-previous / eps - lse)
        tl.store(out_ptr + row * n + idx, grad.to(out_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


FUSED_MAX_TOKENS = 65536  # rows up to this length run in one program per row (fewer launches); longer ones in chunks


def _layout(rows: int, n: int, device: torch.device) -> tuple[int, int]:
    """(chunks per row, chunk length). One chunk (a program per row, FUSED kernels) for rows up to
    FUSED_MAX_TOKENS or when the rows alone fill the GPU; else PROGRAMS_PER_MULTIPROCESSOR programs per
    multiprocessor."""
    multiprocessors = _multiprocessors(device)
    if n <= FUSED_MAX_TOKENS or rows >= 2 * multiprocessors:
        return 1, triton.cdiv(n, BLOCK) * BLOCK
    parts = max(1, min(triton.cdiv(n, BLOCK), triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, rows)))
    chunk = triton.cdiv(triton.cdiv(n, parts), BLOCK) * BLOCK
    return triton.cdiv(n, chunk), chunk


def _mask_arg(valid: torch.Tensor | None, scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if valid is None:
        return scores, False  # never read
    if torch.compiler.is_compiling():
        return valid.to(torch.uint8), True  # Inductor cannot reinterpret bool storage; a copy of one byte a token
    return valid.contiguous().view(torch.uint8), True


def exact_forward(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact soft top-k of `(rows, n)` scores with `(rows,)` float32 amounts and `(rows, n)` bool `valid`.

    Returns `(rows, n)` float32 lambdas and `(rows,)` the serial passes each row needed after the parallel ones
    (a diagnostic: 0 when the parallel passes settled the row)."""
    rows, n = scores.shape
    parts, chunk = _layout(rows, n, scores.device)
    mask, has_mask = _mask_arg(valid, scores)
    f32 = dict(device=scores.device, dtype=torch.float32)
    final = torch.empty(rows, 3, **f32)
    lambdas = torch.empty(rows, n, **f32)
    if parts == 1:
        _exact_row_kernel[(rows,)](scores, mask, k, lambdas, final, n, eps, FINISH_PASSES, HAS_MASK=has_mask,
                                   BLOCK=BLOCK, T=THRESHOLDS)
        return lambdas, final[:, 2]
    p2 = triton.next_power_of_2(parts)
    stats = torch.empty(rows, parts, 3, **f32)
    states = torch.empty(REFINE_PASSES, rows, STATE_SLOTS, **f32)
    sums = torch.empty(REFINE_PASSES, rows, parts, 2, THRESHOLDS, **f32)
    grid = (rows, parts)
    _row_stats_kernel[grid](scores, mask, stats, n, chunk, eps, HAS_MASK=has_mask, BLOCK=BLOCK, num_warps=NUM_WARPS)
    for index in range(REFINE_PASSES):
        previous = max(index - 1, 0)
        _refine_kernel[grid](
            scores, mask, k, stats, states[previous], sums[previous], states[index], sums[index], n, chunk, eps,
            FIRST=index == 0, HAS_MASK=has_mask, BLOCK=BLOCK, T=THRESHOLDS, P2=p2, num_warps=NUM_WARPS,
        )
    _finish_kernel[(rows,)](scores, mask, k, states[-1], sums[-1], final, n, eps, parts, FINISH_PASSES,
                            HAS_MASK=has_mask, BLOCK=BLOCK, T=THRESHOLDS, P2=p2)
    _write_lambdas_kernel[grid](scores, mask, final, lambdas, n, chunk, eps, HAS_MASK=has_mask, BLOCK=BLOCK,
                                num_warps=NUM_WARPS)
    return lambdas, final[:, 2]


def _weighted_sums(lambdas: torch.Tensor, grad: torch.Tensor, eps: float) -> tuple[torch.Tensor, int, int]:
    """Chunk sums of w * g and w for the backward kernels (nothing to do when rows are FUSED)."""
    rows, n = lambdas.shape
    parts, chunk = _layout(rows, n, lambdas.device)
    if parts == 1:
        return lambdas, parts, chunk  # never read
    sums = torch.empty(rows, parts, 2, device=lambdas.device, dtype=torch.float32)
    _weighted_sums_kernel[(rows, parts)](lambdas, grad, sums, n, chunk, eps, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return sums, parts, chunk


def exact_backward(lambdas: torch.Tensor, grad: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    rows, n = lambdas.shape
    grad = grad.contiguous()
    sums, parts, chunk = _weighted_sums(lambdas, grad, eps)
    out = torch.empty(rows, n, device=lambdas.device, dtype=dtype)
    _exact_backward_kernel[(rows, parts)](
        lambdas, grad, sums, out, n, chunk, eps, FUSED=parts == 1, BLOCK=BLOCK, P2=triton.next_power_of_2(parts),
        num_warps=NUM_WARPS,
    )
    return out


@functools.lru_cache(maxsize=64)
def _eps_tensor(eps_steps: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(eps_steps, dtype=torch.float32, device=device)


def iterative_forward(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, eps_steps: tuple[float, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Coordinate-descent soft top-k; returns lambdas and what the backward pass needs."""
    rows, n = scores.shape
    mask, has_mask = _mask_arg(valid, scores)
    eps = _eps_tensor(eps_steps, scores.device)
    steps = len(eps_steps)
    f32 = dict(device=scores.device, dtype=torch.float32)
    lambdas = torch.empty(rows, n, **f32)
    shifts, lse, capped = (torch.empty(rows, steps, **f32) for _ in range(3))
    resident = n <= RESIDENT_MAX_TOKENS
    block = triton.next_power_of_2(n) if resident else BLOCK
    _iterative_forward_kernel[(rows,)](
        scores, mask, k, eps, lambdas, shifts, lse, capped, n, steps, HAS_MASK=has_mask, RESIDENT=resident,
        BLOCK=block, num_warps=min(32, max(4, block // 1024)),
    )
    return lambdas, (eps, shifts, lse, capped)


def iterative_backward(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    lambdas: torch.Tensor,
    grad: torch.Tensor,
    last_eps: float,
    saved: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    eps, shifts, lse, capped = saved
    rows, n = scores.shape
    grad = grad.contiguous()
    sums, parts, chunk = _weighted_sums(lambdas, grad, last_eps)
    mask, has_mask = _mask_arg(valid, scores)
    out = torch.empty(rows, n, device=scores.device, dtype=scores.dtype)
    _iterative_backward_kernel[(rows, parts)](
        scores, mask, lambdas, grad, sums, eps, shifts, lse, capped, out, n, chunk, eps.shape[0], last_eps,
        HAS_MASK=has_mask, FUSED=parts == 1, BLOCK=BLOCK, P2=triton.next_power_of_2(parts), num_warps=NUM_WARPS,
    )
    return out


class ExactSoftTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, valid, eps):
        lambdas, _ = exact_forward(scores, k, valid, eps)
        ctx.save_for_backward(lambdas)
        ctx.eps, ctx.dtype = eps, scores.dtype
        return lambdas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lambdas):
        (lambdas,) = ctx.saved_tensors
        return exact_backward(lambdas, grad_lambdas, ctx.eps, ctx.dtype), None, None, None


class IterativeSoftTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, valid, eps_steps):
        lambdas, saved = iterative_forward(scores, k, valid, eps_steps)
        ctx.save_for_backward(scores, valid, lambdas, *saved)
        ctx.last_eps = eps_steps[-1]
        return lambdas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lambdas):
        scores, valid, lambdas, *saved = ctx.saved_tensors
        grad = iterative_backward(scores, valid, lambdas, grad_lambdas, ctx.last_eps, tuple(saved))
        return grad, None, None, None
