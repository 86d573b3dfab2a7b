"""GPU smoke check of CoLT5Model (no targets; the benchmarks come with the performance issue).

1. CUDA float32 equals the CPU float64 reference on a small padded batch (relative error).
2. bf16 autocast forward + backward of a 2-layer CoLT5Model (hidden 256, paper routing fractions) at 16k, 64k and
   128k tokens: finite outputs and gradients, time and peak memory.

Usage: python scripts/gpu_check.py
"""

import time

import torch
import transformers

from colt5 import CoLT5Config, CoLT5Model


def small_config(**overrides) -> CoLT5Config:
    sizes = dict(vocab_size=384, hidden_size=256, num_hidden_layers=2, light_intermediate_size=128,
                 heavy_intermediate_size=1024)
    return CoLT5Config(**{**sizes, **overrides})


def cuda_matches_cpu() -> float:
    torch.manual_seed(0)
    model = CoLT5Model(small_config()).double().eval()
    input_ids = torch.randint(3, 384, (2, 3000))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 2100:] = 0
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask).last_hidden_state
        model = model.float().cuda()
        out = model(input_ids.cuda(), attention_mask=attention_mask.cuda()).last_hidden_state.double().cpu()
    valid = attention_mask.bool()
    return ((out - reference)[valid].norm() / reference[valid].norm()).item()


def train_step(length: int) -> tuple[float, float, bool]:
    torch.manual_seed(0)
    model = CoLT5Model(small_config()).cuda()
    input_ids = torch.randint(3, 384, (1, length), device="cuda")
    attention_mask = torch.ones_like(input_ids)

    def step() -> bool:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(input_ids, attention_mask=attention_mask).last_hidden_state
        hidden.float().pow(2).mean().backward()
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        return bool(torch.isfinite(hidden).all()) and grads_finite

    finite = step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(3):
        finite &= step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 3 * 1e3, torch.cuda.max_memory_allocated() / 2**30, finite


def main() -> None:
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} transformers={transformers.__version__}")
    print(f"cuda fp32 vs cpu fp64, relative error on valid positions: {cuda_matches_cpu():.2e}")
    print(f"{'tokens':>8} {'fwd+bwd ms':>11} {'peak GiB':>9} {'finite':>7}")
    for length in (16384, 65536, 131072):
        ms, gib, finite = train_step(length)
        print(f"{length:>8} {ms:>11.1f} {gib:>9.2f} {str(finite):>7}")


if __name__ == "__main__":
    main()
