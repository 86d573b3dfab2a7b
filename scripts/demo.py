"""Main job (until the training script lands): train a small CoLT5 classifier on long synthetic documents.

Each document is up to `--seq-len` tokens of noise with a few signal tokens scattered anywhere in it; the label
says which of two signal vocabularies they come from. Documents have random lengths, so batches are padded and
the padding masks are exercised. The run prints loss and held-out accuracy before and after training, runs a
padded 8k-token forward pass, saves the model (safetensors + remote code) and loads it back through
`AutoModelForSequenceClassification`, checking that the reloaded model gives the same logits.

Runs offline on CPU in a few minutes; uses the GPU when there is one.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from colt5 import CoLT5Config, CoLT5ForSequenceClassification

PAD, NUM_SIGNAL, VOCAB = 0, 4, 256
SIGNAL_TOKENS = (torch.arange(2, 2 + NUM_SIGNAL), torch.arange(2 + NUM_SIGNAL, 2 + 2 * NUM_SIGNAL))
NOISE_START = 2 + 2 * NUM_SIGNAL


def make_batch(batch: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Padded documents `(batch, seq_len)`, their masks and labels."""
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=generator)
    input_ids = torch.randint(NOISE_START, VOCAB, (batch, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    for row in range(batch):
        positions = torch.randperm(int(lengths[row]), generator=generator)[:8]
        signal = SIGNAL_TOKENS[int(labels[row])]
        input_ids[row, positions] = signal[torch.randint(0, NUM_SIGNAL, (8,), generator=generator)]
    attention_mask = torch.arange(seq_len) < lengths.unsqueeze(1)
    input_ids[~attention_mask] = PAD
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> tuple[float, float]:
    model.eval()
    losses, correct, total = [], 0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(**batch)
        losses.append(out.loss.item())
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.train()
    return sum(losses) / len(losses), correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    config = CoLT5Config(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        light_num_heads=2,
        light_head_dim=32,
        heavy_num_heads=4,
        heavy_head_dim=32,
        light_window_size=32,
        light_intermediate_size=128,
        heavy_intermediate_size=512,
        num_labels=2,
        pad_token_id=PAD,
    )
    model = CoLT5ForSequenceClassification(config).to(device)
    print(f"device={device} parameters={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    generator = torch.Generator().manual_seed(args.seed + 1)
    held_out = [make_batch(args.batch_size, args.seq_len, generator) for _ in range(4)]
    loss, accuracy = evaluate(model, held_out, device)
    print(f"before training: eval loss {loss:.4f}  accuracy {accuracy:.3f}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = {key: value.to(device) for key, value in make_batch(args.batch_size, args.seq_len, generator).items()}
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            tokens = step * args.batch_size * args.seq_len
            print(f"step {step:4d}  loss {out.loss.item():.4f}  {tokens / elapsed:,.0f} tokens/s")
    loss, accuracy = evaluate(model, held_out, device)
    print(f"after training:  eval loss {loss:.4f}  accuracy {accuracy:.3f}")

    long_batch = make_batch(2, 8192, generator)
    with torch.no_grad():
        logits = model(**{key: value.to(device) for key, value in long_batch.items()}).logits
    print(f"8k-token padded forward: valid lengths {long_batch['attention_mask'].sum(1).tolist()}, logits finite: "
          f"{bool(torch.isfinite(logits).all())}")

    model.save_pretrained(args.output_dir)
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.output_dir).to(device)
    check = {key: value.to(device) for key, value in held_out[0].items()}
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(**check).logits, reloaded.eval()(**check).logits)
    files = sorted(path.name for path in args.output_dir.iterdir())
    print(f"saved to {args.output_dir}: {', '.join(files)}")
    print(f"reloaded with AutoModelForSequenceClassification: identical logits = {same}")
    if not same:
        raise SystemExit("the reloaded model disagrees with the trained one")


if __name__ == "__main__":
    main()
