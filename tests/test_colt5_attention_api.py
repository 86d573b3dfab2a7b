"""colt5 as a drop-in for colt5-attention: its public names, keywords and README examples (at CPU sizes) work with
`from colt5 import ...`; a keyword with no meaning here is an error, and two spellings of one setting must agree."""

import inspect

import pytest
import torch

import colt5
from colt5 import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    CoordinateDescentRouter,
)

PUBLIC_NAMES = [
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedAttention",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedTransformerBlock",
    "CoordinateDescentRouter",
    "coor_descent",
    "topk",
    "ConditionalRoutedViT",
]


def finite_with_gradient(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for tensor in inputs:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- the README's examples
# colt5-attention's README examples as written, with `colt5` for `colt5_attention`, CPU sizes and no `.cuda()`.


def test_readme_usage_feedforward_attention_block():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1024, 512, requires_grad=True)
    mask = torch.ones(2, 1024).bool()
    mask[1, 700:] = False

    ff = ConditionalRoutedFeedForward(dim=512, light_ff_mult=0.5, heavy_ff_mult=4, num_heavy_tokens=256)
    ff_out = ff(tokens, mask=mask)
    assert ff_out.shape == (2, 1024, 512)
    finite_with_gradient(ff_out, tokens)

    attn = ConditionalRoutedAttention(
        dim=512,
        light_dim_head=64,
        light_heads=8,
        light_window_size=128,
        heavy_dim_head=64,
        heavy_heads=8,
        num_heavy_tokens_q=256,
        num_heavy_tokens_kv=256,
    )
    attn_out = attn(tokens, mask=mask)
    assert attn_out.shape == (2, 1024, 512)
    finite_with_gradient(attn_out, tokens)

    block = ConditionalRoutedTransformerBlock(
        dim=512,
        light_dim_head=64,
        light_heads=8,
        light_window_size=128,
        heavy_dim_head=64,
        heavy_heads=8,
        light_ff_mult=0.5,
        heavy_ff_mult=4,
        num_heavy_ff_tokens=256,
        num_heavy_attn_tokens_q=256,
        num_heavy_attn_tokens_kv=256,
    )
    block_out = block(tokens, mask=mask)
    assert block_out.shape == (2, 1024, 512)
    finite_with_gradient(block_out, tokens)


def test_readme_cross_attention():
    torch.manual_seed(0)
    tokens = torch.randn(1, 1024, 512, requires_grad=True)
    tokens_mask = torch.ones(1, 1024).bool()
    memories = torch.randn(1, 16384, 512, requires_grad=True)
    memories_mask = torch.ones(1, 16384).bool()
    cross_attn = ConditionalRoutedCrossAttention(
        dim=512,
        dim_head=64,
        heads=8,
        num_tokens_q=512,
        num_tokens_kv=1024,
        kv_routing_tokens=2,
        use_triton=True,
        route_block_size=4096,
    )
    cross_attn_out = cross_attn(tokens, context=memories, mask=tokens_mask, context_mask=memories_mask)
    assert cross_attn_out.shape == (1, 1024, 512)
    finite_with_gradient(cross_attn_out, tokens, memories)


def test_readme_autoregressive_attention():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1024, 512, requires_grad=True)
    attn = ConditionalRoutedAutoregressiveAttention(
        dim=512,
        light_dim_head=64,
        light_heads=8,
        light_window_size=128,
        heavy_window_size=128,
        heavy_dim_head=64,
        heavy_heads=8,
        num_heavy_tokens_q=32,
        num_heavy_tokens_kv=1024,
        num_routed_kv=2,
        use_triton=True,
        use_flash_attn=True,
    )
    attn_out = attn(tokens) + tokens
    assert attn_out.shape == (2, 1024, 512)
    finite_with_gradient(attn_out, tokens)


