"""Routed cross attention over long memories and routed image attention, against dense SDPA, in one GPU call.

Cross attention (bf16, batch 1, 1024 queries of width 512, memories of width 512, 8 heads of 64):
- ours: ConditionalRoutedCrossAttention with every query routed (1.0) and `kv` keys/values routed from the
  memories, over the whole memory or evenly over blocks of it (`route_block_size`), one or two routing sets;
- dense: q/k/v/o projections and one SDPA call (flash) from every query to every memory token;
- reference: colt5-attention's ConditionalRoutedCrossAttention, float32, where it runs.
Memories of 65,536, 262,144 and 1,048,576 tokens. fwd: forward under no_grad; f+b: forward and backward into the
weights, the queries and the memories. Peak MB: memory allocated by the call above its inputs and weights (the
1M-token memories themselves take 1 GiB in bf16).

Image attention (bf16, batch 1, 512 channels, channels first, 1/16 of pixels routed as queries, 1/8 as keys/values,
4 light heads of 64 in windows of w x w pixels, 8 heavy heads of 64):
- ours: ConditionalRoutedImageAttention, windows of 8 and 16 pixels;
- dense: q/k/v/o projections and one SDPA call over all pixels (8 heads of 64);
- reference: colt5-attention's ConditionalRoutedImageAttention (float32; its heavy branch routes inside each window
  only), where it runs.
Maps of 64 x 64 to 512 x 512 pixels.

Timing and peak memory as in bench_long_context.py (median of three groups of calls, device synchronised).

Usage: python scripts/bench_layer_family.py [--json results/x.json] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch
import torch.nn.functional as F
import transformers
from bench_long_context import peak_mb, timed
from einops import rearrange
from torch import nn

from colt5 import ConditionalRoutedCrossAttention, ConditionalRoutedImageAttention

DIM, HEADS, HEAD_DIM = 512, 8, 64
QUERIES = 1024
LIGHT_HEADS = 4
# colt5's design, as measured since 2026-11-22: the standalone layers default to colt5-attention's settings (norms
# inside each branch, iterative straight-through routers, a learned unrouted output, keys not scaled).
DESIGN = dict(
    branch_norms=False,
    learned_unrouted_output=False,
    multiply_keys_by_score=True,
    router_kwargs=dict(n_iters=None, eps=1.0, straight_through=False),
)


class DenseCrossAttention(nn.Module):
    """Every query attends to every memory token: q/k/v/o projections around one SDPA call."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.kv_proj = nn.Linear(DIM, 2 * HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b n (h e) -> b h n e", h=HEADS)
        k, v = rearrange(self.kv_proj(context), "b m (two h e) -> two b h m e", two=2, h=HEADS)
        return self.o_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)"))


