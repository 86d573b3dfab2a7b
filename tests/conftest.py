"""Shared fixtures: a tiny CoLT5 config factory and a fixed torch seed for every test."""

import os
import subprocess
import sys

import pytest
import torch


if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (set before triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from colt5 import CoLT5Config

# colt5's own router (what CoLT5Config builds: the exact soft top-k at eps 1, weights not straight-through); the
# standalone layers default to colt5-attention's (20 iterations at eps 0.03, straight-through).
COLT5_ROUTER = dict(n_iters=None, eps=1.0, straight_through=False)


def colt5_design(**settings) -> dict:
    """Settings that give a standalone layer colt5's own design (as CoLT5Config's models build it) instead of its
    colt5-attention defaults: the block normalises, no learned unrouted output, keys scaled by their weights, colt5's
    router. `settings` win; their router_kwargs are merged into colt5's router."""
    router = {**COLT5_ROUTER, **settings.pop("router_kwargs", {})}
    design = dict(branch_norms=False, learned_unrouted_output=False, multiply_keys_by_score=True)
    return {**design, **settings, "router_kwargs": router}


def assert_compiled_step_equals_eager(compiled, compiled_model, eager_model, ids, gradient_error: float) -> None:
    """One forward+backward of the language-model loss on `ids` through `compiled` (a compiled call of
    `compiled_model`) and through `eager_model` (its copy): equal losses (1e-5 relative), and every parameter's
    gradient within `gradient_error` relative L2 error of the eager one."""
    losses = []
    for forward in (compiled, eager_model):
        loss = forward(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, expected), actual in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert expected.grad is not None and actual.grad is not None, name
        error = ((actual.grad - expected.grad).norm() / expected.grad.norm()).item()
        assert error <= gradient_error, (name, error)


TINY_CONFIG = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    light_num_heads=2,
    light_head_dim=16,
    heavy_num_heads=4,
    heavy_head_dim=16,
    light_window_size=8,
    light_intermediate_size=32,
    heavy_intermediate_size=128,
    routed_ff_tokens=0.25,
    routed_query_tokens=0.25,
    routed_kv_tokens=0.5,
)


@pytest.fixture
def pythonpath_without_package() -> str:
    """PYTHONPATH for a subprocess that must not see this repository's package (remote-code tests), keeping the
    other entries (e.g. a folder of extra wheels on a GPU machine)."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join(e for e in entries if e and not os.path.isdir(os.path.join(e, "colt5")))


@pytest.fixture
def run_without_package(tmp_path, pythonpath_without_package):
    """Runs a Python `script` with `args` in `tmp_path`, offline, where this package cannot be imported and with a
    fresh modules cache (`tmp_path / "hf_home"`), as a machine that loads a checkpoint as remote code; asserts that
    it exits 0 and printed "REMOTE OK"."""

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        (tmp_path / "remote.py").write_text(script)
        hf_home = tmp_path / "hf_home"
        hf_home.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": pythonpath_without_package, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
        env.pop("HF_MODULES_CACHE", None)
        result = subprocess.run(
            [sys.executable, "remote.py", *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "REMOTE OK" in result.stdout
        return result

    return run


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config():
    """Factory: `tiny_config(**overrides) -> CoLT5Config` with tiny sizes (overrides win)."""

    def make(**overrides) -> CoLT5Config:
        return CoLT5Config(**{**TINY_CONFIG, **overrides})

    return make
