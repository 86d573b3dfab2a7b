# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""What a training run leaves besides the weights: loss curves (PNG), the model card (README.md) and the upload of
the checkpoint folder to the Hugging Face Hub."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token

# Trainer's resumable checkpoints and logs stay local; the Hub gets the final model folder.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "colt5_train_settings.json"]


# What the evaluations of colt5-train measure, by task: language modelling, classification, sequence to sequence.
EVAL_METRICS = ("eval_loss", "eval_bits_per_byte", "eval_accuracy", "eval_rougeL")


@dataclass
class LossCurves:
    """Losses from Trainer's log history: training loss per logging step, evaluation entries (loss, bits per
    byte, accuracy or ROUGE-L) per evaluation."""

    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    @property
    def first_eval(self) -> dict | None:
        return self.evals[0] if self.evals else None

    @property
    def last_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None


def loss_curves(log_history: list[dict]) -> LossCurves:
    """Training and evaluation losses from `trainer.state.log_history` (one evaluation per step: the last wins)."""
    curves = LossCurves()
    evals = {}
    for entry in log_history:
        if "loss" in entry:
            curves.train_steps.append(entry["step"])
            curves.train_losses.append(entry["loss"])
        if "eval_loss" in entry:
            evals[entry["step"]] = {key: value for key, value in entry.items()
                                    if key == "step" or key in EVAL_METRICS}
    curves.evals = [evals[step] for step in sorted(evals)]
    return curves


def plot_losses(curves: LossCurves, path: Path, title: str) -> bool:
    """Draws training and evaluation loss against the step into `path` (PNG). Returns False, with a note, when
    matplotlib is not installed (it is in the `train` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'colt5[train]'): no loss plot.")
        return False
    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot(curves.train_steps, curves.train_losses, label="training loss", color="tab:blue", alpha=0.8)
    axis.plot([e["step"] for e in curves.evals], [e["eval_loss"] for e in curves.evals], "o-",
              label="evaluation loss (held out)", color="tab:orange")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats per token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _format_eval(entry: dict | None) -> str:
    if entry is None:
        return "not measured"
    parts = [f"loss {entry['eval_loss']:.4f}"]
    if "eval_bits_per_byte" in entry:
        parts.append(f"{entry['eval_bits_per_byte']:.3f} bits per byte")
    if "eval_accuracy" in entry:
        parts.append(f"accuracy {entry['eval_accuracy']:.3f}")
    if "eval_rougeL" in entry:
        parts.append(f"ROUGE-L {entry['eval_rougeL']:.3f} (greedy generation)")
    return f"{', '.join(parts)} (step {entry['step']})"


def routed_fractions_text(fractions: dict[str, dict[str, float]]) -> str:
    """One line for the routed shares of `summary["routed_fractions"]`: mean, range over layers, target, and the
    largest share of a layer's tokens dropped for capacity."""
    step = next(iter(fractions.values()))["step"]
    parts = [
        f"{kind} {share['mean']:.3f} ({share['min']:.3f}-{share['max']:.3f} over layers; target {share['target']:g}"
        + ("" if share.get("dropped_max") is None else f"; dropped for capacity at most {share['dropped_max']:.3f}")
        + ")"
        for kind, share in fractions.items()
    ]
    return ", ".join(parts) + f", in training up to step {step}"


