# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""One-token decode steps of `CoLT5ForCausalLM` replayed from a captured CUDA graph.

Why: a decode step of the causal model is a few hundred small kernels (per layer: projections, the ring buffer and
block writes, two attentions, two MLPs), each taking microseconds on the GPU and tens of microseconds of Python and
dispatch on the host, so eager decoding is host-bound. A step has fixed shapes and, after the cache layers' host
bookkeeping (`CoLT5CacheLayer.begin_token`: re-routing at block boundaries, growing the score buffer), only device
operations at device indices, so the whole step can be captured once and replayed.

How: per cache, the first step whose cache tensors are new runs eagerly (it also warms kernels up); the next one
is captured and every later one replayed, after `begin_token` on every layer. A cache layer that replaces a tensor
(a larger score buffer, a new batch size) changes its `version`, and the next step captures anew.

With `config.compile_decoding` the step is compiled (torch.compile, one graph) before it is captured: the replay is
bound by the number of kernels, and Inductor fuses the step's elementwise work (norms, rotations, casts, the
routers' arithmetic) into fewer kernels. The compiled function is one per process; it is traced with the score
buffers' length dynamic, so a growing cache does not compile it again (a second batch size does, once).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .cache_colt5 import CoLT5Cache


class CudaGraphDecodeStep:
    """The captured decode step of one cache (kept as `CoLT5Cache.decode_graph`)."""

    def __init__(self):
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.warmed_key: tuple | None = None
        self.input_ids: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.captures = 0

    def __call__(
        self, model: nn.Module, cache: CoLT5Cache, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits `(batch, 1, vocab)` of `input_ids` `(batch, 1)` at `position_ids` `(batch, 1)`, appending the
        token to `cache` (a fresh tensor: the graph's own output is overwritten by the next step)."""
        for layer in cache.layers:
            layer.begin_token()
        key = (id(model), tuple(input_ids.shape), input_ids.device, tuple(layer.version for layer in cache.layers))
        if key == self.key:
            self.input_ids.copy_(input_ids)
            self.position_ids.copy_(position_ids)
            self.graph.replay()
            return self.logits.clone()
        step = self._run
        if model.config.compile_decoding:
            step = compiled_decode_step()
            for layer in cache.layers:  # they grow by doubling: one trace for every length
                for buffer in (layer.scores, layer.token_mask):
                    torch._dynamo.maybe_mark_dynamic(buffer, buffer.dim() - 1)
        # The step always gets fresh inputs of standard strides (generate() passes a slice of its growing ids, whose
        # stride a plain clone keeps), so that the compiled step's guards see at the capture what they saw at the
        # warm-up: a compile while capturing would fail the capture.
        input_ids, position_ids = (t.clone(memory_format=torch.contiguous_format) for t in (input_ids, position_ids))
        if key != self.warmed_key:
            # New tensors: one step outside a graph first (lazy initialisations, kernel selection, compiling), then
            # capture.
            self.warmed_key = key
            return step(model, cache, input_ids, position_ids)
        self.graph = None  # release the old graph's memory before capturing the new one
        self.input_ids, self.position_ids = input_ids, position_ids
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.compiler.set_stance("fail_on_recompile"):
            self.logits = step(model, cache, self.input_ids, self.position_ids)
        self.graph, self.key = graph, key
        self.captures += 1
        graph.replay()  # capturing records the step without running it
        return self.logits.clone()

    @staticmethod
    def _run(model: nn.Module, cache: CoLT5Cache, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The step's device work, with every layer's `begin_token` already done."""
        for layer in cache.layers:
            layer.tokens_begun_outside = True
        try:
            hidden = model.model(input_ids, position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
            return model.lm_head(hidden)
        finally:
            for layer in cache.layers:
                layer.tokens_begun_outside = False


@functools.cache
def compiled_decode_step() -> Callable[[nn.Module, CoLT5Cache, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`CudaGraphDecodeStep._run` compiled as one graph (fullgraph: a break would split the step into pieces that
    launch as many kernels as before); made once per process."""
    return torch.compile(CudaGraphDecodeStep._run, fullgraph=True)


__all__ = ["CudaGraphDecodeStep", "compiled_decode_step"]
