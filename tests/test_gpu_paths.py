"""The layers' GPU fast paths (FlexAttention for the light branch, SDPA's flash kernel for the unmasked encoder heavy
branch) against the paths they take otherwise: whole layers, outputs and every gradient, with the FlexAttention path
on and off (same device, same float32 routing); the cross and image attention on CUDA against float64 on the CPU;
causal training steps without host synchronisation. tests/test_sliding_window.py compares the kernels themselves.
"""

import copy

import pytest
import torch

from colt5 import (
    CausalRoutedAttention,
    CausalRoutedFeedForward,
    CoLT5Config,
    CoLT5ForCausalLM,
    CausalRoutedTransformerBlock,
    ConditionalRoutedAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedImageAttention,
    ThresholdRouter,
    causal_attention,
    routed_attention,
)
from colt5.memory_attention import memory_attention_reference
from conftest import assert_compiled_step_equals_eager, colt5_design

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention and its backward need a GPU")


def make_layer(kind):
    common = dict(
        light_heads=2, light_dim_head=16, light_window_size=40, heavy_heads=4, heavy_dim_head=16, num_routed_kv=2
    )
    if kind == "encoder attention":
        encoder = colt5_design(**dict(common, light_window_size=80, rotary_emb=True))  # 40 tokens on each side
        return ConditionalRoutedAttention(64, num_heavy_tokens_q=0.25, num_heavy_tokens_kv=0.25, **encoder)
    causal = dict(routed_query_fraction=0.25, memory_size=96, block_size=128, **common)
    if kind == "causal attention":
        return CausalRoutedAttention(64, **causal)
    return CausalRoutedTransformerBlock(64, routed_ff_fraction=0.25, **causal)


