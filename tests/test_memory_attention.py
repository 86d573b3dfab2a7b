"""The Triton memory attention against its float64 PyTorch reference (memory_attention.py).

On CPU (CI) the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) with 16-wide tiles, on
shapes that span several tiles; on a GPU the same tests run compiled (64/128-wide tiles), plus bfloat16 and
layer tests marked `gpu`. Tolerance for float32 kernels against float64: 2e-5 relative L2 error on the output
and on every gradient (queries, keys, values, memory weights).
"""

from __future__ import annotations

import importlib.util
import operator

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

from colt5.causal_attention import CausalRoutedAttention
from colt5.memory_attention import memory_attention, memory_attention_reference
from colt5 import memory_attention_triton as memory_attention_triton_module
from colt5.memory_attention_triton import memory_attention_triton

from conftest import COLT5_ROUTER

# Triton's CPU interpreter evaluates both sides of tl.where in numpy, which warns about the side not taken.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels, bfloat16)")


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def random_problem(
    *, batch=2, sets=2, heads_per_set=2, head_dim=16, block=24, blocks=3, slots=40, queries=None, lengths=(72, 61)
) -> dict:
    """Random inputs as `CausalRoutedAttention` builds them: each block's memory holds distinct tokens before the
    block (fewer than `slots` while the prefix is short; empty slots are -1, in random places), sample b has
    `lengths[b]` valid tokens in its blocks, and queries sit at random sorted block slots (every slot, in order,
    when `queries` is None)."""
    n = blocks * block
    heads = sets * heads_per_set
    memory_index = torch.full((batch, blocks, sets, slots), -1, dtype=torch.long)
    for b in range(batch):
        for j in range(blocks):
            for s in range(sets):
                prefix = min(j * block, lengths[b])
                chosen = torch.randperm(prefix)[: min(prefix, slots)]
                memory_index[b, j, s, torch.randperm(slots)[: chosen.numel()]] = chosen
    block_index = torch.arange(n).view(1, blocks, block).repeat(batch, 1, 1)
    block_index = block_index.masked_fill(block_index >= torch.tensor(lengths).view(batch, 1, 1), -1)
    if queries is None:
        query_slot = torch.arange(block).expand(batch, blocks, block)
    else:
        query_slot = torch.rand(batch, blocks, block).argsort(-1)[..., :queries].sort(-1).values
    g = block if queries is None else queries
    return dict(
        q=torch.randn(batch * blocks, heads, g, head_dim, dtype=torch.float64),
        keys=torch.randn(batch, sets, n, heads_per_set * head_dim, dtype=torch.float64),
        values=torch.randn(batch, sets, n, heads_per_set * head_dim, dtype=torch.float64),
        memory_index=memory_index,
        memory_weights=torch.rand(batch, blocks, sets, slots, dtype=torch.float64) * 0.9 + 0.1,
        block_index=block_index,
        query_slot=query_slot,
    )


def seen_rows(problem: dict) -> torch.Tensor:
    """`(rows, queries)` bool: the query slots that see at least one key (the others' outputs are unspecified)."""
    batch, blocks = problem["block_index"].shape[:2]
    has_memory = (problem["memory_index"] >= 0).any(-1).all(-1)  # (b, j): every set has a memory token
    first_valid = problem["block_index"][..., :1] >= 0  # a valid query sees the block's first slot
    in_block = torch.gather(problem["block_index"] >= 0, -1, problem["query_slot"])
    return (has_memory.unsqueeze(-1) | (first_valid & in_block)).view(batch * blocks, -1)


def run(problem: dict, fn, dtype, grad_out, **kwargs):
    """Output and gradients (q, keys, values, memory weights) of `fn` on `problem` cast to `dtype`."""
    leaves = {
        name: problem[name].to(DEVICE, dtype, copy=True).requires_grad_()
        for name in ("q", "keys", "values", "memory_weights")
    }
    indices = {name: problem[name].to(DEVICE) for name in ("memory_index", "block_index", "query_slot")}
    out = fn(**leaves, **indices, **kwargs)
    (out.double() * grad_out.to(DEVICE)).sum().backward()
    return out.detach(), [leaves[name].grad for name in ("q", "keys", "values", "memory_weights")]


