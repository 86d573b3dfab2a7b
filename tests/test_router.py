"""Router: selection, weights, masks, routing sets, block routing, straight-through, autocast."""

import pytest
import torch

import colt5.router as router_module
from colt5.router import (
    CoordinateDescentRouter,
    TokenScorer,
    gather_tokens,
    route,
    routed_amount,
    scatter_tokens,
    validate_amount,
)
from colt5.soft_topk import soft_topk


def random_scores(batch=3, sets=2, n=100, seed=0, dtype=torch.float64):
    return torch.randn(batch, sets, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_selection_is_the_top_k_of_raw_scores_sorted_by_position():
    scores = random_scores()
    out = route(scores, 12)
    expected = scores.topk(12, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(out.indices, expected)
    assert out.mask.all()


@pytest.mark.parametrize("n_iters", [None, 30])
def test_weights_are_the_soft_topk_normalised_over_the_fetch_ratio(n_iters):
    scores = random_scores(seed=1)
    out = route(scores, 16, fetch_ratio=9 / 8, n_iters=n_iters)
    lambdas = soft_topk(scores, 18.0, n_iters=n_iters)  # 9/8 * 16
    torch.testing.assert_close(out.weights, lambdas.gather(-1, out.indices))
    assert ((out.weights > 0) & (out.weights <= 1)).all()
    # The k chosen weights are the k largest lambdas.
    assert torch.equal(out.weights.sort(-1).values, lambdas.topk(16, dim=-1).values.sort(-1).values)


def test_masked_tokens_are_never_chosen_while_valid_ones_remain():
    scores = random_scores(batch=4, sets=1, n=64, seed=2)
    mask = torch.rand(4, 64, generator=torch.Generator().manual_seed(3)) > 0.5
    scores[~mask.unsqueeze(1)] += 100.0  # padding would win if it were allowed to compete
    out = route(scores, 8, mask)
    chosen_valid = mask.gather(1, out.indices[:, 0])
    assert chosen_valid[out.mask[:, 0]].all()
    assert (out.weights[~out.mask] == 0).all()


def test_fewer_valid_tokens_than_k_route_all_valid_ones_and_flag_the_rest():
    scores = random_scores(batch=2, sets=2, n=20, seed=4)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 5:] = False
    out = route(scores, 8, mask)
    assert out.mask[0].all()
    assert out.mask[1].sum(-1).tolist() == [5, 5]
    assert torch.equal(out.indices[1][out.mask[1]].view(2, 5), torch.arange(5).expand(2, 5))
    assert (out.weights[1][out.mask[1]] == 1).all()  # every valid token routed: lambda = 1
    assert (out.weights[1][~out.mask[1]] == 0).all()


def test_n_at_most_k_routes_everything_with_weight_one():
    scores = random_scores(batch=2, sets=1, n=6, seed=5)
    out = route(scores, 10)
    assert out.indices.shape[-1] == 6
    assert torch.equal(out.indices[0, 0], torch.arange(6))
    assert (out.weights == 1).all()


def test_fully_masked_row_gives_no_nan_and_no_valid_slot():
    scores = random_scores(batch=2, sets=1, n=16, seed=6).requires_grad_(True)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0] = False
    out = route(scores, 4, mask)
    assert not out.mask[0].any() and (out.weights[0] == 0).all()
    out.weights.sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_fraction_amounts_follow_each_samples_valid_length():
    scores = random_scores(batch=2, sets=1, n=64, seed=7)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 32:] = False
    out = route(scores, 0.25, mask)
    assert out.indices.shape[-1] == 16
    assert out.mask.sum(-1).flatten().tolist() == [16, 8]


