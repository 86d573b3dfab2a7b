"""Generation benchmark: CoLT5ForCausalLM vs LlamaForCausalLM (SDPA) of the same width and depth.

For each context length and batch size, the models get the same random prompt and generate greedily (no early
stop). Measured in one run on one GPU, bf16 weights, for CoLT5 with CUDA-graph decoding (`colt5`, the default),
the same weights with the captured step compiled first (`colt5 compiled`, `compile_decoding=True`) and decoding
eagerly (`colt5 eager`, `cuda_graph_decoding=False`), and Llama with transformers' DynamicCache (`llama`, eager)
and with its static cache (`llama static`: generate() then compiles the decode step with torch.compile in
"reduce-overhead" mode, CUDA graphs included: Llama's fastest decoding in transformers):
- first generate(2) s: the first generate() at this shape, 2 new tokens (the prefill and the first decode step),
  with one-time costs (kernel compiles for new sizes, per-shape set-up); every later figure is of warm runs;
- prefill: time of generate(max_new_tokens=1) (the prompt's forward pass);
- first decode s: time of the first 2 decode steps of a fresh cache (an eager warm-up step and the CUDA graph's
  capture: the one-time cost), apart from the steady steps;
- decode tokens/s: batch * (N - 1) / (time from the first to the last new token's logits), inside one generate()
  of N new tokens (a logits processor synchronises and reads the clock at each step; generate's own per-step
  work and the first decode steps included); slowest step ms: the longest of those steps;
- step ms, device ms: one model forward of one token per sample with a cache, wall time (host and device, a
  synchronisation after each step) and the sum of the GPU's kernel and copy times in that step (profiler); their
  difference is host time the device waits for. Steps of a steady cache (no block boundary); not measured for
  `llama static` (its compiled step runs inside generate() only);
- generate device ms: the GPU's kernel and copy time per new token inside generate() (profiler: a generate() of
  N new tokens less one of 1 token, over N - 1), generate()'s own kernels included: the same measure for every
  model, whatever its host;
- end-to-end tokens/s: batch * N / time of N new tokens (prefill included);
- cache MB: bytes of every tensor in the cache returned by generate (N new tokens);
- peak GB: torch.cuda.max_memory_allocated during the N-token generate.
Prompts are multiples of the CoLT5 block size, so the first decoded token re-routes the memory: the decode time
includes one re-routing per layer.

Usage: python scripts/bench_generation.py [--contexts 4096 16384 32768] [--batches 1 8] [--new-tokens 128]
       [--only colt5 "llama static"] [--profile] [--json results/x.json]
       (--smoke: tiny models on CPU, to check the script runs; --profile: each decode step's largest kernels)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from colt5 import CoLT5Config, CoLT5ForCausalLM
from colt5.cache_colt5 import CACHE_NAME

VOCAB = 32128


def colt5_config(smoke: bool) -> CoLT5Config:
    if smoke:
        return CoLT5Config(
            vocab_size=384, hidden_size=64, num_hidden_layers=2, light_num_heads=2, light_head_dim=16,
            heavy_num_heads=4, heavy_head_dim=16, light_window_size=15, light_intermediate_size=64,
            heavy_intermediate_size=128, routed_kv_tokens=32, causal_block_size=64, is_causal=True,
        )
    # ~119M parameters (24.7M of them the tied embedding): CoLT5-B width and attention, 8 layers, heavy MLP 4x.
    return CoLT5Config(
        vocab_size=VOCAB, hidden_size=768, num_hidden_layers=8, light_intermediate_size=1024,
        heavy_intermediate_size=3072, routed_kv_tokens=2048, causal_block_size=1024, light_window_size=127,
        max_position_embeddings=65536, is_causal=True,
    )


def llama_config(colt5: CoLT5Config) -> LlamaConfig:
    """Same width, depth and vocabulary; dense heads of 64 over the full width, MLP 4x."""
    return LlamaConfig(
        vocab_size=colt5.vocab_size, hidden_size=colt5.hidden_size, num_hidden_layers=colt5.num_hidden_layers,
        num_attention_heads=colt5.hidden_size // 64, num_key_value_heads=colt5.hidden_size // 64,
        intermediate_size=4 * colt5.hidden_size, max_position_embeddings=colt5.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )


def cache_bytes(cache) -> int:
    """Bytes of every tensor a cache's layers hold (CoLT5CacheLayer states or DynamicCache keys/values)."""
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready (after a device synchronisation): the first call
    follows the prefill, each later one a decode step."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


