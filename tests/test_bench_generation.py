"""The generation benchmark (scripts/bench_generation.py): smoke runs on the CPU of its main table and of
--first-generate (fresh processes with cold, then warm on-disk caches), so that a change to the models' API or to
the script cannot break the benchmark unnoticed."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/bench_generation.py", "--smoke", "--batches", "1", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_first_generate_runs_cold_then_warm_processes_and_reports_a_failed_one(tmp_path):
    out = tmp_path / "bench.json"
    # Context -1: that child fails (no prompt of a negative length); the parent reports it and goes on to 128.
    result = run_bench("--contexts", "-1", "128", "--first-generate", "--only", "colt5", "--json", str(out))
    rows = json.loads(out.read_text())["first_generate"]
    assert [(row["model"], row["context"], row["caches"]) for row in rows] == [
        ("colt5", -1, "cold"), ("colt5", -1, "warm"), ("colt5", 128, "cold"), ("colt5", 128, "warm"),
    ]
    for failed in rows[:2]:
        assert failed["error"] == "exit code 1" and "RuntimeError" in failed["stderr_tail"], failed
    for row in rows[2:]:
        assert "error" not in row, row
        times = [row[key] for key in ("process_warmup_s", "first_generate_s", "warm_generate_s", "one_time_s")]
        assert all(math.isfinite(t) for t in times), row
        assert row["process_warmup_s"] >= 0 and row["first_generate_s"] > 0 and row["warm_generate_s"] > 0, row
        # Not asserted >= 0: on a shared CPU a throttled warm run can take longer than the first (seen: -3 ms).
        assert row["one_time_s"] == pytest.approx(row["first_generate_s"] - row["warm_generate_s"]), row
    table = [line.split() for line in result.stdout.splitlines() if line.startswith("colt5")]
    assert [line[:4] for line in table] == [
        ["colt5", "-1", "1", "cold"], ["colt5", "-1", "1", "warm"], ["colt5", "128", "1", "cold"],
        ["colt5", "128", "1", "warm"],
    ]
    assert table[0][4:7] == ["failed:", "exit", "code"]
    assert [float(t) for t in table[3][4:]] == pytest.approx(
        [rows[3][key] for key in ("process_warmup_s", "first_generate_s", "warm_generate_s", "one_time_s")], abs=1e-3
    )


def test_smoke_run_reports_the_one_time_costs_apart(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--contexts", "128", "--new-tokens", "4", "--only", "colt5", "llama", "--json", str(out))
    recorded = json.loads(out.read_text())
    assert math.isfinite(recorded["meta"]["process_warmup_s"]) and recorded["meta"]["process_warmup_s"] >= 0
    assert result.stdout.startswith("# ") and "process warm-up s" in result.stdout.splitlines()[0]
    (row,) = recorded["rows"]
    for name in ("colt5", "llama"):
        first, warm = row[name]["first_generate_s"], row[name]["warm_generate_s"]
        assert first > 0 and warm > 0
        assert row[name]["one_time_s"] == pytest.approx(first - warm)
        assert f"one-time s {row[name]['one_time_s']:.3f}" in result.stdout


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_generation", REPO / "scripts" / "bench_generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def assert_same_weights(model, other, name):
    for (key, weight), (other_key, other_weight) in zip(model.state_dict().items(), other.state_dict().items()):
        assert key == other_key and torch.equal(weight, other_weight), (name, key)


def test_build_models_builds_the_named_models_with_the_same_weights_in_every_subset():
    """--only is checked against MODEL_NAMES before any model is built, and a --first-generate child builds only
    its own model: the names must be build_models' own, and a model's weights the same whatever else is built."""
    bench = load_bench()
    models = bench.build_models(True, torch.device("cpu"), torch.float32)
    assert tuple(models) == bench.MODEL_NAMES
    assert models["llama static"] is models["llama"]
    for name in ("colt5 compiled", "colt5 eager"):
        assert_same_weights(models["colt5"], models[name], name)
    assert models["colt5 compiled"].config.compile_decoding and not models["colt5 eager"].config.cuda_graph_decoding
    torch.manual_seed(1)  # build_models seeds itself
    for name in ("colt5 eager", "llama static"):
        (alone,) = bench.build_models(True, torch.device("cpu"), torch.float32, [name]).values()
        assert_same_weights(models[name], alone, name)


def test_first_generate_rejects_profile():
    result = subprocess.run(
        [sys.executable, "scripts/bench_generation.py", "--smoke", "--first-generate", "--profile"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2 and "Run them separately" in result.stderr, result.stderr
