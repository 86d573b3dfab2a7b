"""Tests of ConditionalRoutedImageAttention: window attention over every pixel plus routed attention across the
whole image."""

import functools
import math

import pytest
import torch

from colt5 import ConditionalRoutedImageAttention
from colt5.rotary import apply_rotary
from conftest import colt5_design

DIM = 32
WINDOW = 4
LIGHT_HEADS, LIGHT_DIM_HEAD = 2, 8
HEAVY_HEADS, HEAVY_DIM_HEAD = 4, 8


def make_layer(**overrides) -> ConditionalRoutedImageAttention:
    kwargs = dict(
        num_heavy_tokens_q=0.25,
        num_heavy_tokens_kv=0.5,
        window_size=WINDOW,
        light_heads=LIGHT_HEADS,
        light_dim_head=LIGHT_DIM_HEAD,
        heavy_heads=HEAVY_HEADS,
        heavy_dim_head=HEAVY_DIM_HEAD,
        channels_first=True,
    )
    return ConditionalRoutedImageAttention(DIM, **colt5_design(**{**kwargs, **overrides}))


def amounts(layer) -> tuple:
    """The layer's own routed amounts (queries, keys/values), as its forward passes them to its branches."""
    return layer.num_heavy_tokens_q, layer.num_heavy_tokens_kv


def grid(height, width) -> torch.Tensor:
    """`(height, width, 2)` (row, column) of every pixel, as the layer's forward builds them."""
    return torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), dim=-1)


def random_mask(counts, height, width) -> torch.Tensor:
    """`(len(counts), height, width)` bool masks with `counts[b]` valid pixels at random places."""
    return torch.stack([(torch.randperm(height * width) < c).view(height, width) for c in counts])


def to_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def routed(out, b, s=0) -> list[int]:
    """Sorted flat (row-major) pixel indices a RouterOutput routes for image b, set s."""
    return sorted(out.indices[b, s][out.mask[b, s]].tolist())


def route_pixels(layer, x_last, mask=None):
    """The routers' decisions on the flattened image, as the heavy branch takes them."""
    batch, height, width, dim = x_last.shape
    tokens = x_last.reshape(batch, height * width, dim)
    flat_mask = None if mask is None else mask.reshape(batch, height * width)
    with torch.no_grad():
        return (
            layer.q_router(tokens, layer.num_heavy_tokens_q, flat_mask),
            layer.kv_router(tokens, layer.num_heavy_tokens_kv, flat_mask),
        )


