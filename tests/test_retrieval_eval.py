"""Passkey retrieval (colt5/retrieval_eval.py): the prompts, the teacher-forced scoring against greedy decoding, and
the colt5-retrieval command on tiny CoLT5 and Llama checkpoints."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG
from torch import nn
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from colt5 import CoLT5Config, CoLT5ForCausalLM
from colt5.retrieval_eval import (
    FILLER,
    INTRO,
    NEEDLE,
    QUESTION,
    PasskeyExample,
    PasskeyPrompts,
    evaluate,
    format_table,
    main,
    passkey_correct,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = ByT5Tokenizer()


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids)


def tiny_colt5() -> CoLT5ForCausalLM:
    config = CoLT5Config(**dict(TINY_CONFIG, vocab_size=len(TOKENIZER), routed_kv_tokens=16), is_causal=True,
                         causal_block_size=32, max_position_embeddings=512)
    return CoLT5ForCausalLM(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_example_has_the_exact_length_and_the_needle_where_it_says(depth):
    prompts = PasskeyPrompts(TOKENIZER)
    example = prompts.example(700, depth, random.Random(1))
    assert len(example.input_ids) == 700
    assert re.fullmatch(r"\d{5}", example.key)
    text = decode(example.input_ids)
    assert text.startswith(INTRO) and text.endswith(QUESTION + " " + example.key)
    needle = NEEDLE.format(key=example.key)
    assert decode(example.input_ids[example.needle_start :]).startswith(needle)
    assert text.count(example.key) == 3  # twice in the needle, once as the answer
    assert decode(example.input_ids[-example.answer_length :]) == " " + example.key
    assert example.distance == 700 - example.answer_length - example.needle_start
    # The needle sits between two filler sentences, at the depth's share of the filler.
    filler = text[len(INTRO) : -len(QUESTION) - 6].replace(needle, "")
    before = text[len(INTRO) : text.index(needle)]
    assert before == FILLER * (len(before) // len(FILLER))
    assert abs(len(before) / len(filler) - depth) <= len(FILLER) / len(filler)


def test_depth_zero_is_right_after_the_introduction_and_one_right_before_the_question():
    prompts = PasskeyPrompts(TOKENIZER)
    first = prompts.example(2000, 0.0, random.Random(0))
    last = prompts.example(2000, 1.0, random.Random(0))
    assert first.needle_start == len(TOKENIZER(INTRO, add_special_tokens=False)["input_ids"])
    assert last.distance < len(NEEDLE) + len(FILLER) + len(QUESTION) + 8 < first.distance
    assert first.distance > 2000 - len(INTRO) - 8


def test_keys_and_filler_vary_with_the_generator_and_repeat_with_its_seed():
    prompts = PasskeyPrompts(TOKENIZER, key_length=7)
    keys = {prompts.example(400, 0.5, random.Random(seed)).key for seed in range(20)}
    assert len(keys) == 20 and all(len(key) == 7 for key in keys)
    assert prompts.example(400, 0.5, random.Random(3)) == prompts.example(400, 0.5, random.Random(3))


def test_haystack_text_is_the_filler_from_a_random_offset():
    haystack = "".join(f"line {i}: the quick brown fox.\n" for i in range(200))
    prompts = PasskeyPrompts(TOKENIZER, haystack=haystack)
    texts = [decode(prompts.example(600, 0.5, random.Random(seed)).input_ids) for seed in range(3)]
    for text in texts:
        hay = text[len(INTRO) : text.index("The pass key is")]
        assert hay and hay in haystack * 2
    assert len({text[len(INTRO) : len(INTRO) + 20] for text in texts}) == 3


def test_an_alphabet_of_single_token_symbols():
    sentinels = [f"<extra_id_{i}>" for i in range(10, 20)]
    prompts = PasskeyPrompts(TOKENIZER, key_length=1, alphabet=sentinels)
    example = prompts.example(400, 0.5, random.Random(0))
    assert example.answer_length == 2 and example.key in sentinels  # a space and the symbol
    assert TOKENIZER.convert_ids_to_tokens(example.input_ids[-1]) == example.key


def test_bad_settings_are_refused_with_their_reason():
    prompts = PasskeyPrompts(TOKENIZER)
    with pytest.raises(ValueError, match=f"needs at least {prompts.min_length} tokens"):
        prompts.example(prompts.min_length - 1, 0.5, random.Random(0))
    assert len(prompts.example(prompts.min_length, 0.5, random.Random(0)).input_ids) == prompts.min_length
    with pytest.raises(ValueError, match="depth must be in"):
        prompts.example(1000, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="key_length must be >= 1"):
        PasskeyPrompts(TOKENIZER, key_length=0)
    with pytest.raises(ValueError, match="at least 2 symbols"):
        PasskeyPrompts(TOKENIZER, alphabet=["7"])
    with pytest.raises(ValueError, match="haystack text is empty"):
        PasskeyPrompts(TOKENIZER, haystack="")


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("make_model", [tiny_colt5, tiny_llama])
def test_scoring_agrees_with_greedy_decoding(make_model):
    """passkey_correct says yes exactly for the continuation greedy decoding writes: the greedy tokens pass, and
    changing any one of them fails."""
    model = make_model()
    example = PasskeyPrompts(TOKENIZER).example(300, 0.5, random.Random(0))
    prompt = example.input_ids[: -example.answer_length]
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy = generated[0, len(prompt) :].tolist()
    as_answer = PasskeyExample(prompt + greedy, len(greedy), example.needle_start, example.key)
    assert passkey_correct(model, [as_answer]) == [True]
    for position in range(len(greedy)):
        changed = list(greedy)
        changed[position] = (changed[position] + 1) % len(TOKENIZER)
        wrong = PasskeyExample(prompt + changed, len(changed), example.needle_start, example.key)
        assert passkey_correct(model, [wrong]) == [False]
    # Batched scoring is the same as one at a time.
    assert passkey_correct(model, [as_answer, wrong, as_answer], batch_size=2) == [True, False, True]
    # Model code without logits_to_keep (all positions' logits) is scored alike.
    assert passkey_correct(AllLogits(model), [as_answer, wrong]) == [True, False]


class AllLogits(nn.Module):
    """A causal LM whose forward has no logits_to_keep argument, as older model code."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=use_cache)


