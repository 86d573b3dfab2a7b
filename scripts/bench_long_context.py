"""Long-context speed benchmark: CoLT5's routed layers and models against dense attention, in one GPU call.

Layers (bf16 weights and inputs, batch 2, width 512; routed: 4 light heads of 64 in a +-127 window, 8 heavy heads
of 64, 1/16 of tokens as heavy queries (encoder) and heavy feedforward, 1/8 as keys/values; causal: every token a
heavy query, as in CoLT5ForCausalLM, memory min(n/8, 2048), blocks of min(n/8, 1024) tokens, as
colt5.train.causal_memory_and_block chooses):
- encoder attention    ConditionalRoutedAttention   vs dense SDPA attention (8 heads of 64, q/k/v/o projections)
- causal attention     CausalRoutedAttention         vs dense causal SDPA attention
- encoder feedforward  ConditionalRoutedFeedForward  vs the dense gated 4x MLP (the heavy MLP on every token)
- causal feedforward   CausalRoutedFeedForward       vs the same dense MLP
- encoder block / causal block: pre-norm block of the two vs a pre-norm dense block
and the reference package (colt5-attention, `bench` extra) in float32, where it runs: it fails under bf16. The
causal attention and block also run as "copies": the same layer with the heavy attention on the PyTorch reference
of memory_attention.py (each block's memory copied, one masked SDPA) instead of the Triton kernels.
Forward is timed under no_grad, forward+backward with a random output gradient; ms are per call, the median of
three groups of back-to-back calls (wall clock with the device synchronised). Peak MB: memory allocated by one
forward+backward above the inputs and weights. floor: the layer's matmul FLOPs at the measured bf16 matmul rate,
or its input and output bytes at the measured copy bandwidth, whichever is larger. graph: forward+backward replayed
from a CUDA graph (in train mode; the causal layers' routers have fixed capacities there, so every layer has static
shapes and no host synchronisation), i.e. GPU time without host overhead.

Models (autocast bf16, float32 weights, AdamW steps, width 512, 8 layers, byte vocabulary of 384, batch of
max(1, 65536 / n) sequences): CoLT5ForCausalLM (also as "colt5 copies", see above) vs LlamaForCausalLM (SDPA) and
CoLT5Model vs BertModel (SDPA, a dense bidirectional encoder; loss = mean square of the last hidden state),
training tokens/s and peak GB; "graph tokens/s": the same steps with forward+backward replayed from one CUDA
graph (the optimizer step eager), for each eager model of the pair.

With --compile, each layer also runs compiled (torch.compile of the whole layer, "compiled" and "dense compiled"
rows) and each model pair too ("colt5 compiled", "llama compiled"): regional compilation, each decoder layer
compiled on its own, as transformers recommends for repeated blocks (the layers share their code, so Inductor
compiles one graph and reuses it). "first s" is the first call's (step's) wall time, compilation included, reported
apart from the steady rate. In the model table "x best" is a CoLT5 row's tokens/s over the faster of the baseline's
eager and compiled rows. --only-compiled leaves out the models' eager rows (compiled Llama is the baseline that
counts).

With --profile-models N [N ...], torch.profiler records 3 training steps of each causal model at N tokens
(compiled with --compile on a GPU) and prints the device time per step by kernel family (heavy attention, light
attention, router, rotary, SDPA, matrix products, Inductor's fused kernels) and the largest kernels: where a step's
time goes.

Usage: python scripts/bench_long_context.py [--lengths 4096 ... 131072] [--model-lengths 8192 32768 65536]
       [--profile 32768] [--profile-models 32768] [--compile [--only-compiled]] [--json results/x.json]
       [--plot results/x.png]
       (--smoke: tiny sizes on CPU, to check the script runs)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from colt5 import CoLT5Config, CoLT5ForCausalLM, CoLT5Model, causal_attention
from colt5.causal_attention import CausalRoutedAttention
from colt5.memory_attention import memory_attention_reference
from colt5.routed_attention import ConditionalRoutedAttention
from colt5.routed_block import CausalRoutedTransformerBlock, ConditionalRoutedTransformerBlock
from colt5.routed_feedforward import CausalRoutedFeedForward, ConditionalRoutedFeedForward, GatedMLP
from colt5.train import causal_memory_and_block

DIM, HEADS, HEAD_DIM, BATCH = 512, 8, 64, 2
LIGHT_HEADS, HEAVY_HEADS, WINDOW = 4, 8, 127
MLP_HIDDEN, LIGHT_MLP_HIDDEN = 4 * DIM, DIM // 2
Q_FRACTION, KV_FRACTION, FF_FRACTION = 1 / 16, 1 / 8, 1 / 16
CAUSAL_Q_FRACTION = 1.0  # CoLT5ForCausalLM's default: every token is a heavy query
MODEL_LAYERS, MODEL_VOCAB, MODEL_TOKENS_PER_STEP = 8, 384, 65536


# ------------------------------------------------------------------------------------------------ dense baselines
class DenseAttention(nn.Module):
    """q/k/v/o projections around one SDPA call (flash attention on GPUs): the dense layer routing must beat."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.qkv_proj = nn.Linear(DIM, 3 * HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, HEADS, HEAD_DIM)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DenseBlock(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention, self.mlp = DenseAttention(causal), GatedMLP(DIM, MLP_HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


