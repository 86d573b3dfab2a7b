"""Generation benchmark: CoLT5ForCausalLM vs LlamaForCausalLM (SDPA) of the same width and depth.

For each context length and batch size, the models get the same random prompt and generate greedily (no early
stop). Measured in one run on one GPU, bf16 weights, for CoLT5 with CUDA-graph decoding (`colt5`, the default),
the same weights with the captured step compiled first (`colt5 compiled`, `compile_decoding=True`) and decoding
eagerly (`colt5 eager`, `cuda_graph_decoding=False`), and Llama with transformers' DynamicCache (`llama`, eager)
and with its static cache (`llama static`: generate() then compiles the decode step with torch.compile in
"reduce-overhead" mode, CUDA graphs included: Llama's fastest decoding in transformers).
First a process warm-up pays, charged to no model, what a process pays once whichever model runs first: on a GPU
the CUDA context, cuBLAS's initialisation (a bf16 matmul) and a causal SDPA call's; its time is in the header line
(and the JSON's meta, process_warmup_s). Then, for each model:
- first generate(3) s: the first generate() at this shape, 3 new tokens (the prefill and two decode steps: CoLT5
  captures its decode CUDA graph at a cache's second decode step, compiled first with `compile_decoding`; Llama's
  static cache compiles its step at the first), with the model's one-time costs (kernel compiles for new sizes,
  torch.compile where asked, graph capture, per-shape set-up); every later figure is of warm runs (measurements
  before 2026-12-07's session 40 timed generate(2), without CoLT5's capture);
- one-time s: first generate(3) s less the time of a second generate(3) at this shape (warm_generate_s in the
  JSON): the one-time costs alone. Kernels an earlier shape or model of the run compiled are not compiled again,
  and Triton's and Inductor's on-disk caches may hold those of earlier runs: a fresh process can pay more (see
  --first-generate). Every new cache captures its graph again (about 0.04 s): in first decode s;
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

--first-generate, instead of the above: the one-time costs of a fresh process. For each shape and model (--only;
`colt5` and `llama static` unless named) the script runs itself twice in a new process, which does the process
warm-up, builds that model alone as above (from the same seed: the same weights) and times its first generate(3)
and a second one. Both processes keep Triton's and Inductor's on-disk caches (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR)
in the same new folder: the first finds them empty ("cold", as on a machine's first run, though the operating
system's file cache is warm from the parent), the second finds what the first compiled ("warm": every later
process). Each prints a row of its process warm-up s, first generate(3) s, second generate(3) s and one-time s (the
JSON's "first_generate"); a process that fails or runs past CHILD_TIMEOUT_S prints why and the end of its stderr
instead, and the next one runs.

Usage: python scripts/bench_generation.py [--contexts 4096 16384 32768] [--batches 1 8] [--new-tokens 128]
       [--only colt5 "llama static"] [--profile] [--first-generate] [--json results/x.json]
       (--smoke: tiny models on CPU, to check the script runs; --profile: each decode step's largest kernels)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from colt5 import CoLT5Config, CoLT5ForCausalLM
from colt5.cache_colt5 import CACHE_NAME

VOCAB = 32128
# New tokens of the generate() whose first call measures the one-time costs (see the module docstring).
ONE_TIME_TOKENS = 3


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


def process_warmup(device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of the costs a process pays once, whichever model runs first: on a GPU the CUDA context (created by
    the first tensor), cuBLAS's initialisation (a matmul) and the attention libraries' (a causal SDPA call, Llama's
    attention). Run before any model is measured, so that no model's first generate() is charged for them."""
    start = time.perf_counter()
    matrix = torch.randn(256, 256, device=device, dtype=dtype)
    torch.mm(matrix, matrix, out=torch.empty_like(matrix))
    heads = torch.randn(1, 12, 256, 64, device=device, dtype=dtype)  # (batch, heads, tokens, head dim): Llama's
    F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)
    sync(device)
    return time.perf_counter() - start


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


def random_prompt(vocab_size: int, context: int, batch: int, device: torch.device) -> torch.Tensor:
    """The `(batch, context)` prompt of this shape: the same in every process and for every model."""
    generator = torch.Generator().manual_seed(context + batch)
    return torch.randint(3, vocab_size, (batch, context), generator=generator).to(device)


