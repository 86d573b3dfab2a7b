# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Training data for `colt5.train`: documents from the embedded corpus, local files or the Hub, split into train
and held-out documents, tokenized and packed (language modelling), truncated with labels (classification), or as
input and target pairs (sequence to sequence).

The embedded corpus is the Python standard library's own source, read from the running interpreter: no download,
millions of bytes, and real long-range structure (names defined at the top of a file are used far below). Its
sequence-to-sequence task is summarising code: the input is a module's or a class's source with every docstring
removed, the target the first paragraph of its own docstring, written by the code's authors.
"""

import ast
import math
import sysconfig
import textwrap
import zlib
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

EMBEDDED_CORPUS = "python-stdlib"
# Test suites and vendored or generated code are repetitive; the rest of the standard library is ordinary source.
_EXCLUDED_STDLIB_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
# The classification default: which of these standard-library packages a piece of source comes from.
STDLIB_CLASSIFICATION_PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "xml")

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def stdlib_documents() -> Dataset:
    """The embedded corpus: one document per `.py` file of the running interpreter's standard library (tests and
    vendored code left out), in path order. Columns: `text`, `path` (relative to the library), `package` (the
    top-level module or package the file belongs to)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path for path in root.rglob("*.py") if not _EXCLUDED_STDLIB_PARTS.intersection(path.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"Found no Python source under {root}: this interpreter ships without its standard library's source. "
            "Pass --data with your own text files instead."
        )
    relative = [path.relative_to(root) for path in files]
    return Dataset.from_dict(
        {
            "text": [path.read_text(encoding="utf-8", errors="replace") for path in files],
            "path": [path.as_posix() for path in relative],
            "package": [path.parts[0].removesuffix(".py") for path in relative],
        }
    )


def stdlib_classification_documents() -> Dataset:
    """The embedded classification task: source files of `STDLIB_CLASSIFICATION_PACKAGES`, labelled with their
    package (columns `text`, `path`, `label`)."""
    documents = stdlib_documents().filter(lambda row: row["package"] in STDLIB_CLASSIFICATION_PACKAGES)
    documents = documents.rename_column("package", "label")
    return documents.cast_column("label", ClassLabel(names=list(STDLIB_CLASSIFICATION_PACKAGES)))


def _summary(docstring: str | None) -> str | None:
    """A docstring's first paragraph with its whitespace collapsed; None when it is shorter than four words (such
    as a bare module name), which no reader would call a summary."""
    if not docstring:
        return None
    summary = " ".join(docstring.strip().split("\n\n")[0].split())
    return summary if len(summary.split()) >= 4 else None


