"""Tests of ConditionalRoutedCrossAttention: routed queries of x attending to keys/values routed from a context."""

import math

import pytest
import torch

from colt5 import ConditionalRoutedCrossAttention
from conftest import colt5_design

DIM = 32
HEADS = 4
DIM_HEAD = 8


def make_layer(**overrides) -> ConditionalRoutedCrossAttention:
    kwargs = dict(num_heavy_tokens_q=0.5, num_heavy_tokens_kv=0.25, heads=HEADS, dim_head=DIM_HEAD)
    return ConditionalRoutedCrossAttention(DIM, **colt5_design(**{**kwargs, **overrides}))


def random_mask(counts, n) -> torch.Tensor:
    """`(len(counts), n)` bool masks with `counts[b]` True entries at random (not only leading) positions."""
    return torch.stack([torch.randperm(n) < count for count in counts])


def routed(out, b, s=0) -> list[int]:
    """Sorted positions that a RouterOutput routes (non-empty slots) for sample b, set s."""
    return sorted(out.indices[b, s][out.mask[b, s]].tolist())


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference(layer, x, context, mask=None, context_mask=None) -> torch.Tensor:
    """The layer's output recomputed by hand, one sample and one key/value routing set at a time, from the routers'
    decisions: the heads of set s attend to the valid slots of set s only, values (and keys when
    multiply_keys_by_score) scaled by the key/value weights, queries by their weight when multiply_queries_by_score,
    outputs by it always, the learned unrouted output at valid-or-not positions no routed query lands on."""
    with torch.no_grad():
        rq = layer.q_router(x, layer.num_heavy_tokens_q, mask)
        rkv = layer.kv_router(context, layer.num_heavy_tokens_kv, context_mask)
    batch, n, _ = x.shape
    sets, hps, e = layer.num_routed_kv, layer.heads_per_set, DIM_HEAD
    wq, wk, wv, wo = (
        p.weight.detach() for p in (layer.heavy_q_proj, layer.heavy_k_proj, layer.heavy_v_proj, layer.heavy_o_proj)
    )
    out = torch.zeros_like(x)
    for b in range(batch):
        q_slots = rq.mask[b, 0]
        q_idx, q_w = rq.indices[b, 0][q_slots], rq.weights[b, 0][q_slots]
        q = (x[b, q_idx] @ wq.T).view(len(q_idx), HEADS, e)
        if layer.multiply_queries_by_score:
            q = q * q_w[:, None, None]
        heads_out = []
        for s in range(sets):
            slots = rkv.mask[b, s]
            idx, w = rkv.indices[b, s][slots], rkv.weights[b, s][slots]
            rows = slice(s * hps * e, (s + 1) * hps * e)
            k = (context[b, idx] @ wk[rows].T).view(len(idx), hps, e)
            v = (context[b, idx] @ wv[rows].T).view(len(idx), hps, e) * w[:, None, None]
            if layer.multiply_keys_by_score:
                k = k * w[:, None, None]
            for h in range(hps):
                if len(idx) == 0:  # no valid memory: nothing to attend to
                    heads_out.append(torch.zeros(len(q_idx), e, dtype=x.dtype))
                    continue
                scores = q[:, s * hps + h] @ k[:, h].T / math.sqrt(e)
                heads_out.append(torch.softmax(scores, dim=-1) @ v[:, h])
        out[b, q_idx] = (torch.cat(heads_out, dim=-1) @ wo.T) * q_w[:, None]
        if layer.unrouted_output is not None:
            unrouted = torch.ones(n, dtype=torch.bool)
            unrouted[q_idx] = False
            out[b, unrouted] = layer.unrouted_output.detach()
    return out


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("context_dim", [None, 20, 48])
@pytest.mark.parametrize("with_masks", [False, True])
def test_output_shape(context_dim, with_masks):
    layer = make_layer(context_dim=context_dim).eval()
    x = torch.randn(3, 11, DIM)
    context = torch.randn(3, 37, context_dim or DIM)
    mask = random_mask([11, 6, 1], 11) if with_masks else None
    context_mask = random_mask([37, 20, 3], 37) if with_masks else None
    with torch.no_grad():
        out = layer(x, context, mask, context_mask)
    assert out.shape == (3, 11, DIM)
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert layer.heavy_k_proj.in_features == layer.heavy_v_proj.in_features == (context_dim or DIM)