@pytest.mark.parametrize("multiply_keys", [True, False])
@pytest.mark.parametrize("queries", [None, 10], ids=["every query", "routed queries"])
def test_triton_matches_float64_reference(multiply_keys, queries):
    problem = random_problem(queries=queries)
    out_shape = (problem["q"].shape[0], problem["q"].shape[2], problem["q"].shape[1] * problem["q"].shape[3])
    grad_out = torch.randn(out_shape, dtype=torch.float64) * seen_rows(problem).unsqueeze(-1)
    reference, reference_grads = run(
        problem, memory_attention_reference, torch.float64, grad_out, multiply_keys=multiply_keys, math_only=True
    )
    fast, fast_grads = run(
        problem, memory_attention_triton, torch.float32, grad_out,
        multiply_keys=multiply_keys, every_query=queries is None,
    )
    seen = seen_rows(problem).to(DEVICE)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert rel_err(fast[seen], reference[seen]) < 2e-5
    for name, value, expected in zip(("q", "keys", "values", "memory_weights"), fast_grads, reference_grads):
        assert value.dtype == torch.float32, name
        assert rel_err(value, expected) < 2e-5, name


@pytest.mark.parametrize("multiply_keys", [True, False])
def test_empty_slots_stay_out_of_the_gradients_when_every_score_is_far_below_zero(multiply_keys):
    """An empty memory slot loads a zero key, so its unmasked probability recomputed in the backward pass is
    exp2(0 - lse), which overflows to inf when every score is far below zero (here about -560, a log-sum-exp of
    about -200 in base 2). The output and every gradient stay finite and equal the float64 reference's (1e-3
    relative L2 error: float32 scores of -560 carry absolute errors of about 1e-4); a mask dropped from the
    queries' backward, whose products sum over keys, fails here and not in the test above."""
    torch.manual_seed(0)
    problem = random_problem()
    direction = torch.randn(problem["keys"].shape[-1], dtype=torch.float64)
    problem["keys"] = direction + 0.01 * torch.randn_like(problem["keys"])
    rows, heads, queries, head_dim = problem["q"].shape
    per_head = direction.view(-1, head_dim)  # (heads_per_set, head_dim): query head h reads per_head[h % 2]
    per_head = per_head / per_head.square().sum(-1, keepdim=True)  # q . key = -560 for every head
    q = -560.0 * per_head.repeat(heads // per_head.shape[0], 1)
    problem["q"] = q.view(1, heads, 1, head_dim) + 0.01 * torch.randn_like(problem["q"])
    scores = problem["q"][0, 0] @ problem["keys"][0, 0, :, :head_dim].T * head_dim**-0.5
    assert scores.max() * memory_attention_triton_module.LOG2_E < -130  # exp2(-lse) overflows float32
    grad_out = torch.randn(rows, queries, heads * head_dim, dtype=torch.float64) * seen_rows(problem).unsqueeze(-1)
    reference, reference_grads = run(
        problem, memory_attention_reference, torch.float64, grad_out, multiply_keys=multiply_keys, math_only=True
    )
    fast, fast_grads = run(
        problem, memory_attention_triton, torch.float32, grad_out, multiply_keys=multiply_keys, every_query=True
    )
    seen = seen_rows(problem).to(DEVICE)
    assert rel_err(fast[seen], reference[seen]) < 1e-3
    for name, value, expected in zip(("q", "keys", "values", "memory_weights"), fast_grads, reference_grads):
        assert torch.isfinite(value).all(), name
        assert rel_err(value, expected) < 1e-3, name


@pytest.mark.parametrize("sets", [1, 2])
@pytest.mark.parametrize("heads_per_launch", [1, 2, 3])
def test_key_gradients_in_groups_of_heads_match_float64_reference(heads_per_launch, sets, monkeypatch):
    """The keys' backward accumulates a few heads per launch (KEY_GRADIENT_HEADS): with 1 (four launches of one
    head each for 4 heads per set) and 2 as with 3 (the largest divisor of 4 up to 3 is 2), with one routing set or
    two (a launch covers the same heads of every set), the gradients are the reference's within 2e-5 relative L2
    error (float32 kernels against float64)."""
    monkeypatch.setattr(memory_attention_triton_module, "KEY_GRADIENT_HEADS", heads_per_launch)
    launches = []
    keys_kernel = memory_attention_triton_module._bwd_keys_kernel
    monkeypatch.setattr(memory_attention_triton_module, "_bwd_keys_kernel", CountedKernel(keys_kernel, launches))
    problem = random_problem(sets=sets, heads_per_set=4)
    grad_out = torch.randn(6, 24, sets * 4 * 16, dtype=torch.float64) * seen_rows(problem).unsqueeze(-1)
    _, reference_grads = run(
        problem, memory_attention_reference, torch.float64, grad_out, multiply_keys=True, math_only=True
    )
    _, fast_grads = run(problem, memory_attention_triton, torch.float32, grad_out, multiply_keys=True, every_query=True)
    assert launches == ([0, 1, 2, 3] if heads_per_launch == 1 else [0, 2])
    for name, value, expected in zip(("q", "keys", "values", "memory_weights"), fast_grads, reference_grads):
        assert rel_err(value, expected) < 2e-5, name


class CountedKernel:
    """A Triton kernel whose launches record their `first_head` argument."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args[self.kernel.arg_names.index("first_head")])
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_delta_kernel_matches_its_expression():
    """delta = rowsum(output gradient * output), `(rows, heads, queries)`, on random bfloat16 inputs that span
    several tiles of queries: within float32 rounding of the float64 sum of the same bfloat16 values."""
    rows, queries, heads, head_dim = 3, 150, 2, 16
    grad_out, out = (torch.randn(rows, queries, heads, head_dim, device=DEVICE).bfloat16() for _ in range(2))
    delta = torch.empty(rows, heads, queries, device=DEVICE)
    block = memory_attention_triton_module.DELTA_QUERIES
    memory_attention_triton_module._delta_kernel[(-(-queries // block), rows, heads)](
        grad_out, out, delta, queries, heads, HEAD_DIM=head_dim, BLOCK_M=block
    )
    expected = (grad_out.double() * out.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)


def test_every_query_flag_only_skips_masked_work():
    """every_query=True (skipping the tiles that causality masks) computes what the general path computes."""
    problem = random_problem()
    grad_out = torch.randn(problem["q"].shape[0], problem["q"].shape[2], 4 * 16, dtype=torch.float64)
    kernels = dict(fn=memory_attention_triton, dtype=torch.float32, grad_out=grad_out, multiply_keys=True)
    skipping, skipping_grads = run(problem, **kernels, every_query=True)
    general, general_grads = run(problem, **kernels, every_query=False)
    torch.testing.assert_close(skipping, general, rtol=1e-6, atol=1e-6)
    for a, b in zip(skipping_grads, general_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_query_sees_nothing_later_or_outside_its_memory():
    """Changing a key that no query of a block may see (a later slot of the block, a token outside its memory)
    changes nothing; changing one in its memory does."""
    problem = random_problem(batch=1, sets=1, lengths=(72,))
    kwargs = dict(multiply_keys=True, every_query=True)
    args = {k: v.float().to(DEVICE) if v.is_floating_point() else v.to(DEVICE) for k, v in problem.items()}
    base = memory_attention_triton(**args, **kwargs).view(3, 24, -1)
    row, slot = 2, 5  # block 2, its query at slot 5
    block_token = int(problem["block_index"][0, row, slot + 1])  # the next slot of the same block
    outside = [t for t in range(48) if t not in problem["memory_index"][0, row, 0].tolist()]
    inside = int(problem["memory_index"][0, row, 0][problem["memory_index"][0, row, 0] >= 0][0])
    for token, visible in ((block_token, False), (outside[0], False), (inside, True)):
        keys = args["keys"].clone()
        keys[0, 0, token] += 1.0
        changed = memory_attention_triton(**{**args, "keys": keys}, **kwargs).view(3, 24, -1)
        assert (changed[row, slot] != base[row, slot]).any() == visible, token


def test_compiled_callers_see_each_pass_as_one_operator():
    """Under torch.compile the forward and the backward are one custom-operator call each and no kernel is traced
    (so Inductor keeps no copies of the buffers the kernels write in place), and the compiled function's output and
    gradients are the eager ones (float32, within 1e-6)."""
    graphs = {}

    def recording_backend(module, example_inputs):
        def keep(kind):
            def compiler(graph, _):
                graphs[kind] = graph
                return make_boxed_func(graph)

            return compiler

        return aot_module_simplified(
            module, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward")
        )

    problem = random_problem()
    grad_out = torch.randn(problem["q"].shape[0], problem["q"].shape[2], 4 * 16, dtype=torch.float64)
    kernels = dict(dtype=torch.float32, grad_out=grad_out, multiply_keys=True, every_query=True)
    eager, eager_grads = run(problem, memory_attention_triton, **kernels)
    compiled_function = torch.compile(memory_attention_triton, backend=recording_backend, fullgraph=True)
    compiled, compiled_grads = run(problem, compiled_function, **kernels)

    ours = getattr(torch.ops, memory_attention_triton_module._NAMESPACE)
    passes = (("forward", ours.memory_attention_forward), ("backward", ours.memory_attention_backward))
    for kind, pass_operator in passes:
        called = [node.target for node in graphs[kind].graph.nodes if node.op == "call_function"]
        assert called.count(pass_operator.default) == 1, kind
        # Everything else is an ATen operation (casts, views) or takes an output apart: no traced kernel launch.
        others = {t for t in called if t not in (pass_operator.default, operator.getitem)}
        assert all(getattr(t, "namespace", None) == "aten" for t in others), (kind, others)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_second_copy_of_the_module_registers_operators_of_its_own():
    """A checkpoint's remote code is a second copy of this file, maybe of another version: loaded under another
    module name, it registers its operators under that name (not over the package's), and both compute the same."""
    spec = importlib.util.spec_from_file_location(
        "checkpoint_copy.memory_attention_triton", memory_attention_triton_module.__file__
    )
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._NAMESPACE == "checkpoint_copy_memory_attention_triton"
    assert memory_attention_triton_module._NAMESPACE == "colt5_memory_attention_triton"
    problem = random_problem()
    args = {k: v.float().to(DEVICE) if v.is_floating_point() else v.to(DEVICE) for k, v in problem.items()}
    kwargs = dict(multiply_keys=True, every_query=True)
    ours, theirs = memory_attention_triton(**args, **kwargs), copy.memory_attention_triton(**args, **kwargs)
    torch.testing.assert_close(theirs, ours)


def test_dispatch_keeps_cpu_tensors_on_the_reference():
    """Bit for bit: the kernels (on the GPU, or in the interpreter on CPU) would differ in the last bits and in rows
    without keys."""
    problem = random_problem()
    args = {k: v.float() for k, v in problem.items() if v.is_floating_point()}
    args |= {k: v for k, v in problem.items() if not v.is_floating_point()}
    expected = memory_attention_reference(**args, multiply_keys=True)
    assert torch.equal(memory_attention(**args, multiply_keys=True, every_query=True), expected)
    on_kernels = memory_attention_triton(**{k: v.to(DEVICE) for k, v in args.items()}, multiply_keys=True,
                                         every_query=True)
    assert not torch.equal(on_kernels.cpu(), expected)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_kernels_match_float32_reference(dtype):
    """bf16/fp16 kernels against the float32 reference: relative L2 error below 2e-2 (output and gradients)."""
    problem = random_problem(head_dim=64, block=256, blocks=4, slots=300, lengths=(1024, 900))
    grad_out = torch.randn(8, 256, 4 * 64, dtype=torch.float64) * seen_rows(problem).unsqueeze(-1)
    reference, reference_grads = run(problem, memory_attention_reference, torch.float32, grad_out, multiply_keys=True)
    fast, fast_grads = run(problem, memory_attention_triton, dtype, grad_out, multiply_keys=True, every_query=True)
    seen = seen_rows(problem).to(DEVICE)
    assert rel_err(fast[seen], reference[seen].double()) < 2e-2
    for value, expected in zip(fast_grads, reference_grads):
        assert value.dtype == dtype
        assert rel_err(value, expected.double()) < 2e-2


@gpu
@pytest.mark.parametrize("routed_query_fraction", [1.0, 0.25])
def test_causal_layer_with_kernels_matches_the_reference_path(routed_query_fraction, monkeypatch):
    """`CausalRoutedAttention` on the GPU (kernels) against the same layer on the reference path, float32:
    outputs and parameter gradients within 1e-4 relative L2 error, with padding."""
    from colt5 import causal_attention

    layer = CausalRoutedAttention(
        64, routed_query_fraction=routed_query_fraction, memory_size=48, block_size=32, heavy_heads=4,
        heavy_dim_head=16, light_heads=2, light_dim_head=16, light_window_size=8, num_routed_kv=2,
        router_kwargs=dict(COLT5_ROUTER),
    ).cuda().eval()  # eval: the query router's statistics stay put between the two runs (gradients still flow)
    x = torch.randn(2, 150, 64, device="cuda")
    mask = torch.ones(2, 150, dtype=torch.bool, device="cuda")
    mask[1, :20] = False

    def out_and_grads():
        layer.zero_grad()
        out = layer(x, mask)
        (out * mask.unsqueeze(-1)).square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    fast, fast_grads = out_and_grads()
    monkeypatch.setattr(causal_attention, "memory_attention", memory_attention_reference_kwargs)
    reference, reference_grads = out_and_grads()
    assert rel_err(fast[mask], reference[mask].double()) < 1e-4
    assert fast_grads.keys() == reference_grads.keys()
    for name in fast_grads:
        assert rel_err(fast_grads[name], reference_grads[name].double()) < 1e-4, name


def memory_attention_reference_kwargs(*args, every_query: bool, **kwargs):
    """`memory_attention` forced onto the reference (it has no `every_query`)."""
    return memory_attention_reference(*args, **kwargs)