def test_readme_image_attention():
    torch.manual_seed(0)
    attn = ConditionalRoutedImageAttention(
        dim=32,
        light_dim_head=64,
        light_heads=8,
        light_window_size=32,
        channel_first=True,
        heavy_dim_head=64,
        heavy_heads=8,
        num_heavy_tokens_q=1024,
        num_heavy_tokens_kv=1024,
    )
    fmap = torch.randn(1, 32, 64, 64, requires_grad=True)
    out = attn(fmap)
    assert out.shape == (1, 32, 64, 64)
    finite_with_gradient(out, fmap)


def test_readme_vit():
    from colt5.vit import ConditionalRoutedViT

    torch.manual_seed(0)
    vit = ConditionalRoutedViT(
        image_size=128,
        patch_size=16,
        num_classes=1000,
        dim=256,
        depth=2,
        attn_num_heavy_tokens_q=16,
        attn_num_heavy_tokens_kv=16,
        attn_heavy_dim_head=64,
        attn_heavy_heads=8,
        attn_light_window_size=4,
        attn_light_dim_head=32,
        attn_light_heads=4,
        ff_num_heavy_tokens=16,
        ff_heavy_mult=4,
        ff_light_mult=2,
    )
    images = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits = vit(images)
    assert logits.shape == (1, 1000)
    finite_with_gradient(logits, images)