class DenseImageAttention(nn.Module):
    """Full attention over all pixels of a channels-first map."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(DIM, 3 * HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        tokens = rearrange(x, "b c y x -> b (y x) c")
        q, k, v = rearrange(self.qkv_proj(tokens), "b n (three h e) -> three b h n e", three=3, h=HEADS)
        out = self.o_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)"))
        return rearrange(out, "b (y x) c -> b c y x", y=height)


def reference_cross(kv: int) -> nn.Module | None:
    try:
        import colt5_attention as ref
    except ImportError:
        return None
    return ref.ConditionalRoutedCrossAttention(DIM, num_tokens_q=QUERIES, num_tokens_kv=kv, heads=HEADS)


def reference_image(window: int) -> nn.Module | None:
    """The reference routes inside each window: its amounts are per window (the same 1/16 and 1/8 of pixels)."""
    try:
        import colt5_attention as ref
    except ImportError:
        return None
    return ref.ConditionalRoutedImageAttention(
        DIM,
        num_heavy_tokens_q=window * window // 16,
        num_heavy_tokens_kv=window * window // 8,
        light_heads=LIGHT_HEADS,
        heavy_heads=HEADS,
        light_window_size=window,
        channel_first=True,
    )


def measure(module: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> dict:
    """fwd and f+b ms, peak MB of each; the error instead where the module fails."""
    module = module.to(device=device, dtype=dtype)
    inputs = [t.to(device=device, dtype=dtype) for t in inputs]
    grad: list[torch.Tensor] = []

    def forward():
        with torch.no_grad():
            return module(*inputs)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = module(*leaves)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    result: dict = {}
    try:
        module.eval()
        result["fwd_ms"] = timed(forward)
        result["fwd_peak_mb"] = peak_mb(forward)
        module.train()
        result["fwd_bwd_ms"] = timed(forward_backward)
        module.zero_grad(set_to_none=True)
        result["fwd_bwd_peak_mb"] = peak_mb(forward_backward)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    except Exception as error:  # the reference fails on some inputs: record why and go on
        result["error"] = f"{type(error).__name__}: {str(error)[:120]}"
    module.to("meta")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_row(section: str, size: str, impl: str, row: dict, dense: dict | None) -> None:
    if "error" in row:
        print(f"{section:6s} {size:>14s} {impl:34s} {row['error']}", flush=True)
        return
    speedup = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"] if dense and "fwd_bwd_ms" in dense else float("nan")
    fwd_speedup = dense["fwd_ms"] / row["fwd_ms"] if dense and "fwd_ms" in dense else float("nan")
    print(
        f"{section:6s} {size:>14s} {impl:34s} {row['fwd_ms']:9.2f} {row['fwd_peak_mb']:9.0f} {fwd_speedup:7.2f} "
        f"{row['fwd_bwd_ms']:9.2f} {row['fwd_bwd_peak_mb']:9.0f} {speedup:7.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memories", type=int, nargs="*", default=[65536, 262144, 1048576])
    parser.add_argument("--sides", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--no-reference", action="store_true", help="skip the colt5-attention package")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    queries = QUERIES
    if args.smoke:
        args.memories, args.sides, queries = [4096], [32], 64
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    triton_version = importlib.metadata.version("triton") if device.type == "cuda" else "-"
    header = f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, triton {triton_version}"
    print(header)
    rows: list[dict] = []

    def record(section: str, size: str, impl: str, row: dict, dense: dict | None) -> None:
        row.update(section=section, size=size, impl=impl)
        rows.append(row)
        print_row(section, size, impl, row, dense)
        if args.json:  # after every row: a run cut short keeps what it measured
            with open(args.json, "w") as handle:
                json.dump(dict(header=header, rows=rows), handle, indent=1)

    print("\nms per call, peak MB above inputs and weights; x = dense / ours")
    print(
        f"{'layer':6s} {'size':>14s} {'impl':34s} {'fwd ms':>9s} {'fwd MB':>9s} {'x fwd':>7s} {'f+b ms':>9s} "
        f"{'f+b MB':>9s} {'x f+b':>7s}"
    )

    def cross(kv: int, **options) -> nn.Module:
        return ConditionalRoutedCrossAttention(
            DIM, num_heavy_tokens_q=1.0, num_heavy_tokens_kv=kv, heads=HEADS, dim_head=HEAD_DIM, **DESIGN, **options
        )

    def cross_variants(memory: int) -> list[tuple[str, nn.Module]]:
        block = min(65536, memory // 2)
        return [
            ("routed kv 8192", cross(8192)),
            (f"routed kv 8192, blocks of {block}", cross(8192, route_block_size=block)),
            ("routed kv 2 x 8192 (2 sets)", cross(8192, num_routed_kv=2)),
            ("routed kv 32768", cross(32768)),
        ]

    for memory in args.memories:
        torch.manual_seed(memory)
        inputs = [torch.randn(1, queries, DIM), torch.randn(1, memory, DIM)]
        size = f"{queries}x{memory}"
        dense = measure(DenseCrossAttention(), inputs, dtype, device)
        for name, module in cross_variants(memory):
            record("cross", size, f"ours, {name}", measure(module, inputs, dtype, device), dense)
        record("cross", size, "dense SDPA", dense, dense)
        if not args.no_reference and (module := reference_cross(8192)) is not None:
            row = measure(module, inputs, torch.float32, device)
            record("cross", size, "reference kv 8192 (fp32)", row, dense)

    for side in args.sides:
        torch.manual_seed(side)
        inputs = [torch.randn(1, DIM, side, side)]
        size = f"{side}x{side}"
        dense = measure(DenseImageAttention(), inputs, dtype, device)
        for window in (8, 16):
            module = ConditionalRoutedImageAttention(
                DIM,
                num_heavy_tokens_q=1 / 16,
                num_heavy_tokens_kv=1 / 8,
                window_size=window,
                light_heads=LIGHT_HEADS,
                heavy_heads=HEADS,
                channels_first=True,
                **DESIGN,
            )
            record("image", size, f"ours, windows {window}x{window}", measure(module, inputs, dtype, device), dense)
        record("image", size, "dense SDPA", dense, dense)
        if not args.no_reference and (module := reference_image(16)) is not None:
            record("image", size, "reference windows 16 (fp32)", measure(module, inputs, torch.float32, device), dense)


if __name__ == "__main__":
    main()
