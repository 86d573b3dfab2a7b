"""Router benchmark: this project's Triton soft top-k vs its PyTorch soft top-k vs the colt5-attention Triton kernel.

One run on one GPU prints the whole table, writes JSON and a PNG plot (time vs n, log-log). Rows of n router
scores, 8 rows, k = n/8, float32 scores from randn, eps 1:
- triton exact / torch exact: this project's exact mode (fixed point, implicit gradient);
- triton iter50 / torch iter50: this project's iterative mode, 50 coordinate-descent iterations;
- reference: colt5_attention.triton_coor_descent (50 iterations; the `bench` extra), where it runs.
Times are medians of triton.testing.do_bench (CUDA events), forward and forward+backward (backward of
sum(lambda * g) for a fixed random g). "graph" columns replay the exact mode's kernels (forward; forward and
backward) from a CUDA graph: device time without Python launch overhead. Peak MB is the peak allocation above
the inputs during one forward+backward. The bandwidth floor counts the bytes that must move: forward reads the
scores and writes lambda (8 bytes a token); forward+backward also reads lambda and the gradient and writes the
score gradient (20 bytes a token); it is timed against a measured device-to-device copy.
Every size is also checked against the float64 PyTorch reference (relative L2 error of lambda and of the score
gradient), and bf16 scores go through the Triton path.

Usage: python scripts/bench_router.py [--sizes 4096 16384 65536 262144 1048576] [--rows 8]
       [--json results/x.json] [--plot results/x.png]
       python scripts/bench_router.py --replot results/x.json --plot results/x.png   (matplotlib, no GPU)
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import transformers
import triton
import triton.testing

from colt5 import soft_topk_triton
from colt5.soft_topk import soft_topk


ITERATIONS = 50


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def reference_kernel():
    try:
        from colt5_attention.triton_coor_descent import triton_coor_descent
    except ImportError:
        return None
    return lambda s, k: triton_coor_descent(s, n_iters=ITERATIONS, k=k, eps=1.0)


def methods(k: float):
    reference = reference_kernel()
    table = {
        "triton exact": lambda s: soft_topk(s, k, backend="triton"),
        "triton iter50": lambda s: soft_topk(s, k, n_iters=ITERATIONS, backend="triton"),
        "torch exact": lambda s: soft_topk(s, k, backend="torch"),
        "torch iter50": lambda s: soft_topk(s, k, n_iters=ITERATIONS, backend="torch"),
    }
    if reference is not None:
        table["reference"] = lambda s: reference(s, int(k))
    return table


def time_method(fn, scores: torch.Tensor, grad: torch.Tensor) -> dict:
    def forward_backward():
        scores.grad = None
        (fn(scores) * grad).sum().backward()

    try:
        with torch.no_grad():
            forward_ms = triton.testing.do_bench(lambda: fn(scores), warmup=25, rep=200, return_mode="median")
        both_ms = triton.testing.do_bench(forward_backward, warmup=25, rep=200, return_mode="median")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as error:  # the reference refuses long rows and fails on some inputs: record why
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}
    return {"forward_ms": forward_ms, "forward_backward_ms": both_ms, "peak_mb": peak_mb}


def graph_times(scores: torch.Tensor, grad: torch.Tensor, k: float) -> dict:
    """Exact-mode kernels replayed from CUDA graphs (forward; forward then backward)."""
    rows = scores.shape[0]
    k_rows = torch.full((rows,), k, device=scores.device)

    def forward():
        return soft_topk_triton.exact_forward(scores, k_rows, None, 1.0)[0]

    def forward_backward():
        return soft_topk_triton.exact_backward(forward(), grad, 1.0, scores.dtype)

    out = {}
    for name, fn in (("graph_forward_ms", forward), ("graph_forward_backward_ms", forward_backward)):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        out[name] = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return out


def kernel_profile(scores: torch.Tensor, grad: torch.Tensor, k: float) -> dict:
    """Device time per kernel (microseconds per call) of the exact mode's forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    rows = scores.shape[0]
    k_rows = torch.full((rows,), k, device=scores.device)
    repeats = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            soft_topk_triton.exact_backward(
                soft_topk_triton.exact_forward(scores, k_rows, None, 1.0)[0], grad, 1.0, scores.dtype
            )
        torch.cuda.synchronize()
    return {
        event.key: event.device_time_total / repeats
        for event in prof.key_averages()
        if event.device_time_total > 0 and event.key.startswith("_")
    }


