"""The Triton soft top-k kernels against the float64 PyTorch reference.

On CPU (CI) the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on small rows; on a GPU
the same tests run compiled, plus the long-row and bf16 tests marked `gpu`. Tolerance: relative L2 error
<= 1e-5 on lambda and on the score gradient for float32 scores (scores of moderate size, |s / eps| < 100: float32
cannot place larger z to better than ~1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colt5 import CoLT5Config, soft_topk_triton
from colt5.router import route
from colt5.soft_topk import soft_topk, uses_triton


# Triton's CPU interpreter evaluates both sides of tl.where in numpy, which warns about the side not taken.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (large rows, compiled kernels)")
ITERATIVE_SETTINGS = [dict(n_iters=1), dict(n_iters=7, eps=0.5), dict(n_iters=20, eps=0.3, eps_schedule=(4.0, 0.7))]


@pytest.fixture(params=["one program per row", "chunked rows"])
def layout(request, monkeypatch):
    """Both kernel layouts: rows in one program each (short rows) and rows split into chunks (long rows, forced
    here on short ones)."""
    if request.param == "chunked rows":
        monkeypatch.setattr(soft_topk_triton, "FUSED_MAX_TOKENS", 0)
    return request.param


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def compare(scores, k, valid=None, **settings) -> tuple[float, float]:
    """(lambda, gradient) relative errors of the Triton path (float32 scores) against float64 PyTorch."""
    scores = scores.to(DEVICE)
    valid = None if valid is None else valid.to(DEVICE)
    k = k.to(DEVICE) if torch.is_tensor(k) else k
    grad = torch.randn(scores.shape, dtype=torch.float64, device=DEVICE)
    fast_scores = scores.float().requires_grad_()
    fast = soft_topk(fast_scores, k, valid, backend="triton", **settings)
    (fast * grad.float()).sum().backward()
    ref_scores = fast_scores.detach().double().requires_grad_()
    reference = soft_topk(ref_scores, k, valid, backend="torch", **settings)
    (reference * grad).sum().backward()
    assert torch.isfinite(fast).all() and torch.isfinite(fast_scores.grad).all()
    assert fast_scores.grad.dtype == torch.float32
    return rel_err(fast, reference.detach()), rel_err(fast_scores.grad, ref_scores.grad)


@pytest.mark.parametrize("n", [1, 5, 300, 2500])
@pytest.mark.parametrize("std", [0.5, 3.0])
def test_exact_mode_matches_reference(n, std, layout):
    rows = 3
    scores = torch.randn(rows, n, dtype=torch.float64) * std
    k = torch.tensor([n / 8 + 0.5, max(n / 2, 1.0), 2.25], dtype=torch.float64)  # ragged amounts, one per row
    valid = torch.rand(rows, n) > 0.2
    lam_err, grad_err = compare(scores, k, valid)
    assert lam_err <= 1e-5 and grad_err <= 1e-5, (lam_err, grad_err)


@pytest.mark.parametrize("scale, eps", [(30.0, 1.0), (1.5, 0.05)])
def test_exact_mode_settles_rows_with_sharp_scores(scale, eps, layout):
    """Heavy-tailed scores (z = s / eps spread over thousands) outrun the parallel passes: the per-row finish
    settles them. Lambda sums to k and matches the reference to float32's resolution of z."""
    n, rows = 2000, 3
    scores = torch.distributions.Cauchy(0.0, scale).sample((rows, n)).double()
    k = torch.tensor([n / 8, 1.5, 0.9 * n], dtype=torch.float64)
    fast, serial_passes = soft_topk_triton.exact_forward(
        scores.float().to(DEVICE), k.float().to(DEVICE), None, eps
    )
    fast = fast.cpu().double()
    reference = soft_topk(scores.float().double(), k, eps=eps, backend="torch")
    assert (serial_passes > 0).all()  # the per-row serial passes (the finish, when chunked) did the settling
    resolution = (scores.abs().max() / eps).item() * 2.0**-23
    assert (scores.max(-1).values - scores.min(-1).values).min() / eps > 1000  # far beyond the parallel passes
    assert (fast - reference).abs().max().item() <= 10 * resolution
    assert torch.allclose(fast.sum(-1), k, rtol=1e-5, atol=100 * resolution)


