"""The training script's sequence-to-sequence task (colt5.train --task seq2seq): the embedded summarisation data,
input/target encoding, the ROUGE-L metric, argument checks and a real Seq2SeqTrainer run end to end (eval loss,
ROUGE-L, model card, plot, sample, reload through AutoModelForSeq2SeqLM)."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset
from rouge_score import rouge_scorer
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer

from colt5 import CoLT5ForConditionalGeneration
from colt5.train import main, parse_args, preset_config, rouge_l_metric
from colt5.training_data import prepare_seq2seq, summarization_pairs

SOURCE = textwrap.dedent(
    '''
    """Tools for counting things.

    A longer explanation that is not part of the summary.
    """
    import os


    class Counter:
        """Counts the items it is given, one at a time."""

        def add(self, item):
            """Adds one item."""
            self.total = getattr(self, "total", 0) + 1


    def helper():
        """Too short."""
        return os.sep
    '''
)


def test_summarization_pairs_strip_every_docstring_and_keep_the_first_paragraph():
    (module_code, module_summary), (class_code, class_summary) = summarization_pairs(SOURCE)
    assert module_summary == "Tools for counting things."
    assert class_summary == "Counts the items it is given, one at a time."
    for code in (module_code, class_code):
        assert '"""' not in code and "Adds one item" not in code
    assert "def helper():" in module_code and "return os.sep" in module_code
    assert class_code.startswith("class Counter:") and "def helper" not in class_code
    compile(module_code.replace("def helper():\n", "def helper():\n    pass\n"), "module", "exec")


def test_summarization_pairs_skip_summaries_under_four_words():
    assert summarization_pairs('"""Short one."""\nx = 1\n') == []


def test_prepare_seq2seq_pads_inputs_and_targets_to_fixed_lengths():
    tokenizer = ByT5Tokenizer()
    pairs = Dataset.from_dict({"doc": ["a" * 50, "bb"], "summary": ["xyz", "w" * 30]})
    encoded = prepare_seq2seq(pairs, tokenizer, 20, 8, input_column="doc", target_column="summary")
    assert [len(ids) for ids in encoded["input_ids"]] == [20, 20]
    assert encoded["attention_mask"][1] == [1] * 3 + [0] * 17  # "bb" and EOS
    assert encoded["labels"][0] == tokenizer("xyz")["input_ids"] + [-100] * 4
    assert encoded["labels"][1][-1] == tokenizer.eos_token_id and len(encoded["labels"][1]) == 8
    with pytest.raises(ValueError, match="--target-column"):
        prepare_seq2seq(pairs, tokenizer, 20, 8, input_column="doc", target_column="target")


def test_rouge_l_metric_scores_decoded_generations_against_the_labels():
    tokenizer = ByT5Tokenizer()
    references = ["the cat sat on the mat", "a quick brown fox"]
    generated = ["the cat was on a mat", "a quick brown fox"]
    predictions = [[0] + tokenizer(text)["input_ids"] for text in generated]
    labels = [tokenizer(text)["input_ids"] for text in references]
    width = max(map(len, predictions + labels))
    predictions = np.array([row + [-100] * (width - len(row)) for row in predictions])
    labels = np.array([row + [-100] * (width - len(row)) for row in labels])
    metrics = rouge_l_metric(tokenizer)((predictions, labels))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated)])
    assert metrics["rougeL"] == pytest.approx(expected) and 0.5 < metrics["rougeL"] < 1.0


def test_preset_gives_the_decoder_the_t5_sizes():
    base = preset_config("base", 16384, "seq2seq")
    assert (base["decoder_num_heads"], base["decoder_head_dim"], base["decoder_intermediate_size"]) == (12, 64, 2048)
    assert preset_config("large", 16384, "seq2seq")["decoder_intermediate_size"] == 2816
    assert "decoder_num_heads" not in preset_config("base", 16384)  # causal and classification: the defaults


