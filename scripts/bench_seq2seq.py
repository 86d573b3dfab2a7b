"""Encoder-decoder benchmark: CoLT5ForConditionalGeneration vs LongT5ForConditionalGeneration (transformers' own,
transient-global attention) of the same width, depth, heads and vocabulary, in one run on one GPU.

For each input length (random byte tokens):
- training step: forward, backward and AdamW step with bf16 autocast (fp32 weights, as Trainer's --bf16 does) on
  --step-tokens input tokens (a batch of step_tokens / length samples, at least one), each with a 128-token target;
  tokens/s counts input and target tokens; peak GB is torch.cuda.max_memory_allocated during a step, above the
  weights and optimizer state held before it. A model that runs out of memory is measured again with activation
  (gradient) checkpointing, as its users would train it, and marked so;
- generation: generate() in bf16 weights, greedy, exactly --new-tokens new tokens (no early stop), the encoder
  included, for one input and for a batch of --generate-tokens / length inputs; tokens/s counts the input tokens
  (documents read per second). With one input both decoders are bound by the host's kernel launches (see "host"),
  so the batch shows the models' own costs.
Where the time goes: "host ms" is how long the Python call took to return before waiting for the GPU (kernels
launched); when it is close to the step's time, the GPU waited on the host.

Sizes follow the paper's ratios to LongT5 (section 3): LongT5 width 512, 8 heads of 64, gated MLP 1024, local radius
127 and global blocks of 16; CoLT5's encoder has 2 light and 6 heavy heads, a light MLP of 512 and a heavy one of
4096, 1/16 of tokens routed to the heavy MLP and as heavy queries, 1/8 as keys/values, a local window of 127 on each
side; its decoder has 8 heads of 64 with multi-query cross attention and an MLP of 1024.

Usage: python scripts/bench_seq2seq.py [--lengths 16384 32768 65536] [--layers 6] [--new-tokens 64]
       [--json results/x.json]      (--smoke: tiny models and lengths on CPU, to check the script runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers import LongT5Config, LongT5ForConditionalGeneration

from colt5 import CoLT5Config, CoLT5ForConditionalGeneration

VOCAB = 384  # ByT5's byte vocabulary
TARGET_TOKENS = 128


def model_configs(layers: int, smoke: bool) -> tuple[CoLT5Config, LongT5Config]:
    width, heads, head_dim, mlp = (64, 4, 16, 128) if smoke else (512, 8, 64, 1024)
    colt5 = CoLT5Config(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers, num_decoder_layers=layers,
        light_num_heads=heads // 4, light_head_dim=head_dim, heavy_num_heads=heads - heads // 4,
        heavy_head_dim=head_dim, light_window_size=15 if smoke else 127, light_intermediate_size=mlp // 2,
        heavy_intermediate_size=4 * mlp, decoder_num_heads=heads, decoder_head_dim=head_dim,
        decoder_intermediate_size=mlp, is_encoder_decoder=True, max_position_embeddings=65536,
    )
    longt5 = LongT5Config(
        vocab_size=VOCAB, d_model=width, d_kv=head_dim, d_ff=mlp, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, encoder_attention_type="transient-global", local_radius=15 if smoke else 127,
        global_block_size=16, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return colt5, longt5


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds per call, median seconds until the call returned to the host), after one warm-up call."""
    call()
    sync()
    totals, hosts = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        hosts.append(time.perf_counter() - start)
        sync()
        totals.append(time.perf_counter() - start)
    return statistics.median(totals), statistics.median(hosts)


def peak_gb(call: Callable[[], object]) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure_training(model, n: int, batch: int, device: torch.device, repeats: int) -> dict:
    model.to(device=device, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(n)
    ids = torch.randint(3, VOCAB, (batch, n), generator=generator).to(device)
    labels = torch.randint(3, VOCAB, (batch, TARGET_TOKENS), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = dict(batch=batch, checkpointing=False)
    for checkpointing in (False, True):
        # The retry runs outside the except block: the exception's frames hold the failed step's activations.
        if checkpointing:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            model.gradient_checkpointing_enable()
        try:
            seconds, host = timed(step, repeats)
            result.pop("error", None)
            result.update(checkpointing=checkpointing, step_ms=seconds * 1e3, host_ms=host * 1e3,
                          tokens_per_s=batch * (n + TARGET_TOKENS) / seconds, peak_gb=peak_gb(step))
            break
        except torch.OutOfMemoryError:
            result.update(checkpointing=checkpointing, error="out of memory")
    if checkpointing:
        model.gradient_checkpointing_disable()
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def measure_generation(model, n: int, batch: int, new_tokens: int, device: torch.device, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype).eval()
    ids = torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(n + 1)).to(device)

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, num_beams=1)

    try:
        seconds, host = timed(generate, repeats)
        result = dict(batch=batch, generate_s=seconds, host_s=host, input_tokens_per_s=batch * n / seconds,
                      peak_gb=peak_gb(generate))
    except torch.OutOfMemoryError:
        result = dict(batch=batch, error="out of memory")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def ratio(ours: dict, theirs: dict, key: str, invert: bool = False) -> str:
    if key not in ours or key not in theirs:
        return "n/a"
    value = theirs[key] / ours[key] if invert else ours[key] / theirs[key]
    return f"{value:.2f}x"


