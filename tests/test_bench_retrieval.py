"""The retrieval benchmark (scripts/bench_retrieval.py): its curriculum, the light-only ablation, the encoder's
masked answers, and a smoke run of each task on the CPU."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_retrieval  # noqa: E402

from colt5.retrieval_eval import PasskeyPrompts  # noqa: E402


def test_curriculum_doubles_the_length_stage_by_stage_at_a_fixed_token_budget():
    plan = bench_retrieval.curriculum(100, 512, 4096, 0.6, 8192, seed=0)
    assert plan == bench_retrieval.curriculum(100, 512, 4096, 0.6, 8192, seed=0)
    assert {length for length, _ in plan} == {512, 1024, 2048, 4096}
    assert all(batch == 8192 // length for length, batch in plan)
    # The longest allowed length only grows: no 4096 before the last stage, which starts at 3/4 of the ramp (step 45).
    assert max(length for length, _ in plan[:45]) <= 2048 and plan[0][0] == 512
    assert sum(length == 4096 for length, _ in plan[60:]) > 10
    assert bench_retrieval.curriculum(4, 512, 16384, 0.5, 1024, seed=0)[-1][1] == 1  # at least one example


def test_light_only_causal_model_ignores_tokens_beyond_its_windows():
    torch.manual_seed(0)
    models = bench_retrieval.build_models("causal", 256, 384, smoke=True)
    light_only, routed = models["colt5 light only"].eval(), models["colt5"].eval()
    reach = 2 * 15  # two layers of a 15-token window
    ids = torch.randint(3, 259, (1, 256))
    changed = ids.clone()
    changed[0, :64] = (ids[0, :64] - 3 + 1) % 256 + 3  # tokens further than `reach` from positions >= 64 + reach
    with torch.no_grad():
        before, after = (light_only(input_ids=tokens).logits[0] for tokens in (ids, changed))
        # Equal up to rounding: the heavy MLP's matmuls run over the routed tokens, a set the change alters.
        torch.testing.assert_close(before[64 + reach :], after[64 + reach :], rtol=0, atol=1e-6)
        assert (before[64 : 64 + reach] - after[64 : 64 + reach]).abs().amax() > 1e-3
        # The heavy branch is what reaches further: the routed model's later outputs move with those tokens.
        before, after = (routed(input_ids=tokens).logits[0] for tokens in (ids, changed))
        assert not torch.allclose(before[64 + reach :], after[64 + reach :])


@pytest.mark.parametrize("task", ["causal", "encoder"])
def test_light_only_attention_is_the_light_branch(task):
    torch.manual_seed(0)
    model = bench_retrieval.build_models(task, 256, 384, smoke=True)["colt5 light only"]
    layer = (model.model if task == "causal" else model.encoder).layers[0]
    x, mask = torch.randn(2, 64, 64), torch.ones(2, 64, dtype=torch.bool)
    mask[1, :5] = False
    positions = torch.arange(64).expand(2, 64)
    attention = layer.attention.attention
    out = layer.attention(x, mask, positions)
    if task == "causal":
        torch.testing.assert_close(out, attention._light_full(x, mask, positions)[0], rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, attention._light(x, mask, positions), rtol=0, atol=0)
    assert not torch.allclose(out, attention(x, mask, positions))


def test_encoder_input_masks_the_answer_with_one_sentinel_per_position():
    tokenizer = ByT5Tokenizer()
    prompts = PasskeyPrompts(tokenizer, key_length=3)
    examples = [prompts.example(400, 0.5, random.Random(seed)) for seed in range(2)]
    sentinels = tokenizer.convert_tokens_to_ids([bench_retrieval.SENTINEL.format(i) for i in range(4)])
    masked = bench_retrieval.masked(examples, sentinels)
    assert masked.shape == (2, 400)
    assert masked[:, -4:].tolist() == [sentinels, sentinels]
    assert torch.equal(masked[:, :-4], torch.tensor([example.input_ids[:-4] for example in examples]))
    assert bench_retrieval.answers(examples).tolist() == [example.input_ids[-4:] for example in examples]


@pytest.mark.parametrize("task", ["causal", "encoder"])
def test_smoke_run_reports_every_model(task, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    out = tmp_path / "retrieval.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_retrieval.py"), "--smoke", "--task", task, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads(out.read_text())["results"]
    baseline = "llama" if task == "causal" else "bert"
    assert list(saved) == [baseline, "colt5", "colt5 random routing", "colt5 light only"]
    for name, measured in saved.items():
        assert f"| {name} | " in result.stdout
        assert [row["length"] for row in measured["rows"]] == [512] * 5
        assert all(0 <= row["accuracy"] <= 1 for row in measured["rows"]) and measured["tokens_per_s"] > 0


def test_routing_report_finds_the_key_where_the_memory_holds_every_earlier_block():
    """With a memory larger than the context, a block's memory is every token before the block: the key is in it
    exactly when the needle's key lies before the block of the position that reads it. Every token is a heavy query
    (the causal default); a query router at 1/4 routes that position as its gate decides."""
    tokenizer = ByT5Tokenizer()
    prompts = PasskeyPrompts(tokenizer, key_length=1, alphabet=bench_retrieval.KEY_SENTINELS)
    torch.manual_seed(0)
    overrides = dict(routed_kv_tokens=1024, causal_block_size=128)
    model = bench_retrieval.build_models("causal", 512, len(tokenizer), True, colt5_overrides=overrides)["colt5"]
    report = bench_retrieval.routing_report(model.eval(), prompts, [384, 512], 1024, seed=3, device=torch.device("cpu"))
    rng, shares = random.Random(3), []
    for length in (384, 512):
        examples = [prompts.example(length, depth, rng) for depth in bench_retrieval.EVAL_DEPTHS for _ in range(2)]
        block_start = (length - 2) // 128 * 128
        expected = sum(example.input_ids.index(example.input_ids[-1]) < block_start for example in examples) / 10
        rows = [row for row in report if row["length"] == length]
        assert [row["layer"] for row in rows] == [0, 1]
        assert all(row["answer_routed"] == 1.0 and row["key_in_memory"] == expected for row in rows)
        shares.append(expected)
    assert any(0 < share < 1 for share in shares)  # some needles in the reading block, some before it

    gated = bench_retrieval.build_models("causal", 256, len(tokenizer), True,
                                         colt5_overrides=dict(overrides, routed_query_tokens=0.25))["colt5"].eval()
    report = bench_retrieval.routing_report(gated, prompts, [256], 1024, seed=3, device=torch.device("cpu"))
    rng = random.Random(3)
    examples = [prompts.example(256, depth, rng) for depth in bench_retrieval.EVAL_DEPTHS for _ in range(2)]
    decisions = []
    hooks = [layer.attention.q_router.register_forward_hook(lambda m, i, out: decisions.append(out.routed[:, -1]))
             for layer in gated.model.layers]
    with torch.no_grad():
        gated(input_ids=torch.tensor([example.input_ids[:-1] for example in examples]))
    for hook in hooks:
        hook.remove()
    assert [row["answer_routed"] for row in report] == [routed.float().mean().item() for routed in decisions]
    assert bench_retrieval.routing_report(bench_retrieval.build_models("causal", 256, len(tokenizer), True)["llama"],
                                          prompts, [256], 1024, seed=3, device=torch.device("cpu")) is None
