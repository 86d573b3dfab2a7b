"""Tests of `sliding_window_attention` and `flex_sliding_window_attention` against the local-attention package
they replace on the light branch (colt5-attention's light branch)."""

import pytest
import torch
from local_attention import LocalAttention

from colt5.sliding_window import FLEX_TILE, flex_sliding_window_attention, sliding_window_attention, window_block_mask

BATCH, HEADS, HEAD_DIM = 2, 2, 8
LENGTHS = (1, 5, 37, 64, 100)
WINDOWS = (3, 16, 31)
MASKS = ("none", "left", "right", "random")


def reference(q, k, v, valid, window, causal):
    """The local-attention package, configured as the light branch used it."""
    attn = LocalAttention(
        window_size=window,
        causal=causal,
        look_backward=1,
        look_forward=0 if causal else 1,
        dropout=0.0,
        exact_windowsize=True,
        autopad=True,
        use_rotary_pos_emb=False,
    )
    return attn(q, k, v, mask=valid)


def random_qkv(n, dtype=torch.float64, requires_grad=False):
    return [torch.randn(BATCH, HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def make_valid(kind, n):
    """`(BATCH, n)` bool; sample 0 is always fully valid, every sample has at least one valid token."""
    valid = torch.ones(BATCH, n, dtype=torch.bool)
    pad = (2 * n) // 3  # leaves at least one valid token
    if kind == "left":
        valid[1, :pad] = False
    elif kind == "right":
        valid[1, n - pad :] = False
    elif kind == "random":
        valid[1] = torch.rand(n) < 0.5
        valid[1, torch.randint(n, ())] = True
    else:
        assert kind == "none", kind
    return valid


def at_valid_queries(out, valid):
    """`out` `(batch, heads, n, d)` at the valid query positions, as `(valid tokens, heads, d)`."""
    return out.transpose(1, 2)[valid]


CASES = [(n, w, c, m) for n in LENGTHS for w in WINDOWS for c in (False, True) for m in MASKS]


# ------------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("n, window, causal, mask_kind", CASES)
def test_matches_local_attention(n, window, causal, mask_kind):
    q, k, v = random_qkv(n)
    valid = make_valid(mask_kind, n)
    out = sliding_window_attention(q, k, v, valid, window, causal)
    expected = reference(q, k, v, valid, window, causal)
    assert out.shape == (BATCH, HEADS, n, HEAD_DIM) and out.dtype == torch.float64
    torch.testing.assert_close(at_valid_queries(out, valid), at_valid_queries(expected, valid), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n, window, causal, mask_kind", CASES)
def test_gradients_match_local_attention(n, window, causal, mask_kind):
    valid = make_valid(mask_kind, n)
    inputs = random_qkv(n, requires_grad=True)
    # Upstream gradient only at valid queries: padding query rows are unused by callers and may differ.
    grad_out = torch.randn(BATCH, HEADS, n, HEAD_DIM, dtype=torch.float64) * valid[:, None, :, None]

    grads = torch.autograd.grad(sliding_window_attention(*inputs, valid, window, causal), inputs, grad_out)
    expected = torch.autograd.grad(reference(*inputs, valid, window, causal), inputs, grad_out)
    for name, grad, ref in zip("qkv", grads, expected):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_non_contiguous_inputs():
    """q, k, v straight out of a `(batch, n, heads, d)` projection, transposed (a view, not contiguous)."""
    n, window = 37, 16
    q, k, v = [torch.randn(BATCH, n, HEADS, HEAD_DIM, dtype=torch.float64).transpose(1, 2) for _ in range(3)]
    valid = make_valid("random", n)
    for causal in (False, True):
        out = sliding_window_attention(q, k, v, valid, window, causal)
        expected = reference(q, k, v, valid, window, causal)
        torch.testing.assert_close(at_valid_queries(out, valid), at_valid_queries(expected, valid), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------- no NaN


NAN_CASES = [
    (100, 3),  # sample 1 is valid only at position 0: queries far from it see only padding
    (5, 31),  # n < window
    (37, 16),  # n not a multiple of the block
    (64, 16),  # n a multiple of the block
]


@pytest.mark.parametrize("n, window", NAN_CASES)
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_no_nan_in_outputs_or_gradients(n, window, causal, dtype):
    inputs = random_qkv(n, dtype=dtype, requires_grad=True)
    valid = torch.zeros(BATCH, n, dtype=torch.bool)
    valid[0, 0] = True  # sample 0: a single valid token; sample 1: all padding
    out = sliding_window_attention(*inputs, valid, window, causal)
    # Upstream gradient at every position, padding queries included: their rows must not poison the gradients either.
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------- locality


@pytest.mark.parametrize("mask_kind", ("none", "random"))
@pytest.mark.parametrize("t", (0, 7, 15, 16, 20, 36))
def test_causal_output_ignores_the_future(t, mask_kind):
    n, window = 37, 16
    q, k, v = random_qkv(n)
    valid = make_valid(mask_kind, n)
    out = sliding_window_attention(q, k, v, valid, window, causal=True)

    changed = [x.clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    out_changed = sliding_window_attention(*changed, valid, window, causal=True)
    torch.testing.assert_close(out_changed[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=0)


@pytest.mark.parametrize("causal", (False, True))
def test_keys_outside_the_window_are_ignored(causal):
    """Changing k, v farther than `window` from query t (either side) leaves the output at t alone."""
    n, window, t = 64, 5, 30
    q, k, v = random_qkv(n)
    valid = make_valid("none", n)
    out = sliding_window_attention(q, k, v, valid, window, causal)
    far = (torch.arange(n) - t).abs() > window
    k2, v2 = k.clone(), v.clone()
    k2[:, :, far] = torch.randn_like(k2[:, :, far])
    v2[:, :, far] = torch.randn_like(v2[:, :, far])
    out2 = sliding_window_attention(q, k2, v2, valid, window, causal)
    torch.testing.assert_close(out2[:, :, t], out[:, :, t], rtol=0, atol=0)
    # ... and the window edge itself is seen: changing the key `window` positions back changes the output.
    k3 = k.clone()
    k3[:, :, t - window] = torch.randn_like(k3[:, :, t - window])
    assert not torch.equal(sliding_window_attention(q, k3, v, valid, window, causal)[:, :, t], out[:, :, t])


# ----------------------------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("causal", (False, True))
def test_bfloat16_close_to_float64(causal):
    """bfloat16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.004); with unit-variance inputs and outputs that
    are averages of unit-variance values, an absolute tolerance of 0.05 leaves room for the rounding of q, k, v,
    the scores, the probabilities and the output."""
    n, window = 100, 16
    q, k, v = random_qkv(n)
    valid = make_valid("random", n)
    expected = sliding_window_attention(q, k, v, valid, window, causal)
    out = sliding_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), valid, window, causal)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        at_valid_queries(out.double(), valid), at_valid_queries(expected, valid), rtol=0, atol=0.05
    )


def test_rejects_window_below_one():
    q, k, v = random_qkv(5)
    with pytest.raises(ValueError):
        sliding_window_attention(q, k, v, make_valid("none", 5), 0, causal=False)


# ------------------------------------------------------------------------------------------------ FlexAttention
# Eager FlexAttention (CPU) has no backward pass: gradients are compared on GPUs, where the layers use it compiled.
gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention's backward and compiled kernel need a GPU"
)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiles, window", [(1, 127), (3, 127), (5, 130), (6, 40)])
def test_window_block_mask_lists_exactly_the_tiles_in_reach(tiles, window, causal):
    """The compiled kernel visits only listed tiles: every tile holding an allowed key must be listed, and no other."""
    length = tiles * FLEX_TILE
    dense = window_block_mask(length, window, causal, None, torch.device("cpu")).to_dense()[0, 0]
    position = torch.arange(length)
    distance = position[:, None] - position[None, :]
    allowed = (distance <= window) & (distance >= (0 if causal else -window))
    expected = allowed.view(tiles, FLEX_TILE, tiles, FLEX_TILE).any(dim=(1, 3))
    assert torch.equal(dense.bool(), expected)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("n, window", [(5, 3), (37, 16), (300, 127), (256, 200)])
def test_flex_matches_local_attention(n, window, causal, mask_kind):
    torch.manual_seed(n + window)
    q, k, v = random_qkv(n)
    valid = make_valid(mask_kind, n)
    expected = reference(q, k, v, valid, window, causal)
    got = flex_sliding_window_attention(q, k, v, None if mask_kind == "none" else valid, window, causal)
    at_valid = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[at_valid], expected[at_valid], rtol=0, atol=1e-10)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("n, window", [(300, 127), (1000, 31), (4096, 127)])
def test_flex_compiled_matches_local_attention_with_gradients(n, window, causal, mask_kind):
    """float32 on the GPU (compiled FlexAttention's kernel), outputs and gradients of q, k, v."""
    torch.manual_seed(n + window)
    q, k, v = (torch.randn(BATCH, HEADS, n, 64, device="cuda", requires_grad=True) for _ in range(3))
    valid = make_valid(mask_kind, n).cuda()
    upstream = torch.randn_like(q) * valid[:, None, :, None]
    expected = reference(q, k, v, valid, window, causal)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    got = flex_sliding_window_attention(q, k, v, None if mask_kind == "none" else valid, window, causal)
    got_grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    at_valid = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[at_valid], expected[at_valid], rtol=1e-4, atol=1e-5)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)
