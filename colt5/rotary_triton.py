# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Triton kernel for rotary embeddings (rotary.py holds the PyTorch reference and the dispatch).

The reference rotates in five elementwise kernels forward (two products, a negation, a concatenation, a sum), each
reading or writing a tensor of the query or key's size, and as many backward; broadcasting cos and sin over the
heads makes them strided loops. Every attention layer rotates two to four such tensors per call, so at 8k tokens
these kernels took a tenth of the causal attention's device time. This kernel reads the tensor once and writes
it once, in any layout (strides are arguments: the projections' outputs are views), with cos and sin broadcast by
stride 0. The backward pass is the inverse rotation, the same kernel with the signs of the sines flipped.

Triton specializes an integer argument on its being 1 and on its divisibility by 16, so with the sizes and strides
specialized every layout (broadcast tables' stride 0, decoding's one position, each row count) compiled a variant of
its own: on an H100, a fresh process compiled for 2.7 s over a 119M model's first prefill and decoding step. None is
specialized; what the compiler took from them to vectorize the loads and stores, that every row starts aligned, it
is told by compile-time constants instead: for x, for cos and sin, and for the output, the largest power of two (at
most 16 elements) dividing the tensor's leading strides. They are apart because one for all narrowed the output's
stores to x's loads: 30% longer on an H100 for rows of x 66 elements apart.
"""

from __future__ import annotations

import math

import torch

try:  # transformers' remote-code check skips imports in try blocks: loading a model never requires triton.
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "The Triton rotary embedding needs the `triton` package (pip install triton); without it CoLT5 uses the "
        "PyTorch rotation (rotary.py)."
    ) from error

# The leading dimensions the kernel indexes (tensors with fewer are padded with dimensions of size 1).
LEADING_DIMS = 4
_ROWS_PER_PROGRAM = 32
# The largest row alignment (in elements) the kernel is told of: Triton's own bound for integer arguments (16), and
# more than any load's vector width (16 bytes) needs.
_MAX_ALIGN = 16


@triton.jit
def _row_offsets(rows, d1, d2, d3, s0, s1, s2, s3, ALIGN: tl.constexpr):
    """Element offsets of rows (flat indices over the 4 leading dimensions) in a tensor of those strides, each a
    multiple of ALIGN."""
    i3 = rows % d3
    rest = rows // d3
    i2 = rest % d2
    rest = rest // d2
    i1 = rest % d1
    i0 = rest // d1
    offsets = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
    if ALIGN > 1:  # the strides are not specialized: this is what tells the compiler that rows start aligned
        # (marked here, on the sum, rather than on the caller's result: the call is inlined away with its attributes)
        offsets = tl.multiple_of(offsets, ALIGN)
    return offsets


# Every integer argument is exempt from specialization (see the module docstring): one variant per dtype, head
# dimension, direction and alignments (the rows' and the pointers', which Triton still specializes on), whatever the
# layout and the number of rows.
@triton.jit(
    do_not_specialize=[
        "rows", "d1", "d2", "d3", "xs0", "xs1", "xs2", "xs3", "cs0", "cs1", "cs2", "cs3",
        "ss0", "ss1", "ss2", "ss3", "os0", "os1", "os2", "os3",
    ]
)
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, rows, d1, d2, d3,
    xs0, xs1, xs2, xs3, cs0, cs1, cs2, cs3, ss0, ss1, ss2, ss3, os0, os1, os2, os3,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, INVERSE: tl.constexpr,
    X_ALIGN: tl.constexpr, TABLE_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr,
):
    row = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    feature = tl.arange(0, BLOCK_HALF)
    mask = (row < rows)[:, None] & (feature < HALF)[None, :]
    x_at = (_row_offsets(row, d1, d2, d3, xs0, xs1, xs2, xs3, X_ALIGN))[:, None] + feature[None, :]
    cos_at = (_row_offsets(row, d1, d2, d3, cs0, cs1, cs2, cs3, TABLE_ALIGN))[:, None] + feature[None, :]
    sin_at = (_row_offsets(row, d1, d2, d3, ss0, ss1, ss2, ss3, TABLE_ALIGN))[:, None] + feature[None, :]
    out_at = (_row_offsets(row, d1, d2, d3, os0, os1, os2, os3, OUT_ALIGN))[:, None] + feature[None, :]
    x1 = tl.load(x_ptr + x_at, mask=mask).to(tl.float32)
    x2 = tl.load(x_ptr + x_at + HALF, mask=mask).to(tl.float32)
    c1 = tl.load(cos_ptr + cos_at, mask=mask).to(tl.float32)
    c2 = tl.load(cos_ptr + cos_at + HALF, mask=mask).to(tl.float32)
    s1 = tl.load(sin_ptr + sin_at, mask=mask).to(tl.float32)
    s2 = tl.load(sin_ptr + sin_at + HALF, mask=mask).to(tl.float32)
    if INVERSE:  # the transpose of the rotation below (its gradient)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # x * cos + cat(-x2, x1) * sin
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_ptr + out_at, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_at + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _leading_strides(t: torch.Tensor) -> list[int]:
    """The strides of `t`'s leading dimensions, padded in front to `LEADING_DIMS` (the last dimension has stride 1)."""
    strides = list(t.stride()[:-1])
    return [0] * (LEADING_DIMS - len(strides)) + strides


def _alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two, at most `_MAX_ALIGN`, dividing the leading strides of `tensors`: where each of their
    rows starts, in elements. A broadcast dimension's stride 0 divides everything, and a dimension of size 1 does not
    count (its stride multiplies index 0)."""
    strides = (stride for t in tensors for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1)
    return math.gcd(_MAX_ALIGN, *strides)  # a divisor of a power of two is one


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if out.stride(-1) != 1:  # empty_like keeps a dense layout only; this one is not: write row-major
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x[..., 0].numel()
    if rows == 0:
        return out
    sizes = [1] * (LEADING_DIMS + 1 - x.dim()) + list(x.shape[:-1])
    half = x.shape[-1] // 2
    _rotary_kernel[(triton.cdiv(rows, _ROWS_PER_PROGRAM),)](
        x, cos, sin, out, rows, *sizes[1:],
        *_leading_strides(x), *_leading_strides(cos), *_leading_strides(sin), *_leading_strides(out),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_ROWS=_ROWS_PER_PROGRAM, INVERSE=inverse,
        X_ALIGN=_alignment(x), TABLE_ALIGN=_alignment(cos, sin), OUT_ALIGN=_alignment(out),
    )
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        return _rotate(grad_out, cos.expand(grad_out.shape), sin.expand(grad_out.shape), inverse=True), None, None


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in one kernel each way (see rotary.py for the arguments). Needs `x.dim() <= 5`, an even last
    dimension, cos and sin of x's dtype broadcastable to it, and no gradient for cos and sin."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos, sin = (t.expand(x.shape) for t in (cos, sin))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    return _Rotary.apply(x, cos, sin)