def cell(result: dict, key: str, fmt: str) -> str:
    if "error" in result:
        return result["error"]
    return format(result[key], fmt) + (" (checkpointed)" if result.get("checkpointing") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--layers", type=int, default=6, help="encoder layers, and as many decoder layers")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--step-tokens", type=int, default=65536, help="input tokens per training step")
    parser.add_argument("--generate-tokens", type=int, default=131072, help="input tokens of the batched generate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models and lengths, CPU is fine")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    colt5_config, longt5_config = model_configs(args.layers, args.smoke)
    models = {
        "colt5": CoLT5ForConditionalGeneration(colt5_config),
        "longt5": LongT5ForConditionalGeneration(longt5_config),
    }
    params = {name: model.num_parameters() / 1e6 for name, model in models.items()}
    print(f"parameters (M): {params}; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, params_millions=params,
        new_tokens=args.new_tokens, target_tokens=TARGET_TOKENS, step_tokens=args.step_tokens,
        generate_tokens=args.generate_tokens, layers=args.layers,
        colt5_config=colt5_config.to_diff_dict(), longt5_config=longt5_config.to_diff_dict(),
    )
    rows = []
    for n in args.lengths:
        batch, generate_batch = max(1, args.step_tokens // n), max(1, args.generate_tokens // n)
        row = dict(input_tokens=n, train_batch=batch, generate_batch=generate_batch)
        for name, model in models.items():
            row[name] = dict(
                train=measure_training(model, n, batch, device, args.repeats),
                generate=measure_generation(model, n, 1, args.new_tokens, device, args.repeats),
                generate_batched=measure_generation(model, n, generate_batch, args.new_tokens, device, args.repeats),
            )
        rows.append(row)
        c, t = row["colt5"], row["longt5"]
        print(
            f"input {n:>6} | train (batch {batch}) tok/s colt5 {cell(c['train'], 'tokens_per_s', ',.0f')} longt5 "
            f"{cell(t['train'], 'tokens_per_s', ',.0f')} ({ratio(c['train'], t['train'], 'tokens_per_s')}), step ms "
            f"{cell(c['train'], 'step_ms', '.0f')} (host {cell(c['train'], 'host_ms', '.0f')}) vs "
            f"{cell(t['train'], 'step_ms', '.0f')} (host {cell(t['train'], 'host_ms', '.0f')}), peak GB "
            f"{cell(c['train'], 'peak_gb', '.2f')} vs {cell(t['train'], 'peak_gb', '.2f')} | generate "
            f"{args.new_tokens} s {cell(c['generate'], 'generate_s', '.3f')} (host {cell(c['generate'], 'host_s', '.3f')})"
            f" vs {cell(t['generate'], 'generate_s', '.3f')} (host {cell(t['generate'], 'host_s', '.3f')}) "
            f"({ratio(c['generate'], t['generate'], 'generate_s', invert=True)} faster), peak GB "
            f"{cell(c['generate'], 'peak_gb', '.2f')} vs {cell(t['generate'], 'peak_gb', '.2f')} | generate batch "
            f"{generate_batch} s {cell(c['generate_batched'], 'generate_s', '.3f')} vs "
            f"{cell(t['generate_batched'], 'generate_s', '.3f')} "
            f"({ratio(c['generate_batched'], t['generate_batched'], 'generate_s', invert=True)} faster), peak GB "
            f"{cell(c['generate_batched'], 'peak_gb', '.2f')} vs {cell(t['generate_batched'], 'peak_gb', '.2f')}",
            flush=True,
        )
        if args.json:  # after every length, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