def check(scores: torch.Tensor, grad: torch.Tensor, k: float) -> dict:
    """Relative errors of the Triton modes against the float64 PyTorch reference, and of bf16 scores."""
    out = {}
    for mode, iters in (("exact", None), ("iter50", ITERATIONS)):
        reference_scores = scores.detach().double().requires_grad_()
        reference = soft_topk(reference_scores, k, n_iters=iters, backend="torch")
        (reference * grad.double()).sum().backward()
        fast_scores = scores.detach().clone().requires_grad_()
        fast = soft_topk(fast_scores, k, n_iters=iters, backend="triton")
        (fast * grad).sum().backward()
        out[f"{mode}_lambda_rel_err"] = rel_err(fast, reference.detach())
        out[f"{mode}_grad_rel_err"] = rel_err(fast_scores.grad, reference_scores.grad)
    k_rows = torch.full((scores.shape[0],), k, device=scores.device)
    _, serial_passes = soft_topk_triton.exact_forward(scores.detach(), k_rows, None, 1.0)
    out["exact_serial_passes_max"] = serial_passes.max().item()
    half = scores.detach().bfloat16()
    out["bf16_exact_lambda_rel_err"] = rel_err(
        soft_topk(half, k, backend="triton"), soft_topk(half.double(), k, backend="torch")
    )
    return out


def plot(results: list[dict], gpu: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({name for r in results for name in r["methods"]})
    for ax, key, title in zip(axes, ("forward_ms", "forward_backward_ms"), ("forward", "forward + backward")):
        for name in names:
            points = [(r["n"], r["methods"][name][key]) for r in results if key in r["methods"].get(name, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        graph = [(r["n"], r["methods"]["triton exact"]["graph_" + key]) for r in results]
        ax.plot(*zip(*graph), marker="s", linestyle=":", label="triton exact, CUDA graph")
        floor_key = "floor_forward_ms" if key == "forward_ms" else "floor_forward_backward_ms"
        ax.plot([r["n"] for r in results], [r[floor_key] for r in results], "k--", label="bandwidth floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per row (8 rows, k = n/8)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"soft top-k router, {gpu}, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--replot", default=None, help="draw --plot from this JSON of an earlier run (no GPU needed)")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            recorded = json.load(f)
        plot(recorded["results"], recorded["info"]["gpu"], args.plot)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_router.py needs a CUDA GPU (the Triton kernels run on CUDA tensors).")

    bandwidth = copy_bandwidth()
    results = []
    for n in args.sizes:
        torch.manual_seed(n)
        k = n / 8
        scores = torch.randn(args.rows, n, device="cuda").requires_grad_()
        grad = torch.randn(args.rows, n, device="cuda")
        row = {"n": n, "k": k, "rows": args.rows}
        row["floor_forward_ms"] = args.rows * n * 8 / bandwidth * 1e3
        row["floor_forward_backward_ms"] = args.rows * n * 20 / bandwidth * 1e3
        row["methods"] = {name: time_method(fn, scores, grad) for name, fn in methods(k).items()}
        row["methods"]["triton exact"].update(graph_times(scores.detach(), grad, k))
        row["check"] = check(scores, grad, k)
        if n == max(args.sizes):
            row["exact_kernels_us"] = kernel_profile(scores.detach(), grad, k)
        results.append(row)
        print(f"n={n} done", flush=True)

    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
    }
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}; "
          f"device copy {info['copy_bandwidth_gb_s']:.0f} GB/s (read + write)")
    print("rows=%d, k=n/8, eps 1, float32; ms are medians (CUDA events); x ref = reference time / ours" % args.rows)
    header = f"{'n':>8} {'method':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>8} {'x ref f+b':>9} {'GB/s f+b':>9}"
    print(header)
    for row in results:
        ref = row["methods"].get("reference", {})
        for name, m in row["methods"].items():
            if "error" in m:
                print(f"{row['n']:>8} {name:<14} {m['error']}")
                continue
            speedup = ref["forward_backward_ms"] / m["forward_backward_ms"] if "forward_backward_ms" in ref else None
            gbs = row["rows"] * row["n"] * 20 / (m["forward_backward_ms"] * 1e-3) / 1e9
            print(f"{row['n']:>8} {name:<14} {m['forward_ms']:>9.4f} {m['forward_backward_ms']:>11.4f} "
                  f"{m['peak_mb']:>8.1f} {('%.1fx' % speedup) if speedup else '-':>9} {gbs:>9.0f}")
        exact = row["methods"]["triton exact"]
        print(f"{row['n']:>8} {'exact, graph':<14} {exact['graph_forward_ms']:>9.4f} "
              f"{exact['graph_forward_backward_ms']:>11.4f}   floor {row['floor_forward_ms']:.4f} / "
              f"{row['floor_forward_backward_ms']:.4f} ms -> "
              f"{exact['graph_forward_ms'] / row['floor_forward_ms']:.2f}x / "
              f"{exact['graph_forward_backward_ms'] / row['floor_forward_backward_ms']:.2f}x the floor")
        print(f"{row['n']:>8} {'check':<14} " + " ".join(f"{key} {value:.1e}" for key, value in row["check"].items()))
        if "exact_kernels_us" in row:
            print(f"{row['n']:>8} {'exact kernels':<14} " + ", ".join(
                f"{name} {us:.1f} us" for name, us in sorted(row["exact_kernels_us"].items(), key=lambda kv: -kv[1])
            ))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    if args.plot:
        plot(results, info["gpu"], args.plot)


if __name__ == "__main__":
    main()
