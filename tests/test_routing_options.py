"""Routing options on every routed attention (self, causal, cross, image): random routing as an ablation control,
score multiplication of keys and queries, the learned unrouted output, several key/value routing sets, per-sample
amounts; and two-axis rotary embeddings."""

import math

import pytest
import torch

from colt5 import (
    CausalRoutedAttention,
    CoLT5Config,
    CoLT5ForCausalLM,
    CoLT5Model,
    ConditionalRoutedAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedImageAttention,
    CoordinateDescentRouter,
    ThresholdRouter,
)
from colt5.rotary import RotaryEmbedding, apply_rotary
from conftest import colt5_design

DIM = 32
KINDS = ("self", "causal", "cross", "image")


def make_attention(kind: str, **options) -> torch.nn.Module:
    """A tiny routed attention of `kind` with the routing `options` (constructor arguments)."""
    heavy = dict(num_routed_kv=options.pop("num_routed_kv", 2), **options)
    if kind != "causal":
        heavy = colt5_design(**heavy)
    if kind == "self":
        return ConditionalRoutedAttention(
            DIM,
            num_heavy_tokens_q=0.25,
            num_heavy_tokens_kv=0.5,
            light_heads=2,
            light_dim_head=8,
            light_window_size=8,  # 4 tokens on each side
            heavy_heads=4,
            heavy_dim_head=8,
            rotary_emb=True,
            **heavy,
        )
    if kind == "causal":
        return CausalRoutedAttention(
            DIM,
            routed_query_fraction=0.25,
            memory_size=6,
            block_size=8,
            light_heads=2,
            light_dim_head=8,
            light_window_size=4,
            heavy_heads=4,
            heavy_dim_head=8,
            **heavy,
        )
    if kind == "cross":
        return ConditionalRoutedCrossAttention(
            DIM, num_heavy_tokens_q=0.25, num_heavy_tokens_kv=0.5, heads=4, dim_head=8, **heavy
        )
    if kind == "image":
        return ConditionalRoutedImageAttention(
            DIM,
            num_heavy_tokens_q=0.25,
            num_heavy_tokens_kv=0.5,
            window_size=2,
            light_heads=2,
            light_dim_head=8,
            heavy_heads=4,
            heavy_dim_head=8,
            channels_first=True,
            **heavy,
        )
    raise AssertionError(kind)


def inputs(kind: str, batch: int = 2) -> tuple[torch.Tensor, ...]:
    if kind == "cross":
        return torch.randn(batch, 8, DIM), torch.randn(batch, 24, DIM)
    if kind == "image":
        return (torch.randn(batch, DIM, 4, 6),)
    return (torch.randn(batch, 24, DIM),)


def routers(layer: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in layer.modules() if hasattr(module, "routing_vectors")]


def same_weights(kind: str, reference: torch.nn.Module, **options) -> torch.nn.Module:
    other = make_attention(kind, **options)
    other.load_state_dict(reference.state_dict())
    return other


# ------------------------------------------------------------------------------------------------ random routing
@pytest.mark.parametrize("kind", KINDS)
def test_random_routing_ignores_content_and_follows_the_torch_seed(kind):
    # eval(): in training the causal router's running threshold moves between calls.
    layer = make_attention(kind, router_kwargs=dict(random_routing=True)).double().eval()
    args = tuple(t.double().requires_grad_() for t in inputs(kind))
    torch.manual_seed(1)
    first = layer(*args)
    torch.manual_seed(1)
    again = layer(*args)
    torch.manual_seed(2)
    other_draw = layer(*args)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other_draw).abs().max() > 1e-3, "a new draw should route other tokens"

    first.square().sum().backward()
    assert all(arg.grad is not None and arg.grad.abs().sum() > 0 for arg in args)
    for router in routers(layer):
        assert router.routing_vectors.grad is None, "random scores must not depend on the routing vectors"