def test_readme_differentiable_topk():
    from colt5 import topk

    torch.manual_seed(0)
    x = torch.randn(1024, 512, requires_grad=True)
    values, indices, coor_descent_values, gates = topk(x, k=10, fused=True)
    assert values.shape == indices.shape == coor_descent_values.shape == gates.shape == (1024, 10)
    torch.testing.assert_close(indices.sort(-1).values, x.topk(10).indices.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(values.detach(), x.detach().gather(-1, indices))  # the gates are 1 forward
    assert ((coor_descent_values > 0) & (coor_descent_values <= 1)).all()
    finite_with_gradient(values, x)


# ------------------------------------------------------------------------------------------------------ the keywords


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_public_name_exists(name):
    assert name in colt5.__all__ and hasattr(colt5, name)


def reference_signatures():
    reference = pytest.importorskip("colt5_attention")
    from colt5_attention.vit import ConditionalRoutedViT

    for name in PUBLIC_NAMES:
        ours = getattr(colt5, name)
        theirs = ConditionalRoutedViT if name == "ConditionalRoutedViT" else getattr(reference, name)
        if inspect.isclass(theirs):
            yield f"{name}.__init__", theirs.__init__, ours.__init__
            yield f"{name}.forward", theirs.forward, ours.forward
        else:
            yield name, theirs, ours


def test_every_reference_keyword_is_taken():
    """Each constructor and forward keyword of colt5-attention 0.11.2 is a keyword of ours, its positional arguments
    come in its order, and where both give a keyword a default that means the same thing here, the default is the
    reference's."""
    missing, defaults, order = [], [], []
    # Defaults that differ on purpose (README, "Migrating from colt5-attention"): None lets colt5 choose the fastest
    # kernels where the reference defaults to its PyTorch paths; the others say None for "not given", because the
    # setting has a second spelling here, and resolve to the reference's default.
    resolved_later = {
        "use_triton",
        "use_flash_attn",
        "router_straight_through",
        "use_null_q_tokens",
        "light_ff_mult",
        "heavy_ff_mult",
        "num_sets_kv",
        "kv_routing_tokens",
        "num_tokens_q",
        "num_tokens_kv",
        "num_heavy_attn_tokens_q",
        "num_heavy_attn_tokens_kv",
        "router_kwargs",
        "channel_first",
        "light_window_size",
        "fetch_k_ratio",
        "eps_init",
        "eps_decay",
        "num_routing_tokens",
        "router_use_triton",
    }
    for where, theirs, ours in reference_signatures():
        ours_parameters = inspect.signature(ours).parameters
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        theirs_order = [n for n, q in inspect.signature(theirs).parameters.items() if q.kind == positional]
        # The block's second argument is HF's attention_mask, which also takes the reference's mask= keyword.
        ours_order = [{"attention_mask": "mask"}.get(n, n) for n, q in ours_parameters.items() if q.kind == positional]
        skip = 2 if where.endswith(".forward") else 1  # self, and the input of forward (x, img; hidden_states)
        if ours_order[skip : len(theirs_order)] != theirs_order[skip:]:
            order.append(f"{where}: theirs {theirs_order}, ours {ours_order}")
        for position, (name, parameter) in enumerate(inspect.signature(theirs).parameters.items()):
            if name in ("self", "args", "kwargs"):
                continue
            if where.endswith(".forward") and position == 1:
                continue  # the input (x, img), passed positionally; the block calls it hidden_states, as HF layers do
            if name not in ours_parameters:
                missing.append(f"{where}({name})")
                continue
            default = parameter.default
            if default is inspect.Parameter.empty or name in resolved_later:
                continue
            if ours_parameters[name].default != default:
                defaults.append(f"{where}({name}): theirs {default!r}, ours {ours_parameters[name].default!r}")
    assert not missing, missing
    assert not defaults, defaults
    assert not order, order  # positional arguments in the reference's order


def test_the_reference_defaults_after_resolution():
    router = CoordinateDescentRouter(16)
    assert router.route_kwargs == dict(
        fetch_ratio=9 / 8,
        eps=0.03,
        n_iters=20,
        eps_schedule=(4.0, 0.7),
        straight_through=True,
        route_block_size=None,
        backend="auto",
    )
    attention = ConditionalRoutedAttention(16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4)
    assert attention.unrouted_output is not None  # use_null_q_tokens=True
    assert attention.light_window_size == 64  # light_window_size=128: 64 tokens on each side
    assert attention.light_heads == 8 and attention.heavy_rotary is None  # rotary_emb=False
    feedforward = ConditionalRoutedFeedForward(16, num_heavy_tokens=4)
    assert feedforward.light_mlp.up_proj.out_features == 8 and feedforward.heavy_mlp.up_proj.out_features == 64
    image = ConditionalRoutedImageAttention(16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4)
    assert image.window_size == 128 and not image.channels_first


def test_use_triton_never_fails_on_a_cpu():
    layer = ConditionalRoutedFeedForward(32, num_heavy_tokens=8, use_triton=True)
    assert layer.router.route_kwargs["backend"] == "auto"
    out = layer(torch.randn(2, 40, 32))
    assert out.shape == (2, 40, 32)
    assert CoordinateDescentRouter(32, use_triton=False).route_kwargs["backend"] == "torch"


def test_use_flash_attn_false_runs_the_math_kernel(monkeypatch):
    import colt5.routed_attention as routed_attention

    calls = []
    original = routed_attention.masked_sdpa

    def recording(*args, **kwargs):
        calls.append(kwargs.get("math_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(routed_attention, "masked_sdpa", recording)
    torch.manual_seed(0)
    x = torch.randn(2, 48, 32)
    fast = ConditionalRoutedAttention(
        32, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, heavy_dim_head=8, light_dim_head=8
    )
    math = ConditionalRoutedAttention(
        32, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, heavy_dim_head=8, light_dim_head=8, use_flash_attn=False
    )
    math.load_state_dict(fast.state_dict())
    torch.testing.assert_close(math(x), fast(x), rtol=1e-5, atol=1e-6)
    assert calls == [True, False]  # math(x) ran first


def test_call_time_amounts_override_the_layers():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    layer = ConditionalRoutedFeedForward(32, num_heavy_tokens=8)
    other = ConditionalRoutedFeedForward(32, num_heavy_tokens=20)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x, num_heavy_tokens=20), other(x))
    assert (layer(x, num_heavy_tokens=20) - layer(x)).abs().max() > 1e-4

    attention = ConditionalRoutedAttention(
        32, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, heavy_dim_head=8, light_dim_head=8
    )
    wider = ConditionalRoutedAttention(
        32, num_heavy_tokens_q=16, num_heavy_tokens_kv=24, heavy_dim_head=8, light_dim_head=8
    )
    wider.load_state_dict(attention.state_dict())
    torch.testing.assert_close(attention(x, num_heavy_tokens_q=16, num_heavy_tokens_kv=24), wider(x))

    block = ConditionalRoutedTransformerBlock(
        32,
        num_heavy_attn_tokens_q=8,
        num_heavy_attn_tokens_kv=8,
        num_heavy_ff_tokens=8,
        heavy_dim_head=8,
        light_dim_head=8,
    )
    wide_block = ConditionalRoutedTransformerBlock(
        32,
        num_heavy_attn_tokens_q=16,
        num_heavy_attn_tokens_kv=24,
        num_heavy_ff_tokens=4,
        heavy_dim_head=8,
        light_dim_head=8,
    )
    wide_block.load_state_dict(block.state_dict())
    overridden = block(x, num_heavy_attn_tokens_q=16, num_heavy_attn_tokens_kv=24, num_heavy_ff_tokens=4)
    torch.testing.assert_close(overridden, wide_block(x))
    with pytest.raises(ValueError, match="num_heavy_tokens as a number of tokens must be >= 1"):
        layer(x, num_heavy_tokens=0)


def test_router_returns_the_reference_layout_for_num_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 16)
    mask = torch.ones(2, 50, dtype=torch.bool)
    router = CoordinateDescentRouter(16)
    indices, scores, routed_tokens, routed_mask = router(x, num_tokens=10, mask=mask)
    assert indices.shape == scores.shape == routed_mask.shape == (2, 10) and routed_tokens.shape == (2, 10, 16)
    torch.testing.assert_close(routed_tokens, x.gather(1, indices.unsqueeze(-1).expand(-1, -1, 16)))
    torch.testing.assert_close(scores, torch.ones_like(scores))  # straight-through: 1 in the forward pass
    ours = router(x, 10, mask)
    assert torch.equal(indices, ours.indices[:, 0])

    sets = CoordinateDescentRouter(16, num_routing_tokens=3)
    assert sets(x, num_tokens=10).indices.shape == (2, 3, 10)
    assert router(x, num_tokens=10, keep_one_route_dim=True).routed_tokens.shape == (2, 1, 10, 16)
    everything = router(x, num_tokens=50)  # nothing to route: every token, as in colt5-attention
    assert everything.indices is None and everything.routed_tokens is x and everything.scores.shape == (2, 50)

    src = torch.zeros(2, 50, 16)
    back = router.route_back(src, routed_tokens, indices)
    assert back is src and torch.equal(back.gather(1, indices.unsqueeze(-1).expand(-1, -1, 16)), routed_tokens)

    random_scores = router(x, num_tokens=10, random_route=True).indices
    assert not torch.equal(random_scores, indices)


