"""The tile sweep of the heavy attention's kernels (scripts/tune_memory_attention.py; it runs on a GPU only)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import tune_memory_attention  # noqa: E402

from colt5 import memory_attention_triton  # noqa: E402


def test_every_sweep_times_the_modules_own_tiles():
    """Each kernel's candidates include the module's TILES (the row the others are read against), and name each
    setting once with power-of-two tiles of at least 16 (tl.dot's smallest)."""
    for kernel, candidates in tune_memory_attention.CANDIDATES.items():
        assert tune_memory_attention.current(kernel) in candidates, kernel
        assert len(set(candidates)) == len(candidates), kernel
        for block_m, block_n, _, _ in candidates:
            for size in (block_m, block_n):
                assert size >= 16 and size & (size - 1) == 0, (kernel, size)
        tiles = tune_memory_attention.setting(tune_memory_attention.current(kernel))
        assert tiles == memory_attention_triton.TILES[kernel], kernel
