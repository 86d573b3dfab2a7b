"""ConditionalRoutedAutoregressiveAttention: colt5-attention's keywords on strictly causal routed attention."""

import copy

import pytest
import torch

from colt5 import CausalRoutedAttention, CoLT5Cache, ConditionalRoutedAutoregressiveAttention

DIM = 32
SETTINGS = dict(
    num_heavy_tokens_q=4,
    num_heavy_tokens_kv=8,
    light_window_size=8,
    heavy_window_size=16,
    light_heads=2,
    light_dim_head=8,
    heavy_heads=4,
    heavy_dim_head=8,
    num_routed_kv=2,
)


def make_layer(**overrides) -> ConditionalRoutedAutoregressiveAttention:
    return ConditionalRoutedAutoregressiveAttention(DIM, **{**SETTINGS, **overrides})


def changes_before_and_after(layer, x: torch.Tensor, t: int) -> tuple[float, float]:
    """How much the outputs at positions <= t and > t move when every token after t is replaced. Each input goes to
    its own copy of the layer: in training a call updates the routers' running statistics, and the second call
    must route with the statistics the first one had."""
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        reference, perturbed = copy.deepcopy(layer)(x), copy.deepcopy(layer)(changed)
    before = (perturbed[:, : t + 1] - reference[:, : t + 1]).abs().max().item()
    after = (perturbed[:, t + 1 :] - reference[:, t + 1 :]).abs().max().item()
    return before, after


def test_keywords_map_onto_the_causal_layer():
    layer = make_layer()
    assert isinstance(layer, CausalRoutedAttention)
    assert layer.q_router.fraction == 4 / 16  # 4 heavy queries per heavy window of 16
    assert layer.memory_size == 8 and layer.block_size == 16 and layer.light_window_size == 8
    assert layer.unrouted_output is not None and layer.heavy_rotary is None  # use_null_q_tokens, rotary_emb=False
    assert layer.light_norm is not None and layer.heavy_norm is not None  # the input is normalised inside
    assert layer.memory_route_kwargs["n_iters"] == 20 and layer.memory_route_kwargs["straight_through"]
    assert make_layer(heavy_window_size=None).block_size == 8  # default: the light window size


@pytest.mark.parametrize("training", [False, True])
def test_outputs_do_not_depend_on_later_tokens(training):
    layer = make_layer().train(training)
    x = torch.randn(2, 48, DIM)  # three heavy windows: the routed memory of the second and third is in play
    for t in (0, 7, 15, 16, 17, 30, 31, 32, 46):
        before, after = changes_before_and_after(layer, x, t)
        assert before <= 1e-5, f"t={t}: outputs at positions <= t changed by {before}"
        assert after > 1e-3, f"t={t}: the change after t changed nothing"


def test_the_reference_layer_looks_at_later_tokens_of_its_window():
    """Mutation check of the causality test: colt5-attention's own layer routes each window's queries by a top-k
    over the window, so an output moves when a later token of its window does."""
    reference = pytest.importorskip("colt5_attention")
    layer = reference.ConditionalRoutedAutoregressiveAttention(
        dim=DIM, **{k: v for k, v in SETTINGS.items() if k != "num_routed_kv"}
    ).eval()
    x = torch.randn(2, 48, DIM)
    assert max(changes_before_and_after(layer, x, t)[0] for t in (17, 20, 33, 36)) > 1e-3


@pytest.mark.parametrize("null_kv", [False, True])
def test_decoding_with_a_cache_equals_the_full_forward(null_kv):
    layer = make_layer(null_kv=null_kv).eval()
    x = torch.randn(2, 40, DIM)
    cache = CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        full = layer(x)
        steps = [layer(x[:, :21], cache=cache)]
        for t in range(21, 40):
            steps.append(layer(x[:, t : t + 1], cache=cache))
    assert cache.valid_counts == [40, 40] and cache.get_seq_length() == 40
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_call_time_memory_size_and_random_routing():
    torch.manual_seed(0)
    layer = make_layer().eval()
    wider = make_layer(num_heavy_tokens_kv=12).eval()
    wider.load_state_dict(layer.state_dict())
    x = torch.randn(2, 48, DIM)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, num_heavy_tokens_kv=12), wider(x))
        assert layer.memory_size == 8  # restored after the call
        learned = layer(x)
        torch.manual_seed(1)
        random_once = layer(x, random_route=True)
        torch.manual_seed(1)
        random_again = layer(x, random_route=True)
    torch.testing.assert_close(random_once, random_again)
    assert (random_once - learned).abs().max() > 1e-3
    assert not layer.q_router.random_routing and not layer.kv_router.random_routing


def test_errors_name_what_to_do():
    with pytest.raises(ValueError, match="at most heavy_window_size"):
        make_layer(num_heavy_tokens_q=17)
    layer = make_layer()
    x = torch.randn(1, 20, DIM)
    with pytest.raises(ValueError, match="cannot change per call"):
        layer(x, num_heavy_tokens_q=8)
    layer(x, num_heavy_tokens_q=4)  # the layer's own share is fine
    cache = CoLT5Cache(num_hidden_layers=1)
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="cannot change while decoding"):
        layer(x[:, :1], cache=cache, num_heavy_tokens_kv=4)


def test_random_route_in_training_leaves_the_query_router_statistics_alone():
    layer = make_layer().train()
    x = torch.randn(2, 48, DIM)
    layer(x)  # a learned call: its statistics are pending
    twin = copy.deepcopy(layer)
    for _ in range(5):
        layer(x, random_route=True)
    layer.eval(), twin.eval()  # both fold in what is pending
    assert torch.equal(layer.q_router.threshold, twin.q_router.threshold)
    assert torch.equal(layer.q_router.shift, twin.q_router.shift)
    assert not torch.equal(twin.q_router.threshold, make_layer().q_router.threshold)  # the learned call counted


def test_random_route_refuses_a_cache():
    """The cache carries the query router's prefix statistics, which random scores must not change."""
    layer = make_layer().eval()
    with pytest.raises(ValueError, match="random_route cannot continue a cache"):
        layer(torch.randn(1, 8, DIM), cache=CoLT5Cache(num_hidden_layers=1), random_route=True)


def test_router_keywords_without_meaning_are_clear_errors_here_too():
    for keyword in ({"triton_checkpoint_segments": 4}, {"learned_routing_tokens": True}):
        with pytest.raises(ValueError, match="has no meaning in colt5"):
            make_layer(router_kwargs=keyword)
