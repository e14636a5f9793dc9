"""fineweb.py: shards that decode back to the input, in order; resume; verify; sources; errors.

Everything runs on CPU from local files made of the test data (bench/data.py), with tiny shards (a few thousand
tokens) so that documents are split across shards and there are many files to compare.
"""
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fineweb
from helpers import SHAKESPEARE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = fineweb.EOT
SHARD = 5000  # tokens per shard in these tests


# -----------------------------------------------------------------------------------------------
# Input documents and the token stream they must become


@pytest.fixture(scope="module")
def documents(hellaswag_val):
    """~400 real documents, plus the awkward ones: empty, one mentioning <|endoftext|> as text,
    non-ASCII, and one long enough (~10k tokens) to span three shards."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        shakespeare = f.read()
    paragraphs = [p for p in shakespeare.split("\n\n") if p.strip()][:150]
    hellaswag = []
    with open(hellaswag_val, encoding="utf-8") as f:
        for line, _ in zip(f, range(60)):
            example = json.loads(line)
            hellaswag += [example["ctx"] + " " + ending for ending in example["endings"]]
    awkward = ["", "GPT-2 separates documents with <|endoftext|> in its training data.",
               "Ünïcödé ✓ 🎉 中文 — “quotes”"]
    return paragraphs[:75] + awkward + hellaswag + [shakespeare[:40000]] + paragraphs[75:]


def token_stream(docs) -> np.ndarray:
    """The reference: 50256 then encode_ordinary(doc), for every document, in order."""
    enc = fineweb.gpt2_tokenizer()
    out = []
    for doc in docs:
        out.append(EOT)
        out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)


def shard_files(out_dir) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.endswith(".npy"))


def read_all(out_dir, prefix="edufineweb") -> np.ndarray:
    """Every shard of out_dir, val first, then train in index order."""
    names = [fineweb.shard_name(prefix, i) for i in range(len(shard_files(out_dir)))]
    assert sorted(names) == shard_files(out_dir)
    return np.concatenate([np.load(os.path.join(out_dir, n)) for n in names])


def same_files(dir_a, dir_b):
    """Same shard names with the same bytes, and the same manifest entries."""
    assert shard_files(dir_a) == shard_files(dir_b)
    for name in shard_files(dir_a):
        with open(os.path.join(dir_a, name), "rb") as fa, open(os.path.join(dir_b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    ma, mb = fineweb.load_manifest(str(dir_a)), fineweb.load_manifest(str(dir_b))
    assert ma["shards"] == mb["shards"] and ma["finished"] and mb["finished"]


def leftovers(folder) -> list[str]:
    return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names if n.endswith(".tmp")]


def write_parquet(path, docs, **extra_columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"doc{i}" for i in range(len(docs))], "text": docs, **extra_columns})
    pq.write_table(table, path, row_group_size=64)
    return str(path)


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, key: doc}) + "\n")
    return str(path)


def build(dataset, out_dir, **kw):
    cfg = fineweb.BuildConfig(dataset=str(dataset), out_dir=str(out_dir), shard_size=kw.pop("shard_size", SHARD), **kw)
    return fineweb.build(cfg, progress=False, log=lambda *a: None)


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def parquet_corpus(documents, tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("corpus") / "docs.parquet", documents)


@pytest.fixture(scope="module")
def reference_dir(parquet_corpus, tmp_path_factory):
    """An uninterrupted build of parquet_corpus, 2 workers, small batches (many tasks in flight)."""
    out = tmp_path_factory.mktemp("reference")
    build(parquet_corpus, out, workers=2, batch_chars=3000)
    return out


# -----------------------------------------------------------------------------------------------
# Output format


def test_shards_decode_to_the_documents_in_order(reference_dir, documents):
    names = shard_files(reference_dir)
    expected = token_stream(documents)
    n = -(-len(expected) // SHARD)
    assert n >= 5
    in_order = ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    assert names == sorted(in_order)
    shards = [np.load(os.path.join(reference_dir, name)) for name in in_order]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert [len(s) for s in shards] == [SHARD] * (n - 1) + [len(expected) - SHARD * (n - 1)]
    tokens = np.concatenate(shards)
    assert np.array_equal(tokens, expected)
    # decoding: split on 50256, every piece is one input document, in order
    starts = np.flatnonzero(tokens == EOT)
    assert starts[0] == 0 and len(starts) == len(documents)
    enc = fineweb.gpt2_tokenizer()
    decoded = [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]
    assert decoded == documents


def test_manifest_records_each_shard(reference_dir, documents):
    manifest = fineweb.load_manifest(str(reference_dir))
    assert manifest["finished"] and manifest["settings"]["shard_size"] == SHARD
    position = [0, 0]
    for shard in manifest["shards"]:
        path = os.path.join(reference_dir, shard["file"])
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
        tokens = np.load(path)
        assert shard["tokens"] == len(tokens) and shard["documents"] == np.count_nonzero(tokens == EOT)
        assert shard["start"] == position
        if shard["start"][1] == 0:
            assert tokens[0] == EOT
        position = shard["end"]
    assert position == [len(documents), 0]
    # the long document continues across shards at recorded token offsets
    long_doc = max(range(len(documents)), key=lambda i: len(documents[i]))
    assert sum(s["start"][0] == long_doc and s["start"][1] > 0 for s in manifest["shards"]) >= 2


@pytest.mark.parametrize("workers", [0, 1])
def test_same_bytes_whatever_the_worker_count(parquet_corpus, reference_dir, tmp_path, workers):
    build(parquet_corpus, tmp_path, workers=workers, batch_chars=1 << 20)
    same_files(reference_dir, tmp_path)


def test_same_bytes_whatever_the_read_size(parquet_corpus, reference_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "READ_DOCS", 7)  # `datasets` hands over 7 documents at a time
    build(parquet_corpus, tmp_path, workers=2, batch_chars=2000)
    same_files(reference_dir, tmp_path)
    build(parquet_corpus, tmp_path / "resumed", workers=2, max_tokens=3 * SHARD + 77)
    monkeypatch.undo()
    build(parquet_corpus, tmp_path / "resumed", workers=2)
    same_files(reference_dir, tmp_path / "resumed")


def test_tokenize_batch_equals_encode_ordinary_per_document():
    import pyarrow as pa

    docs = ["Hello world", "", "text with <|endoftext|> inside", "a lone surrogate \ud800 here", "  trailing spaces  "]
    for texts in (list, pa.array, lambda d: pa.array(d, pa.large_string())):  # what the workers get: Arrow arrays
        assert np.array_equal(fineweb.tokenize_batch(texts(docs[:2] + docs[4:])), token_stream(docs[:2] + docs[4:]))
        assert np.array_equal(fineweb.tokenize_batch(texts(docs[:3])), token_stream(docs[:3]))  # literal <|endoftext|>
    with_surrogate = fineweb.tokenize_batch(docs)
    assert with_surrogate.dtype == np.uint16 and np.count_nonzero(with_surrogate == EOT) == len(docs)


def test_import_does_no_work_and_no_torch():
    code = "import sys, fineweb; assert 'torch' not in sys.modules and 'datasets' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# -----------------------------------------------------------------------------------------------
# Resume


def test_resume_after_max_tokens_equals_one_run(parquet_corpus, reference_dir, tmp_path):
    first = build(parquet_corpus, tmp_path, workers=2, max_tokens=2 * SHARD + 1234)
    assert first["tokens"] == 2 * SHARD + 1234 and not first["finished"]
    assert [len(np.load(os.path.join(tmp_path, n))) for n in shard_files(tmp_path)] == [SHARD, 1234, SHARD]
    again = build(parquet_corpus, tmp_path, workers=2, max_tokens=2 * SHARD)  # less than there already is
    assert again["new_tokens"] == 0
    build(parquet_corpus, tmp_path, workers=2, max_tokens=4 * SHARD)  # the short shard is rewritten, then more
    build(parquet_corpus, tmp_path, workers=1)
    same_files(reference_dir, tmp_path)
    assert build(parquet_corpus, tmp_path)["new_tokens"] == 0  # complete: nothing to do


# The child starts with Ctrl-C's default meaning, as under a terminal: a process inherits an ignored
# SIGINT, and the test process may be inside a C library call that ignores it for a moment (libc's
# system() does) when it starts the child.
SLOW_FSYNC = (
    "import os, signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "sys.path.insert(0, {root!r}); import fineweb; real = os.fsync\n"
    "def slow(fd):\n    time.sleep({delay})\n    real(fd)\n"
    "os.fsync = slow\nfineweb.main()"
)


def start_slow_cli(*args, delay=0.02):
    """The CLI in its own process group, every fsync slowed down so that it can be stopped mid-run."""
    code = SLOW_FSYNC.format(root=ROOT, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_shards(proc, out_dir, n, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(out_dir) and len(shard_files(out_dir)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"no {n} shards after {timeout} s")


def test_resume_after_sigkill_equals_one_run(parquet_corpus, tmp_path):
    small = 1025  # the smallest shards allowed: more of them, so the kill lands mid-run
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    build(parquet_corpus, whole, shard_size=small, workers=2)
    proc = start_slow_cli("--dataset", parquet_corpus, "--out-dir", cut, "--shard-size", small, "--workers", 2)
    try:
        wait_for_shards(proc, cut, 6)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its workers, no chance to clean up
        proc.communicate()
    assert len(shard_files(cut)) < len(shard_files(whole))
    result = cli("--dataset", parquet_corpus, "--out-dir", cut, "--shard-size", small, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "resuming after" in result.stdout
    same_files(whole, cut)
    assert leftovers(cut) == []


def test_ctrl_c_leaves_no_partial_files_and_resumes(parquet_corpus, reference_dir, tmp_path):
    # each fsync takes 0.25 s more: after the second shard, seconds of work remain for the signal to cut
    proc = start_slow_cli("--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", SHARD, "--workers", 2,
                          delay=0.25)
    wait_for_shards(proc, tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []
    build(parquet_corpus, tmp_path, workers=2)
    same_files(reference_dir, tmp_path)


def test_other_settings_in_the_same_folder_are_an_error(parquet_corpus, reference_dir, tmp_path):
    folder = tmp_path / "out"
    build(parquet_corpus, folder, max_tokens=SHARD + 1)
    result = cli("--dataset", parquet_corpus, "--out-dir", folder, "--shard-size", SHARD + 1)
    assert result.returncode != 0
    assert "--shard-size was 5000, now 5001" in result.stderr and "Traceback" not in result.stderr
    os.makedirs(tmp_path / "foreign")
    np.save(tmp_path / "foreign" / "edufineweb_val_000000.npy", np.zeros(3, np.uint16))
    result = cli("--dataset", parquet_corpus, "--out-dir", tmp_path / "foreign")
    assert result.returncode != 0 and "no manifest.json" in result.stderr


# -----------------------------------------------------------------------------------------------
# Verify


def test_verify_passes_then_names_a_corrupted_shard(reference_dir, tmp_path):
    for name in os.listdir(reference_dir):
        with open(os.path.join(reference_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    result = cli("--verify", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(shard_files(tmp_path)) and "0 problem(s)" in result.stdout

    victim = "edufineweb_train_000002.npy"
    data = bytearray((tmp_path / victim).read_bytes())
    data[-2 * SHARD] ^= 0xFF  # the low byte of its first token
    (tmp_path / victim).write_bytes(bytes(data))
    result = cli("--verify", "--out-dir", tmp_path)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and victim in failed[0] and "sha256" in failed[0]
    os.remove(tmp_path / "edufineweb_train_000001.npy")
    problems = fineweb.verify(str(tmp_path), log=lambda *a: None)
    assert any("edufineweb_train_000001.npy: missing" in p for p in problems)


def test_rerun_repairs_missing_and_corrupt_shards(parquet_corpus, reference_dir, tmp_path):
    """Through the command line: one shard deleted, one with a byte changed, one truncated; --verify names
    them and says how to repair; the same build command rewrites just those three, byte for byte."""
    command = ["--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", SHARD, "--workers", 2]
    assert cli(*command).returncode == 0
    same_files(reference_dir, tmp_path)
    shards = fineweb.load_manifest(str(tmp_path))["shards"]
    # the corrupted one begins inside a document: rebuilding it starts at a recorded token offset
    split = next(i for i, s in enumerate(shards) if s["start"][1] > 0 and 2 <= i < len(shards) - 1)
    deleted, changed, truncated = (shards[i]["file"] for i in (1, split, len(shards) - 1))
    original = {name: (tmp_path / name).read_bytes() for name in shard_files(tmp_path)}
    os.remove(tmp_path / deleted)
    data = bytearray(original[changed])
    data[-7] ^= 0x01
    (tmp_path / changed).write_bytes(bytes(data))
    (tmp_path / truncated).write_bytes(original[truncated][:1000])
    untouched = {n: os.stat(tmp_path / n).st_mtime_ns for n in original if n not in (deleted, changed, truncated)}

    result = cli("--verify", "--out-dir", tmp_path)
    assert result.returncode == 1
    failed = sorted(line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert failed == sorted([deleted, changed, truncated])
    assert "3 problem(s); rerun the same build command to repair them" in result.stdout

    result = cli(*command)
    assert result.returncode == 0, result.stderr
    assert "rewriting" in result.stdout and "nothing more to do" in result.stdout
    assert {name: (tmp_path / name).read_bytes() for name in shard_files(tmp_path)} == original
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in untouched} == untouched  # the others were left alone
    assert fineweb.load_manifest(str(tmp_path))["shards"] == shards and leftovers(tmp_path) == []
    assert cli("--verify", "--out-dir", tmp_path).returncode == 0


# -----------------------------------------------------------------------------------------------
# Sources


def test_jsonl_json_and_txt_sources(documents, reference_dir, tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", documents, key="content")
    build(jsonl, tmp_path / "from_jsonl", text_column="content", workers=2)
    same_files(reference_dir, tmp_path / "from_jsonl")

    with open(tmp_path / "array.json", "w", encoding="utf-8") as f:
        json.dump([{"text": d} for d in documents], f)
    build(tmp_path / "array.json", tmp_path / "from_json", workers=0)
    same_files(reference_dir, tmp_path / "from_json")

    txt_dir = tmp_path / "txt"  # one document per .txt file, read in sorted name order
    os.makedirs(txt_dir)
    for i, doc in enumerate(documents):
        (txt_dir / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    build(txt_dir, tmp_path / "from_txt", workers=2)
    same_files(reference_dir, tmp_path / "from_txt")


def npy_bytes(tokens) -> bytes:
    """What np.save writes for a 1-D uint16 array: the reference for a shard's bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(tokens, dtype=np.uint16), allow_pickle=False)
    return buffer.getvalue()


