"""The README's examples of the layer family run as written (on the CPU, at the sizes printed there)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Cross attention over long memories, image attention, routing options"


def section_examples(section: str = SECTION) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.index("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_the_section_has_its_three_examples():
    assert len(section_examples()) == 3


@pytest.mark.parametrize("index", range(3))
def test_readme_example_runs(index):
    namespace: dict = {}
    exec(compile(section_examples()[index], f"README.md example {index}", "exec"), namespace)
    if index == 0:
        assert namespace["out"].shape == (2, 1024, 512)
    elif index == 1:
        assert namespace["out"].shape == (1, 256, 64, 64)
        assert namespace["feature_map"].grad is not None
    else:
        assert namespace["y"].shape == (3, 2048, 256)
        counts = namespace["attention"].q_router(namespace["x"], 0.0625, namespace["mask"]).mask.sum(-1)
        assert counts.flatten().tolist() == [128, 63, 19]  # the amounts the README's comment states
        assert namespace["hidden"].shape == (1, 1024, 256)


def test_migration_example_runs():
    (example,) = section_examples("## Migrating from colt5-attention")
    namespace: dict = {}
    exec(compile(example, "README.md migration example", "exec"), namespace)
    assert namespace["out"].shape == (2, 2048, 512)
    assert namespace["block"].attention.light_window_size == 64  # light_window_size=128: 64 tokens on each side


def test_encoder_decoder_example_runs(tmp_path, monkeypatch):
    (example,) = section_examples("## Encoder-decoder (`CoLT5ForConditionalGeneration`)")
    monkeypatch.chdir(tmp_path)  # it saves a checkpoint folder
    namespace: dict = {}
    exec(compile(example, "README.md encoder-decoder example", "exec"), namespace)
    assert namespace["summaries"].shape[0] == 2 and namespace["summaries"].shape[1] <= 17
    assert type(namespace["reloaded"]).__name__ == "CoLT5ForConditionalGeneration"
    assert namespace["model"].model.embed_tokens.weight.grad is not None
