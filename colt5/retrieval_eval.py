# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Passkey retrieval: can a causal language model find a number hidden far back in its context?

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), which long-context papers report: a pass key of random
digits is stated once, somewhere in a long run of irrelevant filler text, and the prompt ends by asking for it. The
model passes an example when greedy decoding continues the prompt with exactly the pass key's tokens. With
`--haystack FILE` the filler is that file's text instead (a needle in a haystack).

Greedy decoding produces the answer's tokens exactly when each of them is the most likely next token given the
prompt and the answer before it, so one teacher-forced forward pass per example decides it: no generation loop, any
`AutoModelForCausalLM`, and the same code scores the retrieval benchmark's models (scripts/bench_retrieval.py).

    colt5-retrieval CHECKPOINT_FOLDER --lengths 4096 16384 65536 --depths 0 0.25 0.5 0.75 1 --trials 10

prints accuracy per context length (rows) and needle depth (columns; 0 = the start of the filler, 1 = right before
the question), and the mean distance in tokens from the needle to the answer.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorise it: "
    "you will be asked for it at the end.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyExample:
    """One prompt with its answer, as token ids.

    Attributes:
        input_ids: the prompt followed by the answer (`len(input_ids)` is the context length).
        answer_length: the answer is the last `answer_length` tokens.
        needle_start: index of the needle's first token.
        key: the pass key's digits.
    """

    input_ids: list[int]
    answer_length: int
    needle_start: int
    key: str

    @property
    def distance(self) -> int:
        """Tokens from the needle's start to the answer's first token: how far back the model has to look."""
        return len(self.input_ids) - self.answer_length - self.needle_start


