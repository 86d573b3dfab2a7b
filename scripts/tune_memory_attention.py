"""Tile sweep of the causal heavy attention's Triton kernels (colt5/memory_attention_triton.py), in one GPU call.

The inputs are the ones the benchmark's causal attention layer hands the kernels (scripts/bench_long_context.py:
bf16, batch 2, width 512, 8 heavy heads of 64, every token a heavy query, memory and blocks as
colt5.train.causal_memory_and_block chooses), captured from one forward of that layer at each length. For each
kernel (forward; the keys' backward; the queries' backward) the script times each candidate tile setting, the two
other kernels keeping the module's TILES, and checks that its results equal those of the module's TILES (relative
L2 error of the output, or of the four gradients, in bf16 arithmetic). "forward" rows time the forward pass,
"keys" and "queries" rows the whole backward pass (delta, keys, queries): only the swept kernel changes between
rows of one kernel. ms: CUDA-event time per call, the median of 3 groups of 10 calls after 3 warm-up calls.

--compare FILE [FILE ...] also times other versions of the module (for instance
`git show HEAD~1:colt5/memory_attention_triton.py > /tmp/before.py`), each with its own TILES, beside this tree's
on the same inputs (the same output gradient), so kernel changes are measured in the same process: ms per pass,
device ms per kernel (torch.profiler over 10 calls; "other": the buffers' zeroing, copies and casts), and the
relative L2 error of the output and of the gradients against the first file's.

Usage: python scripts/tune_memory_attention.py [--lengths 32768] [--check-lengths 8192 131072]
       [--compare /tmp/before.py ...] [--json results/x.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_long_context import BATCH, DIM, ours  # noqa: E402  (the benchmark's layer, one definition)

from colt5 import memory_attention_triton as kernels  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M counts queries and BLOCK_N keys in every kernel (the forward
# and the queries' backward loop over keys, the keys' backward over queries).
CANDIDATES = {
    "forward": [
        (128, 128, 4, 3), (128, 128, 4, 2), (128, 128, 4, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
        (128, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4),
    ],
    "keys": [
        (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 4, 5),
        (32, 128, 8, 4), (64, 128, 4, 2), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2),
    ],
    "queries": [
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 4), (64, 128, 4, 3), (128, 32, 4, 5),
        (128, 32, 8, 4), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 2), (128, 128, 8, 2),
    ],
}


SETTING_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
DEVICE = "cuda"


def setting(candidate: tuple[int, int, int, int]) -> dict[str, int]:
    """A candidate as the keyword arguments of a kernel launch."""
    return dict(zip(SETTING_KEYS, candidate))


def current(kernel: str) -> tuple[int, int, int, int]:
    """The module's TILES of one kernel, as a candidate."""
    return tuple(kernels.TILES[kernel][key] for key in SETTING_KEYS)


def captured_inputs(n: int) -> dict:
    """The arguments the benchmark's causal attention layer passes `memory_attention_triton` at `n` tokens."""
    layer = ours("causal attention", n).to(DEVICE, torch.bfloat16)
    captured = {}

    def capture(*args, **kwargs):
        captured.update(args=[a.detach().clone() for a in args], kwargs=kwargs)
        return original(*args, **kwargs)

    original = kernels.memory_attention_triton
    kernels.memory_attention_triton = capture
    try:
        with torch.no_grad():
            layer(torch.randn(BATCH, n, DIM, device=DEVICE, dtype=torch.bfloat16))
    finally:
        kernels.memory_attention_triton = original
    q, keys, values, memory_index, memory_weights, block_index, query_slot = captured["args"]
    int32 = dict(dtype=torch.int32)
    return dict(
        tensors=(
            q.contiguous(), keys.to(q.dtype).contiguous(), values.to(q.dtype).contiguous(),
            memory_index.to(**int32).contiguous(), memory_weights.contiguous(), block_index.to(**int32).contiguous(),
            query_slot.to(**int32).contiguous(),
        ),
        flags=(captured["kwargs"]["multiply_keys"], captured["kwargs"]["every_query"]),
    )


def passes(module, inputs: dict) -> tuple[Callable, Callable]:
    """The module's forward and backward custom operators on `inputs` (a fixed random output gradient)."""
    tensors, flags = inputs["tensors"], inputs["flags"]
    out, lse = module._forward(*tensors, *flags)
    grad_out = torch.randn_like(out)

    def forward():
        return module._forward(*tensors, *flags)

    def backward():
        return module._backward(grad_out, *tensors, out, lse, *flags)

    return forward, backward


def cuda_ms(fn: Callable) -> float:
    for _ in range(3):
        fn()
    groups = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        groups.append(start.elapsed_time(end) / 10)
    return statistics.median(groups)