def test_same_bytes_as_per_document_encoding(hellaswag_val, tmp_path):
    """Parquet, JSON lines and text files made from the test data, one by one and as one folder: the
    shards are, byte for byte, tiktoken's encoding of each document with 50256 in front, concatenated
    and cut every SHARD tokens, saved as .npy."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        play = f.read()[:50000]
    with open(hellaswag_val, encoding="utf-8") as f:
        contexts = [json.loads(line)["ctx"] for line, _ in zip(f, range(300))]
    paragraphs = [p.strip("\n") for p in play.split("\n\n") if p.strip()]
    folder = tmp_path / "corpus"
    os.makedirs(folder / "z")
    sources = {  # --dataset, --txt-docs: the documents it holds
        ("a.parquet", "file"): paragraphs[:200],
        ("b[1].jsonl", "file"): contexts,  # a glob character: `datasets` must not take it as a pattern
        ("z/c.txt", "paragraph"): paragraphs,
        ("z/c.txt", "line"): [line for line in play.split("\n") if line.strip()],
        ("z/c.txt", "file"): [play],
    }
    write_parquet(folder / "a.parquet", paragraphs[:200])
    write_jsonl(folder / "b[1].jsonl", contexts)
    (folder / "z" / "c.txt").write_text(play, encoding="utf-8")
    sources[(".", "file")] = paragraphs[:200] + contexts + [play]  # the folder: files in path order
    enc = fineweb.gpt2_tokenizer()
    for (name, txt_docs), docs in sources.items():
        expected = np.array([t for doc in docs for t in [EOT] + enc.encode_ordinary(doc)], dtype=np.uint16)
        out = tmp_path / f"{name.replace('/', '_').replace('[', '_').replace(']', '_')}_{txt_docs}"
        if txt_docs == "paragraph" or name == ".":  # stopped, then continued: skips through `datasets` too
            build(folder / name, out, txt_docs=txt_docs, workers=2, batch_chars=3000, max_tokens=2 * SHARD + 123)
        build(folder / name, out, txt_docs=txt_docs, workers=2, batch_chars=3000)
        names = [fineweb.shard_name("edufineweb", i) for i in range(-(-len(expected) // SHARD))]
        assert shard_files(out) == sorted(names), (name, txt_docs)
        for i, shard in enumerate(names):
            assert (out / shard).read_bytes() == npy_bytes(expected[i * SHARD : (i + 1) * SHARD]), (name, shard)


def test_paragraph_and_line_documents_at_blank_lines(tmp_path):
    """Lines of spaces separate paragraphs too, extra blank lines and \\r\\n make no difference: the
    documents --txt-docs paragraph and line have always given (`datasets` alone would keep them)."""
    text = "\n  \nfirst para\nline two  \n\n\n\nsecond\r\nwith crlf\r\n \t \nthird\n\n \nlast words"
    (tmp_path / "edge.txt").write_bytes(text.encode())
    paragraphs = ["first para\nline two  ", "second\nwith crlf", "third", "last words"]
    lines = ["first para", "line two  ", "second", "with crlf", "third", "last words"]
    for mode, docs in [("paragraph", paragraphs), ("line", lines)]:
        cfg = fineweb.BuildConfig(dataset=str(tmp_path), txt_docs=mode)
        ds, _ = fineweb.open_dataset(cfg, [str(tmp_path / "edge.txt")])
        assert [d for _, batch in fineweb.batches(ds, 0, 1 << 20, "edge") for d in batch.to_pylist()] == docs


@pytest.mark.parametrize("mode", ["paragraph", "line"])
def test_txt_paragraph_and_line_documents(hellaswag_val, tmp_path, mode):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:60000]
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    if mode == "paragraph":
        expected = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    else:
        expected = [line for line in text.split("\n") if line.strip()]
    build(tmp_path / "play.txt", tmp_path / "out", txt_docs=mode, workers=2)
    assert np.array_equal(read_all(tmp_path / "out"), token_stream(expected))


def test_folder_of_mixed_files(documents, tmp_path):
    folder = tmp_path / "corpus"
    os.makedirs(folder / "c")
    write_parquet(folder / "a.parquet", documents[:100])
    write_jsonl(folder / "b.jsonl", documents[100:200])
    (folder / "c" / "d.txt").write_text(documents[200], encoding="utf-8")
    (folder / ".hidden.txt").write_text("not read", encoding="utf-8")
    (folder / "notes.md").write_text("not read either", encoding="utf-8")
    build(folder, tmp_path / "out", workers=2, batch_chars=2000)
    assert np.array_equal(read_all(tmp_path / "out"), token_stream(documents[:201]))


def test_hub_reader_streaming_and_cached(documents, tmp_path, monkeypatch):
    """The hub path of open_dataset (files=None) through `datasets` (offline: a local folder is a valid
    dataset path for load_dataset)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub_like"
    os.makedirs(folder)
    write_parquet(folder / "train.parquet", documents)

    def texts(ds, start=0):
        return [d for _, batch in fineweb.batches(ds, start, 5000, "hub") for d in batch.to_pylist()]

    for streaming in (True, False):
        cfg = fineweb.BuildConfig(dataset=str(folder), streaming=streaming, cache_dir=str(tmp_path / "cache"))
        ds, settings = fineweb.open_dataset(cfg, None)
        assert settings["dataset"] == str(folder) and settings["split"] == "train"
        assert texts(ds) == documents
        assert texts(ds, start=150) == documents[150:]
    cfg = fineweb.BuildConfig(dataset=str(folder), text_column="body", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(fineweb.FinewebError, match="no column 'body'; its columns are: id, text"):
        fineweb.open_dataset(cfg, None)


# -----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback, no partial file


def assert_error(result, *needles):
    """Exit status 2 and one error line last on stderr (after the progress bar, if it started)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and error_lines[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert error_lines[0].startswith("fineweb.py: error: ")
    for needle in needles:
        assert needle in error_lines[0], result.stderr


def test_missing_path(tmp_path):
    assert_error(cli("--dataset", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "out"),
                 "nope.jsonl: no such file or folder")
    assert not os.path.exists(tmp_path / "out")


def test_unknown_column_lists_the_columns(documents, tmp_path):
    parquet = write_parquet(tmp_path / "d.parquet", documents[:20])
    assert_error(cli("--dataset", parquet, "--text-column", "body", "--out-dir", tmp_path / "o1"),
                 "d.parquet has no column 'body'; its columns are: id, text", "--text-column")
    jsonl = write_jsonl(tmp_path / "d.jsonl", documents[:20])
    assert_error(cli("--dataset", jsonl, "--text-column", "body", "--out-dir", tmp_path / "o2"),
                 "d.jsonl has no column 'body'; its columns are: id, text")
    assert leftovers(tmp_path) == []


def test_non_string_text(documents, tmp_path):
    parquet = write_parquet(tmp_path / "d.parquet", documents[:20], number=list(range(20)))
    assert_error(cli("--dataset", parquet, "--text-column", "number", "--out-dir", tmp_path / "o1"),
                 "column 'number' holds int64, not text")
    parquet = write_parquet(tmp_path / "nulls.parquet", documents[:100] + [None] + documents[100:110])
    assert_error(cli("--dataset", parquet, "--out-dir", tmp_path / "o3"),
                 "nulls.parquet: document 100 (counting from 0) has no text")
    assert not os.path.exists(tmp_path / "o3")
    # a JSON key holding a number in one line and strings in the others
    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for doc in (documents * 3)[:1100]:
            f.write(json.dumps({"text": doc}) + "\n")
        f.write(json.dumps({"text": 42}) + "\n")
    result = cli("--dataset", tmp_path / "d.jsonl", "--out-dir", tmp_path / "o4")
    assert_error(result, "d.jsonl")  # datasets >= 5 loads the column as JSON values, 4.x fails to load it:
    assert re.search(r"column 'text' holds values of mixed JSON types|Column\(/text\) changed from string to number",
                     result.stderr), result.stderr
    # a bad value deep in the file, found while building: the shards before it are kept whole, nothing
    # half-written
    parquet = write_parquet(tmp_path / "deep.parquet", (documents * 13)[:5000] + [None])
    result = cli("--dataset", parquet, "--out-dir", tmp_path / "o2", "--shard-size", 20000, "--batch-chars", 2000)
    assert_error(result, "deep.parquet: document 5,000 (counting from 0) has no text")
    assert len(shard_files(tmp_path / "o2")) >= 2 and fineweb.verify(str(tmp_path / "o2"), log=lambda *a: None) == []
    assert leftovers(tmp_path) == []


def test_unwritable_out_dir(documents, tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", documents[:20])
    (tmp_path / "a_file").write_text("x")
    assert_error(cli("--dataset", jsonl, "--out-dir", tmp_path / "a_file" / "out"), "--out-dir", "a_file")
    if os.geteuid() != 0:  # root writes anywhere
        os.makedirs(tmp_path / "read_only")
        os.chmod(tmp_path / "read_only", 0o555)
        assert_error(cli("--dataset", jsonl, "--out-dir", tmp_path / "read_only"), "cannot write to --out-dir")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flag, value, allowed", [
    ("--shard-size", 1024, "from 1,025 to 1,000,000,000 (a shard holds at least one GPT-2 sequence of 1024 tokens + 1"),
    ("--shard-size", 10**10, "from 1,025 to 1,000,000,000"),
    ("--max-tokens", 0, "of at least 1,026"),
    ("--workers", -1, "from 0 to 1,024"),
    ("--workers", 5000, "from 0 to 1,024"),
    ("--batch-chars", 100, "from 1,024 to 1,073,741,824"),
])
def test_numeric_flags_have_ranges(documents, tmp_path, flag, value, allowed):
    jsonl = write_jsonl(tmp_path / "d.jsonl", documents[:20])
    result = cli("--dataset", jsonl, "--out-dir", tmp_path / "out", flag, value)
    assert_error(result, f"argument {flag}: must be an integer {allowed}", f"got {value:,}")
    assert not os.path.exists(tmp_path / "out")


def test_refuses_output_the_trainer_cannot_use(documents, tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", documents[:200])
    for prefix in ["", "a/b"]:
        assert_error(cli("--dataset", jsonl, "--out-dir", tmp_path / "out", "--prefix", prefix),
                     f"--prefix {prefix!r}: give a non-empty file name prefix, without a path separator")
    assert_error(cli("--dataset", jsonl, "--out-dir", tmp_path / "out", "--shard-size", 5000, "--max-tokens", 5000),
                 "--max-tokens must exceed --shard-size (5,000)")
    assert not os.path.exists(tmp_path / "out")
    # a dataset that fits in the val shard: nothing written (an empty folder given stays empty), and the
    # message says how many tokens there are and which --shard-size would do
    n = len(token_stream(documents[:200]))
    os.makedirs(tmp_path / "given")
    for out in (tmp_path / "out", tmp_path / "given"):
        assert_error(cli("--dataset", jsonl, "--out-dir", out, "--shard-size", n),
                     f"yields {n:,} tokens, fewer than a val shard plus a train shard (--shard-size {n:,})",
                     f"e.g. --shard-size {(n + 1) // 2:,}")
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path / "given") == []
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["A few words."])
    assert_error(cli("--dataset", tiny, "--out-dir", tmp_path / "out", "--shard-size", 1025), "needs 2,050 at least")
    result = cli("--dataset", jsonl, "--out-dir", tmp_path / "out", "--shard-size", (n + 1) // 2)  # as suggested
    assert result.returncode == 0, result.stderr
    assert shard_files(tmp_path / "out") == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy"]


# -----------------------------------------------------------------------------------------------
# Shared helpers: atomic_write, shard names, download


def test_atomic_write_permissions_result_and_cleanup(tmp_path):
    path = str(tmp_path / "f.txt")
    old = os.umask(0o027)
    try:
        assert fineweb.atomic_write(path, lambda f: f.write(b"hello")) == 5
    finally:
        os.umask(old)
    assert open(path, "rb").read() == b"hello" and os.stat(path).st_mode & 0o777 == 0o640

    def nested(f):  # a second writer of the same path while the first one's file is open: its own name
        f.write(b"outer")
        fineweb.atomic_write(path, lambda g: g.write(b"inner") and temps.append(sorted(os.listdir(tmp_path))))

    temps = []
    fineweb.atomic_write(path, nested)
    assert open(path, "rb").read() == b"outer" and len([n for n in temps[0] if n.endswith(".tmp")]) == 2
    for error in (ValueError, KeyboardInterrupt):
        def fail(f):
            f.write(b"half")
            raise error

        with pytest.raises(error):
            fineweb.atomic_write(path, fail)
        assert os.listdir(tmp_path) == ["f.txt"] and open(path, "rb").read() == b"outer"


def test_shard_names_and_pattern():
    for prefix, index, split in [("edufineweb", 0, "val"), ("my_data", 123, "train")]:
        m = fineweb.SHARD_RE.match(fineweb.shard_name(prefix, index))
        assert (m["prefix"], m["split"], int(m["index"])) == (prefix, split, index)
    for name in ["x_val_00001.npy", "x_test_000001.npy", "x_val_000000.npy.tmp", ".x_val_000000.npy.ab1.tmp"]:
        assert fineweb.SHARD_RE.match(name) is None, name


def test_download(tmp_path):
    (tmp_path / "src.txt").write_bytes(b"some bytes")
    fineweb.download((tmp_path / "src.txt").as_uri(), str(tmp_path / "new" / "got.txt"))
    assert (tmp_path / "new" / "got.txt").read_bytes() == b"some bytes"
    with pytest.raises(OSError):
        fineweb.download((tmp_path / "missing.txt").as_uri(), str(tmp_path / "new" / "none.txt"))
    assert os.listdir(tmp_path / "new") == ["got.txt"]
