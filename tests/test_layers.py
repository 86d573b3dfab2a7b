"""Tests of the plain nn.Module layers: routed feedforward, routed attention and the transformer block."""

import functools

import pytest
import torch

from colt5 import (
    ConditionalRoutedAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedTransformerBlock,
)
from conftest import colt5_design

DIM = 32
LAYERS = ("ff", "attn", "block")


def make_layer(kind: str, **overrides) -> torch.nn.Module:
    """A tiny layer of `kind`; `overrides` are constructor arguments (ignored by the feedforward when they only
    concern attention)."""
    attn_kwargs = dict(
        num_heavy_tokens_q=0.25,
        num_heavy_tokens_kv=0.5,
        light_heads=2,
        light_dim_head=16,
        light_window_size=16,  # 8 tokens on each side
        heavy_heads=4,
        heavy_dim_head=16,
        rotary_emb=True,
    )
    if kind == "ff":
        kwargs = dict(num_heavy_tokens=0.25, light_hidden_dim=16, heavy_hidden_dim=64)
        kwargs.update({k: v for k, v in overrides.items() if k in ("num_heavy_tokens", "router_kwargs")})
        design = colt5_design(**kwargs)
        return ConditionalRoutedFeedForward(
            DIM, **{k: v for k, v in design.items() if k not in ("learned_unrouted_output", "multiply_keys_by_score")}
        )
    if kind == "attn":
        return ConditionalRoutedAttention(DIM, **colt5_design(**{**attn_kwargs, **overrides}))
    if kind == "block":
        kwargs = dict(attn_kwargs, num_heavy_ff_tokens=0.25, light_ff_hidden_dim=16, heavy_ff_hidden_dim=64)
        return ConditionalRoutedTransformerBlock(DIM, **colt5_design(**{**kwargs, **overrides}))
    raise AssertionError(kind)


def run(layer: torch.nn.Module, x, mask=None, position_ids=None):
    if isinstance(layer, ConditionalRoutedFeedForward):
        return layer(x, mask)
    if isinstance(layer, ConditionalRoutedAttention):
        return layer(x, mask, position_ids)
    return layer(x, attention_mask=mask, position_ids=position_ids)


def randomize_unrouted_output(layer: torch.nn.Module) -> None:
    """The learned unrouted output starts at zero; give it a value so that it shows in the outputs."""
    for module in layer.modules():
        if isinstance(module, ConditionalRoutedAttention) and module.unrouted_output is not None:
            with torch.no_grad():
                module.unrouted_output.normal_()


def length_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("n", [1, 2, 9])
def test_output_shape_of_short_sequences(kind, n):
    layer = make_layer(kind).eval()
    out = run(layer, torch.randn(2, n, DIM), length_mask([n, 1], n))
    assert out.shape == (2, n, DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", LAYERS)
def test_counts_beyond_the_length_route_every_token(kind):
    """An int amount is capped at the (valid) length, so a huge count routes everything, like the fraction 1.0."""
    if kind == "ff":
        everything, huge = dict(num_heavy_tokens=1.0), dict(num_heavy_tokens=10**6)
    else:
        everything = dict(num_heavy_tokens_q=1.0, num_heavy_tokens_kv=1.0, num_heavy_ff_tokens=1.0)
        huge = dict(num_heavy_tokens_q=10**6, num_heavy_tokens_kv=10**6, num_heavy_ff_tokens=10**6)
        if kind == "attn":
            del everything["num_heavy_ff_tokens"], huge["num_heavy_ff_tokens"]
    layer_fraction = make_layer(kind, **everything).eval()
    layer_count = make_layer(kind, **huge).eval()
    layer_count.load_state_dict(layer_fraction.state_dict())
    x = torch.randn(2, 30, DIM)
    mask = length_mask([30, 12], 30)
    with torch.no_grad():
        assert torch.equal(run(layer_count, x, mask), run(layer_fraction, x, mask))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_output_shape(kind, with_mask):
    layer = make_layer(kind).eval()
    x = torch.randn(3, 37, DIM)
    mask = length_mask([37, 20, 5], 37) if with_mask else None
    out = run(layer, x, mask)
    assert out.shape == (3, 37, DIM)
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("ff", {}),
        ("attn", {}),
        ("attn", dict(num_routed_kv=2, learned_unrouted_output=True, multiply_queries_by_score=True)),
        ("attn", dict(multiply_keys_by_score=False)),
        ("block", {}),
        ("block", dict(num_routed_kv=2, learned_unrouted_output=True)),
    ],
)
def test_every_parameter_gets_a_finite_nonzero_gradient(kind, overrides):
    layer = make_layer(kind, **overrides).train()
    x = torch.randn(2, 40, DIM, requires_grad=True)
    mask = length_mask([40, 29], 40)
    out = run(layer, x, mask)
    (out * torch.randn_like(out) * mask[..., None]).sum().backward()

    names = [name for name, _ in layer.named_parameters()]
    assert any(name.endswith("routing_vectors") for name in names)
    if overrides.get("learned_unrouted_output"):
        assert any(name.endswith("unrouted_output") for name in names)
    for name, param in layer.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------- padding


