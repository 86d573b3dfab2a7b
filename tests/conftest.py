"""Shared fixtures: a tiny CoLT5 config factory and a fixed torch seed for every test."""

import os

import pytest
import torch


if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (set before triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from colt5 import CoLT5Config

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
