"""The Triton decode attention against its float64 reference (decode_attention.py).

On CPU (CI) the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) with 16 keys a program and
4 tiles a combining step, on shapes that span several of both; on a GPU the same tests run compiled (128 keys a
program), plus bfloat16. Tolerance for float32 kernels against float64: 1e-5 relative L2 error.
"""

from __future__ import annotations

import pytest
import torch

from colt5.decode_attention import decode_attention, decode_attention_reference
from colt5.decode_attention_triton import decode_attention_triton

# Triton's CPU interpreter evaluates both sides of tl.where in numpy, which warns about the side not taken.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bfloat16 kernels)")


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def random_problem(batch=3, heads=4, n=150, head_dim=24, mask_heads=None, dtype=torch.float32, seed=0):
    """Random queries, keys and values (keys a slice of a longer buffer, as a cache's are not always whole), a
    random mask with one sample that may attend to nothing and one that may attend only to keys of the last tile."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    keys = torch.randn(batch, heads, n + 7, head_dim, generator=generator)[:, :, 3 : n + 3]
    values = torch.randn(batch, heads, n, head_dim, generator=generator)
    mask = torch.rand(batch, mask_heads or heads, 1, n, generator=generator) < 0.5
    mask[0] = False  # nothing to attend to: zeros
    mask[1] = False
    mask[1, ..., -3:] = True  # only the last (partial) tile
    return [t.to(DEVICE, dtype) for t in (q, keys, values)] + [mask.to(DEVICE)]


@pytest.mark.parametrize("mask_heads", [None, 1])
@pytest.mark.parametrize("with_null", [False, True])
def test_the_kernels_equal_softmax_attention_in_float64(mask_heads, with_null):
    q, keys, values, mask = random_problem(mask_heads=mask_heads)
    null_kv = torch.randn(2, q.shape[1], q.shape[-1], device=DEVICE) if with_null else None
    out = decode_attention_triton(q, keys, values, mask, null_kv)
    expected = decode_attention_reference(
        *(t.double() for t in (q, keys, values)), mask, None if null_kv is None else null_kv.double()
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, expected) < 1e-5
    if not with_null:
        assert (out[0] == 0).all(), "a query with nothing to attend to gets zeros"


def test_one_tile_and_a_head_dim_of_a_power_of_two():
    q, keys, values, mask = random_problem(batch=2, heads=2, n=9, head_dim=16)
    expected = decode_attention_reference(*(t.double() for t in (q, keys, values)), mask)
    assert rel_err(decode_attention_triton(q, keys, values, mask), expected) < 1e-5


@gpu
def test_the_kernels_in_bfloat16():
    q, keys, values, mask = random_problem(n=3072, head_dim=64, dtype=torch.bfloat16)
    expected = decode_attention_reference(*(t.double() for t in (q, keys, values)), mask)
    # Inputs rounded to bfloat16 alike; float32 arithmetic, one rounding of the output to bfloat16.
    assert rel_err(decode_attention_triton(q, keys, values, mask), expected) < 1e-2


@pytest.mark.parametrize("wants_grad, kernel", [(False, True), (True, False)])
def test_the_dispatch_takes_the_kernels_without_gradients_on_the_gpu(monkeypatch, wants_grad, kernel):
    """CUDA tensors without autograd go to the kernels; anything asking for gradients goes to SDPA (the kernels
    have no backward pass). Checked on CPU by letting the dispatch believe the tensors are on a GPU."""
    calls = []
    import colt5.decode_attention_triton as triton_module

    monkeypatch.setattr(triton_module, "decode_attention_triton", lambda *args: calls.append(args) or args[0])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    q, keys, values, mask = random_problem(batch=2, heads=2, n=8, head_dim=8)
    decode_attention(q.requires_grad_(wants_grad), keys, values, mask)
    assert bool(calls) == kernel


def test_several_queries_are_refused_with_a_clear_error():
    q, keys, values, mask = random_problem(batch=2, heads=2, n=8, head_dim=8)
    with pytest.raises(ValueError, match="one query per sample and head"):
        decode_attention(q.expand(-1, -1, 2, -1), keys, values, mask)