@pytest.mark.parametrize("settings", ITERATIVE_SETTINGS)
@pytest.mark.parametrize("n", [3, 700])
def test_iterative_mode_matches_reference(n, settings, layout):
    rows = 4
    scores = torch.randn(rows, n, dtype=torch.float64) * 2
    k = torch.tensor([n / 8 + 0.5, n / 3, 1.0, 2.5], dtype=torch.float64)
    valid = torch.rand(rows, n) > 0.25
    lam_err, grad_err = compare(scores, k, valid, **settings)
    assert lam_err <= 1e-5 and grad_err <= 1e-5, (lam_err, grad_err)


@pytest.mark.parametrize("settings", [{}, ITERATIVE_SETTINGS[2]])
def test_saturated_and_fully_masked_rows(settings, layout):
    """k >= valid count gives lambda = 1 on valid tokens; a fully masked row gives zeros; gradients stay finite
    (zero) for both."""
    n = 50
    scores = torch.randn(3, n, device=DEVICE).requires_grad_()
    valid = torch.rand(3, n, device=DEVICE) > 0.5
    valid[2] = False
    k = torch.tensor([valid[0].sum().item() + 3.0, 4.0, 4.0], device=DEVICE)
    lam = soft_topk(scores, k, valid, backend="triton", **settings)
    assert torch.equal(lam[0], valid[0].float())
    assert torch.equal(lam[2], torch.zeros(n, device=DEVICE))
    (lam * torch.randn_like(lam)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[[0, 2]], torch.zeros(2, n, device=DEVICE))
    assert scores.grad[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_iters", [None, 10])
def test_half_precision_scores_are_read_and_differentiated_as_such(dtype, n_iters):
    scores = torch.randn(2, 400, device=DEVICE).to(dtype).requires_grad_()
    lam = soft_topk(scores, 30.0, n_iters=n_iters, backend="triton")
    reference = soft_topk(scores.detach().double(), 30.0, n_iters=n_iters, backend="torch")
    assert lam.dtype == torch.float32
    assert rel_err(lam, reference) <= 1e-5
    (lam * torch.randn_like(lam)).sum().backward()
    assert scores.grad.dtype == dtype and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("n_iters", [None, 12])
def test_route_with_several_sets_and_padding_matches_torch_backend(n_iters, layout):
    """Through route(): three key/value sets, padded samples, per-sample amounts from valid lengths."""
    scores = torch.randn(2, 3, 200, device=DEVICE)
    mask = torch.ones(2, 200, dtype=torch.bool, device=DEVICE)
    mask[1, 130:] = False
    fast = route(scores, 0.25, mask, n_iters=n_iters, backend="triton")
    reference = route(scores.double(), 0.25, mask, n_iters=n_iters, backend="torch")
    assert torch.equal(fast.indices, reference.indices)
    assert torch.equal(fast.mask, reference.mask)
    assert rel_err(fast.weights, reference.weights) <= 1e-5
    assert not fast.mask[1].any(-1).logical_not().any() and (fast.indices[1][fast.mask[1]] < 130).all()


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.randn(2, 8)
    assert not uses_triton(cpu, "auto")  # CPU tensors: PyTorch
    assert not uses_triton(cpu, "torch")
    with pytest.raises(ValueError, match="float64"):
        uses_triton(cpu.double(), "triton")
    with pytest.raises(ValueError, match="one of"):
        uses_triton(cpu, "cuda")
    monkeypatch.setenv("COLT5_ROUTER_BACKEND", "torch")
    assert not uses_triton(cpu.to(DEVICE), "auto")
    monkeypatch.setenv("COLT5_ROUTER_BACKEND", "fast")
    with pytest.raises(ValueError, match="COLT5_ROUTER_BACKEND"):
        uses_triton(cpu, "auto")
    monkeypatch.delenv("COLT5_ROUTER_BACKEND")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensors"):
            uses_triton(cpu, "triton")
    else:
        assert uses_triton(cpu.cuda(), "auto") and not uses_triton(cpu.cuda().double(), "auto")
    with pytest.raises(ValueError, match="router_backend"):
        CoLT5Config(router_backend="gpu")


def test_package_imports_and_runs_without_triton(tmp_path):
    """A CPU-only install without triton imports colt5, runs a model, and its saved remote code passes
    transformers' import check (the kernel module's triton import sits in a try block)."""
    code = f"""
import sys
sys.modules["triton"] = None  # any `import triton` now fails
import torch
from transformers.dynamic_module_utils import get_imports
import colt5
from colt5 import CoLT5Config, CoLT5Model
model = CoLT5Model(CoLT5Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, light_num_heads=1,
    light_head_dim=16, heavy_num_heads=2, heavy_head_dim=16, light_window_size=4, light_intermediate_size=16,
    heavy_intermediate_size=32))
model(torch.randint(0, 50, (1, 24)))
model.save_pretrained({str(tmp_path)!r})
import pathlib
needed = set()
for path in pathlib.Path(colt5.__file__).parent.glob("*.py"):
    needed |= set(get_imports(path))
assert "triton" not in needed, needed
print("ok")
"""
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@gpu
@pytest.mark.parametrize("n", [262144, 1048576])
@pytest.mark.parametrize("n_iters", [None, 50])
def test_long_rows_on_gpu(n, n_iters):
    rows = 4 if n_iters is None else 2
    scores = torch.randn(rows, n, dtype=torch.float64) * 2
    k = torch.tensor([n / 8, n / 16, 3.0, n / 2][:rows], dtype=torch.float64)
    valid = torch.rand(rows, n) > 0.1
    lam_err, grad_err = compare(scores, k, valid, n_iters=n_iters)
    assert lam_err <= 1e-5 and grad_err <= 1e-5, (lam_err, grad_err)


@gpu
@pytest.mark.parametrize("n_iters", [None, 50])
def test_bf16_long_rows_on_gpu(n_iters):
    scores = torch.randn(8, 65536, device="cuda").bfloat16().requires_grad_()
    lam = soft_topk(scores, 8192.0, n_iters=n_iters)  # auto: Triton on CUDA
    reference = soft_topk(scores.detach().double(), 8192.0, n_iters=n_iters, backend="torch")
    assert rel_err(lam, reference) <= 1e-5
    (lam * torch.randn_like(lam)).sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("router_iterations", [None, 6])
def test_model_routes_with_the_kernels_as_with_pytorch(tiny_config, router_iterations, monkeypatch):
    """config.router_backend reaches every router: a model on the Triton backend runs the kernels and computes
    what it computes on the PyTorch backend (float32, same weights), gradients included."""
    from colt5 import CoLT5Model

    calls = []
    function = soft_topk_triton.ExactSoftTopk if router_iterations is None else soft_topk_triton.IterativeSoftTopk
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or original(*args))
    ids = torch.randint(0, 300, (2, 48), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    outputs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = CoLT5Model(tiny_config(router_backend=backend, router_iterations=router_iterations)).to(DEVICE)
        hidden = model(ids, attention_mask=mask).last_hidden_state
        hidden.square().mean().backward()
        outputs[backend] = hidden, model.layers[0].attention.kv_router.routing_vectors.grad
    assert len(calls) == 2 * 3  # two layers, three routers each, on the Triton backend only
    assert torch.allclose(outputs["triton"][0], outputs["torch"][0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(outputs["triton"][1], outputs["torch"][1], atol=1e-5, rtol=1e-4)


@gpu
def test_bf16_autocast_training_step_uses_the_kernels(tiny_config, monkeypatch):
    from colt5 import CoLT5ForCausalLM, CoLT5Model

    calls = []
    original = soft_topk_triton.ExactSoftTopk.apply
    monkeypatch.setattr(soft_topk_triton.ExactSoftTopk, "apply", lambda *a: calls.append(1) or original(*a))
    for model in (CoLT5Model(tiny_config()).cuda(), CoLT5ForCausalLM(tiny_config(is_causal=True)).cuda()):
        ids = torch.randint(0, 300, (2, 256), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids)
        hidden = out.logits if isinstance(model, CoLT5ForCausalLM) else out.last_hidden_state
        hidden.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert calls  # auto: the Triton router ran on CUDA
