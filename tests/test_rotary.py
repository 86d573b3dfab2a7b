"""Rotary embeddings: the Triton rotation (rotary_triton.py) against the PyTorch reference (rotary.py).

On CPU (CI) the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU compiled, plus the
dispatch and bfloat16 tests marked `gpu`. The kernel computes in float32: against the float64 reference the output
and the gradient agree to 1e-6 relative L2 error for float32 inputs, 1e-2 for bfloat16 (its rounding of the output).
"""

from __future__ import annotations

import pytest
import torch

from colt5.rotary import RotaryEmbedding, apply_rotary, apply_rotary_reference
from colt5.rotary_triton import _alignment, apply_rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernel, dispatch)")


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def layout(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x in one of the layouts the attention layers rotate, and random cos/sin broadcast to it. cos and sin are not
    a rotation here (and their two halves differ): the kernel must compute the reference's formula, whatever the
    tables hold."""
    batch, heads, n, dim = 2, 3, 37, 16

    def tables(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(*shape, dtype=dtype, device=DEVICE) for _ in range(2))

    if name == "heads first, cos broadcast over heads":
        return torch.randn(batch, heads, n, dim, dtype=dtype, device=DEVICE), *tables(batch, 1, n, dim)
    if name == "transposed view":
        x = torch.randn(batch, n, heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        return x, *tables(batch, 1, n, dim)
    if name == "chunk of a fused projection":
        x = torch.randn(batch, n, 2 * heads * dim, dtype=dtype, device=DEVICE)[..., : heads * dim]
        return x.unflatten(-1, (heads, dim)), *tables(batch, n, 1, dim)
    if name == "five dimensions":
        return torch.randn(2, batch, heads, n, dim, dtype=dtype, device=DEVICE), *tables(batch, 1, n, dim)
    if name == "one row per position":
        return torch.randn(n, dim, dtype=dtype, device=DEVICE), *tables(n, dim)
    if name.startswith("rows of a wider tensor"):  # rows start at multiples of 66 or 65: aligned to 2 or 1 element
        width = int(name.split()[-1])
        x = torch.randn(batch, heads, n, width, dtype=dtype, device=DEVICE)[..., :dim]
        return x, *(t[..., :dim] for t in tables(batch, 1, n, width))
    raise ValueError(name)


LAYOUTS = [
    "heads first, cos broadcast over heads",
    "transposed view",
    "chunk of a fused projection",
    "five dimensions",
    "one row per position",
    "rows of a wider tensor 66",
    "rows of a wider tensor 65",
]


@pytest.mark.parametrize("name", LAYOUTS)
def test_kernel_matches_reference_with_gradient(name):
    x, cos, sin = layout(name)
    grad = torch.randn(x.shape, dtype=x.dtype, device=DEVICE)
    x64 = x.detach().double().requires_grad_()
    expected = apply_rotary_reference(x64, cos.double(), sin.double())
    expected.backward(grad.double())

    x = x.detach().requires_grad_()
    out = apply_rotary_triton(x, cos, sin)
    out.backward(grad)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, expected) < 1e-6
    assert rel_err(x.grad, x64.grad) < 1e-6


def test_alignment_of_rows():
    """What the kernel is told of the strides it is not specialized on: the largest power of two, at most 16,
    dividing the leading strides (of x, of cos and sin, of the output)."""
    x = torch.randn(2, 4, 8, 64)
    assert _alignment(x) == 16  # strides 2048, 512, 64: the cap
    assert _alignment(torch.randn(3, 8, 24)[..., :16]) == 8  # strides 192, 24
    wider = torch.randn(2, 4, 8, 66)[..., :64]  # the rows of a wider tensor: strides 2112, 528, 66
    assert _alignment(wider) == 2
    assert _alignment(torch.randn(3, 5, 65)[..., :64]) == 1  # strides 325, 65
    broadcast = torch.randn(2, 1, 8, 64).expand(x.shape)  # stride 0 over the heads divides everything
    assert broadcast.stride(1) == 0 and _alignment(broadcast) == 16
    assert _alignment(x, broadcast, broadcast, x) == 16
    assert _alignment(x, broadcast, wider) == 2  # the least aligned tensor decides
    assert _alignment(torch.randn(64)) == 16  # no leading dimension
    column = torch.randn(4, 64, 1).transpose(1, 2)  # size 1 with stride 1: its index is always 0
    assert column.stride() == (64, 1, 1) and _alignment(column) == 16


@pytest.mark.parametrize("width, align", [(66, 2), (65, 1)])
def test_rows_of_a_wider_tensor_are_aligned_to_2_or_1(width, align):
    """The layouts "rows of a wider tensor" of test_kernel_matches_reference_with_gradient really are the unaligned
    cases: x, cos and sin are the first features of rows 66 or 65 wide, so the kernel is told rows aligned to 2
    elements or 1 (narrower or scalar loads; the interpreter ignores the hint, a GPU compiles for it)."""
    x, cos, sin = layout(f"rows of a wider tensor {width}")
    assert _alignment(x) == _alignment(cos.expand(x.shape), sin.expand(x.shape)) == align


def test_kernel_rotates_by_position():
    """With RotaryEmbedding's tables, the rotated dot product of a query and a key depends only on their distance,
    and rotating by -position undoes the rotation."""
    rotary_emb = RotaryEmbedding(16)
    q, k = torch.randn(2, 1, 16, device=DEVICE).unbind(0)
    positions = torch.tensor([3, 10, 103, 110], device=DEVICE)
    cos, sin = rotary_emb(positions, torch.float32)
    q_rot = apply_rotary_triton(q.expand(4, 16), cos, sin)
    k_rot = apply_rotary_triton(k.expand(4, 16), cos, sin)
    dots = (q_rot[[1, 3]] * k_rot[[0, 2]]).sum(-1)  # distance 7 at two places
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)
    undone = apply_rotary_triton(q_rot, cos, -sin)
    torch.testing.assert_close(undone, q.expand(4, 16), rtol=1e-5, atol=1e-5)


def test_empty_input():
    x = torch.randn(2, 0, 3, 16, device=DEVICE)
    cos, sin = torch.randn(2, 2, 0, 1, 16, device=DEVICE).unbind(0)
    assert apply_rotary_triton(x, cos, sin).shape == x.shape


def test_cpu_tensors_take_the_reference(monkeypatch):
    """The dispatch sends CPU tensors (and whatever the kernel does not take) to the PyTorch operations."""
    monkeypatch.setattr("colt5.rotary_triton.apply_rotary_triton", None)  # calling it would fail
    x, cos, sin = (t.cpu() for t in layout("heads first, cos broadcast over heads"))
    torch.testing.assert_close(apply_rotary(x, cos, sin), apply_rotary_reference(x, cos, sin))


@gpu
@pytest.mark.parametrize("name", LAYOUTS)
def test_bf16_on_gpu(name):
    x, cos, sin = layout(name, torch.bfloat16)
    grad = torch.randn(x.shape, dtype=x.dtype, device=DEVICE)
    x64 = x.detach().double().requires_grad_()
    apply_rotary_reference(x64, cos.double(), sin.double()).backward(grad.double())
    x = x.detach().requires_grad_()
    out = apply_rotary(x, cos, sin)
    out.backward(grad)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, apply_rotary_reference(x.double(), cos.double(), sin.double())) < 1e-2
    assert rel_err(x.grad, x64.grad) < 1e-2


@gpu
def test_dispatch_on_gpu(monkeypatch):
    """CUDA tensors with tables of their dtype go to the kernel; tables of another dtype, tables that need a
    gradient or tables larger than x (the result would broadcast) go to the reference."""
    calls = []
    kernel = apply_rotary_triton
    monkeypatch.setattr("colt5.rotary_triton.apply_rotary_triton", lambda *args: calls.append(1) or kernel(*args))
    x, cos, sin = layout("heads first, cos broadcast over heads")
    apply_rotary(x, cos, sin)
    assert len(calls) == 1
    apply_rotary(x, cos.double(), sin.double())
    apply_rotary(x, cos.clone().requires_grad_(), sin)
    out = apply_rotary(x[:, :1], cos.expand(2, 3, 37, 16), sin.expand(2, 3, 37, 16))
    assert len(calls) == 1 and out.shape == (2, 3, 37, 16)