PADDING_CASES = [
    ("ff", {}),
    ("attn", dict(num_routed_kv=1, learned_unrouted_output=False, multiply_keys_by_score=True,
                  multiply_queries_by_score=False)),
    ("attn", dict(num_routed_kv=2, learned_unrouted_output=True, multiply_keys_by_score=False,
                  multiply_queries_by_score=True)),
    ("attn", dict(num_routed_kv=2, learned_unrouted_output=False, multiply_keys_by_score=True,
                  multiply_queries_by_score=True)),
    ("attn", dict(num_routed_kv=1, learned_unrouted_output=True, multiply_keys_by_score=False,
                  multiply_queries_by_score=False)),
    ("block", dict(num_routed_kv=1, learned_unrouted_output=False, multiply_keys_by_score=True,
                   multiply_queries_by_score=False)),
    ("block", dict(num_routed_kv=2, learned_unrouted_output=True, multiply_keys_by_score=True,
                   multiply_queries_by_score=True)),
    ("attn", dict(num_routed_kv=2, router_kwargs=dict(route_block_size=16))),
    ("block", dict(router_kwargs=dict(n_iters=5, eps_schedule=(4.0, 0.5), straight_through=True))),
]


@pytest.mark.parametrize("kind, overrides", PADDING_CASES)
def test_padded_content_does_not_leak_into_valid_positions(kind, overrides):
    layer = make_layer(kind, **overrides).eval()
    randomize_unrouted_output(layer)
    n = 48
    x = torch.randn(3, n, DIM)
    mask = length_mask([n, 40, 29], n)
    junk = x.clone()
    junk[~mask] = 100 * torch.randn(int((~mask).sum()), DIM)

    with torch.no_grad():
        out = run(layer, x, mask)
        out_junk = run(layer, junk, mask)
    assert torch.isfinite(out_junk[mask]).all()
    torch.testing.assert_close(out_junk[mask], out[mask], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------- batch invariance


BATCH_CASES = [
    ("ff", {}),
    ("ff", dict(num_heavy_tokens=9)),
    ("attn", {}),
    ("attn", dict(num_routed_kv=2, multiply_queries_by_score=True)),
    ("attn", dict(num_heavy_tokens_q=9, num_heavy_tokens_kv=20, multiply_keys_by_score=False)),
    ("block", {}),
    ("block", dict(num_routed_kv=2)),
    ("ff", dict(router_kwargs=dict(route_block_size=16))),
    ("attn", dict(num_routed_kv=2, router_kwargs=dict(route_block_size=16))),
    ("block", dict(router_kwargs=dict(n_iters=5, eps_schedule=(4.0, 0.5), straight_through=True))),
]


@pytest.mark.parametrize("kind, overrides", BATCH_CASES)
def test_padded_sample_in_batch_equals_sample_alone(kind, overrides):
    """Routed amounts follow each sample's valid length, so padding a sample and batching it with a longer one
    changes nothing at its valid positions."""
    layer = make_layer(kind, **overrides).eval()
    short = torch.randn(1, 70, DIM)
    other = torch.randn(1, 100, DIM)
    padded = torch.cat([short, torch.randn(1, 30, DIM)], dim=1)
    batch = torch.cat([other, padded])
    mask = length_mask([100, 70], 100)

    with torch.no_grad():
        alone = run(layer, short)
        batched = run(layer, batch, mask)
        other_alone = run(layer, other)
    torch.testing.assert_close(batched[1, :70], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[0], other_alone[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- batch separation


@pytest.mark.parametrize("kind", ["attn", "block"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_kv_routing_sets_keep_samples_apart(kind, with_mask):
    layer = make_layer(kind, num_routed_kv=2).eval()
    x = torch.randn(2, 40, DIM)
    mask = length_mask([33, 40], 40) if with_mask else None
    changed = x.clone()
    changed[1] = torch.randn(40, DIM)

    with torch.no_grad():
        out = run(layer, x, mask)
        out_changed = run(layer, changed, mask)
    assert torch.equal(out_changed[0], out[0])
    assert not torch.allclose(out_changed[1], out[1])


# ----------------------------------------------------------------------------------------------------- heavy branch is global


def test_heavy_branch_with_every_token_routed_sees_far_tokens():
    attn = make_layer("attn", light_window_size=4, num_heavy_tokens_q=1.0, num_heavy_tokens_kv=1.0).eval()
    x = torch.randn(1, 128, DIM)
    changed = x.clone()
    changed[0, 100] = torch.randn(DIM)
    positions = torch.arange(128)[None]

    with torch.no_grad():
        out, out_changed = attn(x), attn(changed)
        light, light_changed = attn._light(x, None, positions), attn._light(changed, None, positions)
    # Token 100 is far outside position 0's window: the light branch does not see it ...
    assert torch.equal(light_changed[0, 0], light[0, 0])
    # ... but the heavy branch, where every token is a query and a key, does.
    assert (out_changed[0, 0] - out[0, 0]).abs().max() > 1e-3


def _orthogonal_to(vectors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A random vector orthogonal to every row of `vectors`, with the norm of `like`."""
    basis, _ = torch.linalg.qr(vectors.T)  # (dim, r), orthonormal columns spanning the routing vectors
    delta = torch.randn(vectors.shape[-1], dtype=vectors.dtype)
    delta = delta - basis @ (basis.T @ delta)
    return delta / delta.norm() * 3 * like.norm()


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_heavy_branch_ignores_tokens_that_are_neither_routed_nor_local(num_routed_kv):
    """Position 0's output depends on a far, unrouted token only through that token's router scores (the soft
    top-k normalisation couples every score). Changing the token orthogonally to every routing vector keeps all
    scores, hence the routing and its weights, so position 0's output stays put; the same change to a routed
    key/value token does move it."""
    window = 4
    attn = make_layer(
        "attn", light_window_size=window, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, num_routed_kv=num_routed_kv
    ).double().eval()
    x = torch.randn(1, 128, DIM, dtype=torch.float64)
    with torch.no_grad():
        # Make position 0 a routed query, so the heavy branch contributes to its output.
        q_vector = attn.q_router.routing_vectors[0]
        x[0, 0] += 10 * q_vector / q_vector.norm()
        routed_q = attn.q_router(x, attn.num_heavy_tokens_q)
        routed_kv = attn.kv_router(x, attn.num_heavy_tokens_kv)
    q_positions = set(routed_q.indices[routed_q.mask].tolist())
    kv_positions = set(routed_kv.indices[routed_kv.mask].tolist())
    assert 0 in q_positions
    assert len(q_positions) == 8 and len(kv_positions) <= 8 * num_routed_kv

    far = [p for p in range(window + 1, 128) if p not in q_positions and p not in kv_positions]
    far_kv = [p for p in sorted(kv_positions) if p > window and p not in q_positions]
    assert far and far_kv
    routing_vectors = torch.cat([attn.q_router.routing_vectors, attn.kv_router.routing_vectors]).detach()

    def change(position):
        changed = x.clone()
        changed[0, position] += _orthogonal_to(routing_vectors, x[0, position])
        with torch.no_grad():
            # The change keeps the routing itself.
            assert torch.equal(attn.q_router(changed, attn.num_heavy_tokens_q).indices, routed_q.indices)
            assert torch.equal(attn.kv_router(changed, attn.num_heavy_tokens_kv).indices, routed_kv.indices)
            return attn(changed)

    with torch.no_grad():
        out = attn(x)
    unrouted_far = far[-1]
    torch.testing.assert_close(change(unrouted_far)[0, 0], out[0, 0], atol=1e-10, rtol=0)
    assert (change(far_kv[-1])[0, 0] - out[0, 0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------- learned unrouted output


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_learned_unrouted_output_is_added_exactly_at_unrouted_queries(num_routed_kv):
    """The learned vector goes to every valid query that was not routed and to no routed one, also in a padded
    batch where a shorter sample routes fewer queries than the batch's slot count."""
    attn = make_layer("attn", learned_unrouted_output=True, num_routed_kv=num_routed_kv).eval()
    randomize_unrouted_output(attn)
    x = torch.randn(2, 40, DIM)
    with torch.no_grad():
        # Position 0 is routed in both samples.
        x[:, 0] += 10 * attn.q_router.routing_vectors[0] / attn.q_router.routing_vectors[0].norm()
    mask = length_mask([40, 20], 40)

    with torch.no_grad():
        routed_q = attn.q_router(x, attn.num_heavy_tokens_q, mask)
        with_vector = attn(x, mask)
        vector = attn.unrouted_output.clone()
        attn.unrouted_output.zero_()
        without_vector = attn(x, mask)
    routed = torch.zeros(2, 40, dtype=torch.bool)
    for b in range(2):
        routed[b, routed_q.indices[b, 0][routed_q.mask[b, 0]]] = True
    assert routed[:, 0].all()
    expected = (~routed & mask).unsqueeze(-1) * vector
    torch.testing.assert_close((with_vector - without_vector)[mask], expected[mask], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- fully masked sample


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("ff", {}),
        ("attn", {}),
        ("attn", dict(num_routed_kv=2, learned_unrouted_output=True, multiply_queries_by_score=True)),
        ("block", {}),
        ("block", dict(num_routed_kv=2, learned_unrouted_output=True)),
    ],
)
def test_fully_masked_sample_is_finite_forward_and_backward(kind, overrides):
    layer = make_layer(kind, **overrides).train()
    x = torch.randn(2, 24, DIM, requires_grad=True)
    mask = length_mask([24, 0], 24)
    out = run(layer, x, mask)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name

    # The valid sample is unaffected by its fully masked neighbour.
    with torch.no_grad():
        alone = run(layer.eval(), x[:1].detach())
    torch.testing.assert_close(out[0].detach(), alone[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("kind", ["attn", "block"])
@pytest.mark.parametrize("heavy_heads, num_routed_kv", [(4, 3), (6, 4), (1, 2)])
def test_heavy_heads_not_divisible_by_kv_sets_raises(kind, heavy_heads, num_routed_kv):
    with pytest.raises(ValueError, match="num_routed_kv"):
        make_layer(kind, heavy_heads=heavy_heads, num_routed_kv=num_routed_kv)


# ----------------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("branch", ["_light", "_heavy", "forward"])
def test_rotary_is_relative_shift_invariant_and_permutation_sensitive(branch):
    attn = make_layer("attn").eval()
    x = torch.randn(2, 40, DIM)
    mask = length_mask([40, 31], 40)
    positions = torch.arange(40).expand(2, 40)
    call = getattr(attn, branch)
    if branch == "_heavy":
        call = functools.partial(call, amount_q=attn.num_heavy_tokens_q, amount_kv=attn.num_heavy_tokens_kv)

    with torch.no_grad():
        out = call(x, mask, positions)
        shifted = call(x, mask, positions + 1000)
        permuted = call(x, mask, positions[:, torch.randperm(40)])
    torch.testing.assert_close(shifted[mask], out[mask], atol=1e-4, rtol=0)
    assert (permuted[mask] - out[mask]).abs().max() > 1e-3


def test_default_position_ids_are_arange():
    attn = make_layer("attn").eval()
    x = torch.randn(2, 30, DIM)
    with torch.no_grad():
        default = attn(x)
        explicit = attn(x, None, torch.arange(30).expand(2, 30))
    assert torch.equal(default, explicit)