@pytest.mark.parametrize("kind", KINDS)
def test_learned_routing_trains_the_routing_vectors(kind):
    """The control for the test above: without random routing every routing vector gets a gradient."""
    layer = make_attention(kind).double()
    layer(*(t.double() for t in inputs(kind))).square().sum().backward()
    for router in routers(layer):
        assert router.routing_vectors.grad is not None and router.routing_vectors.grad.abs().sum() > 0


def test_random_routing_never_routes_padding():
    router = CoordinateDescentRouter(DIM, num_sets=2, random_routing=True)
    mask = torch.arange(40)[None, :] < torch.tensor([[40], [17]])
    for seed in range(5):
        torch.manual_seed(seed)
        out = router(torch.randn(2, 40, DIM), 0.25, mask)
        assert out.mask.sum(-1).tolist() == [[10, 10], [5, 5]]  # per-sample amounts from each valid length
        assert mask.gather(1, out.indices[1][out.mask[1]].view(1, -1)).all()


def test_random_routing_picks_tokens_uniformly():
    """Over many draws every position is routed about equally often, whatever the tokens are."""
    router = CoordinateDescentRouter(DIM, num_sets=1, random_routing=True)
    x = torch.randn(1, 32, DIM)
    x[0, :4] *= 50.0  # tokens a learned router would always pick
    counts = torch.zeros(32)
    draws = 400
    for _ in range(draws):
        counts += torch.bincount(router(x, 8).indices[0, 0], minlength=32)
    expected = draws * 8 / 32
    assert counts.sum() == draws * 8
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_random_threshold_router_routes_the_target_fraction_at_initialisation():
    """Random scores have the spread the causal routers' initial thresholds assume (standard normal)."""
    router = ThresholdRouter(DIM, 0.125, random_routing=True).eval()
    x = torch.zeros(8, 512, DIM)  # content is ignored: even identical tokens are routed at random
    gate = router(x)
    assert abs(gate.routed.float().mean().item() - 0.125) < 0.02
    assert gate.routed.any(0).sum() > 0 and not gate.routed.all(0).any()


def test_random_routing_causal_attention_stays_causal():
    layer = make_attention("causal", router_kwargs=dict(random_routing=True)).eval()
    x = torch.randn(2, 24, DIM)
    changed = x.clone()
    changed[:, 13:] = torch.randn_like(changed[:, 13:])
    torch.manual_seed(3)
    reference = layer(x)
    torch.manual_seed(3)
    perturbed = layer(changed)
    torch.testing.assert_close(perturbed[:, :13], reference[:, :13], rtol=0, atol=1e-6)
    assert (perturbed[:, 13:] - reference[:, 13:]).abs().max() > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_config_random_routing_reaches_every_router(tiny_config, is_causal):
    causal = dict(is_causal=True, routed_kv_tokens=8, causal_block_size=8) if is_causal else {}
    config = tiny_config(random_routing=True, **causal)
    model = (CoLT5ForCausalLM if is_causal else CoLT5Model)(config)
    scorers = routers(model)
    assert len(scorers) == 3 * config.num_hidden_layers  # feedforward, queries, keys/values
    assert all(scorer.random_routing for scorer in scorers)
    reloaded = CoLT5Config.from_dict(config.to_dict())
    assert reloaded.random_routing is True


def test_random_routing_causal_lm_trains_and_generates(tiny_config):
    config = tiny_config(random_routing=True, is_causal=True, routed_kv_tokens=8, causal_block_size=8)
    model = CoLT5ForCausalLM(config)
    ids = torch.randint(2, config.vocab_size, (2, 20))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    generated = model.eval().generate(ids[:, :6], max_new_tokens=10, do_sample=False)
    assert generated.shape == (2, 16)