# generate() settings of each benchmarked model that differ from the defaults.
GENERATE_SETTINGS = {"llama static": dict(cache_implementation="static")}


def timed_generate(model, prompt, new_tokens: int, device: torch.device, clock: StepClock | None = None, **settings):
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=0,
        logits_processor=LogitsProcessorList([clock] if clock is not None else []), **settings,
    )
    sync(device)
    return time.perf_counter() - start, out


def generate_device_ms(model, prompt, new_tokens: int, device: torch.device, **settings) -> float:
    """GPU kernel and copy milliseconds per new token inside generate(): (N new tokens - 1 new token) / (N - 1)."""
    if device.type != "cuda":
        return float("nan")
    totals = []
    for tokens in (1, new_tokens):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            timed_generate(model, prompt, tokens, device, **settings)
        totals.append(sum(event.self_device_time_total for event in profile.key_averages()) / 1e3)
    return (totals[1] - totals[0]) / (new_tokens - 1)


def print_kernel_table(name: str, profile, steps: int, rows: int = 25) -> None:
    """The GPU kernels of `steps` profiled decode steps, most device time first: per step, their count and time."""
    events = [e for e in profile.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    print(f"# {name}: {sum(e.count for e in events) / steps:.0f} kernels and copies a step, "
          f"{total / steps / 1e3:.3f} device ms a step; the {rows} largest (per step: count, us, share):")
    for e in events[:rows]:
        print(f"#   {e.count / steps:6.1f} {e.self_device_time_total / steps:8.1f} us "
              f"{100 * e.self_device_time_total / total:5.1f}%  {e.key[:110]}")


def step_times(model, prompt: torch.Tensor, device: torch.device, steps: int = 8, profile_name: str | None = None) -> dict:
    """Wall and device milliseconds of a one-token forward with a cache after `prompt` (see the docstring), and
    the time of a fresh cache's first two decode steps; with `profile_name`, prints the step's kernels."""
    out = model(prompt, use_cache=True)
    cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(2):  # CoLT5: the eager warm-up step and the capture (the first re-routes the memory)
        model(token, **{CACHE_NAME: cache})
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        model(token, **{CACHE_NAME: cache})
        sync(device)
    wall = (time.perf_counter() - start) / steps
    device_ms = float("nan")
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(steps):
                model(token, **{CACHE_NAME: cache})
            sync(device)
        device_ms = sum(event.self_device_time_total for event in profile.key_averages()) / 1e3 / steps
        if profile_name is not None:
            print_kernel_table(profile_name, profile, steps)
    return dict(first_decode_s=first, step_ms=wall * 1e3, device_ms=device_ms)


def measure(
    model, context: int, batch: int, new_tokens: int, device: torch.device, profile_name: str | None = None, **settings
) -> dict:
    generator = torch.Generator().manual_seed(context + batch)
    prompt = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
    with torch.no_grad():
        # The first generate() at this shape: one-time costs (the router's Triton kernels compile for each new row
        # length: the prompt's blocks and the first re-routing; CUDA-graph capture; torch.compile where asked).
        # [0]: each output (and the cache in it) is dropped before the next generate() allocates its own; Llama's
        # static cache at 128k and batch 8 is 26 GB, and two of them at once ran an H100 out of memory.
        first = timed_generate(model, prompt, 2, device, **settings)[0]
        prefill = timed_generate(model, prompt, 1, device, **settings)[0]
        if settings:  # a static cache of another length is compiled for anew: not inside the timed run
            timed_generate(model, prompt, new_tokens, device, **settings)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = StepClock(device)
        total, out = timed_generate(model, prompt, new_tokens, device, clock, **settings)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        cache_mb = cache_bytes(out[CACHE_NAME]) / 2**20
        del out
        generate_ms = generate_device_ms(model, prompt, new_tokens, device, **settings)
        if settings:  # a static cache: its compiled step runs inside generate() only
            steps = dict(first_decode_s=float("nan"), step_ms=float("nan"), device_ms=float("nan"))
        else:
            steps = step_times(model, prompt, device, profile_name=profile_name)
    decode_s = clock.times[-1] - clock.times[0]
    return dict(
        first_generate_s=first,
        prefill_s=prefill,
        total_s=total,
        decode_tok_s=batch * (new_tokens - 1) / max(decode_s, 1e-9),
        slowest_step_ms=max(b - a for a, b in zip(clock.times, clock.times[1:])) * 1e3,
        end_to_end_tok_s=batch * new_tokens / total,
        cache_mb=cache_mb,
        peak_gb=peak,
        generate_device_ms=generate_ms,
        **steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models, short contexts, CPU is fine")
    parser.add_argument("--only", nargs="+", default=None, help="measure only these models (names as printed)")
    parser.add_argument("--profile", action="store_true", help="print the kernels of each model's decode step")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    colt5 = colt5_config(args.smoke)
    compiled_config = copy.deepcopy(colt5)
    compiled_config.compile_decoding = True
    eager_config = copy.deepcopy(colt5)
    eager_config.cuda_graph_decoding = False
    llama = LlamaForCausalLM._from_config(llama_config(colt5), attn_implementation="sdpa")
    models = {
        "colt5": CoLT5ForCausalLM(colt5),
        "colt5 compiled": CoLT5ForCausalLM(compiled_config),
        "colt5 eager": CoLT5ForCausalLM(eager_config),
        "llama": llama,
        "llama static": llama,  # the same model, generate() with a static cache (GENERATE_SETTINGS)
    }
    for name in ("colt5 compiled", "colt5 eager"):
        models[name].load_state_dict(models["colt5"].state_dict())
    for model in models.values():
        model.to(device=device, dtype=dtype).eval()
    params = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()}
    unknown = set(args.only or ()) - set(models)
    if unknown:
        parser.error(f"--only: no model named {sorted(unknown)}; the models are {list(models)}.")
    names = [name for name in models if not args.only or name in args.only]

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            result = {
                name: measure(
                    models[name], context, batch, args.new_tokens, device,
                    profile_name=f"context {context} batch {batch} {name}" if args.profile else None,
                    **GENERATE_SETTINGS.get(name, {}),
                )
                for name in names
            }
            rows.append(dict(context=context, batch=batch, **result))
            # Ratios against Llama's faster decoding of the two (static cache or not).
            baseline = max((result[name] for name in ("llama", "llama static") if name in result),
                           key=lambda r: r["decode_tok_s"], default=None)
            for name, r in result.items():
                ratio = f"({r['decode_tok_s'] / baseline['decode_tok_s']:5.2f}x)" if baseline else " " * 8
                print(
                    f"context {context:>6} batch {batch} {name:<14}: decode tok/s {r['decode_tok_s']:8.1f} {ratio} | "
                    f"generate device ms {r['generate_device_ms']:6.2f} | "
                    f"step ms {r['step_ms']:6.2f} device ms {r['device_ms']:6.2f} | end-to-end tok/s "
                    f"{r['end_to_end_tok_s']:8.1f} | prefill s {r['prefill_s']:.3f} first generate(2) s {r['first_generate_s']:.3f} | "
                    f"first decode s {r['first_decode_s']:.3f} slowest step ms {r['slowest_step_ms']:6.1f} | cache MB {r['cache_mb']:8.1f} | peak GB {r['peak_gb']:.2f}",
                    flush=True,
                )

    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
        params_millions=params, new_tokens=args.new_tokens, colt5_config=colt5.to_diff_dict(),
    )
    print(json.dumps({k: v for k, v in meta.items() if k != "colt5_config"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