class PasskeyReader(nn.Module):
    """A model that solves the task by reading the key after the needle's first "is " (offset shifts where it
    reads): the logits of the last `logits_to_keep` positions are one-hot on what it read, shifted by one token as
    a language model's are."""

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        marker = TOKENIZER("The pass key is ", add_special_tokens=False)["input_ids"]
        logits = torch.zeros(*input_ids.shape[:1], logits_to_keep, len(TOKENIZER))
        for row, ids in enumerate(input_ids.tolist()):
            start = next(i for i in range(len(ids)) if ids[i : i + len(marker)] == marker) + len(marker)
            key = ids[start + self.offset : start + self.offset + logits_to_keep - 1]
            answer = TOKENIZER(" ", add_special_tokens=False)["input_ids"] + key
            logits[row, torch.arange(logits_to_keep), answer] = 1.0
        return type("Output", (), {"logits": logits})


def test_evaluate_scores_a_model_that_reads_the_key_perfectly_and_one_that_misreads_it_never():
    prompts = PasskeyPrompts(TOKENIZER)
    rows = evaluate(PasskeyReader(), prompts, [400, 800], [0.0, 0.5, 1.0], trials=4, batch_size=3)
    assert [(row["length"], row["depth"]) for row in rows] == [(n, d) for n in (400, 800) for d in (0.0, 0.5, 1.0)]
    assert all(row["accuracy"] == 1.0 and row["trials"] == 4 and row["correct"] == [True] * 4 for row in rows)
    assert all(row["distance"] == round(sum(row["distances"]) / 4) for row in rows)
    assert rows[0]["distance"] > rows[2]["distance"] and rows[3]["distance"] > rows[0]["distance"]
    misread = evaluate(PasskeyReader(offset=1), prompts, [400], [0.5], trials=4)
    assert misread[0]["accuracy"] == 0.0
    table = format_table(rows)
    assert "| 400 | 100% (" in table and "| depth 0.5 |" in table and table.count("\n") == 3


# ---------------------------------------------------------------- the command
def save_checkpoint(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make_model", [tiny_colt5, tiny_llama])
def test_command_prints_a_table_and_writes_json_for_a_checkpoint_folder(make_model, tmp_path, capsys):
    folder = save_checkpoint(make_model(), tmp_path / "model")
    out = tmp_path / "passkey.json"
    main([str(folder), "--lengths", "300", "400", "--depths", "0", "1", "--trials", "2", "--batch-size", "2",
          "--json", str(out)])
    printed = capsys.readouterr().out
    assert "5-digit pass keys, 2 per cell" in printed and type(make_model()).__name__ in printed
    assert re.search(r"\| 300 \| \d+% \(\d+\) \| \d+% \(\d+\) \| \d+% \|", printed)
    assert "| 400 |" in printed
    saved = json.loads(out.read_text())
    assert [(row["length"], row["depth"]) for row in saved["rows"]] == [(300, 0.0), (300, 1.0), (400, 0.0), (400, 1.0)]
    assert saved["settings"]["trials"] == 2 and saved["dtype"] == "torch.float32"


def test_command_explains_what_cannot_run(tmp_path, capsys):
    folder = save_checkpoint(tiny_llama(), tmp_path / "model")
    with pytest.raises(SystemExit, match=r"--lengths \[100\] are shorter than a passkey prompt"):
        main([str(folder), "--lengths", "100", "400"])
    with pytest.raises(SystemExit):
        main([str(folder), "--depths", "1.5"])
    assert "--depths must lie in [0, 1]" in capsys.readouterr().err
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(SystemExit, match="is a file; pass the folder"):
        main([str(tmp_path / "weights.bin")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="the folder lacks what save_pretrained writes"):
        main([str(empty)])


def test_command_says_that_a_hub_name_needs_the_network():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "colt5.retrieval_eval", "colt5-test/no-such-model"], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "could not load 'colt5-test/no-such-model'" in result.stderr and "needs network access" in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_command_runs():
    """The console script the README calls is installed with the package (pyproject's [project.scripts])."""
    command = Path(sys.executable).parent / "colt5-retrieval"
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: colt5-retrieval" in result.stdout and "--haystack" in result.stdout