def window_of(row, col, height, width, w=WINDOW) -> torch.Tensor:
    """`(height, width)` bool: the pixels of (row, col)'s window, clipped at the bottom and right edges."""
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[row // w * w : (row // w + 1) * w, col // w * w : (col // w + 1) * w] = True
    return inside


def light_reference(layer, x_last, mask=None) -> torch.Tensor:
    """Window attention by hand: each window's pixels (fewer at the bottom/right edges) attend to its valid pixels,
    queries and keys rotated by each pixel's (row, column)."""
    batch, height, width, _ = x_last.shape
    heads, e = LIGHT_HEADS, LIGHT_DIM_HEAD
    cos, sin = layer.light_rotary(grid(height, width), x_last.dtype)
    q, k, v = (
        (x_last @ p.weight.detach().T).view(batch, height, width, heads, e)
        for p in (layer.light_q_proj, layer.light_k_proj, layer.light_v_proj)
    )
    q, k = apply_rotary(q, cos[:, :, None], sin[:, :, None]), apply_rotary(k, cos[:, :, None], sin[:, :, None])
    valid = torch.ones(batch, height, width, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(batch, height, width, heads * e, dtype=x_last.dtype)
    for b in range(batch):
        for r0 in range(0, height, WINDOW):
            for c0 in range(0, width, WINDOW):
                rows, cols = slice(r0, r0 + WINDOW), slice(c0, c0 + WINDOW)
                keys = valid[b, rows, cols].flatten()
                if not keys.any():
                    continue  # a window of padding: its outputs are padding too
                qw, kw, vw = (t[b, rows, cols].flatten(0, 1) for t in (q, k, v))  # (pixels, heads, e)
                scores = torch.einsum("qhe,khe->hqk", qw, kw) / math.sqrt(e)
                probs = torch.softmax(scores.masked_fill(~keys, -math.inf), dim=-1)
                window_out = torch.einsum("hqk,khe->qhe", probs, vw).flatten(1)
                out[b, rows, cols] = window_out.view(*valid[b, rows, cols].shape, heads * e)
    return out @ layer.light_o_proj.weight.detach().T


def heavy_reference(layer, x_last, mask=None) -> torch.Tensor:
    """Routed attention across the image by hand, per image and key/value set, from the routers' decisions: 2-axis
    rotary by the routed pixels' (row, column), weights as in the cross attention."""
    batch, height, width, dim = x_last.shape
    rq, rkv = route_pixels(layer, x_last, mask)
    tokens = x_last.reshape(batch, height * width, dim)
    positions = grid(height, width).reshape(height * width, 2)
    hps, e = layer.heads_per_set, HEAVY_DIM_HEAD
    wq, wk, wv, wo = (
        p.weight.detach() for p in (layer.heavy_q_proj, layer.heavy_k_proj, layer.heavy_v_proj, layer.heavy_o_proj)
    )
    out = torch.zeros_like(tokens)
    for b in range(batch):
        q_idx, q_w = rq.indices[b, 0][rq.mask[b, 0]], rq.weights[b, 0][rq.mask[b, 0]]
        q = (tokens[b, q_idx] @ wq.T).view(len(q_idx), HEAVY_HEADS, e)
        if layer.multiply_queries_by_score:
            q = q * q_w[:, None, None]
        cos, sin = layer.heavy_rotary(positions[q_idx], x_last.dtype)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        heads_out = []
        for s in range(layer.num_routed_kv):
            idx, w = rkv.indices[b, s][rkv.mask[b, s]], rkv.weights[b, s][rkv.mask[b, s]]
            rows = slice(s * hps * e, (s + 1) * hps * e)
            k = (tokens[b, idx] @ wk[rows].T).view(len(idx), hps, e)
            v = (tokens[b, idx] @ wv[rows].T).view(len(idx), hps, e) * w[:, None, None]
            if layer.multiply_keys_by_score:
                k = k * w[:, None, None]
            cos, sin = layer.heavy_rotary(positions[idx], x_last.dtype)
            k = apply_rotary(k, cos[:, None], sin[:, None])
            for h in range(hps):
                scores = q[:, s * hps + h] @ k[:, h].T / math.sqrt(e)
                heads_out.append(torch.softmax(scores, dim=-1) @ v[:, h])
        out[b, q_idx] = (torch.cat(heads_out, dim=-1) @ wo.T) * q_w[:, None]
        if layer.unrouted_output is not None:
            unrouted = torch.ones(height * width, dtype=torch.bool)
            unrouted[q_idx] = False
            out[b, unrouted] = layer.unrouted_output.detach()
    return out.view(batch, height, width, dim)


def orthogonal_change(layer, like: torch.Tensor) -> torch.Tensor:
    """A random change orthogonal to every routing vector (it keeps every router score), as large as `like`."""
    vectors = torch.cat([layer.q_router.routing_vectors, layer.kv_router.routing_vectors]).detach()
    basis, _ = torch.linalg.qr(vectors.T)
    delta = torch.randn(DIM, dtype=vectors.dtype)
    delta = delta - basis @ (basis.T @ delta)
    return delta / delta.norm() * like.norm()


# -------------------------------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_output_shape_in_both_layouts(channels_first, with_mask):
    layer = make_layer(channels_first=channels_first).eval()
    shape = (2, DIM, 10, 13) if channels_first else (2, 10, 13, DIM)
    x = torch.randn(shape)
    mask = random_mask([130, 50], 10, 13) if with_mask else None
    with torch.no_grad():
        out = layer(x, mask)
    assert out.shape == shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("overrides", [{}, dict(num_routed_kv=2, learned_unrouted_output=True)])
def test_channels_first_and_channels_last_agree(overrides):
    first = make_layer(channels_first=True, **overrides).double().eval()
    last = make_layer(channels_first=False, **overrides).double().eval()
    last.load_state_dict(first.state_dict())
    if first.unrouted_output is not None:
        with torch.no_grad():
            first.unrouted_output.normal_()
            last.unrouted_output.copy_(first.unrouted_output)
    x = torch.randn(2, DIM, 9, 11, dtype=torch.float64)
    mask = random_mask([99, 40], 9, 11)
    with torch.no_grad():
        out_first = first(x, mask)
        out_last = last(to_last(x).contiguous(), mask)
    assert out_last.shape == (2, 9, 11, DIM)
    torch.testing.assert_close(to_last(out_first), out_last, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("height, width", [(10, 13), (3, 5), (1, 1), (9, 4), (4, 8)])
def test_sizes_that_are_not_multiples_of_the_window_work_forward_and_backward(height, width):
    layer = make_layer().train()
    x = torch.randn(2, DIM, height, width, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(1) > 0).all()  # every pixel reaches the output (at least through its window)
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        # A single pixel attends to itself alone (softmax of one score: no query gradient) with weight 1.
        if height * width > 1:
            assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# --------------------------------------------------------------------------------------------------- exact computation


@pytest.mark.parametrize("height, width, with_mask", [(10, 13, False), (10, 13, True), (8, 8, True), (3, 6, False)])
def test_light_branch_is_window_attention(height, width, with_mask):
    layer = make_layer().double().eval()
    x = torch.randn(2, height, width, DIM, dtype=torch.float64)
    mask = random_mask([height * width * 3 // 4, height * width // 3], height, width) if with_mask else None
    if with_mask:
        mask[1, :WINDOW, :WINDOW] = False  # a window of padding only
    with torch.no_grad():
        out = layer._light(x, mask, grid(height, width))
    expected = light_reference(layer, x, mask)
    valid = torch.ones(2, height, width, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_routed_kv=2, multiply_queries_by_score=True),
        dict(num_routed_kv=4, multiply_keys_by_score=False, learned_unrouted_output=True),
    ],
)
def test_layer_is_light_plus_routed_heavy_attention(overrides):
    """The whole forward pass against the two hand-written branches, with padding and partial windows."""
    layer = make_layer(channels_first=False, **overrides).double().eval()
    if layer.unrouted_output is not None:
        with torch.no_grad():
            layer.unrouted_output.normal_()
    x = torch.randn(2, 7, 10, DIM, dtype=torch.float64)
    mask = random_mask([70, 45], 7, 10)
    with torch.no_grad():
        out = layer(x, mask)
    expected = light_reference(layer, x, mask) + heavy_reference(layer, x, mask)
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("branch", ["_light", "_heavy"])
def test_both_branches_depend_on_pixel_offsets_only(branch):
    """Two-axis rotary: shifting every (row, column) changes nothing, swapping the axes does."""
    layer = make_layer(num_heavy_tokens_q=0.5).double().eval()
    x = torch.randn(2, 8, 8, DIM, dtype=torch.float64)
    mask = random_mask([64, 40], 8, 8)
    positions = grid(8, 8)
    call = getattr(layer, branch)
    if branch == "_heavy":
        call = functools.partial(call, amount_q=layer.num_heavy_tokens_q, amount_kv=layer.num_heavy_tokens_kv)
    with torch.no_grad():
        out = call(x, mask, positions)
        shifted = call(x, mask, positions + torch.tensor([37, 101]))
        swapped = call(x, mask, positions.flip(-1))
    torch.testing.assert_close(shifted[mask], out[mask], atol=1e-4, rtol=0)
    assert (swapped[mask] - out[mask]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------- locality


@pytest.mark.parametrize("pixel", [(0, 0), (5, 6), (9, 12), (9, 3), (2, 12)])
def test_light_branch_sees_only_the_pixels_window(pixel):
    """Windows of 4 over a 10 x 13 map: changing one pixel changes the light output inside its (possibly partial)
    window, at every pixel of it, and nowhere else."""
    layer = make_layer().double().eval()
    x = torch.randn(1, 10, 13, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[0, pixel[0], pixel[1]] += torch.randn(DIM, dtype=torch.float64)
    with torch.no_grad():
        diff = (layer._light(changed, None, grid(10, 13)) - layer._light(x, None, grid(10, 13)))[0].abs().amax(-1)
    inside = window_of(*pixel, 10, 13)
    assert torch.all(diff[~inside] == 0)
    assert torch.all(diff[inside] > 1e-8)


def test_a_pixel_neither_routed_nor_local_does_not_reach_the_output():
    """Full layer: a change to a pixel that is routed neither as a query nor as a key, and keeps every router score,
    changes the output exactly inside the pixel's window."""
    layer = make_layer(channels_first=False, num_heavy_tokens_q=6, num_heavy_tokens_kv=10).double().eval()
    x = torch.randn(1, 12, 12, DIM, dtype=torch.float64)
    rq, rkv = route_pixels(layer, x)
    routed_somewhere = set(routed(rq, 0)) | set(routed(rkv, 0))
    pixel = next(p for p in range(144) if p not in routed_somewhere)
    row, col = divmod(pixel, 12)
    changed = x.clone()
    changed[0, row, col] += orthogonal_change(layer, x[0, row, col])
    rq_changed, rkv_changed = route_pixels(layer, changed)
    assert torch.equal(rq_changed.indices, rq.indices) and torch.equal(rkv_changed.indices, rkv.indices)
    with torch.no_grad():
        diff = (layer(changed) - layer(x))[0].abs().amax(-1)
    inside = window_of(row, col, 12, 12)
    assert diff[~inside].max() < 1e-12
    assert torch.all(diff[inside] > 1e-8)


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_heavy_branch_reaches_across_windows(num_routed_kv):
    """A routed query pixel q draws on a routed key/value pixel p in a distant window: changing p (keeping every
    router score, hence the routing) changes the output at q, though q's window does not contain p."""
    size = 12
    layer = (
        make_layer(channels_first=False, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, num_routed_kv=num_routed_kv)
        .double()
        .eval()
    )
    x = torch.randn(1, size, size, DIM, dtype=torch.float64)
    q_pixel, p_pixel = (1, 2), (10, 9)
    with torch.no_grad():
        x[0, q_pixel[0], q_pixel[1]] += 10 * unit(layer.q_router.routing_vectors[0])
        x[0, p_pixel[0], p_pixel[1]] += 10 * unit(layer.kv_router.routing_vectors.sum(0))
    q_flat, p_flat = q_pixel[0] * size + q_pixel[1], p_pixel[0] * size + p_pixel[1]
    rq, rkv = route_pixels(layer, x)
    assert q_flat in routed(rq, 0)
    assert all(p_flat in routed(rkv, 0, s) for s in range(num_routed_kv))
    assert not window_of(*q_pixel, size, size)[p_pixel]

    changed = x.clone()
    changed[0, p_pixel[0], p_pixel[1]] += 0.5 * orthogonal_change(layer, x[0, p_pixel[0], p_pixel[1]])
    rq_changed, rkv_changed = route_pixels(layer, changed)
    assert torch.equal(rq_changed.indices, rq.indices) and torch.equal(rkv_changed.indices, rkv.indices)
    torch.testing.assert_close(rkv_changed.weights, rkv.weights, atol=1e-12, rtol=0)

    positions = grid(size, size)
    with torch.no_grad():
        out, out_changed = layer(x), layer(changed)
        light, light_changed = layer._light(x, None, positions), layer._light(changed, None, positions)
    assert torch.equal(light_changed[0, q_pixel[0], q_pixel[1]], light[0, q_pixel[0], q_pixel[1]])
    assert (out_changed[0, q_pixel[0], q_pixel[1]] - out[0, q_pixel[0], q_pixel[1]]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_masked_pixels_are_never_routed_while_valid_ones_remain(num_routed_kv):
    """Padding gets the highest router scores, and still loses to every valid pixel; the heavy branch then only
    writes to routed (valid) pixels."""
    layer = (
        make_layer(channels_first=False, num_routed_kv=num_routed_kv, num_heavy_tokens_q=12, num_heavy_tokens_kv=20)
        .double()
        .eval()
    )
    x = torch.randn(2, 8, 9, DIM, dtype=torch.float64)
    mask = random_mask([50, 25], 8, 9)
    with torch.no_grad():
        direction = unit(layer.q_router.routing_vectors[0]) + unit(layer.kv_router.routing_vectors.sum(0))
        x[~mask] += 20 * direction
    rq, rkv = route_pixels(layer, x, mask)
    flat_mask = mask.reshape(2, 72)
    with torch.no_grad():
        heavy = layer._heavy(x, mask, grid(8, 9), *amounts(layer)).reshape(2, 72, DIM)
    for b in range(2):
        valid = set(torch.nonzero(flat_mask[b]).flatten().tolist())
        assert len(routed(rq, b)) == 12 and set(routed(rq, b)) <= valid
        assert set(torch.nonzero(heavy[b].abs().sum(-1) > 0).flatten().tolist()) == set(routed(rq, b))
        for s in range(num_routed_kv):
            assert len(routed(rkv, b, s)) == 20 and set(routed(rkv, b, s)) <= valid


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_routed_kv=2, learned_unrouted_output=True, multiply_queries_by_score=True),
        dict(multiply_keys_by_score=False, num_heavy_tokens_kv=40),
        dict(router_kwargs=dict(route_block_size=13)),
    ],
)
def test_valid_pixels_ignore_the_contents_of_masked_pixels(overrides):
    layer = make_layer(**overrides).double().eval()
    x = torch.randn(2, DIM, 10, 13, dtype=torch.float64)
    mask = random_mask([100, 30], 10, 13)
    mask[1, 4:8, 4:8] = False  # a window of padding only
    junk = to_last(x).clone()
    junk[~mask] = 100 * torch.randn(int((~mask).sum()), DIM, dtype=torch.float64)
    junk = junk.permute(0, 3, 1, 2)
    with torch.no_grad():
        out, out_junk = to_last(layer(x, mask)), to_last(layer(junk, mask))
    assert torch.isfinite(out_junk).all()
    torch.testing.assert_close(out_junk[mask], out[mask], atol=1e-12, rtol=0)


@pytest.mark.parametrize("learned_unrouted_output", [False, True])
def test_fully_masked_image_is_finite_forward_and_backward_and_leaves_the_other_alone(learned_unrouted_output):
    layer = make_layer(num_routed_kv=2, learned_unrouted_output=learned_unrouted_output).double().train()
    x = torch.randn(2, DIM, 6, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.stack([random_mask([30], 6, 7)[0], torch.zeros(6, 7, dtype=torch.bool)])
    out = layer(x, mask)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    with torch.no_grad():
        alone = layer.eval()(x[:1], mask[:1])
    torch.testing.assert_close(to_last(out.detach())[0][mask[0]], to_last(alone)[0][mask[0]], atol=1e-12, rtol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_each_image_attends_only_to_itself(with_mask):
    layer = make_layer(num_routed_kv=2).double().eval()
    x = torch.randn(2, DIM, 9, 10, dtype=torch.float64)
    mask = random_mask([60, 90], 9, 10) if with_mask else None
    changed = x.clone()
    changed[1] = torch.randn(DIM, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        out, out_changed = layer(x, mask), layer(changed, mask)
    torch.testing.assert_close(out_changed[0], out[0], atol=1e-12, rtol=0)
    assert (out_changed[1] - out[1]).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------------- amounts and blocks


def test_fractions_route_a_share_of_each_images_valid_pixels():
    layer = (
        make_layer(channels_first=False, num_heavy_tokens_q=0.25, num_heavy_tokens_kv=0.3, num_routed_kv=2)
        .double()
        .eval()
    )
    x = torch.randn(3, 6, 7, DIM, dtype=torch.float64)
    mask = random_mask([42, 20, 7], 6, 7)
    rq, rkv = route_pixels(layer, x, mask)
    assert rq.mask.sum(-1)[:, 0].tolist() == [11, 5, 2]  # ceil(0.25 * [42, 20, 7])
    assert rkv.mask.sum(-1).tolist() == [[13, 13], [6, 6], [3, 3]]  # ceil(0.3 * [42, 20, 7])
    with torch.no_grad():
        heavy = layer._heavy(x, mask, grid(6, 7), *amounts(layer))
    assert (heavy.abs().sum(-1) > 0).flatten(1).sum(-1).tolist() == [11, 5, 2]


@pytest.mark.parametrize("height", [14, 13])
@pytest.mark.parametrize("blocks", [1, 2, 7])
@pytest.mark.parametrize("amount", [21, 20])
def test_block_routing_spreads_routed_pixels_over_row_bands(height, blocks, amount):
    """5-pixel rows, blocks of ceil(pixels / blocks) pixels in row-major order (7 blocks: bands of two rows, the
    last one shorter for 13 rows). The top rows score far above the rest, yet each block routes amount // blocks
    pixels (the first amount % blocks blocks one more), queries and keys/values alike."""
    width = 5
    pixels = height * width
    block_size = math.ceil(pixels / blocks)
    layer = (
        make_layer(
            channels_first=False,
            num_heavy_tokens_q=amount,
            num_heavy_tokens_kv=amount,
            num_routed_kv=2,
            router_kwargs=dict(route_block_size=block_size),
        )
        .double()
        .eval()
    )
    x = torch.randn(2, height, width, DIM, dtype=torch.float64)
    with torch.no_grad():
        direction = unit(layer.q_router.routing_vectors[0]) + unit(layer.kv_router.routing_vectors.sum(0))
        x[:, :4] += 10 * direction
    assert math.ceil(pixels / block_size) == blocks
    base, extra = divmod(amount, blocks)
    expected = [base + 1] * extra + [base] * (blocks - extra)

    def counts(indices):
        per_block = [0] * blocks
        for i in indices:
            per_block[i // block_size] += 1
        return per_block

    rq, rkv = route_pixels(layer, x)
    with torch.no_grad():
        heavy = layer._heavy(x, None, grid(height, width), *amounts(layer)).reshape(2, pixels, DIM)
    for b in range(2):
        assert counts(routed(rq, b)) == expected
        assert torch.nonzero(heavy[b].abs().sum(-1) > 0).flatten().tolist() == routed(rq, b)
        for s in range(2):
            assert counts(routed(rkv, b, s)) == expected


# ----------------------------------------------------------------------------------------------------- routing options


def test_multiply_queries_by_score_changes_the_output():
    x = torch.randn(2, DIM, 8, 8, dtype=torch.float64)
    plain = make_layer().double().eval()
    scaled = make_layer(multiply_queries_by_score=True).double().eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        out_plain, out_scaled = plain(x), scaled(x)
    rq, _ = route_pixels(plain, to_last(x))
    is_routed = torch.zeros(2, 64, dtype=torch.bool)
    for b in range(2):
        is_routed[b, routed(rq, b)] = True
    diff = (out_scaled - out_plain).abs().amax(1).flatten(1)
    assert torch.all(diff[~is_routed] == 0)  # unrouted pixels get the light branch only, in both
    assert diff[is_routed].max() > 1e-4


def test_learned_unrouted_output_goes_exactly_to_unrouted_pixels():
    learned = make_layer(channels_first=False, learned_unrouted_output=True).double().eval()
    plain = make_layer(channels_first=False).double().eval()
    with torch.no_grad():
        learned.unrouted_output.copy_(torch.randn(DIM, dtype=torch.float64))
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "unrouted_output"})
    x = torch.randn(2, 8, 6, DIM, dtype=torch.float64)
    mask = random_mask([48, 20], 8, 6)
    rq, _ = route_pixels(learned, x, mask)
    with torch.no_grad():
        diff = learned(x, mask) - plain(x, mask)
    is_routed = torch.zeros(2, 8 * 6, dtype=torch.bool)
    for b in range(2):
        is_routed[b, routed(rq, b)] = True
    is_routed = is_routed.view(2, 8, 6)
    assert is_routed.flatten(1).sum(-1).tolist() == [12, 5]
    torch.testing.assert_close(diff[is_routed], torch.zeros_like(diff[is_routed]), atol=1e-12, rtol=0)
    unrouted = mask & ~is_routed
    expected = learned.unrouted_output.detach().expand(int(unrouted.sum()), DIM)
    torch.testing.assert_close(diff[unrouted], expected, atol=1e-12, rtol=0)


def test_two_kv_routing_sets_route_different_pixels():
    layer = make_layer(channels_first=False, num_routed_kv=2, num_heavy_tokens_kv=10).double().eval()
    x = torch.randn(2, 8, 8, DIM, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    _, rkv = route_pixels(layer, x)
    for b in range(2):
        assert routed(rkv, b, 0) != routed(rkv, b, 1)


def test_random_routing_follows_the_seed_and_ignores_the_routing_vectors():
    layer = make_layer(num_routed_kv=2, router_kwargs=dict(random_routing=True)).double().train()
    x = torch.randn(2, DIM, 8, 8, dtype=torch.float64, requires_grad=True)
    mask = random_mask([64, 30], 8, 8)

    def call(seed):
        torch.manual_seed(seed)
        rq, rkv = route_pixels(layer, to_last(x.detach()), mask)
        torch.manual_seed(seed)
        return rq, rkv, layer(x, mask)

    (rq0, rkv0, out0), (rq0_again, rkv0_again, out0_again), (rq1, _, out1) = call(0), call(0), call(1)
    assert torch.isfinite(out0).all()
    assert torch.equal(rq0.indices, rq0_again.indices) and torch.equal(rkv0.indices, rkv0_again.indices)
    assert torch.equal(out0, out0_again)
    assert not torch.equal(rq0.indices, rq1.indices)
    assert (out0 - out1).abs().max() > 1e-4
    flat_mask = mask.reshape(2, 64)
    for b in range(2):
        assert all(flat_mask[b, i] for i in routed(rq0, b))
        assert all(flat_mask[b, i] for s in range(2) for i in routed(rkv0, b, s))

    (out0 * torch.randn_like(out0)).sum().backward()
    for router in (layer.q_router, layer.kv_router):
        assert router.routing_vectors.grad is None or torch.all(router.routing_vectors.grad == 0)
    assert torch.isfinite(x.grad).all() and layer.heavy_q_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "channels_first, shape",
    [
        (True, (2, DIM // 2, 8, 8)),
        (True, (2, 8, 8, DIM)),
        (True, (2, DIM, 8)),
        (False, (2, DIM, 8, 8)),
        (False, (2, 8, DIM)),
        (True, (1, 2, DIM, 8, 8)),
    ],
)
def test_wrong_layout_or_channel_count_raises_and_names_channels_first(channels_first, shape):
    layer = make_layer(channels_first=channels_first)
    with pytest.raises(ValueError, match="channels_first"):
        layer(torch.randn(shape))


@pytest.mark.parametrize(
    "channels_first, mask_shape", [(True, (2, 8, 7)), (True, (8, 7)), (False, (1, 7, 8)), (False, (2, 7, 8, 1))]
)
def test_wrong_mask_shape_raises(channels_first, mask_shape):
    layer = make_layer(channels_first=channels_first)
    x = torch.randn((2, DIM, 7, 8) if channels_first else (2, 7, 8, DIM))
    with pytest.raises(ValueError, match="mask must be"):
        layer(x, torch.ones(mask_shape, dtype=torch.bool))


@pytest.mark.parametrize(
    "overrides", [dict(light_dim_head=6), dict(heavy_dim_head=6), dict(light_dim_head=10), dict(heavy_dim_head=2)]
)
def test_head_dims_not_divisible_by_four_raise_at_construction(overrides):
    with pytest.raises(ValueError, match="divisible by 4"):
        make_layer(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(window_size=0),
        dict(window_size=True),
        dict(window_size=2.0),
        dict(num_heavy_tokens_q=0),
        dict(num_heavy_tokens_kv=1.5),
        dict(num_heavy_tokens_q=True),
        dict(heavy_heads=4, num_routed_kv=3),
    ],
)
def test_invalid_settings_raise_at_construction(overrides):
    with pytest.raises(ValueError):
        make_layer(**overrides)


def test_an_empty_feature_map_raises():
    layer = ConditionalRoutedImageAttention(
        DIM,
        num_heavy_tokens_q=2,
        num_heavy_tokens_kv=2,
        window_size=2,
        light_heads=2,
        light_dim_head=8,
        heavy_heads=4,
        heavy_dim_head=8,
        channels_first=True,
    )
    with pytest.raises(ValueError, match="at least one pixel"):
        layer(torch.randn(1, DIM, 0, 5))
