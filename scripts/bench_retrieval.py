"""Retrieval benchmark: does CoLT5's routing carry information across long distances? In one GPU call.

Task: passkey retrieval (`colt5.retrieval_eval`, the test of Mohtashami & Jaggi 2023): a pass key is stated once in
a long run of filler sentences and asked for at the end, byte-level (ByT5 tokens). The answer lies up to the whole
context back, far outside CoLT5's light window (127 tokens): only the heavy (routed) branch can bring it. By default
the key is one symbol out of 100 of ByT5's sentinel tokens, which appear nowhere else (chance: 1%); `--alphabet
digits --key-length 5` is the standard 5-digit key, which the dense model did not learn beyond 1k tokens within
this budget (its byte-level copy meets a look-alike in every filler sentence: "The sky is" / "The pass key is").

Models, trained from scratch in the same run on the same examples (same seed), bf16 autocast, AdamW:
- causal (default): LlamaForCausalLM (dense SDPA attention), CoLT5ForCausalLM, CoLT5 with random_routing=True
  (routers score at random: the control for learned routing) and CoLT5 with the heavy attention switched off
  (light only: nothing reaches past the window). The loss is the answer's tokens given the prompt.
- encoder (--task encoder): BertModel (dense bidirectional SDPA) and CoLT5Model (with the same two controls), each
  with a linear head over the last hidden states. The answer's tokens are replaced by mask tokens, one per answer
  position (ByT5's sentinels), and the head predicts them.
Sizes: width 256, 4 layers, rotary base --rope-theta (Llama and CoLT5); Llama/Bert 4 heads of 64 and a 4x MLP;
CoLT5 2 light and 4 heavy heads of 64, light MLP 128 and heavy MLP 1024, window 127, 1/16 of tokens to the heavy MLP,
heavy queries as CoLT5Config's default (causal: every token; encoder: 1/16); --colt5-config changes any of it;
causal: a memory of max_length / 8 keys/values per block of min(max_length / 8, 1024) tokens; encoder: 1/8 as
keys/values.

Curriculum (the same for every model): context lengths are powers of two from --min-length to --max-length; over
the first --ramp of the steps the longest allowed length doubles stage by stage, and each step takes the longest
allowed length with probability 1/2, else one of the shorter ones; a step holds --step-tokens tokens (a batch of
step_tokens / length examples, at least one); needle depths are uniform. Learning rate: linear warm-up over the first
5% of steps, then cosine decay to 0.

Evaluation: --trials fresh pass keys at each of --eval-lengths and needle depths 0, 0.25, 0.5, 0.75, 1; an example
counts when every answer token is the argmax (causal: what greedy decoding would write). Reported per length and
depth with the mean distance from the needle to the answer, with training time, throughput, peak memory (training
and evaluation) and the last training loss; for causal CoLT5 models also, per layer, how often the position that
reads the key was a heavy query and its routed memory held the key (`routing_report`). Writes the tables (stdout),
--json (after each model, so a cut-short run keeps what it measured) and --plot.

Usage: python scripts/bench_retrieval.py [--task causal|encoder] [--steps 1200] [--max-length 16384]
       [--eval-lengths 4096 8192 16384] [--json results/x.json] [--plot results/x.png]
       (--smoke: tiny models and lengths on CPU, to check the script runs)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import random
import time

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import BertConfig, BertModel, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from colt5 import CoLT5Config, CoLT5ForCausalLM, CoLT5Model
from colt5.causal_attention import CausalRoutedAttention
from colt5.causal_router import route_block_memory
from colt5.retrieval_eval import PasskeyExample, PasskeyPrompts, evaluate, passkey_correct
from colt5.routed_attention import ConditionalRoutedAttention
from colt5.train import causal_memory_and_block, parse_config_overrides

EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# ByT5's sentinel tokens <extra_id_0>, <extra_id_1>, ...: the encoder's mask token for answer position i.
SENTINEL = "<extra_id_{}>"
# --alphabet sentinels: keys of one-token symbols that appear nowhere else (the masks use the first ten).
KEY_SENTINELS = tuple(SENTINEL.format(i) for i in range(10, 110))


# ------------------------------------------------------------------------------------------------ models
class LightOnlyAttention(nn.Module):
    """A CoLT5 attention layer with its heavy (routed) branch switched off: the light branch's local attention alone,
    so nothing reaches further than the light window. The ablation that shows what the heavy branch carries."""

    def __init__(self, attention: CausalRoutedAttention | ConditionalRoutedAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor, cache=None, **amounts):
        """The light branch's output for the causal layer's `(x, mask, position_ids, cache)` call (without a cache:
        training and evaluation only) or the encoder layer's (whose heavy amounts have nothing to set)."""
        if cache is not None:
            raise ValueError("The light-only control is for training and evaluation: it keeps no decode cache.")
        if isinstance(self.attention, CausalRoutedAttention):
            return self.attention._light_full(x, mask, position_ids)[0]
        return self.attention._light(x, mask, position_ids)