# ------------------------------------------------------------------------------------------------ other options
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["multiply_keys_by_score", "multiply_queries_by_score"])
def test_score_multiplication_options_change_the_heavy_output(kind, option):
    default = dict(multiply_keys_by_score=True, multiply_queries_by_score=False)
    layer = make_attention(kind).double()
    flipped = same_weights(kind, layer, **{option: not default[option]}).double()
    args = tuple(t.double() for t in inputs(kind))
    torch.manual_seed(0)
    first = layer(*args)
    torch.manual_seed(0)
    second = flipped(*args)
    assert (first - second).abs().max() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_learned_unrouted_output_changes_only_unrouted_positions(kind):
    layer = make_attention(kind, learned_unrouted_output=True).double().eval()
    args = tuple(t.double() for t in inputs(kind))
    without = layer(*args)
    with torch.no_grad():
        layer.unrouted_output.copy_(torch.randn(DIM))
    with_vector = layer(*args)
    difference = with_vector - without
    if kind == "image":
        difference = difference.movedim(1, -1).flatten(1, 2)
    changed = difference.abs().amax(-1) > 0
    # Every changed position moved by exactly the vector; the routed queries (a quarter) did not move.
    torch.testing.assert_close(difference[changed], layer.unrouted_output.expand(int(changed.sum()), -1))
    assert 0 < changed.float().mean() < 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_routed_kv", [1, 2, 4])
def test_key_value_routing_sets_split_the_heads(kind, num_routed_kv):
    layer = make_attention(kind, num_routed_kv=num_routed_kv)
    kv_router = layer.kv_router
    assert kv_router.routing_vectors.shape == (num_routed_kv, layer.heavy_k_proj.in_features)
    assert layer.heads_per_set * num_routed_kv == layer.heavy_heads
    out = layer(*inputs(kind))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["self", "cross", "image"])
def test_amounts_are_checked_at_construction(kind):
    for amount in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="num_heavy_tokens"):
            if kind == "self":
                ConditionalRoutedAttention(DIM, num_heavy_tokens_q=amount, num_heavy_tokens_kv=4)
            elif kind == "cross":
                ConditionalRoutedCrossAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=amount)
            else:
                ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=amount, num_heavy_tokens_kv=4)


def test_self_attention_amounts_follow_each_samples_valid_length():
    layer = make_attention("self", num_routed_kv=2)
    lengths = torch.tensor([24, 13, 5])
    mask = torch.arange(24)[None, :] < lengths[:, None]
    x = torch.randn(3, 24, DIM)
    q = layer.q_router(x, layer.num_heavy_tokens_q, mask)
    kv = layer.kv_router(x, layer.num_heavy_tokens_kv, mask)
    assert q.mask[:, 0].sum(-1).tolist() == [math.ceil(0.25 * n) for n in lengths.tolist()]
    assert kv.mask.sum(-1).tolist() == [[math.ceil(0.5 * n)] * 2 for n in lengths.tolist()]


# ------------------------------------------------------------------------------------------------ rotary axes
def test_one_axis_rotary_is_the_standard_formula():
    rotary = RotaryEmbedding(8, theta=100.0)
    positions = torch.tensor([0, 3, 17])
    cos, _ = rotary(positions, torch.float64)
    inv_freq = 100.0 ** -(torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = positions[:, None].double() * inv_freq
    torch.testing.assert_close(cos, torch.cat((angles, angles), -1).cos(), rtol=0, atol=1e-6)


def test_two_axis_rotary_scores_depend_only_on_the_offset_along_each_axis():
    rotary = RotaryEmbedding(16, axes=2)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(query_at, key_at):
        cos_q, sin_q = rotary(torch.tensor(query_at), torch.float64)
        cos_k, sin_k = rotary(torch.tensor(key_at), torch.float64)
        return apply_rotary(q, cos_q, sin_q) @ apply_rotary(k, cos_k, sin_k)

    base = score([2, 5], [7, 1])
    torch.testing.assert_close(score([12, 9], [17, 5]), base)  # both shifted by (10, 4)
    assert abs(score([2, 5], [7, 2]) - base) > 1e-3  # another column offset
    assert abs(score([2, 5], [8, 1]) - base) > 1e-3  # another row offset
    assert abs(score([2, 5], [1, 7]) - base) > 1e-3  # rows and columns are not interchangeable


def test_two_axis_rotary_needs_a_head_dimension_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding(6, axes=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        RotaryEmbedding(8, axes=2)(torch.zeros(3, 3, dtype=torch.long), torch.float32)
