"""`masked_sdpa` against softmax attention in float64, gradients included; a query with nothing to attend to gets
zeros (which decode_attention's reference relies on)."""

import pytest
import torch

from colt5.masked_sdpa import masked_sdpa


def reference_attention(q, k, v, mask):
    """Softmax attention in float64; a query with no allowed key gets zeros (as SDPA)."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("queries", [1, 7])
def test_masked_sdpa_equals_softmax_attention_with_its_gradients(queries):
    torch.manual_seed(0)
    q = torch.randn(2, 3, queries, 16, requires_grad=True)
    k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 3, queries, 40) < 0.6
    mask[1, 2] = False  # no allowed key: zeros
    out = masked_sdpa(q, k, v, mask)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves, mask)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    assert (out[1, 2] == 0).all()
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-5)