# ----------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(context_dim=24, num_routed_kv=2, learned_unrouted_output=True, multiply_queries_by_score=True),
        dict(multiply_keys_by_score=False, route_block_size=10),
    ],
)
def test_gradients_reach_inputs_projections_and_routing_vectors(overrides):
    layer = make_layer(**overrides).train()
    context_dim = overrides.get("context_dim", DIM)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    context = torch.randn(2, 40, context_dim, requires_grad=True)
    mask = random_mask([12, 9], 12)
    context_mask = random_mask([40, 25], 40)
    out = layer(x, context, mask, context_mask)
    (out * torch.randn_like(out)).sum().backward()

    expected = {
        "heavy_q_proj.weight",
        "heavy_k_proj.weight",
        "heavy_v_proj.weight",
        "heavy_o_proj.weight",
        "q_router.routing_vectors",
        "kv_router.routing_vectors",
    }
    if overrides.get("learned_unrouted_output"):
        expected.add("unrouted_output")
    assert {name for name, _ in layer.named_parameters()} == expected
    for name, param in layer.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    for name, tensor in (("x", x), ("context", context)):
        assert torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name
    # Padding gets no gradient: it is never routed and never scored into a valid weight.
    assert torch.all(x.grad[~mask] == 0)
    assert torch.all(context.grad[~context_mask] == 0)


# ----------------------------------------------------------------------------------------------------- memory padding


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_padded_memories_are_never_routed_while_valid_ones_remain(num_routed_kv):
    """Padding is given the highest router scores, and still loses to every valid token."""
    layer = make_layer(num_heavy_tokens_kv=10, num_routed_kv=num_routed_kv).double().eval()
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    context_mask = random_mask([25, 4], 30)
    with torch.no_grad():
        context[~context_mask] += 20 * unit(layer.kv_router.routing_vectors.sum(0))
        out = layer.kv_router(context, layer.num_heavy_tokens_kv, context_mask)
    assert out.indices.shape == out.weights.shape == out.mask.shape == (2, num_routed_kv, 10)

    valid_0 = set(torch.nonzero(context_mask[0]).flatten().tolist())
    valid_1 = sorted(torch.nonzero(context_mask[1]).flatten().tolist())
    for s in range(num_routed_kv):
        # More valid tokens than the amount: ten routed, all valid.
        assert out.mask[0, s].all()
        assert len(routed(out, 0, s)) == 10 and set(routed(out, 0, s)) <= valid_0
        assert (out.weights[0, s] > 0).all()
        # Fewer valid tokens than the amount: every valid token routed (weight 1: the soft top-k saturates),
        # the empty slots masked out with weight 0.
        assert out.mask[1, s].sum() == 4
        assert routed(out, 1, s) == valid_1
        assert torch.all(out.weights[1, s][out.mask[1, s]] == 1)
        assert torch.all(out.weights[1, s][~out.mask[1, s]] == 0)


def test_padded_queries_are_never_routed_while_valid_ones_remain():
    layer = make_layer(num_heavy_tokens_q=5).double().eval()
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    mask = random_mask([12, 3], 16)
    with torch.no_grad():
        x[~mask] += 20 * unit(layer.q_router.routing_vectors[0])
        out = layer.q_router(x, layer.num_heavy_tokens_q, mask)
    assert set(routed(out, 0)) <= set(torch.nonzero(mask[0]).flatten().tolist()) and out.mask[0].all()
    assert routed(out, 1) == torch.nonzero(mask[1]).flatten().tolist()


