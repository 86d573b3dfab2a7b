"""GPU checks of the training script in one call; prints a table and writes JSON.

1. The main job as README gives it (defaults: small model, embedded corpus, bf16 and the Triton router on CUDA).
2. The paper's CoLT5-B size (preset base) on 16k-token sequences with activation checkpointing.
3. With 2 or more GPUs: the same short run on one GPU (batch 8) and on two processes of batch 4 each (same global
   batch) with DDP, DDP + activation checkpointing, FSDP2, FSDP2 + FSDP's activation checkpointing; the losses of
   every step are compared with the one-GPU run.

    python3 scripts/verify_training_gpu.py --json results/train_gpu.json [--work-dir /tmp/colt5-train-gpu]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from colt5.train import last_complete_checkpoint

SHORT_RUN = ["--preset", "small", "--seq-len", "2048", "--steps", "20", "--logging-steps", "1", "--eval-steps", "20",
             "--max-eval-sequences", "16", "--sample-tokens", "0", "--lr", "1e-3"]


def run(name: str, args: list[str], work_dir: Path, processes: int = 1) -> dict:
    output_dir = work_dir / name
    launcher = [sys.executable, "-m", "colt5.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    "-m", "colt5.train"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    started = time.perf_counter()
    result = subprocess.run([*launcher, *args, "--output-dir", str(output_dir), "--overwrite"], env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    (work_dir / f"{name}.log").write_text(result.stdout + result.stderr)
    record = {"name": name, "processes": processes, "args": args, "returncode": result.returncode, "wall_s": wall}
    if result.returncode != 0:
        record["error"] = (result.stdout + result.stderr)[-3000:]
        print(f"{name}: FAILED\n{record['error']}", flush=True)
        return record
    summary = json.loads((output_dir / "train_summary.json").read_text())
    history = json.loads((last_complete_checkpoint(output_dir) / "trainer_state.json").read_text())["log_history"]
    record.update(
        losses=[entry["loss"] for entry in history if "loss" in entry],
        start_eval=summary["start_eval"],
        end_eval=summary["end_eval"],
        tokens_per_second=summary["tokens_per_second"],
        peak_memory_gib=summary.get("peak_memory_gib"),
        wrapping=summary["distributed_wrapping"],
        bf16=summary["bf16"],
        parameters=summary["parameters"],
        sample=summary.get("sample"),
    )
    print(f"{name}: ok in {wall:.0f} s", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/colt5-train-gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This script checks training on GPUs; this machine has none.")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()

    records = [
        run("main-job", [], args.work_dir),
        run("base-16k", ["--preset", "base", "--seq-len", "16384", "--batch-size", "1", "--steps", "20",
                         "--logging-steps", "5", "--eval-steps", "20", "--max-eval-sequences", "8",
                         "--gradient-checkpointing", "--lr", "5e-4", "--sample-tokens", "64"], args.work_dir),
    ]
    comparisons = []
    if gpus >= 2:
        comparisons = [
            run("one-gpu-b8", [*SHORT_RUN, "--batch-size", "8"], args.work_dir),
            run("ddp-2x4", [*SHORT_RUN, "--batch-size", "4"], args.work_dir, processes=2),
            run("ddp-2x4-ckpt", [*SHORT_RUN, "--batch-size", "4", "--gradient-checkpointing"], args.work_dir, 2),
            run("fsdp-2x4", [*SHORT_RUN, "--batch-size", "4", "--fsdp"], args.work_dir, processes=2),
            run("fsdp-2x4-ckpt", [*SHORT_RUN, "--batch-size", "4", "--fsdp", "--gradient-checkpointing"],
                args.work_dir, 2),
        ]
    records += comparisons

    import datasets
    import transformers
    import triton

    report = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": triton.__version__, "datasets": datasets.__version__},
        "command": "python3 scripts/verify_training_gpu.py " + " ".join(sys.argv[1:]),
        "runs": records,
    }
    reference = comparisons[0].get("losses") if comparisons else None
    print(f"\n{report['date']}  {gpus} x {report['gpu']}  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print("| run | processes | wrapping | eval loss start -> end | tokens/s | peak GiB/GPU | max abs loss diff vs one GPU |")
    print("|---|---|---|---|---|---|---|")
    for record in records:
        if record["returncode"] != 0:
            print(f"| {record['name']} | {record['processes']} | FAILED (see {record['name']}.log) | | | | |")
            continue
        diff = ""
        if reference and record in comparisons:
            record["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(record["losses"], reference))
            diff = f"{record['max_abs_loss_diff']:.4f} over {len(reference)} steps"
        memory = f"{record['peak_memory_gib']:.2f}" if record["peak_memory_gib"] is not None else ""
        print(f"| {record['name']} | {record['processes']} | {record['wrapping'] or '-'} | "
              f"{record['start_eval']['eval_loss']:.3f} -> {record['end_eval']['eval_loss']:.3f} | "
              f"{record['tokens_per_second']:,.0f} | {memory} | {diff} |")
    if gpus < 2:
        print("one GPU only: the DDP and FSDP comparisons need two")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
