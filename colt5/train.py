# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Train a CoLT5 language model, classifier or encoder-decoder with transformers' Trainer.

With no arguments: trains a small CoLT5ForCausalLM on the embedded corpus (the Python standard library's source,
read from this interpreter, byte-level ByT5 tokens packed into sequences), offline, on the GPU when there is one
(bf16, Triton router) and on the CPU otherwise. Shows Trainer's progress and losses, evaluation loss and bits per
byte on held-out files, a generated sample at the end, and leaves in --output-dir a checkpoint that loads with
AutoModelForCausalLM (safetensors, config, tokenizer, model code, model card, loss plot) next to Trainer's
resumable checkpoints (checkpoint-N).

Several GPUs (or CPU processes): `torchrun --standalone --nproc_per_node N -m colt5.train ...` (DDP; add --fsdp for
FSDP2 on GPUs). A killed run continues with --resume.

`--task seq2seq` trains CoLT5ForConditionalGeneration (the paper's encoder-decoder) with Seq2SeqTrainer, by default
on summarising standard-library code (module or class source without docstrings -> the first paragraph of its
docstring), evaluated by generating the targets and scoring them with ROUGE-L (the `seq2seq` extra: rouge-score).
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sized
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import NamedTuple, get_args

import numpy as np
import torch
from datasets import Dataset
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    DataCollatorWithPadding,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from . import (
    CausalRoutedAttention,
    CausalRoutedFeedForward,
    CoLT5Config,
    CoLT5ForCausalLM,
    CoLT5ForConditionalGeneration,
    CoLT5ForSequenceClassification,
)
from .causal_router import calibrate_causal_routers
from .training_data import (
    EMBEDDED_CORPUS,
    bytes_per_token,
    evenly_spaced,
    load_documents,
    pack_for_language_modeling,
    prepare_classification,
    prepare_seq2seq,
    split_documents,
)
from .training_report import (
    EVAL_METRICS,
    loss_curves,
    plot_losses,
    push_checkpoint,
    routed_fractions_text,
    write_model_card,
)

TASKS = ("causal-lm", "classification", "seq2seq")
SETTINGS_FILE = "colt5_train_settings.json"
# Settings that only steer this invocation, not what is trained: a resumed run may change them freely.
_INVOCATION_ONLY = {"resume", "overwrite", "push_to_hub", "hub_private", "sample_tokens", "prompt"}
# At most this many new tokens of the end-of-run greedy decoding are compared with and without the cache (the
# default sample of 200 crosses a re-routing of the small preset's memory).
CACHE_CHECK_MAX_TOKENS = 256
# Where the two decodings part, a gap between the two tokens' logits up to this share of the largest logit is a
# near-tie that float rounding may break either way (the tolerance of the cache tests), not a broken cache.
CACHE_CHECK_RTOL = 1e-4


# Model sizes. `base` and `large` are the paper's CoLT5-B and CoLT5-L widths; `tiny` and `small` fit a CPU.
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, light_num_heads=2, light_head_dim=16, heavy_num_heads=2,
                 heavy_head_dim=16, light_window_size=31, light_intermediate_size=128, heavy_intermediate_size=256,
                 routed_query_tokens=0.125, routed_ff_tokens=0.125),
    "small": dict(hidden_size=128, num_hidden_layers=2, light_num_heads=2, light_head_dim=32, heavy_num_heads=4,
                  heavy_head_dim=32, light_window_size=63, light_intermediate_size=256, heavy_intermediate_size=1024,
                  routed_query_tokens=0.125, routed_ff_tokens=0.125),
    "base": dict(hidden_size=768, num_hidden_layers=12, light_num_heads=4, light_head_dim=64, heavy_num_heads=8,
                 heavy_head_dim=64, light_window_size=127, light_intermediate_size=1024, heavy_intermediate_size=8192),
    "large": dict(hidden_size=1024, num_hidden_layers=24, light_num_heads=4, light_head_dim=64, heavy_num_heads=12,
                  heavy_head_dim=64, light_window_size=127, light_intermediate_size=1408,
                  heavy_intermediate_size=11264),
}


# Every token is a heavy query over its block's memory, so the memory size sets the heavy attention's cost per
# token: a fixed size keeps the causal model linear in the sequence length (a fraction of it would be quadratic).
# 2048 from the benchmark's sweep at 32k-128k (results/bench_causal_memory_size_2026-12-02_h200.txt).
CAUSAL_MEMORY_TOKENS = 2048