def test_cosine_similarity_routing():
    torch.manual_seed(0)
    router = CoordinateDescentRouter(16, cosine_sim_routing=True, cosine_sim_scale=8)
    x = torch.randn(1, 30, 16)
    scores = router.scores(x * 5.0)
    expected = torch.nn.functional.cosine_similarity(x[0], router.routing_vectors[0], dim=-1) * 8
    torch.testing.assert_close(scores[0, 0], expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CoordinateDescentRouter(16, learned_routing_tokens=True), "learned_routing_tokens"),
        (
            lambda: ConditionalRoutedAttention(
                16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, router_kwargs={"num_routing_tokens": 2}
            ),
            "are its num_routed_kv",
        ),
        (
            lambda: ConditionalRoutedFeedForward(16, num_heavy_tokens=4, router_type="sinkhorn"),
            "router_type='sinkhorn'",
        ),
        (lambda: CoordinateDescentRouter(16, triton_checkpoint_segments=4), "triton_checkpoint_segments"),
        (lambda: CoordinateDescentRouter(16, n_iters=None, eps_init=4.0, eps_decay=0.7), "needs iterations"),
        (lambda: CoordinateDescentRouter(16, eps_schedule=(4.0, 0.7), eps_init=2.0), "pass one spelling"),
        (lambda: CoordinateDescentRouter(16, fetch_ratio=1.5, fetch_k_ratio=1.25), "fetch_ratio=1.5 and fetch_k_ratio"),
        (lambda: CoordinateDescentRouter(16, backend="triton", use_triton=False), "disagree"),
        (
            lambda: ConditionalRoutedAttention(
                16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, use_null_q_tokens=False, learned_unrouted_output=True
            ),
            "use_null_q_tokens=False and learned_unrouted_output=True",
        ),
        (
            lambda: ConditionalRoutedFeedForward(
                16, num_heavy_tokens=4, router_straight_through=True, router_kwargs={"straight_through": False}
            ),
            "same setting",
        ),
        (
            lambda: ConditionalRoutedFeedForward(16, num_heavy_tokens=4, light_ff_mult=0.5, light_hidden_dim=8),
            "light_hidden_dim and light_ff_mult",
        ),
        (lambda: ConditionalRoutedFeedForward(16, num_heavy_tokens=4, mlp="relu"), "mlp must be one of"),
        (
            lambda: ConditionalRoutedCrossAttention(16, num_tokens_q=4, num_heavy_tokens_q=8, num_tokens_kv=4),
            "num_tokens_q=4 and num_heavy_tokens_q=8",
        ),
        (lambda: ConditionalRoutedCrossAttention(16, num_tokens_kv=4), "num_tokens_q"),
        (
            lambda: ConditionalRoutedCrossAttention(
                16, num_tokens_q=4, num_tokens_kv=4, kv_routing_tokens=2, num_sets_kv=4
            ),
            "num_sets_kv=4 and kv_routing_tokens=2",
        ),
        (
            lambda: ConditionalRoutedImageAttention(
                16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=8, window_size=4
            ),
            "light_window_size=8 and window_size=4",
        ),
        (
            lambda: ConditionalRoutedTransformerBlock(16, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=4),
            "needs num_heavy_attn_tokens_q",
        ),
        (
            lambda: ConditionalRoutedAttention(16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=1),
            "light_window_size must be",
        ),
    ],
)
def test_keywords_without_meaning_or_in_conflict_are_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_router_rejects_call_time_routing_tokens_and_double_amounts():
    router = CoordinateDescentRouter(16)
    x = torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match="routing_tokens are not supported"):
        router(x, num_tokens=4, routing_tokens=torch.randn(1, 16))
    with pytest.raises(ValueError, match="Pass the amount to route once"):
        router(x, 4, num_tokens=4)