@pytest.mark.parametrize("learned_unrouted_output", [False, True])
def test_fully_padded_context_gives_finite_memoryless_output_and_leaves_other_samples_alone(learned_unrouted_output):
    """A sample without a single valid memory: the routed queries have nothing to attend to and get 0, the unrouted
    ones the learned unrouted output (if any); forward and backward stay finite, and the other sample's output is
    the one it has alone."""
    layer = make_layer(learned_unrouted_output=learned_unrouted_output).double().train()
    if learned_unrouted_output:
        with torch.no_grad():
            layer.unrouted_output.normal_()
    x = torch.randn(2, 10, DIM, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 24, DIM, dtype=torch.float64, requires_grad=True)
    context_mask = torch.stack([random_mask([17], 24)[0], torch.zeros(24, dtype=torch.bool)])

    out = layer(x, context, None, context_mask)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(context.grad).all()
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name

    with torch.no_grad():
        rq = layer.q_router(x, layer.num_heavy_tokens_q)
    is_routed = torch.zeros(10, dtype=torch.bool)
    is_routed[routed(rq, 1)] = True
    assert 0 < is_routed.sum() < 10
    assert torch.all(out[1, is_routed] == 0)
    expected_unrouted = layer.unrouted_output.detach() if learned_unrouted_output else torch.zeros(DIM).double()
    assert torch.equal(out[1, ~is_routed], expected_unrouted.expand(int((~is_routed).sum()), DIM))

    with torch.no_grad():
        alone = layer(x[:1], context[:1], None, context_mask[:1])
    torch.testing.assert_close(out[0].detach(), alone[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("multiply_keys_by_score", [True, False])
@pytest.mark.parametrize("num_heavy_tokens_kv", [6, 0.5])
def test_output_ignores_the_contents_of_padded_memories(multiply_keys_by_score, num_heavy_tokens_kv):
    """Also where fewer valid memories than the amount leave empty slots, which point at position 0 (padding in
    sample 1)."""
    layer = (
        make_layer(
            num_heavy_tokens_kv=num_heavy_tokens_kv, num_routed_kv=2, multiply_keys_by_score=multiply_keys_by_score
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    context_mask = random_mask([22, 4], 30)
    context_mask[1, 0] = False
    context_mask[1, 29] = True
    junk = context.clone()
    junk[~context_mask] = 100 * torch.randn(int((~context_mask).sum()), DIM, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x, context, None, context_mask)
        out_junk = layer(x, junk, None, context_mask)
    assert torch.isfinite(out_junk).all()
    torch.testing.assert_close(out_junk, out, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------- batch separation


@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_each_sample_attends_to_its_own_context_only(with_masks, num_routed_kv):
    layer = make_layer(num_routed_kv=num_routed_kv).double().eval()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    mask = random_mask([7, 10], 10) if with_masks else None
    context_mask = random_mask([20, 26], 30) if with_masks else None
    with torch.no_grad():
        out = layer(x, context, mask, context_mask)
        changed_context = context.clone()
        changed_context[1] = torch.randn(30, DIM, dtype=torch.float64)
        out_context = layer(x, changed_context, mask, context_mask)
        changed_x = x.clone()
        changed_x[1] = torch.randn(10, DIM, dtype=torch.float64)
        out_both = layer(changed_x, changed_context, mask, context_mask)
    for changed in (out_context, out_both):
        torch.testing.assert_close(changed[0], out[0], atol=1e-12, rtol=0)
        assert (changed[1] - out[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------- exact computation


@pytest.mark.parametrize("num_routed_kv", [1, 2])
@pytest.mark.parametrize("multiply_keys_by_score", [True, False])
@pytest.mark.parametrize("multiply_queries_by_score", [True, False])
def test_routing_everything_equals_plain_multi_head_cross_attention(
    num_routed_kv, multiply_keys_by_score, multiply_queries_by_score
):
    """With every query and memory routed, all weights are 1 and the layer is ordinary multi-head cross attention
    (keys of padded memories masked out), whatever the routing options."""
    context_dim = 24
    layer = (
        make_layer(
            num_heavy_tokens_q=1.0,
            num_heavy_tokens_kv=1.0,
            context_dim=context_dim,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    context = torch.randn(2, 19, context_dim, dtype=torch.float64)
    context_mask = torch.stack([torch.ones(19, dtype=torch.bool), random_mask([11], 19)[0]])

    with torch.no_grad():
        rq = layer.q_router(x, 1.0)
        rkv = layer.kv_router(context, 1.0, context_mask)
        out = layer(x, context, None, context_mask)
    assert torch.equal(rq.indices[:, 0], torch.arange(7).expand(2, 7)) and torch.all(rq.weights == 1)
    for b in range(2):
        for s in range(num_routed_kv):
            assert routed(rkv, b, s) == torch.nonzero(context_mask[b]).flatten().tolist()
    assert torch.all(rkv.weights[rkv.mask] == 1)

    def heads(t):
        return t.view(*t.shape[:2], HEADS, DIM_HEAD).transpose(1, 2)

    q = heads(x @ layer.heavy_q_proj.weight.T)
    k = heads(context @ layer.heavy_k_proj.weight.T)
    v = heads(context @ layer.heavy_v_proj.weight.T)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(DIM_HEAD)).masked_fill(~context_mask[:, None, None], -math.inf)
    attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 7, HEADS * DIM_HEAD)
    expected = attended @ layer.heavy_o_proj.weight.T
    torch.testing.assert_close(out, expected.detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_routed_kv=2),
        dict(num_routed_kv=4, multiply_keys_by_score=False),
        dict(num_routed_kv=2, multiply_queries_by_score=True, learned_unrouted_output=True),
        dict(num_routed_kv=2, route_block_size=7, context_dim=20),
    ],
)
def test_matches_a_per_sample_per_set_reference(overrides):
    """Partial routing (weights below 1), padded queries and memories, a sample with fewer valid memories than the
    amount: the layer equals the hand-written reference."""
    layer = make_layer(num_heavy_tokens_q=0.5, num_heavy_tokens_kv=8, **overrides).double().eval()
    if layer.unrouted_output is not None:
        with torch.no_grad():
            layer.unrouted_output.normal_()
    context_dim = overrides.get("context_dim", DIM)
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    context = torch.randn(3, 30, context_dim, dtype=torch.float64)
    mask = random_mask([10, 6, 9], 10)
    context_mask = random_mask([30, 19, 5], 30)
    with torch.no_grad():
        out = layer(x, context, mask, context_mask)
        rkv = layer.kv_router(context, layer.num_heavy_tokens_kv, context_mask)
    assert (rkv.weights[rkv.mask] < 1).any()  # the weights matter
    torch.testing.assert_close(out, reference(layer, x, context, mask, context_mask), atol=1e-12, rtol=1e-10)


def test_each_routing_set_routes_its_own_memories_to_its_own_heads():
    """Two sets whose routing vectors pick two disjoint groups of memories; a memory of set 0 only reaches the output
    through the heads of set 0."""
    layer = make_layer(num_heavy_tokens_kv=4, num_routed_kv=2).double().eval()
    group_0, group_1 = [3, 10, 17, 25], [5, 12, 28, 33]
    context = torch.randn(1, 36, DIM, dtype=torch.float64)
    context[0, group_0, 0] += 8
    context[0, group_1, 1] += 8
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    with torch.no_grad():
        layer.kv_router.routing_vectors.zero_()
        layer.kv_router.routing_vectors[0, 0] = 5.0
        layer.kv_router.routing_vectors[1, 1] = 5.0
        rkv = layer.kv_router(context, layer.num_heavy_tokens_kv)
    assert routed(rkv, 0, 0) == group_0 and routed(rkv, 0, 1) == group_1

    # Change memory 10 (set 0 only) along features no routing vector reads: routing and weights stay put.
    changed = context.clone()
    changed[0, 10, 2:] += torch.randn(DIM - 2, dtype=torch.float64)
    with torch.no_grad():
        rkv_changed = layer.kv_router(changed, layer.num_heavy_tokens_kv)
    assert torch.equal(rkv_changed.indices, rkv.indices) and torch.equal(rkv_changed.weights, rkv.weights)

    inner_per_set = HEADS // 2 * DIM_HEAD
    outputs = {}
    for kept_set in (0, 1):
        only = make_layer(num_heavy_tokens_kv=4, num_routed_kv=2).double().eval()
        only.load_state_dict(layer.state_dict())
        with torch.no_grad():
            # Silence the other set's heads in the output projection.
            other = slice((1 - kept_set) * inner_per_set, (2 - kept_set) * inner_per_set)
            only.heavy_o_proj.weight[:, other] = 0
            outputs[kept_set] = only(x, context), only(x, changed)
    torch.testing.assert_close(outputs[1][1], outputs[1][0], atol=1e-12, rtol=0)
    assert (outputs[0][1] - outputs[0][0]).abs().max() > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(layer(x, changed), reference(layer, x, changed), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------- block routing


def block_counts(indices: list[int], block_size: int, blocks: int) -> list[int]:
    counts = [0] * blocks
    for i in indices:
        counts[i // block_size] += 1
    return counts


@pytest.mark.parametrize("length", [70, 67])
@pytest.mark.parametrize("blocks", [1, 2, 7])
@pytest.mark.parametrize("amount", [21, 20])
def test_route_block_size_spreads_memories_evenly_over_blocks(length, blocks, amount):
    """The first memories score far above the rest, yet each block gets amount // blocks memories (the first
    amount % blocks blocks one more), also when the last block is partial (length 67)."""
    block_size = math.ceil(length / blocks)
    layer = make_layer(num_heavy_tokens_kv=amount, num_routed_kv=2, route_block_size=block_size).double().eval()
    context = torch.randn(2, length, DIM, dtype=torch.float64)
    with torch.no_grad():
        context[:, :25] += 10 * unit(layer.kv_router.routing_vectors.sum(0))
        out = layer.kv_router(context, amount)
    num_blocks = math.ceil(length / block_size)
    assert num_blocks == blocks
    base, extra = divmod(amount, blocks)
    expected = [base + 1] * extra + [base] * (blocks - extra)
    for b in range(2):
        for s in range(2):
            assert block_counts(routed(out, b, s), block_size, blocks) == expected


def test_route_block_size_moves_the_share_of_short_blocks_to_others():
    """Blocks with too few valid memories route all they have and the others take the rest, never padding."""
    layer = make_layer(num_heavy_tokens_kv=21, route_block_size=10).double().eval()
    context = torch.randn(1, 67, DIM, dtype=torch.float64)
    context_mask = torch.ones(1, 67, dtype=torch.bool)
    context_mask[0, 30:40] = False  # block 3 is all padding
    context_mask[0, 10:18] = False  # block 1 keeps 2 valid memories
    with torch.no_grad():
        out = layer.kv_router(context, 21, context_mask)
    indices = routed(out, 0)
    assert len(indices) == 21 and all(context_mask[0, i] for i in indices)
    counts = block_counts(indices, 10, 7)
    assert counts[1] == 2 and counts[3] == 0
    assert max(counts) - min(c for i, c in enumerate(counts) if i not in (1, 3)) <= 1


def test_route_block_size_in_router_kwargs_is_refused():
    with pytest.raises(ValueError, match="route_block_size"):
        make_layer(router_kwargs=dict(route_block_size=8))


@pytest.mark.parametrize("route_block_size", [0, -3, True])
def test_invalid_route_block_size_is_refused(route_block_size):
    with pytest.raises(ValueError, match="route_block_size"):
        make_layer(route_block_size=route_block_size)


# ----------------------------------------------------------------------------------------------------- amounts


def test_fractions_route_a_share_of_each_samples_own_valid_length():
    layer = make_layer(num_heavy_tokens_q=0.25, num_heavy_tokens_kv=0.3, num_routed_kv=2).double().eval()
    x = torch.randn(3, 20, DIM, dtype=torch.float64)
    context = torch.randn(3, 40, DIM, dtype=torch.float64)
    mask = random_mask([20, 9, 3], 20)
    context_mask = random_mask([40, 17, 5], 40)
    with torch.no_grad():
        rq = layer.q_router(x, layer.num_heavy_tokens_q, mask)
        rkv = layer.kv_router(context, layer.num_heavy_tokens_kv, context_mask)
        out = layer(x, context, mask, context_mask)
    assert rq.mask.shape == (3, 1, 5) and rkv.mask.shape == (3, 2, 12)
    assert rq.mask.sum(-1)[:, 0].tolist() == [5, 3, 1]  # ceil(0.25 * [20, 9, 3])
    assert rkv.mask.sum(-1).tolist() == [[12, 12], [6, 6], [2, 2]]  # ceil(0.3 * [40, 17, 5])
    # Without a learned unrouted output, exactly the routed queries get a (nonzero) output.
    assert (out.abs().sum(-1) > 0).sum(-1).tolist() == [5, 3, 1]


def test_counts_are_capped_at_each_samples_valid_length():
    layer = make_layer(num_heavy_tokens_q=6, num_heavy_tokens_kv=9).double().eval()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    context = torch.randn(2, 20, DIM, dtype=torch.float64)
    mask = random_mask([10, 4], 10)
    context_mask = random_mask([20, 7], 20)
    with torch.no_grad():
        rq = layer.q_router(x, 6, mask)
        rkv = layer.kv_router(context, 9, context_mask)
        out = layer(x, context, mask, context_mask)
    assert rq.mask.sum(-1)[:, 0].tolist() == [6, 4]
    assert rkv.mask.sum(-1)[:, 0].tolist() == [9, 7]
    assert (out.abs().sum(-1) > 0).sum(-1).tolist() == [6, 4]


# ----------------------------------------------------------------------------------------------------- routing options


def test_multiply_queries_by_score_changes_the_output_only_when_weights_are_below_one():
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    for amounts, should_differ in (
        (dict(num_heavy_tokens_q=0.5, num_heavy_tokens_kv=0.25), True),
        (dict(num_heavy_tokens_q=1.0, num_heavy_tokens_kv=0.25), False),
    ):
        plain = make_layer(**amounts).double().eval()
        scaled = make_layer(multiply_queries_by_score=True, **amounts).double().eval()
        scaled.load_state_dict(plain.state_dict())
        with torch.no_grad():
            difference = (scaled(x, context) - plain(x, context)).abs().max()
        if should_differ:
            assert difference > 1e-4
        else:
            assert difference < 1e-12


def test_multiply_keys_by_score_changes_the_output():
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    keys = make_layer().double().eval()
    no_keys = make_layer(multiply_keys_by_score=False).double().eval()
    no_keys.load_state_dict(keys.state_dict())
    with torch.no_grad():
        assert (keys(x, context) - no_keys(x, context)).abs().max() > 1e-4


def test_learned_unrouted_output_is_exactly_the_vector_at_unrouted_queries_and_absent_at_routed_ones():
    learned = make_layer(learned_unrouted_output=True).double().eval()
    plain = make_layer().double().eval()
    with torch.no_grad():
        learned.unrouted_output.copy_(torch.randn(DIM, dtype=torch.float64))
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "unrouted_output"})
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    context = torch.randn(2, 30, DIM, dtype=torch.float64)
    mask = random_mask([12, 7], 12)
    with torch.no_grad():
        rq = learned.q_router(x, learned.num_heavy_tokens_q, mask)
        out, out_plain = learned(x, context, mask), plain(x, context, mask)
    for b in range(2):
        is_routed = torch.zeros(12, dtype=torch.bool)
        is_routed[routed(rq, b)] = True
        assert is_routed.sum() == [6, 4][b]
        assert torch.equal(out[b, is_routed], out_plain[b, is_routed])
        assert (out[b, is_routed].abs().sum(-1) > 0).all()
        unrouted = out[b, ~is_routed]
        assert torch.equal(unrouted, learned.unrouted_output.detach().expand_as(unrouted))


# ----------------------------------------------------------------------------------------------------- random routing


def test_random_routing_follows_the_torch_seed_and_never_routes_padding():
    layer = make_layer(num_routed_kv=2, router_kwargs=dict(random_routing=True)).double().eval()
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    context = torch.randn(2, 40, DIM, dtype=torch.float64)
    context_mask = random_mask([30, 12], 40)

    def call(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return layer.kv_router(context, layer.num_heavy_tokens_kv, context_mask), layer(
                x, context, None, context_mask
            )

    (r0, out0), (r0_again, out0_again), (r1, out1) = call(0), call(0), call(1)
    assert torch.equal(r0.indices, r0_again.indices) and torch.equal(out0, out0_again)
    assert not torch.equal(r0.indices, r1.indices)
    assert (out0 - out1).abs().max() > 1e-4
    for r in (r0, r1):
        for b in range(2):
            for s in range(2):
                assert all(context_mask[b, i] for i in routed(r, b, s))
                assert len(routed(r, b, s)) == math.ceil(0.25 * context_mask[b].sum().item())


def test_random_routing_does_not_depend_on_the_routing_vectors():
    layer = make_layer(router_kwargs=dict(random_routing=True)).train()
    x = torch.randn(2, 12, DIM, requires_grad=True)
    context = torch.randn(2, 30, DIM)
    out = layer(x, context)
    (out * torch.randn_like(out)).sum().backward()
    for router in (layer.q_router, layer.kv_router):
        grad = router.routing_vectors.grad
        assert grad is None or torch.all(grad == 0)
    assert layer.heavy_q_proj.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    # Moving the routing vectors changes nothing under the same seed.
    layer.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        before = layer(x, context)
        layer.q_router.routing_vectors.normal_()
        layer.kv_router.routing_vectors.normal_()
    torch.manual_seed(5)
    with torch.no_grad():
        after = layer(x, context)
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------------- errors


def test_batch_mismatch_between_x_and_context_raises():
    layer = make_layer()
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(2, 5, DIM), torch.randn(3, 9, DIM))


def test_wrong_context_width_raises_and_names_context_dim():
    layer = make_layer(context_dim=24)
    with pytest.raises(ValueError, match="context_dim"):
        layer(torch.randn(2, 5, DIM), torch.randn(2, 9, DIM))
    with pytest.raises(ValueError, match="context_dim"):
        make_layer()(torch.randn(2, 5, DIM), torch.randn(2, 9, 24))


@pytest.mark.parametrize("x_shape, context_shape", [((2, 5), (2, 9, DIM)), ((2, 5, DIM), (9, DIM))])
def test_inputs_that_are_not_three_dimensional_raise(x_shape, context_shape):
    with pytest.raises(ValueError, match="batch, length, features"):
        make_layer()(torch.randn(*x_shape), torch.randn(*context_shape))


@pytest.mark.parametrize(
    "mask_shape, context_mask_shape, name",
    [
        ((2, 4), None, "mask"),
        ((1, 5), None, "mask"),
        (None, (2, 5), "context_mask"),
        (None, (2, 9, 1), "context_mask"),
        ((2, 9), None, "mask"),
    ],
)
def test_wrong_mask_shapes_raise(mask_shape, context_mask_shape, name):
    layer = make_layer()
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    context_mask = None if context_mask_shape is None else torch.ones(context_mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        layer(torch.randn(2, 5, DIM), torch.randn(2, 9, DIM), mask, context_mask)


@pytest.mark.parametrize("which", ["num_heavy_tokens_q", "num_heavy_tokens_kv"])
@pytest.mark.parametrize("amount", [0, -2, 0.0, 1.5, True, "4", None])
def test_invalid_amounts_raise_at_construction(which, amount):
    with pytest.raises(ValueError, match=which):
        make_layer(**{which: amount})


@pytest.mark.parametrize("heads, num_routed_kv", [(4, 3), (6, 4), (1, 2)])
def test_heads_not_divisible_by_kv_sets_raises(heads, num_routed_kv):
    with pytest.raises(ValueError, match="num_routed_kv"):
        make_layer(heads=heads, num_routed_kv=num_routed_kv)


@pytest.mark.parametrize("queries, memories", [(0, 5), (4, 0)])
def test_empty_sequences_raise(queries, memories):
    layer = ConditionalRoutedCrossAttention(DIM, num_heavy_tokens_q=2, num_heavy_tokens_kv=2, heads=4, dim_head=8)
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(1, queries, DIM), torch.randn(1, memories, DIM))