def causal_memory_and_block(seq_len: int) -> tuple[int, int]:
    """Causal routing for `seq_len`-token sequences: a key/value memory of seq_len / 8 tokens (64 to
    `CAUSAL_MEMORY_TOKENS`) re-chosen every seq_len / 8 tokens (64 to 1024)."""
    eighth = max(seq_len // 8, 64)
    return min(eighth, CAUSAL_MEMORY_TOKENS), min(eighth, 1024)


def preset_config(preset: str, seq_len: int, task: str = "causal-lm") -> dict:
    """CoLT5Config settings of a preset for `seq_len`-token sequences (causal routing: `causal_memory_and_block`,
    every token a heavy query).
    For seq2seq the decoder has as many heads as the encoder's two branches together, of the heavy heads' width,
    and an MLP a quarter of the heavy one (for `base` and `large` the T5 v1.1 decoder of that width)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown --preset {preset!r}: choose one of {sorted(PRESETS)}.")
    memory, block = causal_memory_and_block(seq_len)
    sizes = dict(PRESETS[preset], routed_kv_tokens=memory, causal_block_size=block, max_position_embeddings=seq_len)
    if task == "causal-lm":
        # The presets' query share is the encoder's; the causal model keeps CoLT5Config's default (every token).
        sizes.pop("routed_query_tokens", None)
    if task == "seq2seq":
        sizes.update(
            decoder_num_heads=sizes["light_num_heads"] + sizes["heavy_num_heads"],
            decoder_head_dim=sizes["heavy_head_dim"],
            decoder_intermediate_size=sizes["heavy_intermediate_size"] // 4,
        )
    return sizes


def parse_config_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs for CoLT5Config; values are read as JSON where they parse (numbers, true, null, lists)
    and as strings otherwise."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config expects key=value (e.g. --config router_iterations=50), got {pair!r}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    types = {f.name: f.type for f in fields(CoLT5Config)}
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ValueError(f"--config: {unknown} are not CoLT5Config fields.")
    # "1" reads as an int; a float field (router_eps, also one that may be None) takes it as 1.0, a field that takes
    # either (routed_kv_tokens: a number of tokens or a fraction) keeps it.
    return {key: float(value) if _takes_float_only(types[key]) and type(value) is int else value
            for key, value in overrides.items()}


def _takes_float_only(field_type) -> bool:
    return field_type is float or (float in get_args(field_type) and int not in get_args(field_type))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colt5-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--task", choices=TASKS, default="causal-lm",
                      help="causal-lm: CoLT5ForCausalLM on packed text; classification: CoLT5ForSequenceClassification")
    what.add_argument("--preset", choices=list(PRESETS), default="small", help="model size (default: small)")
    what.add_argument("--init-from", default=None,
                      help="start from this checkpoint folder (e.g. fine-tune a classifier from a trained LM)")
    what.add_argument("--lora-rank", type=int, default=0,
                      help="train LoRA adapters of this rank (peft) on the attention and MLP projections of every "
                           "routed layer instead of all weights; the saved model has them merged (0: off)")
    what.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                      help="override a CoLT5Config field (repeatable), e.g. --config router_iterations=50")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="a text file, a folder of text files (classification: one sub-folder per label) or a "
                           "JSON/JSONL/CSV/Parquet file; default: the embedded corpus")
    data.add_argument("--dataset", default=None, help="a dataset name on the Hugging Face Hub (needs network)")
    data.add_argument("--dataset-config", default=None, help="the Hub dataset's configuration name")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--input-column", default="input", help="seq2seq: the column of the inputs")
    data.add_argument("--target-column", default="target", help="seq2seq: the column of the targets")
    data.add_argument("--eval-fraction", type=float, default=0.05,
                      help="documents held out for evaluation when the data has no validation split")
    data.add_argument("--max-eval-sequences", type=int, default=64,
                      help="evaluate on at most this many sequences, spread over the held-out data")
    data.add_argument("--seq-len", type=int, default=1024,
                      help="tokens per training sequence (bytes with ByT5); seq2seq: per input")
    data.add_argument("--target-len", type=int, default=128,
                      help="seq2seq: tokens per target, and the most tokens generated at evaluation")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per device and step")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on for GPUs that support it)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--fsdp", action="store_true",
                       help="shard with FSDP2 over GPUs (under torchrun); wraps each CoLT5 layer")
    train.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                       help="causal-lm on one GPU: replay each training step's forward and backward from CUDA "
                            "graphs (captured at the first step); the optimizer step stays eager")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--eval-steps", type=int, default=None, help="default: --steps / 4")
    train.add_argument("--save-steps", type=int, default=None, help="checkpoint interval; default: --eval-steps")
    train.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=Path("outputs/colt5-small"))
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --output-dir from its last complete checkpoint (its saved settings "
                          "are the defaults)")
    out.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds checkpoints")
    out.add_argument("--sample-tokens", type=int, default=200, help="bytes to generate at the end (0: none)")
    out.add_argument("--prompt", default=None, help="prompt of the sample (default: the start of a held-out file)")
    out.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                     help="upload the final checkpoint folder to this Hub repository")
    out.add_argument("--hub-private", action="store_true", help="create the Hub repository private")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings. With --resume the saved settings of the run are the defaults, so `--output-dir DIR
    --resume` continues it as it was; options given explicitly still win (and are reported)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        saved_path = args.output_dir / SETTINGS_FILE
        if not saved_path.is_file():
            parser.error(f"--resume: {saved_path} not found; is {args.output_dir} the output folder of a run?")
        saved = json.loads(saved_path.read_text())
        parser.set_defaults(**{key: value for key, value in saved.items() if key not in _INVOCATION_ONLY})
        args = parser.parse_args(argv)
        args.output_dir = Path(args.output_dir)
        changed = {key: (saved[key], value) for key, value in _run_settings(args).items()
                   if key in saved and key not in _INVOCATION_ONLY and saved[key] != value}
        for key, (old, new) in changed.items():
            print(f"--resume: {key} changes from {old!r} to {new!r}")
    _validate_args(parser, args)
    return args


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "target_len", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("eval_steps", "save_steps", "max_eval_sequences"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    try:
        parse_config_overrides(args.config)
    except ValueError as error:
        parser.error(str(error))
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}.")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts afresh: pass one.")
    if args.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        parser.error("--bf16 needs a GPU with bfloat16 support; on this machine leave it out.")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0, got {args.lora_rank}.")
    if args.task == "seq2seq" and importlib.util.find_spec("rouge_score") is None:
        parser.error("--task seq2seq scores with ROUGE-L: pip install 'colt5[seq2seq]' (rouge-score).")
    if args.lora_rank and args.task == "seq2seq":
        parser.error("--lora-rank is for causal-lm and classification; fine-tune the encoder-decoder fully.")
    if args.lora_rank and args.fsdp:
        parser.error("--lora-rank with --fsdp is not supported: train the adapters with DDP (leave out --fsdp).")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("--fsdp shards over several processes: start the run with torchrun --nproc_per_node N.")
    if args.cuda_graphs:
        if args.task != "causal-lm":
            parser.error("--cuda-graphs is for --task causal-lm (the model whose training step was made capturable).")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.fsdp:
            parser.error("--cuda-graphs trains on one GPU: leave out torchrun (DDP) and --fsdp.")
        if args.gradient_checkpointing:
            parser.error("--cuda-graphs with --gradient-checkpointing is not supported: pass one of them.")
        if args.lora_rank:
            parser.error("--cuda-graphs with --lora-rank is not supported: train LoRA adapters eagerly.")
        if parse_config_overrides(args.config).get("causal_router_capacity_factor", 1) is None:
            parser.error("--cuda-graphs needs the routers' fixed capacities: leave causal_router_capacity_factor set.")
        if not torch.cuda.is_available():
            parser.error("--cuda-graphs needs a CUDA GPU; on this machine leave it out.")
        if torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # Trainer would wrap the model in DataParallel over every visible GPU, which a graph cannot capture.
            parser.error("--cuda-graphs trains on one GPU: make one visible (CUDA_VISIBLE_DEVICES=0).")


def _run_settings(args: argparse.Namespace) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` folder that Trainer finished writing. Trainer writes trainer_state.json last, so
    a run killed while saving leaves a newer folder without it; that one is skipped (and reported)."""
    checkpoints = sorted(
        (path for path in output_dir.glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()),
        key=lambda path: int(path.name[11:]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint
        print(f"--resume: skipping {checkpoint.name}, written only partly (the run stopped while saving it)")
    return None


class ThroughputCallback(TrainerCallback):
    """Training tokens per second over the optimizer steps only (evaluation and saving left out)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.steps = 0
        self.seconds = 0.0
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._started
        self.steps += 1

    @property
    def tokens_per_second(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds if self.seconds else float("nan")


class _LossOf(torch.nn.Module):
    """`model(**inputs).loss` as a module of positional tensors, the form `torch.cuda.make_graphed_callables` takes."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).loss


# Batches whose mean statistics start untrained causal routers (see `CoLT5Trainer.calibrate_routers`).
CALIBRATION_BATCHES = 4


class CoLT5Trainer(Trainer):
    """Trainer that adds bits per byte to the evaluation logs and tokens/s to the training logs.

    With `cuda_graphs`, the forward and backward pass of a training batch replay CUDA graphs captured at the first
    batch (`torch.cuda.make_graphed_callables`: its 3 warm-up passes also update the causal routers' statistics);
    the optimizer step, gradient clipping and evaluation stay eager. This needs static shapes and no host
    synchronisation in the step, which the causal model has in training (its routers' fixed capacities). A batch of
    other shapes (a last, shorter one) runs eagerly. Before the first step, untrained causal routers are calibrated
    (`calibrate_routers`)."""

    def __init__(
        self,
        *args,
        bytes_per_token: float | None = None,
        throughput: ThroughputCallback,
        cuda_graphs: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.bytes_per_token = bytes_per_token
        self.throughput = throughput
        self.add_callback(throughput)
        self.cuda_graphs = cuda_graphs
        self._graphed_loss: tuple[tuple, torch.nn.Module] | None = None  # (input signature, graphed loss)
        self._routers_checked = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._routers_checked:
            self._routers_checked = True
            self.calibrate_routers()
        return super().training_step(model, inputs, num_items_in_batch)

    def calibrate_routers(self, batches: int = CALIBRATION_BATCHES) -> int:
        """Before the first training step, set untrained causal routers' statistics from forward passes over the
        training set's last `batches` batches of `per_device_train_batch_size` sequences (see
        `calibrate_causal_routers`); a resumed or fine-tuned model's routers keep theirs. Returns how many routers
        were set."""
        dataset = self.train_dataset
        if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__") or not len(dataset):
            return 0  # a streamed dataset: no batch to take apart from the training order
        size = self.args.per_device_train_batch_size
        starts = list(range(len(dataset) - size, -1, -size))[:batches] or [0]  # [0]: fewer sequences than a batch

        def forward(index: int) -> None:
            stop = min(starts[index] + size, len(dataset))
            batch = self.data_collator([dataset[i] for i in range(starts[index], stop)])
            self.model(**self._prepare_inputs(batch))

        with self.compute_loss_context_manager():
            return calibrate_causal_routers(self.model, forward, len(starts))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.cuda_graphs and model.training) or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        graph_inputs = dict(inputs)
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # A tensor input of the graph, so that each replay divides by its batch's count.
            graph_inputs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=self.args.device)
        names = tuple(sorted(graph_inputs))
        tensors = tuple(graph_inputs[name] for name in names)
        signature = tuple((name, tensor.shape, tensor.dtype) for name, tensor in zip(names, tensors))
        if self._graphed_loss is None:
            graphed = torch.cuda.make_graphed_callables(_LossOf(model, names), tensors, allow_unused_input=True)
            self._graphed_loss = (signature, graphed)
        if self._graphed_loss[0] != signature:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._graphed_loss[1](*tensors)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.bytes_per_token:
            logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) / self.bytes_per_token
        if "loss" in logs:
            if self.throughput.steps:
                logs["tokens_per_second"] = round(self.throughput.tokens_per_second, 1)
            logs.update(routed_fraction_logs(self.model))
        super().log(logs, start_time)


class CoLT5Seq2SeqTrainer(CoLT5Trainer, Seq2SeqTrainer):
    """Seq2SeqTrainer (evaluation generates the targets) with CoLT5Trainer's logs."""


ROUTER_KINDS = {"queries": (CausalRoutedAttention, "q_router"), "feedforward": (CausalRoutedFeedForward, "router")}


def routed_fraction_logs(model: torch.nn.Module) -> dict[str, float]:
    """For each kind of per-token causal router (heavy queries, heavy feedforward), the share of valid tokens its
    routers routed in training since the last log, as `routed_{kind}_{mean,min,max}` over the layers, the way
    mixture-of-experts trainers log load balance, and the share dropped for capacity (`dropped_{kind}_max`, the
    layer that dropped most). Counts come from this process's batches (the logging one, under DDP or FSDP). Empty
    for encoders, whose routers route exact amounts."""
    logs = {}
    for kind, (layer_class, attribute) in ROUTER_KINDS.items():
        # A layer whose every token is a heavy query has no query router (None).
        routers = [getattr(module, attribute) for module in model.modules() if isinstance(module, layer_class)]
        shares = [share for router in routers if router is not None and (share := router.take_fractions())]
        if shares:
            routed = [share[0] for share in shares]
            logs[f"routed_{kind}_mean"] = round(sum(routed) / len(routed), 4)
            logs[f"routed_{kind}_min"] = round(min(routed), 4)
            logs[f"routed_{kind}_max"] = round(max(routed), 4)
            logs[f"dropped_{kind}_max"] = round(max(share[1] for share in shares), 4)
    return logs


def last_routed_fractions(log_history: list[dict], config: CoLT5Config) -> dict[str, dict[str, float]] | None:
    """The routed shares of the last training log (see `routed_fraction_logs`) with each kind's target."""
    entries = [entry for entry in log_history if any(f"routed_{kind}_mean" in entry for kind in ROUTER_KINDS)]
    if not entries:
        return None
    targets = {"queries": config.routed_query_tokens, "feedforward": config.routed_ff_tokens}
    return {
        kind: {"step": entries[-1]["step"], "target": targets[kind]}
        | {stat: entries[-1][f"routed_{kind}_{stat}"] for stat in ("mean", "min", "max")}
        # Logs of runs from before the capacities (a resumed run) have no dropped share.
        | {"dropped_max": entries[-1].get(f"dropped_{kind}_max")}
        for kind in ROUTER_KINDS
        if f"routed_{kind}_mean" in entries[-1]
    }


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def rouge_l_metric(tokenizer: PreTrainedTokenizerBase) -> Callable:
    """`compute_metrics` for Seq2SeqTrainer's generated predictions: ROUGE-L F1 (in [0, 1], with stemming, as in
    summarisation papers) of the decoded predictions against the decoded labels, averaged over the samples, and
    the mean generated length. Needs the `seq2seq` extra (rouge-score)."""
    from rouge_score import rouge_scorer  # the seq2seq extra: colt5-train checks for it before it starts

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def compute(prediction) -> dict[str, float]:
        predictions, labels = prediction
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        generated = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = [scorer.score(reference, text)["rougeL"].fmeasure for reference, text in zip(references, generated)]
        lengths = [(row != tokenizer.pad_token_id).sum() for row in predictions]
        return {"rougeL": float(np.mean(scores)), "generated_tokens": float(np.mean(lengths))}

    return compute


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None):
    """The model to train: from --init-from, or a fresh one from --preset (causal for causal-lm, the paper's
    encoder for classification, its encoder-decoder for seq2seq), with --config overrides."""
    overrides = parse_config_overrides(args.config)
    if args.init_from is not None:
        if args.task == "causal-lm":
            return CoLT5ForCausalLM.from_pretrained(args.init_from, **overrides)
        if args.task == "seq2seq":
            return CoLT5ForConditionalGeneration.from_pretrained(args.init_from, **overrides)
        return CoLT5ForSequenceClassification.from_pretrained(
            args.init_from, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)}, **overrides,
        )
    settings = dict(
        preset_config(args.preset, args.seq_len, args.task),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if args.task == "causal-lm":
        config = CoLT5Config(**dict(settings, is_causal=True, **overrides))
        return CoLT5ForCausalLM(config)
    if args.task == "seq2seq":
        config = CoLT5Config(**dict(settings, is_encoder_decoder=True, **overrides))
        return CoLT5ForConditionalGeneration(config)
    config = CoLT5Config(**dict(
        settings, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)}, **overrides,
    ))
    return CoLT5ForSequenceClassification(config)