@pytest.mark.parametrize(
    "argv, message",
    [(["--lora-rank", "4"], "--lora-rank"), (["--target-len", "0"], "--target-len must be >= 1")],
)
def test_bad_seq2seq_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--task", "seq2seq", *argv])
    assert message in capsys.readouterr().err


TINY_SEQ2SEQ = ["--task", "seq2seq", "--preset", "tiny", "--seq-len", "256", "--target-len", "48", "--batch-size", "4",
                "--max-eval-sequences", "8", "--logging-steps", "5", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 Seq2SeqTrainer steps of the tiny encoder-decoder on the embedded summarisation task."""
    output_dir = tmp_path_factory.mktemp("seq2seq") / "colt5-seq2seq"
    main([*TINY_SEQ2SEQ, "--steps", "30", "--eval-steps", "15", "--sample-tokens", "24", "--output-dir",
          str(output_dir)])
    return output_dir


def test_seq2seq_run_learns_and_reports_rouge(trained):
    summary = json.loads((trained / "train_summary.json").read_text())
    start, end = summary["start_eval"], summary["end_eval"]
    assert summary["task"] == "seq2seq" and summary["model_class"] == "CoLT5ForConditionalGeneration"
    assert start["eval_loss"] == pytest.approx(math.log(384), abs=0.4)
    assert end["eval_loss"] < start["eval_loss"] - 1.0
    # Each evaluation generated the held-out targets (up to --target-len tokens) and scored them.
    for entry in (start, end):
        assert isinstance(entry["eval_rougeL"], float)
    state = json.loads((trained / "checkpoint-30" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [0, 15, 30]
    assert all(0 < entry["eval_generated_tokens"] <= 48 for entry in evals)
    assert summary["tokens_per_step"] == 4 * (256 + 48)
    assert summary["train_sequences"] > 500  # modules and classes of the standard library
    card = (trained / "README.md").read_text()
    assert "pipeline_tag: summarization" in card and "AutoModelForSeq2SeqLM" in card
    assert f"ROUGE-L {end['eval_rougeL']:.3f}" in card and "![loss curves](loss.png)" in card
    sample = summary["sample"]
    assert sample["loaded_with"] == "AutoModelForSeq2SeqLM" and sample["reference"]
    assert sample["completion"] in card and sample["reference"] in card
    assert sample["cache_check"]["passed"] and sample["cache_check"]["new_tokens"] == 24


def test_seq2seq_checkpoint_loads_and_generates_targets_of_the_trained_length(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["CoLT5ForConditionalGeneration"] and config["is_encoder_decoder"]
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_colt5.CoLT5ForConditionalGeneration"
    model = AutoModelForSeq2SeqLM.from_pretrained(trained).eval()
    assert type(model) is CoLT5ForConditionalGeneration
    assert model.generation_config.max_new_tokens == 48
    tokenizer = AutoTokenizer.from_pretrained(trained)
    inputs = tokenizer(["def f(x):\n    return x + 1\n"], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, min_new_tokens=48)
    assert output.shape == (1, 49)


def test_seq2seq_from_a_jsonl_file_with_named_columns(tmp_path):
    rows = [{"doc": f"def function_{i}(value):\n    return value * {i}\n" * 20, "summary": f"Multiply by {i}."}
            for i in range(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "run"
    main([*TINY_SEQ2SEQ, "--data", str(data), "--input-column", "doc", "--target-column", "summary", "--steps", "4",
          "--eval-steps", "4", "--eval-fraction", "0.2", "--sample-tokens", "0", "--output-dir", str(output_dir)])
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["data"] == str(data) and summary["steps"] == 4 and "eval_rougeL" in summary["end_eval"]
    with pytest.raises(SystemExit, match="--input-column"):
        main([*TINY_SEQ2SEQ, "--data", str(data), "--steps", "1", "--output-dir", str(tmp_path / "bad")])