def test_routed_amount_rounding_and_caps():
    assert routed_amount(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert routed_amount(1 / 16, 16384) == 1024
    assert routed_amount(0.25, 5) == 2
    assert routed_amount(100, 30) == 30
    assert routed_amount(0.1, torch.tensor([30, 31, 0])).tolist() == [3, 4, 0]
    assert routed_amount(7, torch.tensor([3, 10])).tolist() == [3, 7]


@pytest.mark.parametrize("amount", [0, -1, 0.0, 1.5, True, "8", None])
def test_invalid_amounts_are_rejected(amount):
    with pytest.raises(ValueError, match="amount_name"):
        validate_amount("amount_name", amount)


def test_routing_sets_and_samples_are_independent():
    scores = random_scores(batch=3, sets=4, n=50, seed=8)
    together = route(scores, 10)
    for b in range(3):
        for s in range(4):
            alone = route(scores[b : b + 1, s : s + 1], 10)
            assert torch.equal(together.indices[b, s], alone.indices[0, 0])
            torch.testing.assert_close(together.weights[b, s], alone.weights[0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("blocks", [1, 2, 7])
def test_block_routing_spreads_tokens_evenly_over_blocks(blocks):
    n, k = 70, 15
    block_size = -(-n // blocks)
    scores = random_scores(batch=2, sets=1, n=n, seed=9)
    scores[..., :block_size] += 50.0  # without blocks the first block would take every slot
    out = route(scores, k, route_block_size=block_size if blocks > 1 else None)
    assert out.indices.shape[-1] == k and out.mask.all()
    counts = torch.bincount(out.indices[0, 0] // block_size, minlength=blocks)
    sizes = [min(block_size, n - b * block_size) for b in range(blocks)]
    expected = [min(k // blocks + (b < k % blocks), size) for b, size in enumerate(sizes)]
    assert counts.tolist() == expected
    assert torch.equal(out.indices, out.indices.sort(-1).values)


def test_block_routing_with_a_partial_last_block_and_padding():
    scores = random_scores(batch=2, sets=1, n=50, seed=10).requires_grad_(True)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 30:] = False
    out = route(scores, 0.2, mask, route_block_size=16)  # 4 blocks, the last of 2 tokens
    assert out.mask.sum(-1).flatten().tolist() == [10, 6]
    # Sample 1's last two blocks are padding: their share goes to the two valid blocks.
    assert torch.bincount(out.indices[1, 0][out.mask[1, 0]] // 16, minlength=4).tolist() == [3, 3, 0, 0]
    assert torch.bincount(out.indices[0, 0] // 16, minlength=4).tolist() == [3, 3, 2, 2]
    assert mask.gather(1, out.indices[:, 0])[out.mask[:, 0]].all()
    out.weights.sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_straight_through_weights_are_one_with_lambda_gradients():
    scores = random_scores(seed=11)
    plain_scores = scores.clone().requires_grad_(True)
    st_scores = scores.clone().requires_grad_(True)
    plain = route(plain_scores, 10)
    straight = route(st_scores, 10, straight_through=True)
    assert (straight.weights == 1).all()
    upstream = torch.randn_like(plain.weights)
    (plain.weights * upstream).sum().backward()
    (straight.weights * upstream).sum().backward()
    torch.testing.assert_close(plain_scores.grad, st_scores.grad)


def test_router_module_scores_in_float32_under_autocast_and_routes_each_set():
    router = CoordinateDescentRouter(16, num_sets=3)
    x = torch.randn(2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = router.scores(x)
        out = router(x, 0.25)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.einsum("bnd,sd->bsn", x, router.routing_vectors.detach()))
    assert out.indices.shape == (2, 3, 10) and out.weights.dtype == torch.float32
    out.weights.sum().backward()
    assert router.routing_vectors.grad.abs().sum() > 0


def test_router_rejects_fetch_ratio_below_one():
    with pytest.raises(ValueError, match="fetch_ratio"):
        CoordinateDescentRouter(8, fetch_ratio=0.5)


def test_gather_and_scatter_are_inverse_on_routed_positions():
    x = torch.randn(2, 12, 4)
    indices = torch.tensor([[[1, 5, 7]], [[0, 2, 11]]])
    gathered = gather_tokens(x, indices)
    assert torch.equal(gathered[1, 0, 2], x[1, 11])
    scattered = scatter_tokens(gathered[:, 0], indices[:, 0], 12)
    assert torch.equal(scattered[0, 5], x[0, 5]) and (scattered[0, 6] == 0).all()


@pytest.mark.parametrize(
    "length,amount,valid_length,expected",
    [(70, 0.5, 70, 35), (17, 1.0, 17, 17), (100, 1.0, 17, 17), (100, 40, 33, 33)],
)
def test_block_routing_routes_the_whole_amount_when_blocks_are_short(length, amount, valid_length, expected):
    scores = random_scores(batch=1, sets=1, n=length, seed=12)
    mask = torch.arange(length).unsqueeze(0) < valid_length
    out = route(scores, amount, mask, route_block_size=16)
    assert out.mask.sum().item() == expected
    assert mask.gather(1, out.indices[:, 0])[out.mask[:, 0]].all()


@pytest.mark.parametrize("dtype, batch_invariant", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
def test_scores_of_narrow_tokens_are_widened_a_chunk_at_a_time(monkeypatch, dtype, batch_invariant):
    """Scores and both gradients equal the plain widened matmul, with several chunks, and autograd keeps no wide
    copy of the tokens."""
    monkeypatch.setattr(router_module, "WIDE_SCORE_CHUNK_ELEMENTS", 3 * 2 * 16)  # chunks of 3 tokens, the last one partial
    scorer = TokenScorer(16, 2, batch_invariant=batch_invariant)
    wide = torch.float64 if batch_invariant else torch.float32
    x = torch.randn(2, 40, 16).to(dtype).requires_grad_()  # more than FEW_SCORED_TOKENS: the chunked product
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scores = scorer.scores(x)
    upstream = torch.randn_like(scores)
    scores.backward(upstream)

    widened = x.detach().to(wide).requires_grad_()
    vectors = scorer.routing_vectors.detach().to(wide).requires_grad_()
    expected = (widened @ vectors.T).transpose(1, 2)
    expected.backward(upstream.to(wide))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, widened.grad.to(dtype))
    torch.testing.assert_close(scorer.routing_vectors.grad, vectors.grad.float(), rtol=1e-5, atol=1e-5)
    assert not any(t.shape == x.shape and t.dtype == wide for t in saved), "a wide copy of x was kept"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scores_of_few_tokens_equal_their_scores_among_many(dtype):
    """The few-token path (a decode step: a product and a sum in float64) gives a batch-invariant scorer's tokens
    the bits the chunked matrix product gives them in a long sequence, and the same gradients as the wide matmul."""
    torch.manual_seed(0)
    scorer = TokenScorer(48, 3, batch_invariant=True)
    x = torch.randn(2, router_module.FEW_SCORED_TOKENS, 48).to(dtype)
    among_many = scorer.scores(x)
    for token in (0, 17, x.shape[1] - 1):
        alone = scorer.scores(x[:, token : token + 1])
        assert torch.equal(alone, among_many[..., token : token + 1]), f"token {token}"

    few = x[:, :5].clone().requires_grad_()
    scores = scorer.scores(few)
    upstream = torch.randn_like(scores)
    scores.backward(upstream)
    widened = few.detach().double().requires_grad_()
    vectors = scorer.routing_vectors.detach().double().requires_grad_()
    (widened @ vectors.T).transpose(1, 2).backward(upstream.double())
    torch.testing.assert_close(few.grad, widened.grad.to(dtype))
    torch.testing.assert_close(scorer.routing_vectors.grad, vectors.grad.float(), rtol=1e-6, atol=1e-6)


def test_compiled_scores_of_many_tokens_equal_the_chunked_product():
    """Traced by torch.compile, many tokens are scored by a product and a sum (no matrix product: one fused
    reduction under Inductor): the same float32 scores as the eager chunked float64 product, and float32 gradients
    equal to eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    forward_ops = []

    def record_forward(graph, _):
        forward_ops.extend(node.target for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=record_forward, bw_compiler=lambda graph, _: make_boxed_func(graph.forward))
    torch.manual_seed(0)
    scorer = TokenScorer(48, 2, batch_invariant=True)
    x = torch.randn(2, 3 * router_module.FEW_SCORED_TOKENS, 48).to(torch.bfloat16)

    def scores_and_grads(score):
        leaf = x.clone().requires_grad_()
        scorer.zero_grad()
        scores = score(leaf)
        scores.backward(torch.linspace(-1, 1, scores.numel()).view_as(scores))
        return scores.detach(), leaf.grad, scorer.routing_vectors.grad.clone()

    eager = scores_and_grads(scorer.scores)
    torch._dynamo.reset()
    compiled = scores_and_grads(torch.compile(scorer.scores, backend=backend, fullgraph=True))
    assert torch.ops.aten.mul.Tensor in forward_ops and torch.ops.aten.mm.default not in forward_ops, forward_ops
    assert eager[0].dtype == compiled[0].dtype == torch.float32
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-6, atol=1e-6)