def first_and_warm_generate(model, prompt: torch.Tensor, device: torch.device, **settings) -> dict[str, float]:
    """Seconds of the first generate(3) at the prompt's shape (first_generate_s), of a second one (warm_generate_s)
    and their difference (one_time_s): the first pays the one-time costs (Triton kernels compile for new row
    lengths: the prompt's blocks and the first re-routing; the decode graph's capture, torch.compile where asked;
    per-shape set-up), the second does not."""
    # [0]: each output (and the cache in it) is dropped before the next generate() allocates its own; Llama's static
    # cache at 128k and batch 8 is 26 GB, and two of them at once ran an H100 out of memory.
    first = timed_generate(model, prompt, ONE_TIME_TOKENS, device, **settings)[0]
    warm = timed_generate(model, prompt, ONE_TIME_TOKENS, device, **settings)[0]
    return dict(first_generate_s=first, warm_generate_s=warm, one_time_s=first - warm)


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
    prompt = random_prompt(model.config.vocab_size, context, batch, device)
    with torch.no_grad():
        one_time = first_and_warm_generate(model, prompt, device, **settings)
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
        **one_time,
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


# The benchmarked models, in the order of the rows; build_models makes them.
MODEL_NAMES = ("colt5", "colt5 compiled", "colt5 eager", "llama", "llama static")
# --first-generate's models unless --only names others: CoLT5's default decoding and Llama's fastest.
FIRST_GENERATE_MODELS = ("colt5", "llama static")
# Starts a --first-generate child's result line, so that the parent finds it whatever else reaches the child's stdout.
CHILD_RESULT = "first-generate result: "
# The columns of --first-generate's table.
FIRST_GENERATE_COLUMNS = ("model", "context", "batch", "caches", "process warm-up s", "first generate(3) s",
                          "second generate(3) s", "one-time s")
# Seconds a --first-generate child may take (model building, two generate() calls, compiles with empty caches).
CHILD_TIMEOUT_S = 900


def build_models(
    smoke: bool, device: torch.device, dtype: torch.dtype, names: Sequence[str] = MODEL_NAMES
) -> dict[str, torch.nn.Module]:
    """The benchmarked models `names` (of MODEL_NAMES) by name, in evaluation mode on `device`. Each is built from
    seed 0, so that every process (the --first-generate children too) and every subset has the same weights: the
    three CoLT5 models share theirs, and "llama" and "llama static" are one model (GENERATE_SETTINGS tells them apart)."""
    colt5 = colt5_config(smoke)
    configs = {"colt5": colt5, "colt5 compiled": copy.deepcopy(colt5), "colt5 eager": copy.deepcopy(colt5)}
    configs["colt5 compiled"].compile_decoding = True
    configs["colt5 eager"].cuda_graph_decoding = False
    models, llama = {}, None
    for name in names:
        torch.manual_seed(0)
        if name in configs:
            models[name] = CoLT5ForCausalLM(configs[name])
        else:
            if llama is None:
                llama = LlamaForCausalLM._from_config(llama_config(colt5), attn_implementation="sdpa")
            models[name] = llama
    for model in models.values():
        model.to(device=device, dtype=dtype).eval()
    return models


def run_meta(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """The machine, versions and CoLT5 configuration of a run."""
    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
        colt5_config=colt5_config(smoke).to_diff_dict(),
    )


def write_results(meta: dict, path: str | None, **results: list[dict]) -> None:
    """Prints the run's meta (less the CoLT5 configuration) as a JSON line; writes it and `results` to `path`."""
    print(json.dumps({k: v for k, v in meta.items() if k != "colt5_config"}))
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=meta, **results), f, indent=1)


def first_generate_child(
    name: str, smoke: bool, context: int, batch: int, device: torch.device, dtype: torch.dtype
) -> None:
    """A --first-generate child: the process warm-up, model `name`, its first and a second generate(3) at this shape;
    prints the seconds as one JSON line after CHILD_RESULT."""
    warmup = process_warmup(device, dtype)
    model = build_models(smoke, device, dtype, [name])[name]
    prompt = random_prompt(model.config.vocab_size, context, batch, device)
    with torch.no_grad():
        one_time = first_and_warm_generate(model, prompt, device, **GENERATE_SETTINGS.get(name, {}))
    result = dict(process_warmup_s=warmup, **one_time)
    print(CHILD_RESULT + json.dumps(result), flush=True)


def run_first_generate_child(name: str, context: int, batch: int, smoke: bool, cache_dir: str) -> dict:
    """Runs this script as a --first-generate child in a fresh process whose Triton and Inductor caches are under
    `cache_dir`; its result, or on failure its exit code and the end of its stderr."""
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
    }
    command = [
        sys.executable, os.path.abspath(__file__), "--first-generate-child", name,
        "--contexts", str(context), "--batches", str(batch), *(["--smoke"] if smoke else []),
    ]
    try:
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
        return dict(error=f"no result within {CHILD_TIMEOUT_S} s", stderr_tail="\n".join(stderr.splitlines()[-20:]))
    results = [line[len(CHILD_RESULT):] for line in child.stdout.splitlines() if line.startswith(CHILD_RESULT)]
    if child.returncode != 0 or not results:
        return dict(error=f"exit code {child.returncode}", stderr_tail="\n".join(child.stderr.splitlines()[-20:]))
    return json.loads(results[-1])