class EncoderWithHead(nn.Module):
    """An encoder and a linear head that predicts the tokens at the last `answer_length` positions."""

    def __init__(self, encoder: nn.Module, width: int, vocab: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, answer_length: int) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        return self.head(hidden[:, -answer_length:])


def build_models(
    task: str, max_length: int, vocab: int, smoke: bool, rope_theta: float = 10000.0, colt5_overrides: dict | None = None
) -> dict[str, nn.Module]:
    """The four models of `task`, freshly initialised (torch's default generator, seeded by the caller);
    `colt5_overrides` are CoLT5Config fields set in every CoLT5 model."""
    width, layers, head_dim = (64, 2, 16) if smoke else (256, 4, 64)
    window = 15 if smoke else 127
    memory, block = causal_memory_and_block(max_length)
    causal = task == "causal"
    colt5 = dict(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        light_num_heads=2,
        light_head_dim=head_dim,
        heavy_num_heads=4,
        heavy_head_dim=head_dim,
        light_window_size=window,
        light_intermediate_size=width // 2,
        heavy_intermediate_size=4 * width,
        routed_ff_tokens=1 / 16,
        routed_kv_tokens=memory if causal else 1 / 8,
        causal_block_size=block,
        max_position_embeddings=max_length,
        is_causal=causal,
        use_cache=False,
        rope_theta=rope_theta,
    )
    colt5.update(colt5_overrides or {})
    dense = dict(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // head_dim,
        intermediate_size=4 * width,
        max_position_embeddings=max_length,
        pad_token_id=0,
    )
    models = {}
    if causal:
        llama = LlamaConfig(**dense, num_key_value_heads=width // head_dim, tie_word_embeddings=True, eos_token_id=1,
                            bos_token_id=None, use_cache=False, rope_parameters=dict(rope_type="default",
                                                                                    rope_theta=rope_theta))
        models["llama"] = LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")
        make = lambda **extra: CoLT5ForCausalLM(CoLT5Config(**colt5, **extra))  # noqa: E731
    else:
        models["bert"] = EncoderWithHead(
            BertModel._from_config(BertConfig(**dense), attn_implementation="sdpa", add_pooling_layer=False),
            width, vocab,
        )
        make = lambda **extra: EncoderWithHead(CoLT5Model(CoLT5Config(**colt5, **extra)), width, vocab)  # noqa: E731
    models["colt5"] = make()
    models["colt5 random routing"] = make(random_routing=True)
    # Its feedforward routers on raw scores: prefix-standardised ones would let each token's routing depend on the
    # scores of the whole prefix, an information path beyond the light windows that this control must not have.
    light_only = make(causal_router_prefix_normalization=False) if causal else make()
    backbone = light_only.model if causal else light_only.encoder
    for layer in backbone.layers:
        layer.attention = LightOnlyAttention(layer.attention)
    models["colt5 light only"] = light_only
    return models