@gpu
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("n", [300, 1000])
@pytest.mark.parametrize("kind", ["encoder attention", "causal attention", "causal block"])
def test_flex_paths_match_the_fallback_paths_with_gradients(kind, n, padding, monkeypatch):
    torch.manual_seed(n)
    layer = make_layer(kind).cuda().eval()  # eval: the causal routers' statistics stay put between the two runs
    x = torch.randn(2, n, 64, device="cuda")
    mask = None
    if padding:
        mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
        mask[1, : n // 3] = False
    upstream = torch.randn(2, n, 64, device="cuda")
    if mask is not None:
        upstream = upstream * mask.unsqueeze(-1)

    def run():
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = layer(inputs, mask)
        out = out[0] if isinstance(out, tuple) else out
        (out * upstream).sum().backward()
        return [out.detach(), inputs.grad] + [p.grad for p in layer.parameters()]

    fast = run()
    monkeypatch.setattr(routed_attention, "FLEX_MIN_HEAD_DIM", 10**6)  # every head "too narrow": the SDPA path
    reference = run()
    valid = torch.ones(2, n, 1, dtype=torch.bool, device="cuda") if mask is None else mask.unsqueeze(-1)
    torch.testing.assert_close(fast[0] * valid, reference[0] * valid, rtol=1e-4, atol=1e-5)
    for got, expected in zip(fast[1:], reference[1:]):
        if expected is None:
            assert got is None
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("n", [700, 3000])
def test_causal_heavy_attention_kernels_match_the_reference_on_cudnn(n, monkeypatch):
    """The memory-attention kernels against the PyTorch reference (per-block copies, one masked SDPA on cuDNN) in
    the whole layer, bf16 (cuDNN takes no float32): relative L2 error of the output and of every gradient below
    2e-2."""
    torch.manual_seed(n)
    layer = make_layer("causal attention").cuda().bfloat16().eval()
    x = torch.randn(2, n, 64, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn_like(x)

    def run():
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        (out * upstream).sum().backward()
        return [out.detach(), inputs.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    with_kernels = run()
    def reference_path(*args, every_query, **kwargs):
        return memory_attention_reference(*args, **kwargs)

    monkeypatch.setattr(causal_attention, "memory_attention", reference_path)
    on_reference = run()
    assert len(with_kernels) == len(on_reference)
    for got, expected in zip(with_kernels, on_reference):
        error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        assert error < 2e-2, error


@gpu
def test_threshold_router_training_statistics_do_not_synchronise():
    """A ThresholdRouter's training calls (decisions, batch statistics, folding them into the running ones, the
    routed count) pass torch.cuda.set_sync_debug_mode("error"), with a padding mask and without."""
    router = ThresholdRouter(64, 0.25).cuda().train()
    x = torch.randn(2, 300, 64, device="cuda")
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[1, :50] = False
    router(x, mask)
    before = router.threshold.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            router(x, mask)
            router(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.equal(router.threshold, before)
    assert abs(router.take_fractions()[0] - 0.25) < 0.1


def sync_free_case(kind):
    """A causal layer (or CoLT5ForCausalLM) in train mode and a function that runs one training step's forward and
    backward of it under bf16 autocast, on a batch with left padding."""
    torch.manual_seed(0)
    n = 1000
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, :100] = False
    if kind == "model":
        config = CoLT5Config(
            vocab_size=384, hidden_size=64, num_hidden_layers=2, light_num_heads=2, light_head_dim=16,
            heavy_num_heads=4, heavy_head_dim=16, light_window_size=40, light_intermediate_size=32,
            heavy_intermediate_size=256, routed_ff_tokens=0.25, routed_query_tokens=0.25, routed_kv_tokens=96,
            causal_block_size=128, num_kv_routing_sets=2, is_causal=True, use_cache=False,
        )
        model = CoLT5ForCausalLM(config).cuda().train()
        ids = torch.randint(3, 384, (2, n), device="cuda")
        return model, lambda: model(ids, attention_mask=mask, labels=ids).loss.backward()
    if kind == "feedforward":
        layer = CausalRoutedFeedForward(64, fraction=0.25)
    elif kind.startswith("attention"):
        fraction = 1.0 if kind.endswith("every query") else 0.25
        layer = CausalRoutedAttention(64, routed_query_fraction=fraction, memory_size=96, block_size=128,
                                      light_heads=2, light_dim_head=16, heavy_heads=4, heavy_dim_head=16,
                                      num_routed_kv=2)
    else:
        layer = make_layer("causal block")
    layer = layer.cuda().train()
    x = torch.randn(2, n, 64, device="cuda", requires_grad=True)
    return layer, lambda: layer(x, mask).float().square().mean().backward()


@gpu
@pytest.mark.parametrize("kind", ["feedforward", "attention", "attention, every query", "block", "model"])
def test_a_causal_training_step_does_not_synchronise(kind):
    """Forward and backward of each causal layer and of CoLT5ForCausalLM in training (bf16 autocast, padding,
    per-token routers with their capacities) pass torch.cuda.set_sync_debug_mode("error"); the heavy branches
    take part (the routers routed tokens)."""
    module, step = sync_free_case(kind)
    with torch.autocast("cuda", torch.bfloat16):
        step()  # compiles the kernels (and FlexAttention) first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    routers = [m for m in module.modules() if isinstance(m, ThresholdRouter)]
    assert len(routers) == {"feedforward": 1, "attention": 1, "attention, every query": 0, "block": 2, "model": 4}[kind]
    assert all(router.take_fractions()[0] > 0.05 for router in routers)


@gpu
def test_a_compiled_causal_training_step_equals_eager():
    """Inductor compiles CoLT5ForCausalLM's forward with its loss as one graph (fullgraph: the Triton kernels of
    the router and the heavy attention inside it, launched by Inductor, which passes Python floats as float64 unless
    the kernels take them as constants), and its loss and every gradient equal the eager model's (float32, relative
    L2 error of each gradient at most 1e-4)."""
    torch.manual_seed(0)
    eager, _ = sync_free_case("model")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    ids = torch.randint(3, 384, (2, 512), device="cuda")
    assert_compiled_step_equals_eager(compiled, compiled_model, eager, ids, gradient_error=1e-4)


@gpu
@pytest.mark.parametrize("kind", ["cross", "image"])
@pytest.mark.parametrize("padding", [False, True])
def test_cross_and_image_attention_on_cuda_match_float64_on_cpu(kind, padding):
    """The GPU paths (Triton router, flash or memory-efficient SDPA, float32) against the same layer in float64 on
    the CPU (PyTorch router): outputs and every gradient."""
    torch.manual_seed(7)
    if kind == "cross":
        layer = ConditionalRoutedCrossAttention(
            64, num_heavy_tokens_q=0.5, num_heavy_tokens_kv=700, heads=4, dim_head=16, num_routed_kv=2,
            route_block_size=3000, **colt5_design(learned_unrouted_output=True),
        )
        inputs = [torch.randn(2, 100, 64), torch.randn(2, 20000, 64)]
        masks = [None, torch.arange(20000)[None, :] < torch.tensor([[20000], [9000]])] if padding else [None, None]
    else:
        layer = ConditionalRoutedImageAttention(
            64, num_heavy_tokens_q=1 / 16, num_heavy_tokens_kv=1 / 8, window_size=8, light_heads=2, light_dim_head=16,
            heavy_heads=4, heavy_dim_head=16, num_routed_kv=2, channels_first=True,
            **colt5_design(learned_unrouted_output=True),
        )
        inputs = [torch.randn(2, 64, 60, 70)]
        masks = [torch.rand(2, 60, 70) > 0.2] if padding else [None]
    with torch.no_grad():
        layer.unrouted_output.normal_()
    upstream = torch.randn_like(layer(*inputs))

    def run(device, dtype):
        module = copy.deepcopy(layer).to(device=device, dtype=dtype)
        leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in inputs]
        args = [*leaves, *[None if m is None else m.to(device) for m in masks]]
        out = module(*args)
        (out * upstream.to(device=device, dtype=dtype)).sum().backward()
        return [out] + [leaf.grad for leaf in leaves] + [p.grad for p in module.parameters()]

    gpu_results = run("cuda", torch.float32)
    cpu_results = run("cpu", torch.float64)
    for got, expected in zip(gpu_results, cpu_results, strict=True):
        error = (got.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"relative error {error:.2e}"