ENCODER_DESIGN = dict(branch_norms=False, router_kwargs=dict(n_iters=None, eps=1.0, straight_through=False))
ENCODER_ATTENTION_DESIGN = dict(
    ENCODER_DESIGN, multiply_keys_by_score=True, learned_unrouted_output=False, rotary_emb=True
)


def ours(kind: str, n: int) -> nn.Module:
    memory, block = causal_memory_and_block(n)
    attention = dict(light_heads=LIGHT_HEADS, heavy_heads=HEAVY_HEADS, light_window_size=WINDOW)
    # The encoder layer's window counts both sides: WINDOW tokens on each side.
    encoder_attention = dict(attention, light_window_size=2 * WINDOW, **ENCODER_ATTENTION_DESIGN)
    if kind == "encoder attention":
        return ConditionalRoutedAttention(
            DIM, num_heavy_tokens_q=Q_FRACTION, num_heavy_tokens_kv=KV_FRACTION, **encoder_attention
        )
    if kind == "causal attention":
        return CausalRoutedAttention(
            DIM, routed_query_fraction=CAUSAL_Q_FRACTION, memory_size=memory, block_size=block, **attention
        )
    mlps = dict(light_hidden_dim=LIGHT_MLP_HIDDEN, heavy_hidden_dim=MLP_HIDDEN)
    if kind == "encoder feedforward":
        return ConditionalRoutedFeedForward(DIM, num_heavy_tokens=FF_FRACTION, **mlps, **ENCODER_DESIGN)
    if kind == "causal feedforward":
        return CausalRoutedFeedForward(DIM, fraction=FF_FRACTION, **mlps)
    blocks = dict(light_ff_hidden_dim=LIGHT_MLP_HIDDEN, heavy_ff_hidden_dim=MLP_HIDDEN, **attention)
    if kind == "encoder block":
        return ConditionalRoutedTransformerBlock(
            DIM,
            num_heavy_tokens_q=Q_FRACTION,
            num_heavy_tokens_kv=KV_FRACTION,
            num_heavy_ff_tokens=FF_FRACTION,
            **dict(blocks, light_window_size=2 * WINDOW, **ENCODER_ATTENTION_DESIGN),
        )
    if kind == "causal block":
        return CausalRoutedTransformerBlock(
            DIM,
            routed_query_fraction=CAUSAL_Q_FRACTION,
            routed_ff_fraction=FF_FRACTION,
            memory_size=memory,
            block_size=block,
            **blocks,
        )
    raise ValueError(kind)


def dense(kind: str) -> nn.Module:
    causal = kind.startswith("causal")
    if kind.endswith("attention"):
        return DenseAttention(causal)
    if kind.endswith("feedforward"):
        return GatedMLP(DIM, MLP_HIDDEN)
    return DenseBlock(causal)


