"""`from_colt5_attention`: trained colt5-attention modules load into the matching colt5 layers. Where both compute
the same function, outputs and gradients agree in float32; where they cannot (the reference's bugs), the tests show
why. Needs colt5-attention (the test extra installs it)."""

import pytest
import torch

from colt5 import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    ConditionalRoutedViT,
    CoordinateDescentRouter,
    coor_descent,
    from_colt5_attention,
    topk,
)

reference = pytest.importorskip("colt5_attention")

DIM = 64
# float32, the reference's own router settings (20 iterations, eps-scaling from 4 to 0.03, straight-through).
ATOL, RTOL = 1e-5, 1e-4
ATTENTION = dict(light_dim_head=16, light_heads=2, light_window_size=32, heavy_dim_head=16, heavy_heads=4)


def trained(module: torch.nn.Module, routing_scale: float = 0.05) -> torch.nn.Module:
    """The module with every weight moved off its initial value, as training would, and routing vectors scaled so
    that scores spread over a few eps (no more than the routed amount saturate at weight 1: see the tie test)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
            if name.endswith("routing_token"):
                parameter.mul_(routing_scale / parameter.norm(dim=-1, keepdim=True))
    return module


def inputs(batch: int = 2, length: int = 96):
    x = torch.randn(batch, length, DIM, requires_grad=True)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length - 29 :] = False
    return x, mask


def assert_same_function(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, **kwargs) -> None:
    """Outputs, input gradients and weight gradients agree (valid positions; padding is undefined in both)."""
    mask = kwargs.get("mask")
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    weight = torch.randn(*x.shape) * valid.unsqueeze(-1)
    out_theirs, out_ours = theirs(x, **kwargs), ours(x, **kwargs)
    torch.testing.assert_close(out_ours * valid.unsqueeze(-1), out_theirs * valid.unsqueeze(-1), atol=ATOL, rtol=RTOL)
    grads_theirs = torch.autograd.grad((out_theirs * weight).sum(), x)
    grads_ours = torch.autograd.grad((out_ours * weight).sum(), x)
    torch.testing.assert_close(grads_ours, grads_theirs, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("masked", [False, True])
def test_feedforward_matches(masked):
    theirs = trained(
        reference.ConditionalRoutedFeedForward(dim=DIM, num_heavy_tokens=24, light_ff_mult=0.5, heavy_ff_mult=4)
    )
    ours = from_colt5_attention(theirs)
    assert isinstance(ours, ConditionalRoutedFeedForward)
    x, mask = inputs()
    assert_same_function(theirs, ours, x, **({"mask": mask} if masked else {}))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rotary_emb": True, "multiply_keys_by_score": True},
        {"multiply_queries_by_score": True, "use_null_q_tokens": False},
    ],
)
def test_attention_matches(options, masked):
    theirs = trained(
        reference.ConditionalRoutedAttention(
            dim=DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=32, **ATTENTION, **options
        )
    )
    ours = from_colt5_attention(theirs)
    assert isinstance(ours, ConditionalRoutedAttention)
    x, mask = inputs()
    assert_same_function(theirs, ours, x, **({"mask": mask} if masked else {}))


def test_attention_with_several_routing_sets_matches_for_one_sample():
    theirs = trained(
        reference.ConditionalRoutedAttention(
            dim=DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=32, num_routed_kv=2, **ATTENTION
        )
    )
    ours = from_colt5_attention(theirs)
    x, _ = inputs(batch=1)
    assert_same_function(theirs, ours, x)


def test_reference_mixes_samples_with_several_routing_sets():
    """colt5-attention's router gathers the routed keys/values of every (sample, set) row from the sample-major rows
    of x as if they were per-sample: with 2 sets, sample 1 attends to sample 0's tokens. colt5 keeps samples apart."""
    theirs = trained(
        reference.ConditionalRoutedAttention(
            dim=DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=32, num_routed_kv=2, **ATTENTION
        )
    )
    ours = from_colt5_attention(theirs)
    x, _ = inputs()
    alone = x[1:].detach()
    with torch.no_grad():
        assert (theirs(x)[1:] - theirs(alone)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x)[1:], ours(alone), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours(x)[:1], theirs(x)[:1], atol=ATOL, rtol=RTOL)  # sample 0 reads its own rows


def test_block_matches():
    theirs = trained(
        reference.ConditionalRoutedTransformerBlock(
            dim=DIM,
            light_ff_mult=0.5,
            heavy_ff_mult=4,
            num_heavy_ff_tokens=24,
            num_heavy_attn_tokens_q=24,
            num_heavy_attn_tokens_kv=32,
            **ATTENTION,
        )
    )
    ours = from_colt5_attention(theirs)
    assert isinstance(ours, ConditionalRoutedTransformerBlock)
    x, mask = inputs()
    assert_same_function(theirs, ours, x, mask=mask)


