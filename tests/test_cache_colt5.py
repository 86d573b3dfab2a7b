"""CoLT5Cache and CoLT5CacheLayer (colt5/cache_colt5.py): what the cache layer holds after a prefill and after
appending tokens, its host and device token counts, and which batch operations keep its tensors (and a captured
CUDA graph reading them) valid. Cache-equals-no-cache through the model is in test_causal.py."""

import pytest
import torch

from colt5 import CausalRoutedAttention, CoLT5Cache

DIM, BLOCK, MEMORY, WINDOW = 32, 8, 5, 4


def make_layer(routed_query_fraction: float = 1.0) -> CausalRoutedAttention:
    torch.manual_seed(0)
    return CausalRoutedAttention(
        DIM, routed_query_fraction=routed_query_fraction, memory_size=MEMORY, block_size=BLOCK, light_heads=2, light_dim_head=8,
        light_window_size=WINDOW, heavy_heads=4, heavy_dim_head=8, num_routed_kv=2,
    ).eval()


def test_a_cache_takes_a_config_or_a_layer_count():
    with pytest.raises(ValueError, match="config or num_hidden_layers"):
        CoLT5Cache()
    assert len(CoLT5Cache(num_hidden_layers=3).layers) == 3


def test_appended_tokens_land_where_a_longer_prefill_puts_them():
    """Prefill 13 tokens then append 2 (no block boundary: 13 -> 15 of blocks of 8) against a prefill of all 15:
    equal ring buffers, scores, current block and counts (float32, exact up to float rounding)."""
    layer = make_layer()
    x = torch.randn(2, 15, DIM)
    appended, whole = CoLT5Cache(num_hidden_layers=1), CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        layer(x[:, :13], cache=appended)
        layer(x[:, 13:], cache=appended)
        layer(x, cache=whole)
    a, b = appended.layers[0], whole.layers[0]
    assert a.valid_counts == b.valid_counts == [15, 15] and a.seen_tokens == b.seen_tokens == 15
    assert a.counts.tolist() == [15, 15] and int(a.seen) == 15
    # Ring buffers: slot order depends only on the position, so the two are comparable slot by slot.
    for name in ("light_keys", "light_values", "heavy_keys", "heavy_values"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5)
    for name in ("light_mask", "heavy_mask", "block_index", "block_fill", "memory_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.scores[..., :15], b.scores[..., :15], atol=1e-6, rtol=1e-5)
    assert int(a.block_fill[0]) == 15 - BLOCK


def test_the_query_router_statistics_are_those_of_the_valid_scores():
    """(count, sum, sum of squares) of the query router's raw scores over each sample's valid tokens, after a
    prefill and after an appended token (float64 sums of float32 scores, within 1e-9 relative); a layer with
    every token a query has no router and keeps none."""
    layer = make_layer(routed_query_fraction=0.5)
    x = torch.randn(2, 12, DIM)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False
    cache = CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        layer(x[:, :11], mask[:, :11], cache=cache)
        layer(x[:, 11:], cache=cache)
        scores = layer.q_router.scores(x)[:, 0].double() * mask
    expected = torch.stack((mask.double().sum(1), scores.sum(1), scores.square().sum(1)), 1)
    torch.testing.assert_close(cache.layers[0].query_router_statistics, expected, rtol=1e-9, atol=1e-9)

    every_query = CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        make_layer()(x, mask, cache=every_query)
    assert every_query.layers[0].query_router_statistics is None


def test_reordering_works_in_place_and_batch_changes_replace_the_tensors():
    layer = make_layer(routed_query_fraction=0.5)
    x = torch.randn(3, 11, DIM)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[2, :4] = False
    cache = CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        layer(x, mask, cache=cache)
    cache_layer = cache.layers[0]
    names = ("heavy_keys", "scores", "counts", "query_router_statistics")
    before = {name: getattr(cache_layer, name).clone() for name in names}
    pointers, version = cache_layer.heavy_keys.data_ptr(), cache_layer.version
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert cache_layer.heavy_keys.data_ptr() == pointers and cache_layer.version == version
    assert cache.valid_counts == [7, 11, 11]
    for name, tensor in before.items():
        assert torch.equal(getattr(cache_layer, name), tensor[[2, 0, 1]]), name
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.valid_counts == [7, 11] and cache_layer.heavy_keys.shape[0] == 2
    assert cache_layer.version == version + 1
    cache.batch_repeat_interleave(2)
    assert cache.valid_counts == [7, 7, 11, 11] and cache_layer.counts.tolist() == [7, 7, 11, 11]
    assert cache_layer.version == version + 2
    # The router statistics follow their samples: [2, 0, 1] -> select [0, 2] -> repeat twice.
    assert torch.equal(cache_layer.query_router_statistics, before["query_router_statistics"][[2, 2, 1, 1]])


def test_a_reset_cache_is_empty():
    layer = make_layer()
    cache = CoLT5Cache(num_hidden_layers=1)
    with torch.no_grad():
        layer(torch.randn(1, 9, DIM), cache=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.valid_counts == [] and cache.decode_graph is None
    assert not cache.layers[0].is_filled
