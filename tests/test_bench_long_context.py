"""The long-context benchmark (scripts/bench_long_context.py): a smoke run of its causal layers and model pair on
the CPU, so that an API change of the layers cannot break the benchmark unnoticed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_measures_every_causal_row(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "scripts/bench_long_context.py", "--smoke", "--no-reference", "--kinds", "causal attention",
        "causal block", "--tasks", "causal", "--profile-models", "256", "--json", str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = json.loads(out.read_text())
    layers = {(row["kind"], row["n"], row["impl"]): row for row in recorded["layers"]}
    for kind in ("causal attention", "causal block"):
        for impl in ("ours", "copies", "dense"):
            row = layers[(kind, 256, impl)]
            assert "error" not in row and row["fwd_bwd_ms"] > 0, row
    models = {row["model"]: row for row in recorded["models"]}
    assert models.keys() == {"colt5", "colt5 copies", "llama"}
    assert all("error" not in row and row["tokens_per_s"] > 0 for row in models.values())
    # --profile-models: one profile per model of the pair whose table leaves no family out (their times add up to
    # the busy time, which sums the same events) and holds the attention.
    assert [profile.split(",")[0] for profile in recorded["profiles"]] == ["colt5", "llama"]
    for profile in recorded["profiles"]:
        busy = float(profile.split(" busy ")[1].split(" ms")[0])
        families = [line for line in profile.splitlines()[1:] if "%" in line]
        assert sum(float(line.split()[0]) for line in families) == pytest.approx(busy, rel=0.01, abs=0.1)
        assert any(line.endswith("SDPA") for line in families)  # Llama's attention; on the CPU also our heavy one


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", REPO / "scripts" / "bench_long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profiled_kernels_fall_into_their_families(bench):
    """--profile-models sorts a step's kernels: colt5's Triton kernels by the module that defines them (a renamed
    kernel stays in its family), FlexAttention's templates apart from Inductor's other fused kernels."""
    assert bench.kernel_family("_bwd_keys_kernel") == "heavy attention (memory_attention_triton)"
    assert bench.kernel_family("_exact_row_kernel") == "router (soft_topk_triton)"
    assert bench.kernel_family("_rotary_kernel") == "rotary (rotary_triton)"
    assert bench.kernel_family("triton_tem_fused_0") == "light attention (FlexAttention)"
    assert bench.kernel_family("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_3") == "fused by Inductor"
    assert bench.kernel_family("sm90_xmma_gemm_bf16bf16_bf16f32") == "matrix products (cuBLAS)"
    assert bench.kernel_family("cudnn_generated_fort_native_sdpa_sm90") == "SDPA"
    assert bench.kernel_family("void at::native::vectorized_elementwise_kernel") == "other"


def test_each_row_compiles_its_own_graph_after_the_last_is_released(bench):
    """Dynamo's recompile limit counts a function's compilations over every module that runs it: without `release`
    forgetting them, the second length below would pass a limit of 1 and run eagerly (a warning, no compile)."""
    import torch

    compiled = []

    def backend(graph, example_inputs):
        compiled.append(example_inputs[-1].shape[0] if example_inputs else None)
        return graph.forward

    class Layer(torch.nn.Module):  # a module of this file: Dynamo does not trace into torch.nn's own
        def forward(self, x):
            return x * 2 + 1

    torch._dynamo.reset()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the entry from Dynamo's config module.
    with torch._dynamo.config.patch(recompile_limit=1):
        for n in (3, 5):
            module = Layer()
            module.compile(backend=backend, dynamic=False)
            module(torch.randn(n, 4))
            bench.release(module)
    assert compiled == [3, 5]