def test_weight_gradients_match():
    theirs = trained(
        reference.ConditionalRoutedAttention(dim=DIM, num_heavy_tokens_q=24, num_heavy_tokens_kv=32, **ATTENTION)
    )
    ours = from_colt5_attention(theirs)
    x, mask = inputs()
    target = torch.randn(*x.shape)
    (theirs(x, mask=mask) * target * mask.unsqueeze(-1)).sum().backward()
    (ours(x, mask=mask) * target * mask.unsqueeze(-1)).sum().backward()
    pairs = [
        (ours.heavy_q_proj.weight, theirs.heavy_attn.to_q.weight),
        (ours.heavy_o_proj.weight, theirs.heavy_attn.to_out.weight),
        (ours.heavy_norm.weight, theirs.heavy_attn.norm.gamma),
        (ours.heavy_null_kv, theirs.heavy_attn.null_kv),
        (ours.light_o_proj.weight, theirs.light_attn.to_out.weight),
        (ours.light_norm.weight, theirs.light_attn.norm.weight),
        (ours.q_router.routing_vectors, theirs.q_router.routing_token),
        (ours.kv_router.routing_vectors, theirs.kv_router.routing_token),
    ]
    for mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, atol=1e-4, rtol=1e-3)
    assert ours.q_router.routing_vectors.grad.abs().sum() > 0  # straight-through: the routers learn


def test_reference_breaks_ties_between_saturated_weights_arbitrarily():
    """With sharp scores more tokens reach weight 1 than are routed; colt5-attention then picks among them by the
    order of torch.topk over equal weights, not by score. colt5 routes the highest scores."""
    theirs = reference.ConditionalRoutedFeedForward(dim=DIM, num_heavy_tokens=24)
    with torch.no_grad():
        theirs.router.routing_token.mul_(100.0)
    ours = from_colt5_attention(theirs)
    x = torch.randn(1, 96, DIM)
    scores = (x @ theirs.router.routing_token.T)[..., 0]
    weights = reference.coor_descent(scores, n_iters=20, k=27, eps=0.03, eps_init=4.0, eps_decay=0.7)
    assert (weights == 1).sum() > 24
    chosen_theirs = set(weights.topk(24).indices[0].tolist())
    chosen_ours = set(ours.router(x, 24).indices[0, 0].tolist())
    assert chosen_ours == set(scores.topk(24).indices[0].tolist())
    assert chosen_theirs != chosen_ours


def test_reference_cross_attention_cannot_run():
    """colt5-attention 0.11.2's cross attention raises NameError (`should_route_queries` is never defined); the
    converted layer runs."""
    theirs = trained(
        reference.ConditionalRoutedCrossAttention(
            dim=DIM, num_tokens_q=8, num_tokens_kv=16, dim_head=16, heads=4, kv_routing_tokens=2
        )
    )
    x, context = torch.randn(2, 20, DIM), torch.randn(2, 50, DIM)
    with pytest.raises(NameError, match="should_route_queries"):
        theirs(x, context)
    ours = from_colt5_attention(theirs)
    assert isinstance(ours, ConditionalRoutedCrossAttention) and ours.num_routed_kv == 2
    torch.testing.assert_close(ours.heavy_q_proj.weight, theirs.heavy_attn.to_q.weight)
    assert ours(x, context).shape == (2, 20, DIM)


def test_image_and_autoregressive_attention_and_vit_convert():
    """These route differently here (README: the image heavy branch across the whole map, not per window; causal
    routing per token): their weights load and the layers run."""
    image = trained(
        reference.ConditionalRoutedImageAttention(
            dim=32,
            light_window_size=4,
            num_heavy_tokens_q=8,
            num_heavy_tokens_kv=8,
            heavy_dim_head=16,
            light_dim_head=16,
            channel_first=True,
        )
    )
    ours_image = from_colt5_attention(image)
    assert isinstance(ours_image, ConditionalRoutedImageAttention) and ours_image.channels_first
    torch.testing.assert_close(ours_image.light_norm.weight, image.light_attn.norm.gamma)
    assert ours_image(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)

    causal = trained(
        reference.ConditionalRoutedAutoregressiveAttention(
            dim=DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=16, heavy_window_size=16, **ATTENTION
        )
    )
    ours_causal = from_colt5_attention(causal)
    assert isinstance(ours_causal, ConditionalRoutedAutoregressiveAttention)
    assert ours_causal.block_size == 16 and ours_causal.memory_size == 16 and ours_causal.light_window_size == 32
    torch.testing.assert_close(ours_causal.q_router.routing_vectors, causal.q_router.routing_token)
    assert ours_causal(torch.randn(2, 64, DIM)).shape == (2, 64, DIM)
    # Every token of a window a heavy query: ours has no query router, and the reference's routing vector is dropped.
    every_query = from_colt5_attention(
        reference.ConditionalRoutedAutoregressiveAttention(
            dim=DIM, num_heavy_tokens_q=16, num_heavy_tokens_kv=16, heavy_window_size=16, **ATTENTION
        )
    )
    assert every_query.q_router is None and "q_router.routing_vectors" not in every_query.state_dict()
    assert every_query(torch.randn(2, 64, DIM)).shape == (2, 64, DIM)

    from colt5_attention.vit import ConditionalRoutedViT as ReferenceViT

    vit = ReferenceViT(
        image_size=32,
        patch_size=8,
        num_classes=5,
        dim=32,
        depth=2,
        attn_num_heavy_tokens_q=4,
        attn_num_heavy_tokens_kv=4,
        attn_heavy_dim_head=16,
        attn_heavy_heads=2,
        attn_light_window_size=2,
        attn_light_dim_head=16,
        attn_light_heads=2,
        ff_num_heavy_tokens=4,
        ff_heavy_mult=4,
        ff_light_mult=2,
        flash_attn=False,
    )
    with pytest.raises(ValueError, match="image_size"):
        from_colt5_attention(vit)
    ours_vit = from_colt5_attention(vit, image_size=32)
    assert isinstance(ours_vit, ConditionalRoutedViT)
    torch.testing.assert_close(ours_vit.head.weight, vit.linear_head[2].weight)
    assert ours_vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_converter_refuses_other_modules_and_unknown_reference_state():
    with pytest.raises(TypeError, match="colt5-attention package"):
        from_colt5_attention(ConditionalRoutedFeedForward(DIM, num_heavy_tokens=4))
    theirs = reference.ConditionalRoutedFeedForward(dim=DIM, num_heavy_tokens=24)
    theirs.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="no place for these colt5-attention weights: \\['extra'\\]"):
        from_colt5_attention(theirs)


