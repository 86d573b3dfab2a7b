"""Generation benchmark: CoLT5ForCausalLM vs LlamaForCausalLM (SDPA, DynamicCache) of the same width and depth.

For each context length and batch size, both models get the same random prompt and generate greedily (no early
stop). Measured in one run on one GPU, bf16 weights:
- prefill: time of generate(max_new_tokens=1) (the prompt's forward pass);
- decode tokens/s: batch * (N - 1) / (time of N new tokens - prefill time), i.e. new tokens after the first;
- end-to-end tokens/s: batch * N / time of N new tokens (prefill included);
- cache MB: bytes of every tensor in the cache returned by generate (N new tokens);
- peak GB: torch.cuda.max_memory_allocated during the N-token generate.
Prompts are multiples of the CoLT5 block size, so the first decoded token re-routes the memory: the decode time
includes one re-routing per layer.

Usage: python scripts/bench_generation.py [--contexts 4096 16384 32768] [--batches 1 8] [--new-tokens 128]
       [--json results/x.json]      (--smoke: tiny models on CPU, to check the script runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import fields, is_dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

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
    """Bytes of every tensor a cache holds (CoLT5Cache layer states or DynamicCache keys/values)."""
    total = 0
    for layer in cache.layers:
        state = getattr(layer, "state", None)
        if is_dataclass(state):
            tensors = [getattr(state, f.name) for f in fields(state)]
        else:
            tensors = [layer.keys, layer.values]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, prompt, new_tokens: int, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=0,
    )
    sync(device)
    return time.perf_counter() - start, out


def measure(model, context: int, batch: int, new_tokens: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(context + batch)
    prompt = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
    with torch.no_grad():
        timed_generate(model, prompt[:, : min(context, 256)], 4, device)  # warm-up
        prefill, _ = timed_generate(model, prompt, 1, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total, out = timed_generate(model, prompt, new_tokens, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(
        prefill_s=prefill,
        total_s=total,
        decode_tok_s=batch * (new_tokens - 1) / max(total - prefill, 1e-9),
        end_to_end_tok_s=batch * new_tokens / total,
        cache_mb=cache_bytes(out[CACHE_NAME]) / 2**20,
        peak_gb=peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models, short contexts, CPU is fine")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    colt5 = colt5_config(args.smoke)
    models = {
        "colt5": CoLT5ForCausalLM(colt5),
        "llama": LlamaForCausalLM._from_config(llama_config(colt5), attn_implementation="sdpa"),
    }
    for model in models.values():
        model.to(device=device, dtype=dtype).eval()
    params = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()}

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            result = {name: measure(model, context, batch, args.new_tokens, device) for name, model in models.items()}
            rows.append(dict(context=context, batch=batch, **result))
            c, l = result["colt5"], result["llama"]
            print(
                f"context {context:>6} batch {batch}: decode tok/s colt5 {c['decode_tok_s']:8.1f} llama "
                f"{l['decode_tok_s']:8.1f} ({c['decode_tok_s'] / l['decode_tok_s']:.2f}x) | end-to-end tok/s "
                f"{c['end_to_end_tok_s']:8.1f} vs {l['end_to_end_tok_s']:8.1f} "
                f"({c['end_to_end_tok_s'] / l['end_to_end_tok_s']:.2f}x) | prefill s {c['prefill_s']:.3f} vs "
                f"{l['prefill_s']:.3f} | cache MB {c['cache_mb']:8.1f} vs {l['cache_mb']:8.1f} "
                f"({c['cache_mb'] / l['cache_mb']:.3f}x) | peak GB {c['peak_gb']:.2f} vs {l['peak_gb']:.2f}",
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