def test_block_takes_mask_or_attention_mask_not_both():
    block = ConditionalRoutedTransformerBlock(
        32,
        num_heavy_attn_tokens_q=8,
        num_heavy_attn_tokens_kv=8,
        num_heavy_ff_tokens=8,
        heavy_dim_head=8,
        light_dim_head=8,
    )
    x = torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    torch.testing.assert_close(block(x, mask=mask), block(x, mask))
    with pytest.raises(ValueError, match="pass one of them"):
        block(x, mask, mask=mask)


def test_branch_norms_make_the_layers_scale_invariant():
    """colt5-attention's layers normalise their own input (LayerNorm/RMSNorm before each branch): the branches then
    do not see the input's scale (the routers do, but their choices are invariant to it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 48, 32)
    attention = ConditionalRoutedAttention(
        32, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, heavy_dim_head=8, light_dim_head=8
    )
    feedforward = ConditionalRoutedFeedForward(32, num_heavy_tokens=8)
    for layer in (attention, feedforward):
        torch.testing.assert_close(layer(3.0 * x), layer(x), rtol=1e-4, atol=1e-5)
    plain = ConditionalRoutedFeedForward(32, num_heavy_tokens=8, branch_norms=False)
    assert (plain(3.0 * x) - plain(x)).abs().max() > 1e-2
    block = ConditionalRoutedTransformerBlock(
        32,
        num_heavy_attn_tokens_q=8,
        num_heavy_attn_tokens_kv=8,
        num_heavy_ff_tokens=8,
        heavy_dim_head=8,
        light_dim_head=8,
    )
    assert isinstance(block.attention_norm, torch.nn.Identity) and block.attention.light_norm is not None


def test_older_releases_router_type_keyword():
    """colt5-attention up to 0.5 took router_type; its coordinate-descent router is the one here."""
    x = torch.randn(1, 40, 32)
    for layer in (
        ConditionalRoutedFeedForward(32, num_heavy_tokens=8, router_type="coor_descent"),
        ConditionalRoutedAttention(
            32,
            num_heavy_tokens_q=8,
            num_heavy_tokens_kv=8,
            heavy_dim_head=8,
            light_dim_head=8,
            router_type="coor_descent",
        ),
        ConditionalRoutedAutoregressiveAttention(
            32,
            num_heavy_tokens_q=4,
            num_heavy_tokens_kv=8,
            heavy_dim_head=8,
            light_dim_head=8,
            router_type="coor_descent",
        ),
    ):
        assert layer(x).shape == (1, 40, 32)


def test_router_takes_the_references_positional_arguments():
    router = CoordinateDescentRouter(16, False, 10, 1.5, 0.1, 0.8, 2.0, 2)
    assert router.route_kwargs["straight_through"] is False and router.route_kwargs["n_iters"] == 10
    assert router.route_kwargs["fetch_ratio"] == 1.5 and router.route_kwargs["eps"] == 0.1
    assert router.route_kwargs["eps_schedule"] == (2.0, 0.8) and router.routing_vectors.shape == (2, 16)
    assert CoordinateDescentRouter(16, backend="triton", use_triton=True).route_kwargs["backend"] == "triton"
    with pytest.raises(ValueError, match="pass routing sets as num_sets"):
        CoordinateDescentRouter(16, 3)


def test_causal_block_feedforward_router_follows_the_attentions_settings():
    from colt5 import CausalRoutedTransformerBlock

    block = CausalRoutedTransformerBlock(
        32,
        routed_query_fraction=0.25,
        routed_ff_fraction=0.25,
        memory_size=4,
        block_size=8,
        light_dim_head=8,
        heavy_dim_head=8,
        router_kwargs={"fetch_k_ratio": 1.5, "cosine_sim_routing": True, "eps": 0.5},
    )
    for router in (block.attention.q_router, block.feedforward.router):
        assert router.fetch_ratio == 1.5 and router.eps == 0.5 and router.cosine_sim_scale == 8.0
    # colt5's causal default with iterations stays a constant eps.
    assert block.attention.memory_route_kwargs["eps_schedule"] is None
    iterative = CausalRoutedTransformerBlock(
        32,
        routed_query_fraction=0.25,
        routed_ff_fraction=0.25,
        memory_size=4,
        block_size=8,
        router_kwargs={"n_iters": 10},
    )
    assert iterative.attention.memory_route_kwargs["eps_schedule"] is None


def test_attention_without_a_light_branch_is_the_heavy_branch_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 32)
    settings = dict(num_heavy_tokens_q=8, num_heavy_tokens_kv=8, heavy_dim_head=8, light_dim_head=8)
    heavy_only = ConditionalRoutedAttention(32, has_light_attn=False, **settings)
    assert not any(name.startswith("light_") for name, _ in heavy_only.named_parameters())
    both = ConditionalRoutedAttention(32, **settings)
    both.load_state_dict(heavy_only.state_dict(), strict=False)
    position_ids = torch.arange(40).expand(2, 40)
    torch.testing.assert_close(heavy_only(x), both._heavy(x, None, position_ids, 8, 8))