def print_first_generate_row(row: dict) -> None:
    """One row of --first-generate's table (FIRST_GENERATE_COLUMNS), or the child's failure."""
    shape = f"{row['model']:<14} {row['context']:>7} {row['batch']:>5} {row['caches']:<6}"
    if "error" in row:
        print(f"{shape} failed: {row['error']}; the end of its stderr:", flush=True)
        for line in row["stderr_tail"].splitlines():
            print(f"#   {line}", flush=True)
        return
    times = (row["process_warmup_s"], row["first_generate_s"], row["warm_generate_s"], row["one_time_s"])
    print(shape + "".join(f" {t:>{len(column)}.3f}" for t, column in zip(times, FIRST_GENERATE_COLUMNS[4:])),
          flush=True)


def first_generate_rows(names: list[str], contexts: list[int], batches: list[int], smoke: bool) -> list[dict]:
    """--first-generate: for each shape and model, the one-time costs of fresh processes, with Triton's and
    Inductor's on-disk caches empty ("cold") and then holding the first process's entries ("warm")."""
    print(f"{FIRST_GENERATE_COLUMNS[0]:<14} {FIRST_GENERATE_COLUMNS[1]:>7} {FIRST_GENERATE_COLUMNS[2]:>5} "
          f"{FIRST_GENERATE_COLUMNS[3]:<6} " + " ".join(FIRST_GENERATE_COLUMNS[4:]), flush=True)
    rows = []
    for context in contexts:
        for batch in batches:
            for name in names:
                # Fresh caches for each shape and model: a cold run finds no kernel that another one compiled.
                cache_dir = tempfile.mkdtemp(prefix="bench_generation_caches_")
                try:
                    for caches in ("cold", "warm"):
                        row = dict(model=name, context=context, batch=batch, caches=caches,
                                   **run_first_generate_child(name, context, batch, smoke, cache_dir))
                        print_first_generate_row(row)
                        rows.append(row)
                finally:
                    shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models, short contexts, CPU is fine")
    parser.add_argument("--only", nargs="+", default=None, help="measure only these models (names as printed)")
    parser.add_argument("--profile", action="store_true", help="print the kernels of each model's decode step")
    parser.add_argument(
        "--first-generate", action="store_true",
        help="instead: the first generate(3)'s one-time costs in fresh processes, with cold and warm on-disk caches",
    )
    parser.add_argument("--first-generate-child", metavar="NAME", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.only or ()) - set(MODEL_NAMES)
    if unknown:
        parser.error(f"--only: no model named {sorted(unknown)}; the models are {list(MODEL_NAMES)}.")
    if args.first_generate and args.profile:
        parser.error("--profile profiles the decode steps of the main benchmark; --first-generate measures one-time "
                     "costs only. Run them separately.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    if args.first_generate_child:
        (context,), (batch,) = args.contexts, args.batches  # one shape a child: its caches are cold only once
        first_generate_child(args.first_generate_child, args.smoke, context, batch, device, dtype)
        return
    if args.first_generate:
        names = [name for name in MODEL_NAMES if name in (args.only or FIRST_GENERATE_MODELS)]
        rows = first_generate_rows(names, args.contexts, args.batches, args.smoke)
        # Only now: the parent creates no CUDA context (GPU memory) while its children run.
        write_results(run_meta(device, dtype, args.smoke), args.json, first_generate=rows)
        return

    warmup = process_warmup(device, dtype)
    meta = dict(**run_meta(device, dtype, args.smoke), process_warmup_s=warmup, new_tokens=args.new_tokens)
    print(f"# {meta['device']}, {meta['dtype']}: process warm-up s {warmup:.3f} (on a GPU the CUDA context, a matmul "
          f"and a causal SDPA call: before any model, charged to none)", flush=True)
    names = [name for name in MODEL_NAMES if not args.only or name in args.only]
    models = build_models(args.smoke, device, dtype, names)
    meta["params_millions"] = {
        name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()
    }

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
                    f"{r['end_to_end_tok_s']:8.1f} | prefill s {r['prefill_s']:.3f} "
                    f"first generate(3) s {r['first_generate_s']:.3f} one-time s {r['one_time_s']:.3f} | "
                    f"first decode s {r['first_decode_s']:.3f} slowest step ms {r['slowest_step_ms']:6.1f} | cache MB {r['cache_mb']:8.1f} | peak GB {r['peak_gb']:.2f}",
                    flush=True,
                )

    write_results(meta, args.json, rows=rows)


if __name__ == "__main__":
    main()