def rel_err(values, references) -> float:
    """The largest relative L2 error over corresponding tensors."""
    return max(
        ((v.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
        for v, r in zip(values, references)
    )


def sweep(inputs: dict, kernel: str, candidates: list[tuple]) -> list[dict]:
    """Time each candidate setting of one kernel, the others at the module's TILES."""
    default = dict(kernels.TILES)
    forward, backward = passes(kernels, inputs)
    timed_pass = forward if kernel == "forward" else backward
    expected = timed_pass()
    rows = []
    for candidate in candidates:
        kernels.TILES = {**default, kernel: setting(candidate)}
        try:
            error = rel_err(timed_pass(), expected)
            ms = cuda_ms(timed_pass)
        except Exception as exc:  # a setting that does not compile (shared memory, registers) is a result here
            rows.append(dict(kernel=kernel, tiles=candidate, error=f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            kernels.TILES = default
        is_default = setting(candidate) == default[kernel]
        rows.append(dict(kernel=kernel, tiles=candidate, ms=ms, rel_err=error, default=is_default))
    return rows


def load_module(path: str):
    """Another version of memory_attention_triton.py, under a module name (and so an operator namespace) of its own."""
    spec = importlib.util.spec_from_file_location(f"colt5.compared_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_ms(fn: Callable) -> dict[str, float]:
    """Device ms per call of each kernel `fn` launches: this module's Triton kernels by name, the rest "other"."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA":
            name = event.key if event.key.startswith("_") and event.key.endswith("_kernel") else "other"
            times[name] = times.get(name, 0.0) + event.self_device_time_total / 10 / 1e3
    return {name: round(ms, 4) for name, ms in sorted(times.items())}


def compare(inputs: dict, versions: dict) -> dict:
    """Each version's forward and backward ms, kernel times and agreement with the first version."""
    report, outputs = {}, {}
    for name, module in versions.items():
        torch.manual_seed(0)  # the same output gradient
        forward, backward = passes(module, inputs)
        outputs[name] = forward()[0], backward()
        kernels_ms = kernel_ms(forward)
        for kernel, ms in kernel_ms(backward).items():
            kernels_ms[kernel] = round(kernels_ms.get(kernel, 0.0) + ms, 4)
        report[name] = dict(
            forward_ms=cuda_ms(forward), backward_ms=cuda_ms(backward), kernels=kernels_ms,
            rel_err_output=rel_err([outputs[name][0]], [next(iter(outputs.values()))[0]]),
            rel_err_gradients=rel_err(outputs[name][1], next(iter(outputs.values()))[1]),
        )
    return report


def print_comparison(n: int, report: dict) -> None:
    print(f"\n{n} tokens, versions of the module (each with its own TILES): ms per call")
    for name, row in report.items():
        kernels_ms = ", ".join(f"{kernel} {ms:.3f}" for kernel, ms in row["kernels"].items())
        print(
            f"  {name:<28} forward {row['forward_ms']:7.3f}  backward {row['backward_ms']:7.3f}  "
            f"rel. err. output {row['rel_err_output']:.1e}, gradients {row['rel_err_gradients']:.1e}\n"
            f"  {'':<28} device: {kernels_ms}"
        )


def print_rows(n: int, rows: list[dict]) -> None:
    print(f"\n{n} tokens: kernel   BLOCK_M x BLOCK_N, warps, stages    ms    rel. err. vs TILES")
    for row in rows:
        label = "{} x {}, {} warps, {} stages".format(*row["tiles"])
        if "error" in row:
            print(f"  {row['kernel']:<8} {label:<32} {row['error'][:60]}")
        else:
            mark = "  <- TILES" if row["default"] else ""
            print(f"  {row['kernel']:<8} {label:<32} {row['ms']:7.3f}  {row['rel_err']:.1e}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768], help="sweep every candidate here")
    parser.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES), help="to sweep")
    parser.add_argument(
        "--check-lengths", type=int, nargs="*", default=[],
        help="time the module's TILES and the fastest of the sweep (of each swept kernel) at these lengths",
    )
    parser.add_argument(
        "--compare", nargs="*", default=[], help="other memory_attention_triton.py files to time beside this tree's"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_memory_attention.py times Triton kernels: it needs a CUDA GPU.")
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}; TILES {kernels.TILES}"
    )
    print(header)
    report = dict(header=header, sweeps={}, checks={}, versions={})
    versions = {Path(path).name: load_module(path) for path in args.compare}
    if versions:
        versions["this tree"] = kernels
    best = {}
    for n in args.lengths:
        inputs = captured_inputs(n)
        rows = [row for kernel in args.kernels for row in sweep(inputs, kernel, CANDIDATES[kernel])]
        print_rows(n, rows)
        report["sweeps"][n] = rows
        for kernel in args.kernels:
            timed_rows = [r for r in rows if r["kernel"] == kernel and "ms" in r and r["rel_err"] < 2e-2]
            best[kernel] = min(timed_rows, key=lambda r: r["ms"])["tiles"]
        print("  fastest: " + "; ".join(f"{k} {v}" for k, v in best.items()))
        if versions:
            report["versions"][n] = compare(inputs, versions)
            print_comparison(n, report["versions"][n])
        del inputs
    for n in args.check_lengths:
        inputs = captured_inputs(n)
        rows = [
            row
            for kernel in best
            for row in sweep(inputs, kernel, list(dict.fromkeys([current(kernel), best[kernel]])))
        ]
        print_rows(n, rows)
        report["checks"][n] = rows
        if versions:
            report["versions"][n] = compare(inputs, versions)
            print_comparison(n, report["versions"][n])
        del inputs
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
