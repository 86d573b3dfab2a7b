"""The soft top-k against the paper's literal coordinate descent (float64, autograd through every iteration)."""

import math

import pytest
import torch

from colt5.soft_topk import eps_steps_for, soft_topk


def literal_coordinate_descent(scores, k, valid, eps_steps):
    """The paper's algorithm as written (CoLT5 appendix C), masked tokens excluded, autograd-differentiable."""
    a = torch.zeros(scores.shape[:-1] + (1,), dtype=scores.dtype)
    b = -scores
    for eps in eps_steps:
        a = eps * (math.log(k) - torch.logsumexp(((scores + b) / eps).masked_fill(~valid, -math.inf), -1, keepdim=True))
        b = -torch.relu(scores + a)
    return torch.exp((scores + a + b) / eps_steps[-1]).masked_fill(~valid, 0.0)


def random_problem(rows=4, n=300, std=1.0, masked_fraction=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, n, dtype=torch.float64, generator=gen) * std
    valid = torch.rand(rows, n, generator=gen) > masked_fraction
    return scores, valid


@pytest.mark.parametrize("std,eps", [(1.0, 1.0), (3.0, 1.0), (3.0, 0.1), (10.0, 0.5)])
def test_exact_mode_is_the_fixed_point(std, eps):
    scores, valid = random_problem(std=std)
    k = 20.25
    lambdas = soft_topk(scores, k, valid, eps=eps)
    converged = literal_coordinate_descent(scores, k, valid, [eps] * 3000)
    torch.testing.assert_close(lambdas, converged, rtol=0, atol=1e-10)
    torch.testing.assert_close(lambdas.sum(-1), torch.full((4,), k, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (lambdas[~valid] == 0).all()
    assert ((lambdas[valid] > 0) & (lambdas[valid] <= 1)).all()


def test_exact_mode_keeps_precision_when_top_scores_dominate():
    # exp(100) would swamp the rest of the row if the tail sums were computed by subtraction.
    scores = torch.zeros(1, 64, dtype=torch.float64)
    scores[0, 0] = 100.0
    lambdas = soft_topk(scores, 2.0, eps=1.0)
    assert lambdas[0, 0] == 1.0
    torch.testing.assert_close(lambdas[0, 1:], torch.full((63,), 1 / 63, dtype=torch.float64))


@pytest.mark.parametrize("schedule", [None, (4.0, 0.7)])
def test_iterative_mode_equals_literal_iterations(schedule):
    scores, valid = random_problem(std=2.0, seed=1)
    steps = eps_steps_for(20, 0.5, schedule)
    lambdas = soft_topk(scores, 12.0, valid, eps=0.5, n_iters=20, eps_schedule=schedule)
    torch.testing.assert_close(lambdas, literal_coordinate_descent(scores, 12.0, valid, steps), rtol=0, atol=1e-12)


def test_eps_schedule_is_floored_at_eps():
    assert eps_steps_for(4, 0.5, (4.0, 0.5)) == (4.0, 2.0, 1.0, 0.5)
    assert eps_steps_for(6, 0.5, (4.0, 0.5))[-1] == 0.5
    assert eps_steps_for(3, 0.3) == (0.3, 0.3, 0.3)


def test_exact_and_iterative_agree_where_the_iteration_converges():
    scores, valid = random_problem(std=1.0, seed=2)
    exact = soft_topk(scores, 30.0, valid, eps=1.0)
    iterative = soft_topk(scores, 30.0, valid, eps=1.0, n_iters=50)
    torch.testing.assert_close(exact, iterative, rtol=0, atol=1e-10)


def test_iterative_mode_stops_short_where_it_converges_slowly():
    # router.md fact 3: at small eps many top scores saturate and 50 iterations are far from the fixed point.
    scores, _ = random_problem(rows=2, n=4096, std=3.0, masked_fraction=0.0, seed=3)
    iterative = soft_topk(scores, 256.0, eps=0.1, n_iters=50)
    assert (iterative.sum(-1) - 256.0).abs().min() > 10.0
    torch.testing.assert_close(soft_topk(scores, 256.0, eps=0.1).sum(-1), torch.full((2,), 256.0, dtype=torch.float64))


@pytest.mark.parametrize("mode", [dict(), dict(n_iters=15), dict(n_iters=15, eps_schedule=(3.0, 0.8))])
def test_gradcheck(mode):
    scores, valid = random_problem(rows=3, n=40, std=1.5, seed=4)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 7.5, valid, eps=0.7, **mode), (scores,))


@pytest.mark.parametrize("mode", ["exact", "iterative"])
def test_gradient_equals_autograd_through_the_literal_iterations(mode):
    scores, valid = random_problem(rows=3, n=60, std=2.0, seed=5)
    upstream = torch.randn(3, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    iterations = 400 if mode == "exact" else 25
    ours = scores.clone().requires_grad_(True)
    theirs = scores.clone().requires_grad_(True)
    n_iters = None if mode == "exact" else iterations
    (soft_topk(ours, 9.0, valid, eps=0.8, n_iters=n_iters) * upstream).sum().backward()
    (literal_coordinate_descent(theirs, 9.0, valid, [0.8] * iterations) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-10)


def test_per_row_amounts_and_saturated_rows():
    scores, valid = random_problem(rows=3, n=50, masked_fraction=0.0, seed=7)
    valid[2, 10:] = False  # 10 valid tokens, amount 12: every valid token gets 1
    k = torch.tensor([5.0, 20.0, 12.0], dtype=torch.float64)
    scores.requires_grad_(True)
    lambdas = soft_topk(scores, k, valid)
    torch.testing.assert_close(lambdas[:2].sum(-1), k[:2])
    assert (lambdas[2, :10] == 1).all() and (lambdas[2, 10:] == 0).all()
    lambdas.sum().backward()
    assert (scores.grad[2] == 0).all()


@pytest.mark.parametrize("n_iters", [None, 10])
def test_fully_masked_row_gives_zeros_not_nan(n_iters):
    scores, valid = random_problem(rows=2, n=30, seed=8)
    valid[1] = False
    scores.requires_grad_(True)
    lambdas = soft_topk(scores, 4.0, valid, n_iters=n_iters)
    lambdas.sum().backward()
    assert (lambdas[1] == 0).all() and torch.isfinite(lambdas).all()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_scores_are_normalised_in_float32(dtype):
    scores, valid = random_problem(rows=2, n=200, seed=9)
    lambdas = soft_topk(scores.to(dtype), 16.0, valid)
    assert lambdas.dtype == torch.float32
    reference = soft_topk(scores.to(dtype).double(), 16.0, valid)
    torch.testing.assert_close(lambdas.double(), reference, rtol=0, atol=1e-5)


def test_bad_arguments_raise():
    scores = torch.randn(2, 10)
    with pytest.raises(ValueError, match="eps"):
        soft_topk(scores, 2.0, eps=0.0)
    with pytest.raises(ValueError, match="n_iters"):
        soft_topk(scores, 2.0, n_iters=0)
    with pytest.raises(ValueError, match="eps_schedule"):
        soft_topk(scores, 2.0, eps_schedule=(4.0, 0.7))