def summarization_pairs(source: str) -> list[tuple[str, str]]:
    """(code, summary) pairs of one Python file: the module without any docstring and its module docstring's first
    paragraph, and the same for each class with a docstring (its source, dedented). Pairs without a summary are
    left out. Raises SyntaxError for source that does not parse."""
    tree = ast.parse(source)
    documented = [tree, *(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))]
    docstring_lines = set()
    for node in [tree, *(node for node in ast.walk(tree)
                         if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]:
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            docstring_lines.update(range(first.lineno - 1, first.end_lineno))
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in documented:
        summary = _summary(ast.get_docstring(node))
        if summary is None:
            continue
        span = range(len(lines)) if node is tree else range(node.lineno - 1, node.end_lineno)
        code = textwrap.dedent("".join(lines[i] for i in span if i not in docstring_lines))
        pairs.append((code, summary))
    return pairs


def stdlib_summarization_documents(min_input_chars: int = 1000) -> Dataset:
    """The embedded sequence-to-sequence task: summarising standard-library code. For each module, and each
    class, with a docstring and at least `min_input_chars` characters of code: the code without docstrings
    (`input`), its docstring's first paragraph (`target`) and the file's `path` (a file's pairs stay on one side
    of the held-out split). The generated codec modules of `encodings` are left out: their docstrings are one
    template."""
    rows = {"input": [], "target": [], "path": []}
    for document in stdlib_documents():
        if document["package"] == "encodings":
            continue
        try:
            pairs = summarization_pairs(document["text"])
        except (SyntaxError, ValueError):  # a few files are templates or in an older syntax
            continue
        for code, summary in pairs:
            if len(code) >= min_input_chars:
                rows["input"].append(code)
                rows["target"].append(summary)
                rows["path"].append(document["path"])
    return Dataset.from_dict(rows)


def load_documents(
    data: str | None, dataset_name: str | None, dataset_config: str | None = None, task: str = "causal-lm"
) -> DatasetDict:
    """Documents from the first source given: local `data` (a text file, a folder of text files, or a
    JSON/JSONL/CSV/Parquet file with a text column), a Hub `dataset_name`, else the embedded corpus.

    A folder of text files gives one document per file; for classification its sub-folders are the labels
    (`data/positive/*.txt`, `data/negative/*.txt`). Returns the splits found (e.g. only `train`)."""
    if data is not None and dataset_name is not None:
        raise ValueError("Pass either --data (local files) or --dataset (a Hub dataset name), not both.")
    if data is not None:
        return _load_local(Path(data), task)
    if dataset_name is not None:
        return _load_hub(dataset_name, dataset_config)
    if task == "classification":
        return DatasetDict(train=stdlib_classification_documents())
    if task == "seq2seq":
        return DatasetDict(train=stdlib_summarization_documents())
    return DatasetDict(train=stdlib_documents())


def _load_local(path: Path, task: str) -> DatasetDict:
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist: pass a text file, a folder of text files, or a "
                                "JSON/JSONL/CSV/Parquet file.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"--data {path} is an empty folder.")
        columns = {"text": [p.read_text(encoding="utf-8", errors="replace") for p in files]}
        if task == "classification":
            labels = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in files]
            if None in labels:
                raise ValueError(
                    f"--data {path}: for classification a folder needs one sub-folder per label "
                    f"(e.g. {path}/positive/*.txt); {files[labels.index(None)].name} is not in one."
                )
            columns["label"] = labels
            documents = Dataset.from_dict(columns).class_encode_column("label")
        else:
            documents = Dataset.from_dict(columns)
        return DatasetDict(train=documents)
    builder = _FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        # Any other file is plain text, one document per file.
        return load_dataset("text", data_files={"train": str(path)}, sample_by="document")
    return load_dataset(builder, data_files={"train": str(path)})


def _load_hub(name: str, config: str | None) -> DatasetDict:
    try:
        return load_dataset(name, config)
    except (ConnectionError, OSError) as error:
        raise ConnectionError(
            f"Could not load the dataset {name!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "This needs network access (and no HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or a copy in the local "
            "datasets cache; without it, pass local files with --data or leave both out for the embedded corpus."
        ) from error


def split_documents(documents: DatasetDict, eval_fraction: float, seed: int = 0) -> DatasetDict:
    """`train` and `validation` splits. An existing `validation` (or `test`) split is kept; otherwise whole
    documents are held out: those whose `path` (or index) hashes into `eval_fraction`, so the split does not
    depend on the order or number of the other documents."""
    if "train" not in documents:
        raise ValueError(f"The data has no 'train' split (it has {sorted(documents)}).")
    for held_out in ("validation", "test"):
        if held_out in documents:
            return DatasetDict(train=documents["train"], validation=documents[held_out])
    if not 0 < eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {eval_fraction}.")
    train = documents["train"]
    keys = train["path"] if "path" in train.column_names else [str(i) for i in range(len(train))]
    threshold = eval_fraction * 2**32
    is_held_out = [zlib.crc32(f"{seed}:{key}".encode()) < threshold for key in keys]
    held_out_rows = [i for i, held in enumerate(is_held_out) if held]
    train_rows = [i for i, held in enumerate(is_held_out) if not held]
    if not held_out_rows or not train_rows:
        # Too few documents for the hash to put some on each side: hold out the last one.
        if len(train) < 2:
            raise ValueError("The data has a single document: a held-out split needs at least two.")
        held_out_rows, train_rows = [len(train) - 1], list(range(len(train) - 1))
    return DatasetDict(train=train.select(train_rows), validation=train.select(held_out_rows))


def _check_text_column(dataset: Dataset, text_column: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The data has no column {text_column!r} (columns: {dataset.column_names}): pass --text-column."
        )


def pack_for_language_modeling(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, text_column: str = "text"
) -> Dataset:
    """Tokenizes every document, ends it with EOS, concatenates them in order and cuts the stream into sequences
    of `seq_len` tokens (the remainder is dropped). Columns: `input_ids` and `labels` (the same tokens: the model
    shifts them)."""
    _check_text_column(documents, text_column)
    eos = tokenizer.eos_token_id

    def pack(batch: dict) -> dict:
        stream = []
        for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        sequences = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": sequences, "labels": [list(seq) for seq in sequences]}

    # One batch of 1,000 documents per map call: the remainder lost at each cut is small against the batch.
    packed = documents.map(pack, batched=True, batch_size=1000, remove_columns=documents.column_names)
    if len(packed) == 0:
        raise ValueError(
            f"The documents hold fewer than {seq_len} tokens in all: nothing to train on. Lower --seq-len or add data."
        )
    return packed


def prepare_classification(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
) -> tuple[Dataset, list[str]]:
    """Tokenizes each document (truncated to `max_len` tokens) with its label as an index. String labels are
    mapped through `label_names` (sorted names of the train split when None). Returns the dataset (`input_ids`,
    `labels`) and the label names."""
    _check_text_column(documents, text_column)
    if label_column not in documents.column_names:
        raise ValueError(
            f"Classification needs a label column; the data has no {label_column!r} (columns: "
            f"{documents.column_names}): pass --label-column."
        )
    feature = documents.features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_index = None
    else:
        values = documents[label_column]
        if label_names is None:
            label_names = sorted({str(value) for value in values})
        names = list(label_names)
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(value) for value in values} - set(index))
        if unknown:
            raise ValueError(f"Labels {unknown[:5]} of the held-out data do not occur in the training data.")
        to_index = index

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_len)
        labels = batch[label_column] if to_index is None else [to_index[str(v)] for v in batch[label_column]]
        return {"input_ids": encoded["input_ids"], "labels": labels}

    return documents.map(encode, batched=True, remove_columns=documents.column_names), names