@pytest.mark.parametrize("n_iters, eps_init, eps_decay", [(20, 4.0, 0.7), (10, None, 1.0), (5, 0.5, 0.9)])
def test_coor_descent_matches(n_iters, eps_init, eps_decay):
    scores = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 40) > 0.2
    k = torch.tensor([4.0, 9.0, 13.5], dtype=torch.float64)
    settings = dict(n_iters=n_iters, k=k, eps=0.1, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    theirs, ours = reference.coor_descent(scores, **settings), coor_descent(scores, **settings)
    if eps_init is not None and eps_init * eps_decay ** (n_iters - 1) > 0.1:
        # Schedule still above its floor: the reference divides its final weights by one more decayed eps.
        assert (theirs - ours).abs().max() > 1e-3
        return
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)
    weight = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad((ours * weight).sum(), scores)[0],
        torch.autograd.grad((theirs * weight).sum(), scores)[0],
        atol=1e-8,
        rtol=1e-6,
    )


def test_topk_matches():
    x = torch.randn(6, 50, requires_grad=True)
    theirs = reference.topk(x, k=7)
    ours = topk(x, k=7)
    assert torch.equal(ours.indices.sort(-1).values, theirs.indices.sort(-1).values)
    order_theirs, order_ours = theirs.indices.argsort(-1), ours.indices.argsort(-1)
    for got, expected in zip(ours[:1] + ours[2:], theirs[:1] + theirs[2:]):
        torch.testing.assert_close(got.gather(-1, order_ours), expected.gather(-1, order_theirs), atol=1e-6, rtol=1e-5)
    weight = torch.randn(6, 7)
    grad_ours = torch.autograd.grad((ours.values.gather(-1, order_ours) * weight).sum(), x)[0]
    grad_theirs = torch.autograd.grad((theirs.values.gather(-1, order_theirs) * weight).sum(), x)[0]
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=1e-4)
    plain = topk(x, k=7, non_differentiable=True)
    assert plain.coor_descent_values is None and torch.equal(
        plain.indices.sort(-1).values, ours.indices.sort(-1).values
    )


@pytest.mark.parametrize(
    "schedule", [{}, {"eps_init": 2.0}, {"eps_decay": 0.6}, {"eps_init": 1.0, "eps_decay": 0.8}, {"eps_decay": 0.9}]
)
def test_router_weights_match_with_either_schedule_keyword(schedule):
    """The router's soft weights (without straight-through) at the reference's settings, one schedule keyword given
    alone taking the reference's default for the other. Where the schedule has not reached eps by the last of the
    20 iterations (4.0 * 0.9**19 > 0.03), the reference divides by one more decayed eps (README)."""
    theirs = reference.CoordinateDescentRouter(DIM, straight_through=False, **schedule)
    ours = CoordinateDescentRouter(DIM, straight_through=False, **schedule)
    with torch.no_grad():
        ours.routing_vectors.copy_(theirs.routing_token * 0.05 / theirs.routing_token.norm())
        theirs.routing_token.copy_(ours.routing_vectors)
    x = torch.randn(2, 80, DIM)
    indices, weights, *_ = theirs(x, num_tokens=20)
    mine = ours(x, num_tokens=20)
    order = indices.argsort(-1)
    assert torch.equal(indices.gather(-1, order), mine.indices)
    start, decay = schedule.get("eps_init", 4.0), schedule.get("eps_decay", 0.7)
    if start * decay**19 > 0.03:
        assert (mine.scores - weights.gather(-1, order)).abs().max() > 1e-3
    else:
        torch.testing.assert_close(mine.scores, weights.gather(-1, order), atol=1e-6, rtol=1e-5)