# The linear layers of both branches of every routed attention and feedforward layer (not the LM head).
LORA_TARGET_MODULES = [
    "light_q_proj", "light_k_proj", "light_v_proj", "light_o_proj",
    "heavy_q_proj", "heavy_k_proj", "heavy_v_proj", "heavy_o_proj",
    "gate_proj", "up_proj", "down_proj",
]


def add_lora_adapters(model: PreTrainedModel, rank: int, task: str = "causal-lm"):
    """`model` wrapped by peft with LoRA adapters of `rank` on `LORA_TARGET_MODULES` (alpha = 2 * rank); only the
    adapters train (and a classifier's fresh `score` head). Needs the `train` extra (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise SystemExit("--lora-rank needs peft: pip install 'colt5[train]'.") from error
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGET_MODULES,
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
        modules_to_save=None if task == "causal-lm" else ["score"],
    )
    return get_peft_model(model, config)


def _load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    if args.init_from is not None and (Path(args.init_from) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(args.init_from)
    return ByT5Tokenizer()


def _training_arguments(args: argparse.Namespace, model: PreTrainedModel, resuming: bool) -> TrainingArguments:
    eval_steps = args.eval_steps or max(args.steps // 4, 1)
    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    settings = dict(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(args.steps // 10, 1),
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=bf16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        eval_on_start=not resuming,
        save_strategy="steps",
        save_steps=args.save_steps or eval_steps,
        save_total_limit=2,
        seed=args.seed,
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=cuda,
        # --cuda-graphs captures the first batch's shapes: a last, shorter batch would run eagerly beside the graph.
        dataloader_drop_last=args.cuda_graphs,
        # Without it accelerate runs torchrun's CPU processes as independent single-process runs (no DDP).
        use_cpu=not cuda,
        report_to="none",
        # Every parameter gets a gradient at every step (tested): DDP needs no search for unused ones.
        ddp_find_unused_parameters=False,
    )
    if args.gradient_checkpointing and not args.fsdp:
        # transformers 5.23 renamed gradient checkpointing to activation checkpointing; 5.17 has the old name.
        names = {f.name for f in fields(TrainingArguments)}
        settings["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    if args.fsdp:
        settings["fsdp"] = True
        settings["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": True,
            "transformer_layer_cls_to_wrap": model._no_split_modules if args.task == "seq2seq"
            else model.model._no_split_modules,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": args.gradient_checkpointing,
        }
    if args.task == "seq2seq":
        # max_length counts the decoder's start token.
        return Seq2SeqTrainingArguments(**settings, predict_with_generate=True,
                                        generation_max_length=args.target_len + 1, generation_num_beams=1)
    return TrainingArguments(**settings)


class TrainingData(NamedTuple):
    train: Dataset
    eval: Dataset
    collator: Callable
    held_out_documents: Dataset
    label_names: list[str] | None  # classification
    bytes_per_token: float | None  # language modelling: over the evaluation sequences


def prepare_data(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Loads and splits the documents, then packs them (language modelling), encodes them with labels
    (classification) or as input and target pairs (seq2seq). Bad data settings end the run here with a message
    (SystemExit)."""
    try:
        splits = split_documents(
            load_documents(args.data, args.dataset, args.dataset_config, args.task), args.eval_fraction, args.seed
        )
        if args.task == "causal-lm":
            train = pack_for_language_modeling(splits["train"], tokenizer, args.seq_len, args.text_column)
            held_out = pack_for_language_modeling(splits["validation"], tokenizer, args.seq_len, args.text_column)
            held_out = evenly_spaced(held_out, args.max_eval_sequences)
            return TrainingData(train, held_out, default_data_collator, splits["validation"], None,
                                bytes_per_token(held_out, tokenizer))
        if args.task == "seq2seq":
            columns = dict(input_column=args.input_column, target_column=args.target_column)
            train = prepare_seq2seq(splits["train"], tokenizer, args.seq_len, args.target_len, **columns)
            held_out = prepare_seq2seq(splits["validation"], tokenizer, args.seq_len, args.target_len, **columns)
            held_out = evenly_spaced(held_out, args.max_eval_sequences)
            return TrainingData(train, held_out, default_data_collator, splits["validation"], None, None)
        train, names = prepare_classification(
            splits["train"], tokenizer, args.seq_len, args.text_column, args.label_column
        )
        held_out, _ = prepare_classification(
            splits["validation"], tokenizer, args.seq_len, args.text_column, args.label_column, names
        )
        held_out = evenly_spaced(held_out, args.max_eval_sequences)
        return TrainingData(train, held_out, DataCollatorWithPadding(tokenizer), splits["validation"], names, None)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise SystemExit(f"colt5-train: {error}") from error


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["colt5-train", *(sys.argv[1:] if argv is None else argv)])
    rank = int(os.environ.get("RANK", "0"))
    checkpoint = None
    if args.resume:
        checkpoint = last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            raise SystemExit(f"--resume: {args.output_dir} has no complete checkpoint-N folder to resume from.")
        print(f"resuming from {checkpoint}")
    elif any(args.output_dir.glob("checkpoint-*")) and not args.overwrite:
        raise SystemExit(
            f"{args.output_dir} already holds checkpoints of a run: pass --resume to continue it, --overwrite to "
            "start afresh there, or another --output-dir."
        )

    torch.manual_seed(args.seed)
    tokenizer = _load_tokenizer(args)
    data = prepare_data(args, tokenizer)
    train_set, eval_set, label_names = data.train, data.eval, data.label_names

    try:
        model = build_model(args, tokenizer, label_names)
    except (ValueError, StrictDataclassError) as error:  # CoLT5Config's validation: the message names the field
        raise SystemExit(f"colt5-train: {error}") from error
    if args.lora_rank:
        model = add_lora_adapters(model, args.lora_rank, args.task)
    if args.cuda_graphs and model.config.causal_router_capacity_factor is None:  # e.g. from --init-from's config
        raise SystemExit(
            "--cuda-graphs needs the routers' fixed capacities: the model's causal_router_capacity_factor is None; "
            "set one with --config causal_router_capacity_factor=1.5."
        )
    training_args = _training_arguments(args, model, resuming=checkpoint is not None)
    world_size = training_args.world_size
    # seq2seq: input and target tokens (both padded to their fixed lengths).
    tokens_per_sequence = args.seq_len + (args.target_len if args.task == "seq2seq" else 0)
    tokens_per_step = args.batch_size * args.grad_accum * world_size * tokens_per_sequence
    print(
        f"{type(model).__name__}: {model.num_parameters() / 1e6:.2f}M parameters "
        f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained); train {len(train_set)} and "
        f"eval {len(eval_set)} sequences of up to {args.seq_len} tokens; {world_size} process(es) on "
        f"{training_args.device}; bf16 {training_args.bf16}; {tokens_per_step} tokens per step"
    )
    throughput = ThroughputCallback(tokens_per_step)
    compute_metrics = None
    if args.task == "classification":
        compute_metrics = _accuracy
    elif args.task == "seq2seq":
        compute_metrics = rouge_l_metric(tokenizer)
    trainer = (CoLT5Seq2SeqTrainer if args.task == "seq2seq" else CoLT5Trainer)(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data.collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        bytes_per_token=data.bytes_per_token,
        throughput=throughput,
        cuda_graphs=args.cuda_graphs,
    )
    if args.fsdp and not trainer.is_fsdp_enabled:
        raise SystemExit(
            "--fsdp: accelerate did not enable FSDP (it shards over GPUs only; these processes run on "
            f"{training_args.device}). Leave out --fsdp to train with DDP."
        )
    if rank == 0:  # only once data and model have been built from the settings
        if args.overwrite:
            # A fresh run must not leave the old run's checkpoints for a later --resume to pick up.
            for old_checkpoint in args.output_dir.glob("checkpoint-*"):
                shutil.rmtree(old_checkpoint)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        # What --resume restores.
        (args.output_dir / SETTINGS_FILE).write_text(json.dumps(_run_settings(args), indent=2) + "\n")
    train_result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not any("eval_loss" in entry and entry["step"] == trainer.state.global_step
               for entry in trainer.state.log_history):
        trainer.evaluate()  # the end of training fell between evaluation steps

    wrapping = _distributed_wrapping(trainer)
    model.config.use_cache = True  # Trainer turns the cache off for training; generation wants it.
    if args.task == "seq2seq":
        # Seq2SeqTrainer's evaluation marks the generation config as the user's, so that it would be saved with
        # every default (max_length 20, which generate() then warns about beside max_new_tokens). The checkpoint
        # generates targets of the trained length by default instead.
        model.generation_config = GenerationConfig.from_model_config(model.config)
        model.generation_config.max_new_tokens = args.target_len
    if args.lora_rank:
        # The adapters on their own, then the model with them merged: the checkpoint loads without peft.
        if trainer.is_world_process_zero():
            model.save_pretrained(args.output_dir / "lora_adapter")
            model = model.merge_and_unload()
            model.save_pretrained(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
    else:
        trainer.save_model()
    if torch.distributed.is_initialized():
        # Every process leaves the process group once the checkpoint is saved, before the others exit: a rank that
        # exited with the group's threads alive aborted once at interpreter shutdown ("terminate called without an
        # active exception", 2 CPU processes). What follows (summary, sample, push) runs on rank 0 alone.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not trainer.is_world_process_zero():
        return
    curves = loss_curves(trainer.state.log_history)
    summary = {
        "command": command,
        "model_path": args.push_to_hub or str(args.output_dir),
        "task": args.task,
        "model_class": type(model).__name__,
        "parameters": model.num_parameters(),
        "data": args.data or args.dataset or EMBEDDED_CORPUS,
        "train_sequences": len(train_set),
        "eval_sequences": len(eval_set),
        "seq_len": args.seq_len,
        "steps": trainer.state.global_step,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": throughput.tokens_per_second,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "world_size": world_size,
        "device": _device_name(training_args.device),
        "bf16": training_args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fsdp": args.fsdp,
        "distributed_wrapping": wrapping,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "resumed_from": checkpoint.name if checkpoint else None,
        "settings": _run_settings(args),
        "start_eval": curves.first_eval,
        "end_eval": curves.last_eval,
        "routed_fractions": last_routed_fractions(trainer.state.log_history, model.config),
        "versions": _versions(),
    }
    samplers = {"causal-lm": _generate_sample, "seq2seq": _generate_summary}
    sample = samplers[args.task](args, data.held_out_documents) if args.task in samplers else None
    summary["sample"] = sample
    origin = f"from {Path(args.init_from).name}" if args.init_from else args.preset
    if plot_losses(curves, args.output_dir / "loss.png", title=f"{type(model).__name__} ({origin})"):
        print(f"loss curves: {args.output_dir / 'loss.png'}")
    write_model_card(args.output_dir, summary)
    (args.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    if args.push_to_hub:
        push_checkpoint(args.output_dir, args.push_to_hub, private=args.hub_private)
    if sample and sample["cache_check"] and not sample["cache_check"]["passed"]:
        raise SystemExit(f"colt5-train: {_cache_check_result(sample['cache_check'])}")


def _reload(output_dir: Path, auto_class: type) -> tuple[str, PreTrainedTokenizerBase, PreTrainedModel]:
    """The saved checkpoint and tokenizer, through `auto_class` (so the sample also shows that it loads), in
    evaluation mode on the GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    return device, tokenizer, auto_class.from_pretrained(output_dir).to(device).eval()


def _generate_sample(args: argparse.Namespace, held_out) -> dict | None:
    """Reloads the saved checkpoint through AutoModelForCausalLM (so the sample also shows that it loads),
    samples `--sample-tokens` bytes after the prompt and checks cached generation (`_check_cached_generation`)."""
    if args.sample_tokens == 0:
        return None
    device, tokenizer, model = _reload(args.output_dir, AutoModelForCausalLM)
    prompt = args.prompt if args.prompt is not None else held_out[0][args.text_column][:256]
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=args.sample_tokens, do_sample=True, temperature=0.8, top_k=40,
            pad_token_id=tokenizer.pad_token_id,
        )
        # Random routing draws new scores on every call, so a cached step routes differently by design.
        cache_check = None if model.config.random_routing else _check_cached_generation(
            model, inputs, min(args.sample_tokens, CACHE_CHECK_MAX_TOKENS), tokenizer.pad_token_id
        )
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"prompt": prompt, "completion": completion, "loaded_with": "AutoModelForCausalLM",
            "cache_check": cache_check}


def _generate_summary(args: argparse.Namespace, held_out) -> dict | None:
    """Reloads the saved checkpoint through AutoModelForSeq2SeqLM, generates (greedy) the target of the first
    held-out input and checks cached generation (`_check_cached_generation`)."""
    if args.sample_tokens == 0:
        return None
    device, tokenizer, model = _reload(args.output_dir, AutoModelForSeq2SeqLM)
    source = args.prompt if args.prompt is not None else held_out[0][args.input_column]
    inputs = tokenizer(source, truncation=True, max_length=args.seq_len, return_tensors="pt").to(device)
    new_tokens = min(args.sample_tokens, args.target_len)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        cache_check = None if model.config.random_routing else _check_cached_generation(
            model, inputs, new_tokens, tokenizer.pad_token_id
        )
    return {
        "prompt": source[:300],
        "completion": tokenizer.decode(output[0], skip_special_tokens=True),
        "reference": None if args.prompt is not None else held_out[0][args.target_column],
        "loaded_with": "AutoModelForSeq2SeqLM",
        "cache_check": cache_check,
    }


def _check_cached_generation(model: PreTrainedModel, inputs, new_tokens: int, pad_token_id: int) -> dict:
    """Greedy decoding of `new_tokens` tokens with the cache and without it (a full forward pass per token). They
    must agree, or the sample, which decodes with the cache, does not show what the model computes; where they
    part on a near-tie of the uncached logits (`CACHE_CHECK_RTOL`), the check passes on the tokens before."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                    return_dict_in_generate=True)
    # Exactly new_tokens are generated, after the prompt (a decoder) or the decoder start token (an encoder-decoder).
    cached = model.generate(**inputs, use_cache=True, **settings).sequences[0, -new_tokens:]
    uncached = model.generate(**inputs, use_cache=False, output_logits=True, **settings)
    start = uncached.sequences.shape[1] - new_tokens
    mismatches = (cached != uncached.sequences[0, start:]).nonzero()
    if len(mismatches) == 0:
        return {"new_tokens": new_tokens, "first_mismatch": None, "logit_gap": None, "passed": True}
    step = int(mismatches[0])
    logits = uncached.logits[step][0].float()
    gap = float(logits[uncached.sequences[0, start + step]] - logits[cached[step]])
    passed = gap <= CACHE_CHECK_RTOL * float(logits.abs().max())
    return {"new_tokens": new_tokens, "first_mismatch": step, "logit_gap": gap, "passed": passed}


def _cache_check_result(check: dict) -> str:
    if check["first_mismatch"] is None:
        return f"greedy decoding with the cache equals decoding without it over {check['new_tokens']} new tokens"
    where = f"new token {check['first_mismatch']} of {check['new_tokens']}"
    if check["passed"]:
        return (f"greedy decoding with the cache equals decoding without it up to {where}, where the uncached logits "
                f"of the two choices tie (gap {check['logit_gap']:.2e})")
    return (f"CACHED GENERATION IS BROKEN: greedy decoding with the cache differs from decoding without it from {where} "
            f"on (uncached logit gap {check['logit_gap']:.3g}), so the sample is not what the model computes. "
            f"The checkpoint itself is saved. Versions: {_versions()}.")


def _distributed_wrapping(trainer: Trainer) -> str | None:
    """How Trainer distributed the model: "DistributedDataParallel", "FSDP2" (sharded DTensor parameters), or
    None for a single process."""
    if any(type(param).__name__ == "DTensor" for param in trainer.model.parameters()):
        return "FSDP2"
    wrapper = type(trainer.model_wrapped).__name__
    return wrapper if wrapper != type(trainer.model).__name__ else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    """Versions of what the run used (from package metadata: triton is not imported where there is no GPU)."""
    from . import __version__

    versions = {"colt5": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "transformers", "datasets", "accelerate") + (("triton",) if torch.cuda.is_available() else ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _print_summary(summary: dict) -> None:
    start, end = summary["start_eval"], summary["end_eval"]
    print(f"\ncheckpoint: {summary['settings']['output_dir']}  ({summary['steps']} steps, "
          f"{summary['tokens_per_second']:,.0f} training tokens/s on {summary['device']})")
    for name in EVAL_METRICS:
        if start and name in start and end and name in end:
            print(f"{name}: {start[name]:.4f} (step {start['step']}) -> {end[name]:.4f} (step {end['step']})")
    if summary["routed_fractions"]:
        print(f"routed shares: {routed_fractions_text(summary['routed_fractions'])}")
    sample = summary["sample"]
    if not sample:
        return
    if summary["task"] == "seq2seq":
        print(f"\nsample from the reloaded checkpoint (greedy), the input's start:\n{sample['prompt']}\n{'-' * 40}"
              f"\ngenerated: {sample['completion']}\nreference: {sample['reference']}\n")
    else:
        print(f"\nsample from the reloaded checkpoint, prompt then completion:\n{sample['prompt']}"
              f"\n{'-' * 40}\n{sample['completion']}\n")
    check = sample["cache_check"]
    if check is None:
        print("cache check: skipped (random routing routes every call anew)")
    elif check["passed"]:
        print(f"cache check: {_cache_check_result(check)}")
    else:
        print(f"\n{'!' * 80}\n{_cache_check_result(check)}\n{'!' * 80}\n", file=sys.stderr)


if __name__ == "__main__":
    main()