def prepare_seq2seq(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    input_len: int,
    target_len: int,
    input_column: str = "input",
    target_column: str = "target",
) -> Dataset:
    """Tokenizes each pair: `input_ids` and `attention_mask` truncated or padded to `input_len` tokens, `labels`
    the target's tokens with EOS, truncated or padded with -100 to `target_len`. Fixed lengths give every step
    the same cost, so the measured tokens/s is the model's."""
    for column, option in ((input_column, "--input-column"), (target_column, "--target-column")):
        if column not in documents.column_names:
            raise ValueError(
                f"Sequence to sequence needs an input and a target column; the data has no {column!r} (columns: "
                f"{documents.column_names}): pass {option}."
            )

    def encode(batch: dict) -> dict:
        inputs = tokenizer(batch[input_column], truncation=True, max_length=input_len, padding="max_length")
        targets = tokenizer(batch[target_column], truncation=True, max_length=target_len)["input_ids"]
        labels = [ids + [-100] * (target_len - len(ids)) for ids in targets]
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}

    encoded = documents.map(encode, batched=True, remove_columns=documents.column_names)
    if len(encoded) == 0:
        raise ValueError("The data has no input and target pairs.")
    return encoded


def bytes_per_token(sequences: Dataset, tokenizer: PreTrainedTokenizerBase) -> float:
    """UTF-8 bytes per predicted token over packed `sequences` (targets are tokens 1..n-1 of each sequence):
    converts a loss in nats per token to bits per byte, `loss / ln 2 / bytes_per_token`. Byte tokenizers give
    slightly under 1 (end-of-document tokens carry no byte)."""
    special = set(tokenizer.all_special_ids)
    # ByT5: one token per byte after the special tokens; counting them is exact where decoding a sequence cut in
    # the middle of a multi-byte character would not be.
    is_byte_level = isinstance(tokenizer, ByT5Tokenizer)
    targets = byte_count = 0
    for ids in sequences["input_ids"]:
        predicted = [i for i in ids[1:] if i not in special]
        targets += len(ids) - 1
        byte_count += len(predicted) if is_byte_level else len(tokenizer.decode(predicted).encode("utf-8"))
    if targets == 0:
        raise ValueError("No predicted tokens to measure bytes over.")
    return byte_count / targets


def evenly_spaced(dataset: Dataset, count: int | None) -> Dataset:
    """At most `count` rows spread evenly over `dataset` (all rows when `count` is None or larger): a small
    held-out set that still covers every part of the packed stream."""
    if count is None or count >= len(dataset):
        return dataset
    step = len(dataset) / count
    return dataset.select([math.floor(i * step) for i in range(count)])