class PasskeyPrompts:
    """Builds passkey examples of an exact token length for one tokenizer.

    Args:
        tokenizer: the model's tokenizer; the pieces of the prompt are tokenized separately (no special tokens), so
            every example of a length has exactly that many tokens.
        key_length: symbols in a pass key.
        haystack: filler text (repeated as needed, read from a random offset) instead of the grass-and-sky
            sentences.
        alphabet: the symbols a key is drawn from (uniformly, independently): digits by default.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        key_length: int = 5,
        haystack: str | None = None,
        alphabet: Sequence[str] = tuple("0123456789"),
    ):
        if key_length < 1:
            raise ValueError(f"key_length must be >= 1, got {key_length}.")
        if len(alphabet) < 2:
            raise ValueError(f"A pass key needs an alphabet of at least 2 symbols, got {list(alphabet)}.")
        self.tokenizer, self.key_length, self.alphabet = tokenizer, key_length, tuple(alphabet)
        self._intro = self._encode(INTRO)
        self._question = self._encode(QUESTION)
        self._haystack = self._encode(FILLER if haystack is None else haystack)
        self._random_offset = haystack is not None
        if not self._haystack:
            raise ValueError("The haystack text is empty: pass a file with some text in it.")
        # The needle and the answer may differ in length with the key (a tokenizer that merges digits): this is
        # the length with the symbol of the longest encoding repeated, which examples check again.
        widest = max(self.alphabet, key=lambda symbol: len(self._encode(symbol))) * key_length
        self.min_length = len(self._intro) + len(self._needle(widest)) + len(self._question) + len(self._answer(widest))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _needle(self, key: str) -> list[int]:
        return self._encode(NEEDLE.format(key=key))

    def _answer(self, key: str) -> list[int]:
        return self._encode(ANSWER.format(key=key))

    def random_key(self, rng: random.Random) -> str:
        """A pass key of `key_length` symbols drawn from the alphabet."""
        return "".join(rng.choice(self.alphabet) for _ in range(self.key_length))

    def example(self, length: int, depth: float, rng: random.Random) -> PasskeyExample:
        """An example of exactly `length` tokens with the needle at `depth` of the filler (0: right after the
        introduction, 1: right before the question) and a random key drawn from `rng`."""
        if not 0 <= depth <= 1:
            raise ValueError(f"depth must be in [0, 1], got {depth}.")
        key = self.random_key(rng)
        needle, answer = self._needle(key), self._answer(key)
        filler = length - len(self._intro) - len(needle) - len(self._question) - len(answer)
        if filler < 0:
            raise ValueError(
                f"A passkey example with this tokenizer and a {self.key_length}-symbol key needs at least "
                f"{max(self.min_length, length - filler)} tokens; got a length of {length}."
            )
        start = rng.randrange(len(self._haystack)) if self._random_offset else 0
        repeats = (start + filler) // len(self._haystack) + 1
        hay = (self._haystack * repeats)[start : start + filler]
        before = round(depth * filler)
        if not self._random_offset:  # put the needle between two filler sentences
            unit = len(self._haystack)
            before = min(round(before / unit) * unit, filler // unit * unit)
        prefix = self._intro + hay[:before]
        input_ids = prefix + needle + hay[before:] + self._question + answer
        return PasskeyExample(input_ids, len(answer), len(prefix), key)


@torch.no_grad()
def passkey_correct(model: PreTrainedModel, examples: Sequence[PasskeyExample], batch_size: int = 1) -> list[bool]:
    """Whether greedy decoding after each example's prompt produces its answer: one teacher-forced forward pass per
    batch of examples of one length (as `PasskeyPrompts.example` makes them), every answer token the argmax."""
    device = next(model.parameters()).device
    # transformers' causal LMs can compute the logits of the last positions only (those of a 128k-token prompt over
    # a 128k-token vocabulary would take 64 GiB in float32); model code without that argument gives them all.
    keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    results: list[bool] = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        if len({len(example.input_ids) for example in chunk}) > 1:
            raise ValueError("passkey_correct batches examples of one length: build each batch at one length.")
        ids = torch.tensor([example.input_ids for example in chunk], device=device)
        answer = max(example.answer_length for example in chunk)
        # Logits at position i predict token i + 1: the answer's tokens come from the positions just before them.
        keep = {"logits_to_keep": answer} if keeps_last else {}
        predicted = model(input_ids=ids[:, :-1], use_cache=False, **keep).logits[:, -answer:].argmax(-1)
        for row, example in enumerate(chunk):
            want = ids[row, -example.answer_length :]
            results.append(bool((predicted[row, -example.answer_length :] == want).all()))
    return results


def evaluate(
    model: PreTrainedModel,
    prompts: PasskeyPrompts,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    batch_size: int = 1,
    seed: int = 0,
    score: Callable[[PreTrainedModel, list[PasskeyExample], int], list[bool]] = passkey_correct,
) -> list[dict]:
    """Accuracy at every (length, depth): `trials` random keys each, judged by `score(model, examples, batch_size)`
    (default: `passkey_correct`). Returns one row per pair: length, depth, accuracy, the mean distance (tokens from
    the needle to the answer), the number of trials, and each example's distance and result."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            examples = [prompts.example(length, depth, rng) for _ in range(trials)]
            correct = score(model, examples, batch_size)
            distances = [example.distance for example in examples]
            rows.append(
                dict(
                    length=length,
                    depth=depth,
                    accuracy=sum(correct) / trials,
                    distance=round(sum(distances) / trials),
                    trials=trials,
                    distances=distances,
                    correct=correct,
                )
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `evaluate`'s rows: lengths down, depths across, accuracy (mean distance) in each cell,
    and each length's mean accuracy."""
    depths = sorted({row["depth"] for row in rows})
    lengths = sorted({row["length"] for row in rows})
    cell = {(row["length"], row["depth"]): row for row in rows}
    lines = [
        "| context | " + " | ".join(f"depth {depth:g}" for depth in depths) + " | mean |",
        "|---" * (len(depths) + 2) + "|",
    ]
    for length in lengths:
        accuracies = [cell[length, depth]["accuracy"] for depth in depths]
        cells = [f"{cell[length, depth]['accuracy']:.0%} ({cell[length, depth]['distance']:,})" for depth in depths]
        lines.append(f"| {length:,} | " + " | ".join(cells) + f" | {sum(accuracies) / len(accuracies):.0%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colt5-retrieval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a folder saved with save_pretrained (model and tokenizer; CoLT5 or any "
                                           "AutoModelForCausalLM), or a Hub model id (needs network)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer's folder (default: the checkpoint's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="context lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle positions in the filler: 0 = its start, 1 = right before the question")
    parser.add_argument("--trials", type=int, default=10, help="random pass keys per length and depth")
    parser.add_argument("--digits", type=int, default=5, help="digits in a pass key")
    parser.add_argument("--haystack", type=Path, default=None,
                        help="a text file to hide the pass key in (default: the repeated grass-and-sky sentences)")
    parser.add_argument("--batch-size", type=int, default=1, help="examples per forward pass")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code stored with the checkpoint (not needed for CoLT5 with colt5 installed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the settings and rows to this file")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("trials", "digits", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if any(length < 1 for length in args.lengths):
        parser.error(f"--lengths must be positive token counts, got {args.lengths}.")
    if any(not 0 <= depth <= 1 for depth in args.depths):
        parser.error(f"--depths must lie in [0, 1], got {args.depths}.")
    if args.haystack is not None and not args.haystack.is_file():
        parser.error(f"--haystack {args.haystack} is not a file.")
    return args


def _load(name: str, auto_class: type, **kwargs):
    """`auto_class.from_pretrained(name)`, with a message that says what to do when it cannot be found."""
    local = Path(name).is_dir()
    if not local and Path(name).exists():
        raise SystemExit(f"colt5-retrieval: {name} is a file; pass the folder that save_pretrained wrote.")
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # missing files; a folder without tokenizer files raises ValueError
        where = (
            "the folder lacks what save_pretrained writes (config, weights, tokenizer files)"
            if local
            else "it is no local folder, so it was looked up on the Hugging Face Hub, which needs network access "
            "(and no HF_HUB_OFFLINE); pass a local checkpoint folder instead"
        )
        raise SystemExit(f"colt5-retrieval: could not load {name!r} with {auto_class.__name__}: {where}.\n{error}")


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    remote = dict(trust_remote_code=args.trust_remote_code)
    tokenizer = _load(args.tokenizer or args.checkpoint, AutoTokenizer, **remote)
    model = _load(args.checkpoint, AutoModelForCausalLM, dtype=dtype, **remote).to(device).eval()
    haystack = None if args.haystack is None else args.haystack.read_text(encoding="utf-8", errors="replace")
    try:
        prompts = PasskeyPrompts(tokenizer, key_length=args.digits, haystack=haystack)
    except ValueError as error:
        raise SystemExit(f"colt5-retrieval: {error}")
    too_short = [length for length in args.lengths if length < prompts.min_length]
    if too_short:
        raise SystemExit(
            f"colt5-retrieval: --lengths {too_short} are shorter than a passkey prompt with this tokenizer "
            f"({prompts.min_length} tokens with {args.digits} digits)."
        )
    longest = getattr(model.config, "max_position_embeddings", None)
    if longest is not None and max(args.lengths) > longest:
        print(f"note: lengths above the model's max_position_embeddings ({longest:,}) test length extrapolation")

    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"{args.checkpoint}: {type(model).__name__}, {parameters / 1e6:.1f}M parameters, {device} {dtype}; "
        f"{args.digits}-digit pass keys, {args.trials} per cell, "
        f"haystack: {args.haystack or 'grass-and-sky sentences'}"
    )
    rows = evaluate(model, prompts, args.lengths, args.depths, args.trials, args.batch_size, args.seed)
    print("accuracy (mean distance in tokens from the needle to the answer)")
    print(format_table(rows))
    if args.json is not None:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps(dict(settings=settings, dtype=str(dtype), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