# ------------------------------------------------------------------------------------------------ data
def curriculum(steps: int, min_length: int, max_length: int, ramp: float, step_tokens: int, seed: int):
    """`(length, batch)` of every step (see the module docstring)."""
    lengths = [min_length]
    while lengths[-1] < max_length:
        lengths.append(min(2 * lengths[-1], max_length))
    rng = random.Random(seed)
    plan = []
    for step in range(steps):
        stage = min(len(lengths) - 1, int(step / max(1.0, ramp * steps) * len(lengths)))
        index = stage if stage == 0 or rng.random() < 0.5 else rng.randrange(stage)
        plan.append((lengths[index], max(1, step_tokens // lengths[index])))
    return plan


def step_examples(prompts: PasskeyPrompts, length: int, batch: int, seed: int) -> list[PasskeyExample]:
    rng = random.Random(seed)
    return [prompts.example(length, rng.random(), rng) for _ in range(batch)]


def masked(examples: list[PasskeyExample], sentinels: list[int]) -> torch.Tensor:
    """The encoder's input: each example with its answer's tokens replaced by the sentinels."""
    rows = [example.input_ids[: -example.answer_length] + sentinels[: example.answer_length] for example in examples]
    return torch.tensor(rows)


def answers(examples: list[PasskeyExample]) -> torch.Tensor:
    return torch.tensor([example.input_ids[-example.answer_length :] for example in examples])


# ------------------------------------------------------------------------------------------------ train, evaluate
def answer_logits(model: nn.Module, task: str, examples, sentinels, device: torch.device) -> torch.Tensor:
    """`(batch, answer_length, vocab)` logits of the answer's tokens of examples of one length."""
    answer_length = examples[0].answer_length
    if task == "causal":
        ids = torch.tensor([example.input_ids for example in examples], device=device)
        # Position i predicts token i + 1, so the prompt's last position predicts the answer's first token.
        return model(input_ids=ids[:, :-1], logits_to_keep=answer_length).logits
    return model(masked(examples, sentinels).to(device), answer_length)


def train(model: nn.Module, task: str, prompts, plan, args, device, sentinels) -> dict:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    warmup = max(1, len(plan) // 20)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, tokens, start = [], 0, time.perf_counter()
    for step, (length, batch) in enumerate(plan):
        progress = max(0.0, (step - warmup) / max(1, len(plan) - warmup))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        examples = step_examples(prompts, length, batch, args.seed * 1_000_003 + step)
        with autocast:
            logits = answer_logits(model, task, examples, sentinels, device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), answers(examples).to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += length * batch
        if step % max(1, len(plan) // 20) == 0 or step == len(plan) - 1:
            losses.append((step, length, round(loss.item(), 4)))
            print(f"  step {step:5d}  length {length:6d}  loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(train_s=round(seconds, 1), tokens_per_s=round(tokens / seconds), losses=losses)


def scorer(task: str, sentinels: list[int], eval_tokens: int, device: torch.device):
    """`retrieval_eval.evaluate`'s `score` for this benchmark: batches of `eval_tokens` tokens, bf16 autocast on
    GPUs; causal models as `passkey_correct` judges them, encoders by the argmax at each masked answer position."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def score(model: nn.Module, examples: list[PasskeyExample], batch_size: int) -> list[bool]:
        batch = max(1, eval_tokens // len(examples[0].input_ids))  # instead of evaluate's batch_size
        with autocast:
            if task == "causal":
                return passkey_correct(model, examples, batch)
            correct = []
            for first in range(0, len(examples), batch):
                chunk = examples[first : first + batch]
                predicted = answer_logits(model, task, chunk, sentinels, device).argmax(-1).cpu()
                correct += (predicted == answers(chunk)).all(-1).tolist()
            return correct

    return score


@torch.no_grad()
def routing_report(model: nn.Module, prompts: PasskeyPrompts, lengths: list[int], eval_tokens: int, seed: int,
                   device: torch.device) -> list[dict] | None:
    """Where a causal CoLT5 model's routing stands at the token that must read the key (None for other models).

    For 2 examples per needle depth at each length and for each layer: the share of examples whose position that
    predicts the answer's last token (the key) was a heavy query, and the share whose routed memory at that position
    (any routing set) held one of the needle's copies of the key (the only tokens before the answer equal to it).
    Routing is recomputed from each layer's input (with random_routing: a fresh draw, as likely as the forward's)."""
    if not isinstance(model, CoLT5ForCausalLM):
        return None
    layers = [layer.attention for layer in model.model.layers if isinstance(layer.attention, CausalRoutedAttention)]
    if not layers:
        return None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rng, report = random.Random(seed), []
    for length in lengths:
        examples = [prompts.example(length, depth, rng) for depth in EVAL_DEPTHS for _ in range(2)]
        routed, in_memory = [[] for _ in layers], [[] for _ in layers]
        batch = max(1, eval_tokens // length)
        for first in range(0, len(examples), batch):
            chunk = examples[first : first + batch]
            ids = torch.tensor([example.input_ids[:-1] for example in chunk], device=device)
            inputs = []
            hooks = [attention.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
                     for attention in layers]
            with autocast:
                model(input_ids=ids, logits_to_keep=1)
            for hook in hooks:
                hook.remove()
            position = ids.shape[1] - 1
            key = torch.tensor([example.input_ids[-1] for example in chunk], device=device)
            copies = ids == key[:, None]  # (batch, n): the needle's copies of the key
            valid = torch.ones_like(ids, dtype=torch.bool)
            for index, (attention, x) in enumerate(zip(layers, inputs)):
                with autocast:
                    gate = attention._gate(x, valid, None)
                    memory = route_block_memory(attention.kv_router.scores(x), valid, attention.block_size,
                                                attention.memory_size, **attention.memory_route_kwargs)
                block = position // attention.block_size
                indices, filled = memory.indices[:, block], memory.mask[:, block]  # (batch, sets, memory)
                held = copies.gather(1, indices.flatten(1)).view_as(indices) & filled
                routed[index] += gate.routed[:, position].tolist()
                in_memory[index] += held.flatten(1).any(-1).tolist()
        for index in range(len(layers)):
            report.append(dict(length=length, layer=index, examples=len(examples),
                               answer_routed=sum(routed[index]) / len(examples),
                               key_in_memory=sum(in_memory[index]) / len(examples)))
    return report


# ------------------------------------------------------------------------------------------------ report
def table(results: dict[str, dict], eval_lengths: list[int]) -> str:
    """Each model's accuracy per context length (the mean over needle depths), training time, throughput, peak
    memory and last training loss."""
    lines = [
        "| model | " + " | ".join(f"{length:,} tokens" for length in eval_lengths)
        + " | train s | tokens/s | peak GB | last loss |",
        "|---" * (len(eval_lengths) + 5) + "|",
    ]
    for name, result in results.items():
        per_length = []
        for length in eval_lengths:
            rows = [row for row in result["rows"] if row["length"] == length]
            per_length.append(f"{sum(row['accuracy'] for row in rows) / len(rows):.0%}")
        lines.append(
            f"| {name} | " + " | ".join(per_length) + f" | {result['train_s']} | {result['tokens_per_s']:,} | "
            f"{result.get('peak_gb', '-')} | {result['losses'][-1][2]} |"
        )
    return "\n".join(lines)


def depth_tables(results: dict[str, dict]) -> str:
    """Per model: accuracy by context length and needle depth, with the mean distance from needle to answer."""
    out = []
    for name, result in results.items():
        out.append(f"{name}: accuracy (mean distance in tokens from the needle to the answer)")
        out.append("| context | " + " | ".join(f"depth {depth:g}" for depth in EVAL_DEPTHS) + " |")
        out.append("|---" * (len(EVAL_DEPTHS) + 1) + "|")
        for length in sorted({row["length"] for row in result["rows"]}):
            cells = [
                f"{row['accuracy']:.0%} ({round(sum(row['distances']) / len(row['distances'])):,})"
                for row in result["rows"]
                if row["length"] == length
            ]
            out.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def routing_tables(results: dict[str, dict]) -> str:
    """Per causal CoLT5 model: by context length and layer, the share of examples whose key-reading position was a
    heavy query and whose memory there held the key (see `routing_report`)."""
    out = []
    for name, result in results.items():
        if not result.get("routing"):
            continue
        out.append(f"{name}: routing at the position that reads the key (share of examples)")
        out.append("| context | layer | heavy query | key in memory |")
        out.append("|---|---|---|---|")
        for row in result["routing"]:
            out.append(f"| {row['length']:,} | {row['layer']} | {row['answer_routed']:.0%} | {row['key_in_memory']:.0%} |")
    return "\n".join(out)


def plot(results: dict[str, dict], header: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["length"] for result in results.values() for row in result["rows"]})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        for name, result in results.items():
            rows = [row for row in result["rows"] if row["length"] == length]
            distance = [sum(row["distances"]) / len(row["distances"]) for row in rows]
            axis.plot(distance, [row["accuracy"] for row in rows], marker="o", label=name)
        axis.set(title=f"context {length:,} tokens", xlabel="distance needle -> answer (tokens)", ylabel="accuracy",
                 ylim=(-0.05, 1.05))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(header, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["causal", "encoder"], default="causal")
    parser.add_argument("--models", nargs="+", default=None, help="train only these (default: all four)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--ramp", type=float, default=0.7, help="share of the steps over which the length grows")
    parser.add_argument("--step-tokens", type=int, default=65536)
    parser.add_argument("--key-length", type=int, default=1, help="symbols in a pass key")
    parser.add_argument("--alphabet", choices=["digits", "sentinels"], default="sentinels",
                        help="key symbols: digits, or 100 of ByT5's sentinel tokens (one token each, unlike any filler)")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--eval-tokens", type=int, default=131072, help="tokens per evaluation forward pass")
    parser.add_argument("--trials", type=int, default=20, help="pass keys per eval length and depth")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="rotary base of every model")
    parser.add_argument("--colt5-config", action="append", default=[], metavar="KEY=VALUE",
                        help="set a CoLT5Config field in every CoLT5 model (repeatable), e.g. routed_query_tokens=0.25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny models and lengths on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.min_length, args.max_length, args.step_tokens = 6, 256, 512, 1024
        args.eval_lengths, args.trials, args.eval_tokens = [512], 2, 1024

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    tokenizer = ByT5Tokenizer()
    alphabet = tuple("0123456789") if args.alphabet == "digits" else KEY_SENTINELS
    prompts = PasskeyPrompts(tokenizer, key_length=args.key_length, alphabet=alphabet)
    if args.min_length < prompts.min_length:
        parser.error(f"--min-length must be >= {prompts.min_length} (the shortest passkey prompt).")
    answer_length = len(tokenizer(" " + alphabet[0] * args.key_length, add_special_tokens=False)["input_ids"])
    sentinels = tokenizer.convert_tokens_to_ids([SENTINEL.format(i) for i in range(answer_length)])
    plan = curriculum(args.steps, args.min_length, args.max_length, args.ramp, args.step_tokens, args.seed)

    overrides = parse_config_overrides(args.colt5_config)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"bench_retrieval --task {args.task}: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}"
        f", triton {importlib.metadata.version('triton') if device.type == 'cuda' else '-'}; {args.steps} steps of "
        f"{args.step_tokens:,} tokens, lengths {args.min_length:,}-{args.max_length:,}, lr {args.lr}, "
        f"keys of {args.key_length} {args.alphabet}, rope_theta {args.rope_theta:g}, {args.trials} trials per cell"
        + (f", CoLT5 {overrides}" if overrides else "")
    )
    print(header, flush=True)
    torch.manual_seed(args.seed)
    models = build_models(args.task, args.max_length, len(tokenizer), args.smoke, args.rope_theta, overrides)
    names = args.models or list(models)
    unknown = sorted(set(names) - set(models))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(models)}.")

    results: dict[str, dict] = {}
    for name in names:
        model = models.pop(name)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        print(f"{name}: {parameters / 1e6:.2f}M parameters", flush=True)
        result = dict(params_m=round(parameters / 1e6, 2))
        result.update(train(model, args.task, prompts, plan, args, device, sentinels))
        # The same evaluation examples for every model.
        result["rows"] = evaluate(model.eval(), prompts, args.eval_lengths, EVAL_DEPTHS, args.trials,
                                  seed=args.seed + 12345, score=scorer(args.task, sentinels, args.eval_tokens, device))
        routing = routing_report(model, prompts, args.eval_lengths, args.eval_tokens, args.seed + 54321, device)
        if routing is not None:
            result["routing"] = routing
        if device.type == "cuda":
            result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        results[name] = result
        model.to("meta")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(table({name: result}, args.eval_lengths), flush=True)
        if args.json:
            with open(args.json, "w") as file:
                json.dump(dict(header=header, args=vars(args), results=results), file, indent=1)

    print("\n" + header)
    print(table(results, args.eval_lengths))
    print()
    print(depth_tables(results))
    if any(result.get("routing") for result in results.values()):
        print()
        print(routing_tables(results))
    if args.plot:
        plot(results, header, args.plot)


if __name__ == "__main__":
    main()