def reference(kind: str, n: int) -> nn.Module | None:
    """The colt5-attention package's layer with the same sizes, or None where it has none."""
    try:
        import colt5_attention as ref
    except ImportError:
        return None
    _, block = causal_memory_and_block(n)
    attention = dict(light_heads=LIGHT_HEADS, heavy_heads=HEAVY_HEADS, light_window_size=WINDOW + 1)
    if kind == "encoder attention":
        return ref.ConditionalRoutedAttention(DIM, num_heavy_tokens_q=n // 16, num_heavy_tokens_kv=n // 8, **attention)
    if kind == "causal attention":
        return ref.ConditionalRoutedAutoregressiveAttention(
            DIM, num_heavy_tokens_q=block // 16, num_heavy_tokens_kv=n // 8, heavy_window_size=block, **attention
        )
    if kind == "encoder feedforward":
        return ref.ConditionalRoutedFeedForward(DIM, num_heavy_tokens=n // 16)
    if kind == "encoder block":
        return ref.ConditionalRoutedTransformerBlock(
            DIM,
            num_heavy_attn_tokens_q=n // 16,
            num_heavy_attn_tokens_kv=n // 8,
            num_heavy_ff_tokens=n // 16,
            **attention,
        )
    return None


def matmul_flops(kind: str, n: int) -> float:
    """Forward matmul FLOPs per sample of our layer (x3 for forward+backward): the arithmetic a perfect kernel
    still does."""
    causal = kind.startswith("causal")
    attention_flops = mlp_flops = 0.0
    if not kind.endswith("feedforward"):
        memory, block = causal_memory_and_block(n)
        q, kv = (n * CAUSAL_Q_FRACTION, memory + block / 2) if causal else (n * Q_FRACTION, n * KV_FRACTION)
        light, heavy = LIGHT_HEADS * HEAD_DIM, HEAVY_HEADS * HEAD_DIM
        window = (WINDOW + 1) if causal else (2 * WINDOW + 1)
        attention_flops = 2 * n * DIM * 4 * light + 4 * n * window * light  # light projections and attention
        attention_flops += 2 * q * DIM * 2 * heavy + 2 * (n if causal else kv) * DIM * 2 * heavy
        attention_flops += 4 * q * kv * heavy
    if not kind.endswith("attention"):
        mlp_flops = 6 * n * DIM * (LIGHT_MLP_HIDDEN + FF_FRACTION * MLP_HIDDEN)
    return attention_flops + mlp_flops


@contextlib.contextmanager
def heavy_attention_by_copies():
    """Inside: the causal heavy attention runs the PyTorch reference (per-block copies) instead of the kernels."""

    def reference_path(*args, every_query: bool, **kwargs):
        return memory_attention_reference(*args, **kwargs)

    kernels = causal_attention.memory_attention
    causal_attention.memory_attention = reference_path
    try:
        yield
    finally:
        causal_attention.memory_attention = kernels


# ------------------------------------------------------------------------------------------------ timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[], None], budget_s: float = 0.2) -> float:
    """Milliseconds per call: the median of three groups of back-to-back calls, after two warm-up calls."""
    step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    single = time.perf_counter() - start
    reps = max(2, min(50, int(budget_s / max(single, 1e-6))))
    groups = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        groups.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(groups)


def peak_mb(step: Callable[[], None]) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def graph_replay_ms(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Forward+backward replayed from a CUDA graph: the layer's GPU time without Python and launch overhead (what
    eager time would be if the host kept up). Only for layers without host synchronisation (static shapes)."""
    x.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(3):
            module(x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x).backward(grad)
    ms = timed(graph.replay)
    del graph
    return ms


def release(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Free what a measured module holds on the device (its weights, gradients and optimizer state) before the next
    row, so that each row's peak memory is its own, and forget its compiled code, so that the next row compiles
    its own: Dynamo counts compilations per function against one limit over all modules (8; transformers'
    `GradientCheckpointingLayer` gives both models' layers one forward, `forward_with_checkpointing`), and a run
    over four lengths passed it at 64k, after which the layers ran eagerly, silently but for a warning."""
    if optimizer is not None:
        optimizer.state.clear()
    module.to("meta")
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_graph_error(result: dict, what: str, error: Exception) -> None:
    """Record a failed CUDA-graph capture or replay in `result`, and print it at once: an error that broke the CUDA
    context ends the run at the next CUDA call, before the row is printed."""
    result["graph_error"] = f"{type(error).__name__}: {str(error)[:100]}"
    print(f"{what}: CUDA graph failed: {result['graph_error']}", flush=True)


def measure_layer(module: nn.Module, n: int, dtype: torch.dtype, device: torch.device, graph: bool = False) -> dict:
    module = module.to(device=device, dtype=dtype)
    x = torch.randn(BATCH, n, DIM, device=device, dtype=dtype)
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        module(x.requires_grad_()).backward(grad)
        x.grad = None

    result = {}
    try:
        module.train()
        start = time.perf_counter()
        forward_backward()
        sync()
        result["first_s"] = time.perf_counter() - start
        module.eval()
        result["fwd_ms"] = timed(forward)
        module.train()
        result["fwd_bwd_ms"] = timed(forward_backward)
        module.zero_grad(set_to_none=True)
        result["peak_mb"] = peak_mb(forward_backward)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    except Exception as error:  # the reference fails on some sizes: record why and go on
        result["error"] = f"{type(error).__name__}: {str(error)[:100]}"
    if graph and device.type == "cuda" and "error" not in result:
        try:
            result["graph_fwd_bwd_ms"] = graph_replay_ms(module, x, grad)
        except Exception as error:  # recorded apart: the eager numbers stand either way
            record_graph_error(result, f"layer at n={n}", error)
    release(module)
    return result


def machine_rates(device: torch.device) -> dict:
    """Measured bf16 matmul FLOP/s and device copy bytes/s (read + write): the floors' denominators."""
    if device.type != "cuda":
        return dict(matmul_tflops=float("nan"), copy_gbs=float("nan"))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_ms = timed(lambda: a @ a)
    big = torch.empty(2**28, device=device, dtype=torch.uint8)
    out = torch.empty_like(big)
    copy_ms = timed(lambda: out.copy_(big))
    return dict(matmul_tflops=2 * 8192**3 / matmul_ms / 1e9, copy_gbs=2 * big.numel() / copy_ms / 1e6)


def floor_ms(kind: str, n: int, rates: dict, backward: bool) -> float:
    flops = BATCH * matmul_flops(kind, n) * (3 if backward else 1)
    bytes_moved = BATCH * n * DIM * 2 * (2 if not backward else 4)  # x in, y out (and their gradients)
    return max(flops / (rates["matmul_tflops"] * 1e9), bytes_moved / (rates["copy_gbs"] * 1e6))


# ------------------------------------------------------------------------------------------------ models
def model_pair(task: str, n: int, smoke: bool) -> dict[str, nn.Module]:
    dim, layers = (64, 2) if smoke else (DIM, MODEL_LAYERS)
    memory, block = causal_memory_and_block(n)
    colt5 = CoLT5Config(
        vocab_size=MODEL_VOCAB,
        hidden_size=dim,
        num_hidden_layers=layers,
        light_num_heads=LIGHT_HEADS,
        light_head_dim=dim // HEADS,
        heavy_num_heads=HEAVY_HEADS,
        heavy_head_dim=dim // HEADS,
        light_window_size=WINDOW,
        light_intermediate_size=dim // 2,
        heavy_intermediate_size=4 * dim,
        routed_kv_tokens=memory if task == "causal" else KV_FRACTION,
        causal_block_size=block,
        max_position_embeddings=n,
        is_causal=task == "causal",
        use_cache=False,
    )
    if task == "causal":
        llama = LlamaConfig(
            vocab_size=MODEL_VOCAB,
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            intermediate_size=4 * dim,
            max_position_embeddings=n,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            use_cache=False,
        )
        return {
            "colt5": CoLT5ForCausalLM(colt5),
            "llama": LlamaForCausalLM._from_config(llama, attn_implementation="sdpa"),
        }
    bert = BertConfig(
        vocab_size=MODEL_VOCAB,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=4 * dim,
        max_position_embeddings=n,
        pad_token_id=0,
    )
    return {
        "colt5": CoLT5Model(colt5),
        "bert": BertModel._from_config(bert, attn_implementation="sdpa", add_pooling_layer=False),
    }


def model_tokens_per_step(n: int, smoke: bool) -> int:
    """Tokens in a model training step: MODEL_TOKENS_PER_STEP, or two sequences in a smoke run."""
    return 2 * n if smoke else MODEL_TOKENS_PER_STEP


def training_step(
    model: nn.Module, task: str, n: int, device: torch.device, tokens_per_step: int
) -> tuple[Callable[[], None], Callable[[], torch.Tensor], torch.optim.Optimizer, int]:
    """The model on `device` with an AdamW optimizer and a batch of max(1, tokens_per_step / n) random sequences:
    returns (step, loss, optimizer, batch), where step() runs loss().backward() and the optimizer step."""
    batch = max(1, tokens_per_step // n)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(3, MODEL_VOCAB, (batch, n), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss() -> torch.Tensor:
        with autocast:
            if task == "causal":
                return model(input_ids=ids, labels=ids).loss
            return model(input_ids=ids).last_hidden_state.float().square().mean()

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, loss, optimizer, batch


def measure_model(
    model: nn.Module, task: str, n: int, device: torch.device, tokens_per_step: int, graph: bool = True
) -> dict:
    step, loss, optimizer, batch = training_step(model, task, n, device, tokens_per_step)
    result = dict(batch=batch, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    try:
        start = time.perf_counter()
        step()
        sync()
        result["first_step_s"] = time.perf_counter() - start
        step_ms = timed(step, budget_s=1.0)
        result.update(step_ms=step_ms, tokens_per_s=batch * n / step_ms * 1e3, peak_gb=peak_mb(step) / 1024)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    if graph and device.type == "cuda" and "error" not in result:
        try:
            graph_ms = timed(graphed_training_step(loss, optimizer), budget_s=1.0)
            result["graph_tokens_per_s"] = batch * n / graph_ms * 1e3
        except Exception as error:  # recorded apart: the eager numbers stand either way
            record_graph_error(result, f"{task} model at n={n}", error)
    release(model, optimizer)
    return result


def compile_layers(model: nn.Module) -> nn.Module:
    """Regional compilation: each decoder (encoder) layer of the model compiled with torch.compile, for static shapes
    (each length of the run compiles afresh, as a training run at one length would; the recompilation with dynamic
    shapes that a second length would otherwise trigger failed in Inductor's backward, torch 2.11)."""
    base = model.base_model
    for layer in base.layers if hasattr(base, "layers") else base.encoder.layer:
        layer.compile(dynamic=False)
    return model


def graphed_training_step(loss, optimizer: torch.optim.Optimizer):
    """A training step whose forward+backward (`loss().backward()`) replays one CUDA graph; the optimizer step and
    zeroing the gradients (in place, so the graph keeps adding into the same tensors) stay eager."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(3):
            loss().backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss().backward()

    def step():
        graph.replay()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return step


# ------------------------------------------------------------------------------------------------ profile
def profile_layer(kind: str, n: int, dtype: torch.dtype, device: torch.device, top: int = 12) -> str:
    """Forward+backward of our layer under torch.profiler (device time by kernel) and cProfile (host time by
    Python function: what the GPU waits for when the layer is host-bound)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    module = ours(kind, n).to(device=device, dtype=dtype).train()
    x = torch.randn(BATCH, n, DIM, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        module(x).backward(grad)

    for _ in range(2):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    calls = 5
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync()
    wall = (time.perf_counter() - start) / calls * 1e3
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    device_total = sum(e.self_device_time_total for e in events) / calls / 1e3
    launches = sum(e.count for e in events) / calls
    lines = [
        (
            f"{kind}, n={n}: profiled wall {wall:.2f} ms/call, device busy {device_total:.2f} ms/call, "
            f"{launches:.0f} kernels/call"
        )
    ]
    for event in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        share = event.self_device_time_total / calls / 1e3
        lines.append(f"    {share:8.3f} ms  x{event.count // calls:<4d} {event.key[:100]}")
    host = cProfile.Profile()
    host.enable()
    for _ in range(calls):
        step()
    sync()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(top)
    table = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(table) if "tottime" in line), 0)
    lines.append(f"  host, {calls} calls, top functions by own time:")
    lines.extend("    " + line.strip()[:140] for line in table[start : start + top + 1] if line.strip())
    release(module)
    return "\n".join(lines)


# Kernel families of a training step: colt5's Triton kernels by their names in each module, then library kernels by
# a part of their names (first match wins: FlexAttention's kernels are Inductor templates, "triton_tem...", before
# Inductor's other fused kernels, "triton_...").
OUR_KERNEL_MODULES = (
    ("heavy attention (memory_attention_triton)", "memory_attention_triton"),
    ("router (soft_topk_triton)", "soft_topk_triton"),
    ("rotary (rotary_triton)", "rotary_triton"),
)
LIBRARY_KERNELS = (
    ("light attention (FlexAttention)", ("triton_tem", "flex")),
    ("SDPA", ("flash", "fmha", "cudnn", "scaled_dot_product")),
    ("matrix products (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "splitk")),
    ("fused by Inductor", ("triton_",)),
)


@functools.cache
def our_kernel_families() -> dict[str, str]:
    """Kernel name -> family, for the Triton kernels of colt5's modules (`_..._kernel` functions)."""
    return {
        name: family
        for family, module in OUR_KERNEL_MODULES
        for name in vars(importlib.import_module(f"colt5.{module}"))
        if name.startswith("_") and name.endswith("_kernel")
    }


def kernel_family(name: str) -> str:
    if (family := our_kernel_families().get(name)) is not None:
        return family
    lowered = name.lower()
    for family, parts in LIBRARY_KERNELS:
        if any(part in lowered for part in parts):
            return family
    return "other"


def profile_model(
    name: str, model: nn.Module, n: int, device: torch.device, tokens_per_step: int, top: int = 12
) -> str:
    """torch.profiler over 3 training steps of a causal model (after 3 warm-up steps): device time per step by
    kernel family and the largest kernels (on a CPU: operator self time)."""
    from torch.profiler import ProfilerActivity, profile

    step, _, optimizer, batch = training_step(model, "causal", n, device, tokens_per_step)
    for _ in range(3):
        step()
    sync()
    cuda = device.type == "cuda"
    steps = 3
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = (time.perf_counter() - start) / steps * 1e3
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if cuda else "CPU")]

    def own_ms(event) -> float:
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / steps / 1e3

    busy = sum(own_ms(e) for e in events)
    lines = [
        f"{name}, n={n}, batch {batch}: wall {wall:.1f} ms per profiled step, {'device' if cuda else 'CPU'} busy "
        f"{busy:.1f} ms, {sum(e.count for e in events) / steps:.0f} {'kernels' if cuda else 'operators'} per step"
    ]
    families: dict[str, list[float]] = {}
    for event in events:
        family = families.setdefault(kernel_family(event.key), [0.0, 0])
        family[0] += own_ms(event)
        family[1] += event.count / steps
    for family, (ms, count) in sorted(families.items(), key=lambda item: -item[1][0]):
        lines.append(f"    {ms:8.2f} ms {ms / busy:6.1%}  x{count:<6.0f} {family}")
    lines.append("  largest:")
    for event in sorted(events, key=lambda e: -own_ms(e))[:top]:
        lines.append(f"    {own_ms(event):8.3f} ms  x{event.count // steps:<5d} {event.key[:110]}")
    release(model, optimizer)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def plot(layers: list[dict], header: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(row["kind"] for row in layers))
    fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 3.2 * len(kinds)), squeeze=False)
    for ax_row, kind in zip(axes, kinds):
        for ax, (metric, label) in zip(
            ax_row, [("fwd_ms", "forward ms"), ("fwd_bwd_ms", "forward+backward ms"), ("peak_mb", "peak MB (fwd+bwd)")]
        ):
            curves = [("ours", metric, "o-"), ("dense", metric, "s--"), ("reference", metric, "^:")]
            if metric == "fwd_bwd_ms":
                curves += [("ours", "graph_fwd_bwd_ms", "o-"), ("dense", "graph_fwd_bwd_ms", "s--")]
            for impl, key, style in curves:
                points = [
                    (r["n"], r[key])
                    for r in layers
                    if r["kind"] == kind and r["impl"] == impl and r.get(key, float("nan")) > 0
                ]
                if points:
                    graphed = key.startswith("graph")
                    ax.plot(
                        *zip(*points),
                        style,
                        label=f"{impl}, CUDA graph" if graphed else impl,
                        alpha=0.45 if graphed else 1.0,
                        markerfacecolor="none" if graphed else None,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{kind}: {label}", fontsize=9)
            ax.set_xlabel("tokens per sample")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--model-lengths", type=int, nargs="*", default=[8192, 32768, 65536])
    parser.add_argument("--kinds", nargs="+", default=None, help="layer kinds to run (default all)")
    parser.add_argument("--tasks", nargs="+", default=["causal", "encoder"], help="model pairs to run")
    parser.add_argument("--no-reference", action="store_true", help="skip the colt5-attention package")
    parser.add_argument("--profile", type=int, default=None, help="profile our layers at this length")
    parser.add_argument(
        "--profile-models", type=int, nargs="+", default=[],
        help="profile a training step of each causal model at these lengths (compiled with --compile on a GPU)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--compile", action="store_true", help="also run each layer and model compiled")
    parser.add_argument("--no-copies", action="store_true", help="skip the rows of the heavy attention by copies")
    parser.add_argument(
        "--only-compiled", action="store_true", help="with --compile, run the models compiled only (no eager rows)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script runs")
    parser.add_argument("--replot", default=None, help="only redraw --plot from this JSON file of an earlier run")
    args = parser.parse_args()
    if args.only_compiled and not args.compile:
        parser.error("--only-compiled needs --compile: without it no model row would run")
    if args.replot:
        with open(args.replot) as handle:
            recorded = json.load(handle)
        plot(recorded["layers"], recorded["header"], args.plot)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.lengths, args.model_lengths = [256], [256]
    kinds = args.kinds or [
        "encoder attention",
        "causal attention",
        "encoder feedforward",
        "causal feedforward",
        "encoder block",
        "causal block",
    ]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    rates = machine_rates(device)
    triton_version = importlib.metadata.version("triton") if device.type == "cuda" else "-"
    header = (
        f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, triton {triton_version}; bf16 matmul "
        f"{rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gbs']:.0f} GB/s (measured)"
    )
    print(header, flush=True)

    layers, models, profiles = [], [], []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(
                    dict(header=header, rates=rates, layers=layers, models=models, profiles=profiles), handle, indent=1
                )

    print(
        f"\nlayers: batch {BATCH}, width {DIM}; ms per call; x = the faster dense time (eager or compiled) / this "
        "row's; first s: the first forward+backward"
    )
    print(
        f"{'layer':20s} {'n':>7s} {'impl':14s} {'fwd ms':>9s} {'f+b ms':>9s} {'peak MB':>9s} {'x f+b':>7s} "
        f"{'floor f+b':>10s} {'graph f+b':>10s} {'x graph':>8s} {'first s':>8s}"
    )
    for kind in kinds:
        for n in args.lengths:
            torch.manual_seed(n)
            rows = {"ours": measure_layer(ours(kind, n), n, dtype, device, graph=True)}
            if kind in ("causal attention", "causal block") and not args.no_copies:
                torch.manual_seed(n)
                with heavy_attention_by_copies():
                    rows["copies"] = measure_layer(ours(kind, n), n, dtype, device, graph=True)
            if args.compile:
                torch.manual_seed(n)
                rows["compiled"] = measure_layer(torch.compile(ours(kind, n)), n, dtype, device, graph=True)
            rows["dense"] = measure_layer(dense(kind), n, dtype, device, graph=True)
            if args.compile:
                rows["dense compiled"] = measure_layer(torch.compile(dense(kind)), n, dtype, device, graph=True)
            if not args.no_reference and (module := reference(kind, n)) is not None:
                rows["reference"] = measure_layer(module, n, torch.float32, device)
            floor = floor_ms(kind, n, rates, backward=True)
            dense_rows = [row for impl, row in rows.items() if impl.startswith("dense")]
            best_dense = min((row.get("fwd_bwd_ms", math.inf) for row in dense_rows), default=math.inf)
            best_dense_graph = min((row.get("graph_fwd_bwd_ms", math.inf) for row in dense_rows), default=math.inf)
            for impl, row in rows.items():
                row.update(kind=kind, n=n, impl=impl)
                if impl == "ours":
                    row["floor_fwd_ms"], row["floor_fwd_bwd_ms"] = floor_ms(kind, n, rates, False), floor
                layers.append(row)
                save()
                if "error" in row:
                    print(f"{kind:20s} {n:7d} {impl:14s} {row['error']}", flush=True)
                    continue
                routed = not impl.startswith("dense")
                ratio = best_dense / row["fwd_bwd_ms"] if routed and math.isfinite(best_dense) else float("nan")
                floor_note = f"{row['fwd_bwd_ms'] / floor:9.1f}x" if impl == "ours" and math.isfinite(floor) else ""
                graphed = row.get("graph_fwd_bwd_ms")
                graph_note = f"{graphed:10.3f}" if graphed else ""
                graph_ratio = ""
                if graphed and routed and math.isfinite(best_dense_graph):
                    graph_ratio = f"{best_dense_graph / graphed:8.2f}"
                print(
                    f"{kind:20s} {n:7d} {impl:14s} {row['fwd_ms']:9.3f} {row['fwd_bwd_ms']:9.3f} {row['peak_mb']:9.0f} "
                    f"{ratio:7.2f} {floor_note:>10s} {graph_note:>10s} {graph_ratio:>8s} {row['first_s']:8.2f}",
                    flush=True,
                )

    print(
        "\nmodels: training step (forward, backward, AdamW), autocast bf16; graph: forward+backward replayed from a "
        "CUDA graph; x best: this CoLT5 row's tokens/s over the baseline's fastest (eager, compiled or graph); "
        "first s: the first step"
    )
    print(
        f"{'task':8s} {'n':>7s} {'model':15s} {'batch':>5s} {'params M':>8s} {'tokens/s':>10s} {'peak GB':>8s} "
        f"{'x best':>6s} {'graph tok/s':>11s} {'x best':>7s} {'first s':>8s}"
    )
    for task in args.tasks:
        for n in args.model_lengths:
            torch.manual_seed(0)
            pair = model_pair(task, n, args.smoke)
            measure = dict(task=task, n=n, device=device, tokens_per_step=model_tokens_per_step(n, args.smoke))
            results = {} if args.only_compiled else {name: measure_model(m, **measure) for name, m in pair.items()}
            if task == "causal" and not args.no_copies and not args.only_compiled:
                torch.manual_seed(0)
                with heavy_attention_by_copies():
                    results["colt5 copies"] = measure_model(model_pair(task, n, args.smoke)["colt5"], **measure)
            if args.compile:
                torch.manual_seed(0)
                for name, model in model_pair(task, n, args.smoke).items():
                    # Not captured in a CUDA graph: capturing a compiled step broke the CUDA context for every later
                    # row, for Llama at 32k (a random-number offset advanced outside the capture) and for CoLT5 at
                    # 131,072 tokens (an illegal memory access, H100, torch 2.11, not diagnosed). The eager rows are.
                    results[f"{name} compiled"] = measure_model(compile_layers(model), **measure, graph=False)
            baseline_speeds = [
                speed
                for name, row in results.items()
                if not name.startswith("colt5")
                for speed in (row.get("tokens_per_s"), row.get("graph_tokens_per_s"))
                if speed
            ]
            best_baseline = max(baseline_speeds, default=float("nan"))
            for name, row in results.items():
                row.update(task=task, n=n, model=name)
                models.append(row)
                save()
                if "error" in row:
                    print(f"{task:8s} {n:7d} {name:15s} {row['error']}", flush=True)
                    continue
                is_colt5 = name.startswith("colt5")
                ratio = row["tokens_per_s"] / best_baseline if is_colt5 else float("nan")
                graphed = row.get("graph_tokens_per_s")
                graph_note = f"{graphed:11.0f}" if graphed else f"{'-':>11s}"
                graph_ratio = f"{graphed / best_baseline:7.2f}" if graphed and is_colt5 else ""
                print(
                    f"{task:8s} {n:7d} {name:15s} {row['batch']:5d} {row['params_m']:8.1f} {row['tokens_per_s']:10.0f} "
                    f"{row['peak_gb']:8.2f} {ratio:6.2f} {graph_note} {graph_ratio:>7s} {row['first_step_s']:8.2f}"
                    + (f"  (graph: {row['graph_error']})" if "graph_error" in row else ""),
                    flush=True,
                )

    compiled = args.compile and device.type == "cuda"
    for n in args.profile_models:
        print(f"\nprofiles at n={n} (causal training steps{', compiled' if compiled else ''}; ms per step)")
        torch.manual_seed(0)
        for name, model in model_pair("causal", n, args.smoke).items():
            model = compile_layers(model) if compiled else model
            profiles.append(profile_model(name, model, n, device, model_tokens_per_step(n, args.smoke)))
            save()
            print(profiles[-1], flush=True)
    if args.profile:
        print(f"\nprofiles at n={args.profile} (our layers, forward+backward)")
        for kind in kinds:
            profiles.append(profile_layer(kind, args.profile, dtype, device))
            save()
            print(profiles[-1], flush=True)
    if args.plot:
        plot(layers, header, args.plot)


if __name__ == "__main__":
    main()
