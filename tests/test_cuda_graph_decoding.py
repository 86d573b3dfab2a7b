"""The CUDA-graph decode step (colt5/cuda_graph_decoding.py): graph decoding gives what eager decoding gives, in
float32, through re-routing at block boundaries, a growing score buffer, left padding and beam search, also with
the step compiled first (`compile_decoding`); a replayed step synchronises with the host nowhere. The warm-up step,
compiled or not, runs on CPU too."""

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from colt5 import CoLT5Cache, CoLT5Config, CoLT5ForCausalLM
from colt5.cuda_graph_decoding import CudaGraphDecodeStep

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

VOCAB = 384


def tiny_lm(device: str, **overrides) -> CoLT5ForCausalLM:
    """A tiny causal model (blocks of 16, memory 12, two routing sets); weights 10x larger than usual so that
    greedy decoding does not repeat one token whatever the context."""
    config = CoLT5Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, light_num_heads=2, light_head_dim=16,
        heavy_num_heads=4, heavy_head_dim=16, light_window_size=8, light_intermediate_size=64,
        heavy_intermediate_size=128, routed_kv_tokens=12, causal_block_size=16, num_kv_routing_sets=2,
        is_causal=True, initializer_range=0.2, **overrides,
    )
    torch.manual_seed(0)
    return CoLT5ForCausalLM(config).to(device).eval()


def left_padded_prompts(lengths: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (never pad 0 or eos 1), left-padded to the longest: `(ids, attention_mask)`."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,))
        mask[row, width - length :] = 1
    return ids.to(device), mask.to(device)


def test_the_warm_up_step_equals_a_plain_cached_step():
    """The step before a capture runs eagerly with every layer's host bookkeeping done by the runner first: it
    must give the logits and cache a plain cached forward gives (CPU, float32)."""
    model = tiny_lm("cpu", cuda_graph_decoding=False)
    ids, mask = left_padded_prompts([16, 11], "cpu")  # the first new token re-routes the first sample's memory
    token = torch.randint(3, VOCAB, (2, 1))
    plain, through_runner = CoLT5Cache(model.config), CoLT5Cache(model.config)
    with torch.no_grad():
        for cache in (plain, through_runner):
            model(ids, attention_mask=mask, cache=cache)
        expected = model(token, cache=plain).logits
        positions = through_runner.device_counts().unsqueeze(-1).clone()
        actual = CudaGraphDecodeStep()(model, through_runner, token, positions)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert through_runner.valid_counts == plain.valid_counts == [17, 12]
    for a, b in zip(through_runner.layers, plain.layers):
        torch.testing.assert_close(a.heavy_keys, b.heavy_keys, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert not a.tokens_begun_outside


def test_the_compiled_step_equals_plain_cached_steps_and_compiles_once():
    """With compile_decoding the runner's step is compiled (run here outside a graph, as a warm-up step is): over 30
    tokens of two left-padded prompts, through re-routing at block boundaries and the score buffer's growth, it
    gives the logits and cache of plain cached steps (CPU, float32; Inductor may reorder sums: 1e-5), and is traced
    once (the buffers' length is dynamic)."""
    model = tiny_lm("cpu", compile_decoding=True)
    ids, mask = left_padded_prompts([40, 29], "cpu")
    plain, compiled = CoLT5Cache(model.config), CoLT5Cache(model.config)
    capacity = []
    torch._dynamo.reset()  # what other tests compiled must not serve this one
    counters.clear()
    with torch.no_grad():
        for cache in (plain, compiled):
            model(ids, attention_mask=mask, cache=cache)
        for _ in range(30):
            token = torch.randint(3, VOCAB, (2, 1))
            expected = model(token, cache=plain).logits
            positions = compiled.device_counts().unsqueeze(-1).clone()
            actual = CudaGraphDecodeStep()(model, compiled, token, positions)  # a new runner: never a capture
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            capacity.append(compiled.layers[0].scores.shape[-1])
    assert capacity[0] < capacity[-1], "the score buffer did not grow: the test does not cover it"
    assert compiled.valid_counts == plain.valid_counts == [70, 59]  # blocks of 16: 4 re-routings of the first
    for a, b in zip(compiled.layers, plain.layers):
        torch.testing.assert_close(a.heavy_keys, b.heavy_keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.memory_index, b.memory_index, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


class _NoGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capturing runs the step as it is, replaying does nothing."""

    def replay(self):
        pass


def test_the_compiled_step_never_compiles_while_captured(monkeypatch):
    """A compile during a CUDA graph's capture fails it, and the capture refuses to compile: the step must meet at
    its capture the guards of its warm-up step, also at a second batch size (which makes the batch dynamic) and
    with generate()'s strided slice of the ids as input. On the CPU, with the capture stood in for."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _NoGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    model = tiny_lm("cpu", compile_decoding=True)
    with torch.no_grad():
        for batch in (1, 3):
            ids, mask = left_padded_prompts([20] * batch, "cpu")
            cache = CoLT5Cache(model.config)
            model(ids, attention_mask=mask, cache=cache)
            runner = CudaGraphDecodeStep()
            for _ in range(2):  # the warm-up step, then the capture (which raises if it compiles)
                ids = torch.cat((ids, torch.randint(3, VOCAB, (batch, 1))), dim=1)
                positions = cache.device_counts().unsqueeze(-1).clone()
                runner(model, cache, ids[:, -1:], positions)
            assert runner.captures == 1


def test_compile_decoding_needs_cuda_graph_decoding():
    with pytest.raises(ValueError, match="compile_decoding compiles the CUDA-graph decode step"):
        CoLT5Config(is_causal=True, cuda_graph_decoding=False, compile_decoding=True)


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compiled graph"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_graph_decoding_equals_eager_decoding(num_beams, compiled):
    """Greedy and beam search, 3 left-padded prompts, 60 new tokens: blocks fill up (re-routing outside the graph)
    and the score buffer outgrows its capacity (a new capture)."""
    model = tiny_lm("cuda")
    ids, mask = left_padded_prompts([40, 29, 17], "cuda")
    settings = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False, num_beams=num_beams,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    outputs = {}
    for graphs in (True, False):
        model.config.compile_decoding = graphs and compiled
        model.config.cuda_graph_decoding = graphs
        outputs[graphs] = model.generate(ids, attention_mask=mask, **settings)
    graph, eager = outputs[True], outputs[False]
    assert torch.equal(graph.sequences, eager.sequences)
    # Inductor's fused kernels may sum in another order than the eager ones.
    tolerance = 1e-4 if compiled else 1e-5
    torch.testing.assert_close(torch.stack(graph.logits), torch.stack(eager.logits), rtol=tolerance, atol=tolerance)
    cache = graph.get("cache", graph.get("past_key_values"))
    # The capacity of 64 scores is full after 24 new tokens: the first capture and one after the buffer grew.
    assert cache.decode_graph.captures == 2
    assert cache.get_seq_length() == 40 + 60 - 1


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compiled graph"])
def test_a_replayed_step_does_not_synchronise_with_the_host(compiled):
    model = tiny_lm("cuda", compile_decoding=compiled)
    ids, mask = left_padded_prompts([20, 20], "cuda")
    cache = CoLT5Cache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        token = torch.randint(3, VOCAB, (2, 1), device="cuda")
        for _ in range(2):  # warm-up step, capture
            model(token, cache=cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):  # 22 .. 27 valid tokens: no block boundary, no re-routing
                model(token, cache=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.decode_graph.captures == 1
    assert cache.valid_counts == [27, 27]