def write_model_card(output_dir: Path, summary: dict) -> Path:
    """Writes `output_dir/README.md`: Hub metadata, how to load the model, the training settings and the measured
    evaluation numbers of `summary` (as built by `colt5.train`)."""
    auto_class, pipeline_tag = {
        "causal-lm": ("AutoModelForCausalLM", "text-generation"),
        "classification": ("AutoModelForSequenceClassification", "text-classification"),
        "seq2seq": ("AutoModelForSeq2SeqLM", "summarization"),
    }[summary["task"]]
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["colt5", "long-context", "conditional-computation", "byte-level"],
        license="apache-2.0",
        datasets=[summary["data"]] if summary["settings"].get("dataset") else None,
    )
    settings = summary["settings"]
    rows = [
        ("model", f"{summary['model_class']}, {summary['parameters'] / 1e6:.2f}M parameters, "
                  + (f"from `{settings['init_from']}`" if settings.get("init_from") else f"preset `{settings['preset']}`")
                  + (f", LoRA rank {settings['lora_rank']} (merged)" if settings.get("lora_rank") else "")),
        ("data", f"`{summary['data']}`: {summary['train_sequences']} training and {summary['eval_sequences']} "
                 f"held-out sequences of up to {summary['seq_len']} tokens"),
        ("optimizer steps", f"{summary['steps']} (batch {settings['batch_size']} x {settings['grad_accum']} "
                            f"accumulation x {summary['world_size']} process(es) = {summary['tokens_per_step']:,} "
                            "tokens a step)"),
        ("learning rate", f"{settings['lr']} (AdamW, cosine, weight decay {settings['weight_decay']})"),
        ("precision", "bf16 autocast" if summary["bf16"] else "float32"),
        ("hardware", f"{summary['device']} x {summary['world_size']}"
                     + (", FSDP" if summary["fsdp"] else "")
                     + (", gradient checkpointing" if summary["gradient_checkpointing"] else "")),
        ("throughput", f"{summary['tokens_per_second']:,.0f} training tokens/s"),
        *(
            [("routed shares (last logging interval)", routed_fractions_text(summary["routed_fractions"]))]
            if summary.get("routed_fractions")
            else []
        ),
        ("versions", ", ".join(f"{name} {version}" for name, version in summary["versions"].items())),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    sample = ""
    if summary.get("sample") and summary["task"] == "seq2seq":
        reference = summary["sample"]["reference"]
        sample = (
            "\n## Sample\n\nGenerated (greedy) by this checkpoint after reloading it, for a held-out input that "
            f"starts:\n\n```text\n{summary['sample']['prompt']}\n```\n\n- generated: {summary['sample']['completion']}\n"
            + (f"- reference: {reference}\n" if reference is not None else "")
        )
    elif summary.get("sample"):
        sample = (
            "\n## Sample\n\nSampled (temperature 0.8, top-k 40) from this checkpoint after reloading it, continuing "
            f"a held-out prompt:\n\n```text\n{summary['sample']['prompt']}{summary['sample']['completion']}\n```\n"
        )
    check = summary["sample"]["cache_check"] if summary.get("sample") else None
    if check and check["passed"]:
        agreed = check["new_tokens"] if check["first_mismatch"] is None else check["first_mismatch"]
        sample += (f"\nGreedy decoding with the cache equals decoding without it over the first {agreed} new "
                   "tokens (checked after training).\n")
    elif check:
        sample += (f"\n**Warning: greedy decoding with the cache differed from decoding without it from new token "
                   f"{check['first_mismatch']} on (checked after training): the sample is not what the model "
                   "computes.**\n")
    plot = "\n![loss curves](loss.png)\n" if (output_dir / "loss.png").is_file() else ""
    body = f"""
# {summary['model_class']}, trained with colt5-train

A CoLT5 model (conditionally routed long-range transformer: light local attention and a narrow MLP for every
token, heavy attention and a wide MLP for routed tokens) trained with the `colt5` package's training script.

```python
from transformers import {auto_class}, AutoTokenizer

model = {auto_class}.from_pretrained("{summary['model_path']}", trust_remote_code=True)  # or `import colt5`
tokenizer = AutoTokenizer.from_pretrained("{summary['model_path']}")
```

## Evaluation (held-out documents)

- start: {_format_eval(summary['start_eval'])}
- end: {_format_eval(summary['end_eval'])}

## Training

| setting | value |
|---|---|
{table}

Command: `{summary['command']}`
{plot}{sample}"""
    path = output_dir / "README.md"
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(path)
    return path


def push_checkpoint(output_dir: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Uploads the checkpoint folder as it is on disk (weights, config, model code, tokenizer, model card, plot)
    to `repo_id` in one commit, as Trainer.push_to_hub does; Trainer's resumable checkpoints stay local. On any
    failure it raises SystemExit with what went wrong and how to upload later; the local folder is not touched."""
    retry = f"hf upload {repo_id} {output_dir} --exclude 'checkpoint-*' 'runs/*'"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise SystemExit(
            f"Not pushed to {repo_id}: HF_HUB_OFFLINE is set. The checkpoint is saved in {output_dir}; upload it "
            f"when online with: {retry}"
        )
    token = token or get_token()
    if token is None:
        raise SystemExit(
            f"Not pushed to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN). The checkpoint "
            f"is saved in {output_dir}; upload it with: {retry}"
        )
    api = HfApi(token=token, library_name="colt5")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=output_dir,
            commit_message="Upload CoLT5 checkpoint trained with colt5-train",
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except Exception as error:  # noqa: BLE001 -- whatever the Hub or the network raised, the message says it
        raise SystemExit(
            f"Not pushed to {repo_id}: {type(error).__name__}: {error}\nThe checkpoint is saved in {output_dir} "
            f"(nothing was lost); upload it later with: {retry}"
        ) from error
    print(f"pushed {output_dir} to {repo.repo_id}: {commit.commit_url}")
    return repo.repo_id
