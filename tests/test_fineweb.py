"""fineweb.py: shards equal to tiktoken's encoding of the documents; resume; repair; verify; sources; errors.

Everything runs on CPU from local files made of the test data, with tiny shards (a few thousand tokens) so that
documents are split across shards and there are many files to compare. The reference for every build is computed
here, without fineweb: tiktoken's encode_ordinary of each document after 50256, cut every SHARD tokens, each piece
as np.save writes it, with the manifest entry it must have.
"""
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from helpers import SHAKESPEARE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
SHARD = 5000  # tokens per shard in these tests


@pytest.fixture(autouse=True)
def _keep_use_torch(monkeypatch):
    """main() sets USE_TORCH=0 unless it is set; in this process it must not outlive the test."""
    monkeypatch.setenv("USE_TORCH", os.environ.get("USE_TORCH", "AUTO"))


# -----------------------------------------------------------------------------------------------
# Input documents and what they must become


@pytest.fixture(scope="session")
def play(shakespeare_text):
    return shakespeare_text[:50000]


@pytest.fixture(scope="session")
def documents(hellaswag_val, shakespeare_text):
    """~400 real documents, plus the awkward ones: empty, one mentioning <|endoftext|> as text,
    non-ASCII, and one long enough (~10k tokens) to span three shards."""
    paragraphs = [p for p in shakespeare_text.split("\n\n") if p.strip()][:150]
    hellaswag = []
    with open(hellaswag_val, encoding="utf-8") as f:
        for line, _ in zip(f, range(60)):
            example = json.loads(line)
            hellaswag += [example["ctx"] + " " + ending for ending in example["endings"]]
    awkward = ["", "GPT-2 separates documents with <|endoftext|> in its training data.",
               "Ünïcödé ✓ 🎉 中文 — “quotes”"]
    return paragraphs[:75] + awkward + hellaswag + [shakespeare_text[:40000]] + paragraphs[75:]


def token_stream(docs) -> np.ndarray:
    """50256 then tiktoken's encode_ordinary(doc), for every document, in order."""
    enc = fineweb.gpt2_tokenizer()  # tests/test_tokenizer.py checks it against known ids
    return np.array([t for doc in docs for t in [EOT, *enc.encode_ordinary(doc)]], dtype=np.uint16)


def npy_bytes(tokens) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(tokens, dtype=np.uint16), allow_pickle=False)
    return buffer.getvalue()


def expected_build(docs, shard=SHARD) -> dict:
    """{file name: (its bytes, its manifest entry)} for `docs` cut every `shard` tokens. A position is
    [document, token offset in it]; the end of the last shard is [number of documents, 0]."""
    stream = token_stream(docs)
    starts = np.flatnonzero(stream == EOT)

    def position(t):
        d = int(np.searchsorted(starts, t, side="right")) - 1
        return [len(docs), 0] if t == len(stream) else [d, int(t - starts[d])]

    out = {}
    for i, a in enumerate(range(0, len(stream), shard)):
        piece, name = stream[a : a + shard], f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy"
        data = npy_bytes(piece)
        out[name] = data, {"file": name, "split": "val" if i == 0 else "train", "tokens": len(piece),
                           "documents": int(np.count_nonzero(piece == EOT)), "start": position(a),
                           "end": position(a + len(piece)), "sha256": hashlib.sha256(data).hexdigest()}
    return out


@pytest.fixture(scope="session")
def expected(documents):
    return expected_build(documents)


def assert_built(out_dir, expected):
    """Exactly the expected files (no temporary ones), byte for byte, and a finished manifest that
    records each shard as expected."""
    assert sorted(os.listdir(out_dir)) == sorted([*expected, "manifest.json"])
    for name, (data, _) in expected.items():
        with open(os.path.join(out_dir, name), "rb") as f:
            assert f.read() == data, name
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["finished"] and manifest["shards"] == [entry for _, entry in expected.values()]


def shard_files(out_dir) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.endswith(".npy"))


def write_parquet(path, docs, row_group_size=16, **extra_columns):
    table = pa.table({"id": [f"doc{i}" for i in range(len(docs))], "text": docs, **extra_columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, key: doc}) + "\n")
    return str(path)


def build(dataset, out_dir, **kw):
    cfg = fineweb.BuildConfig(dataset=str(dataset), out_dir=str(out_dir), shard_size=kw.pop("shard_size", SHARD), **kw)
    return fineweb.build(cfg, progress=False, log=lambda *a: None)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """fineweb.main in this process: (exit status, stdout, stderr)."""
    try:
        fineweb.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def main_error(capsys, *args) -> str:
    """The one-line error of fineweb.main(args): exit status 2, last on stderr (after the progress bar, if
    it started), no traceback."""
    with pytest.raises(SystemExit) as exit:
        fineweb.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith("fineweb.py: error: "), err
    return errors[0]


@pytest.fixture(scope="session")
def parquet_corpus(documents, tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("corpus") / "docs.parquet", documents)


@pytest.fixture(scope="session")
def built(parquet_corpus, tmp_path_factory):
    """An unbroken build of parquet_corpus, 2 workers, a task per row group of 16 documents (many in flight)."""
    out = tmp_path_factory.mktemp("built")
    build(parquet_corpus, out, workers=2)
    return out


# -----------------------------------------------------------------------------------------------
# Output format


def test_shards_are_tiktoken_per_document_cut_every_shard_size(built, documents, expected):
    assert len(expected) >= 5
    assert_built(built, expected)  # names (val first), exact sizes, bytes, manifest entries
    tokens = np.concatenate([np.load(os.path.join(built, name)) for name in expected])
    starts = np.flatnonzero(tokens == EOT)  # split on 50256: every piece is one input document, in order
    enc = fineweb.gpt2_tokenizer()
    assert [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])] == documents
    # the long document continues across shards at recorded token offsets
    long_doc = max(range(len(documents)), key=lambda i: len(documents[i]))
    assert sum(e["start"][0] == long_doc and e["start"][1] > 0 for _, e in expected.values()) >= 2


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_same_bytes_whatever_the_worker_count_and_row_groups(documents, expected, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(fineweb, "TASK_BYTES", 5000)  # a task: one row group of 1,000 documents, or a few of 7
    for rows in (7, 1000):  # the workers read row groups of 7 or 1,000 documents themselves
        build(write_parquet(tmp_path / f"{rows}.parquet", documents, row_group_size=rows), tmp_path / str(rows),
              workers=workers)
        assert_built(tmp_path / str(rows), expected)


def test_huge_row_groups_are_read_by_datasets(parquet_corpus, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "ROW_GROUP_BYTES", 1000)  # every row group is "huge": the main process reads
    monkeypatch.setattr(fineweb, "READ_DOCS", 7)  # `datasets` hands over 7 documents at a time
    assert fineweb.worker_parquet(parquet_corpus, "text") is None
    build(parquet_corpus, tmp_path, workers=0)
    assert_built(tmp_path, expected)


def test_tokenize_batch_equals_encode_ordinary_per_document():
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


def test_resume_after_max_tokens_equals_one_run(parquet_corpus, expected, tmp_path):
    first = build(parquet_corpus, tmp_path, workers=2, max_tokens=2 * SHARD + 1234)
    assert first["tokens"] == 2 * SHARD + 1234 and not first["finished"]
    assert [len(np.load(os.path.join(tmp_path, n))) for n in shard_files(tmp_path)] == [SHARD, 1234, SHARD]
    again = build(parquet_corpus, tmp_path, workers=2, max_tokens=2 * SHARD)  # less than there already is
    assert again["new_tokens"] == 0
    build(parquet_corpus, tmp_path, workers=2, max_tokens=4 * SHARD)  # the short shard is rewritten, then more
    build(parquet_corpus, tmp_path, workers=1)
    assert_built(tmp_path, expected)
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


def test_resume_after_sigkill_equals_one_run(parquet_corpus, documents, tmp_path, capsys):
    small = 1025  # the smallest shards allowed: more of them, so the kill lands mid-run
    expected = expected_build(documents, small)
    command = ["--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", small, "--workers", 2]
    proc = start_slow_cli(*command)
    try:
        wait_for_shards(proc, tmp_path, 6)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its workers, no chance to clean up
        proc.communicate()
    assert len(shard_files(tmp_path)) < len(expected)
    code, out, err = run_main(capsys, *command)
    assert code == 0 and "resuming after" in out, err
    assert_built(tmp_path, expected)  # and no temporary file is left


def test_ctrl_c_leaves_no_partial_files_and_resumes(parquet_corpus, expected, tmp_path):
    # each fsync takes 0.25 s more: after the second shard, seconds of work remain for the signal to cut
    proc = start_slow_cli("--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", SHARD, "--workers", 2,
                          delay=0.25)
    wait_for_shards(proc, tmp_path, 2)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to the workers too, which leave it to the parent
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    build(parquet_corpus, tmp_path, workers=2)
    assert_built(tmp_path, expected)


def test_a_killed_worker_is_a_one_line_error_and_the_build_resumes(parquet_corpus, expected, tmp_path):
    """A worker killed from outside (the kernel's OOM killer, say): one line, exit 2, the shards before it kept."""
    import psutil
    proc = start_slow_cli("--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", SHARD, "--workers", 2,
                          delay=0.25)
    wait_for_shards(proc, tmp_path, 1)
    psutil.Process(proc.pid).children()[0].kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in err, (out, err)
    last = err.strip().splitlines()[-1]  # before it: the progress bar
    assert last.startswith("fineweb.py: error: A ") and "terminated abruptly" in last, err
    build(parquet_corpus, tmp_path, workers=2)
    assert_built(tmp_path, expected)


def test_other_settings_in_the_same_folder_are_an_error(parquet_corpus, built, tmp_path, capsys):
    folder = tmp_path / "out"
    build(parquet_corpus, folder, max_tokens=SHARD + 1)
    assert "--shard-size was 5000, now 5001" in main_error(capsys, "--dataset", parquet_corpus, "--out-dir", folder,
                                                           "--shard-size", SHARD + 1)
    os.makedirs(tmp_path / "foreign")
    np.save(tmp_path / "foreign" / "edufineweb_val_000000.npy", np.zeros(3, np.uint16))
    assert "no manifest.json" in main_error(capsys, "--dataset", parquet_corpus, "--out-dir", tmp_path / "foreign")
    # a manifest of the previous fineweb.py records settings that are gone (prefix, the files' names and sizes):
    # it still resumes
    shutil.copytree(built, tmp_path / "older")
    with open(tmp_path / "older" / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["settings"] = {**manifest["settings"], "prefix": "edufineweb", "tokenizer": "gpt2", "files": 1,
                            "files_sha256": "0" * 64}
    del manifest["settings"]["streaming"]
    with open(tmp_path / "older" / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    assert "nothing more to do" in run_main(capsys, "--dataset", parquet_corpus, "--out-dir", tmp_path / "older",
                                            "--shard-size", SHARD)[1]


# -----------------------------------------------------------------------------------------------
# Verify and repair


def test_verify_passes_then_names_a_corrupted_shard(built, tmp_path, capsys):
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)
    code, out, _ = run_main(capsys, "--verify", "--out-dir", tmp_path)
    assert code == 0 and out.count("ok ") == len(shard_files(tmp_path)) and "0 problem(s)" in out, out

    victim = "edufineweb_train_000002.npy"
    data = bytearray((tmp_path / victim).read_bytes())
    data[-2 * SHARD] ^= 0xFF  # the low byte of its first token
    (tmp_path / victim).write_bytes(bytes(data))
    code, out, _ = run_main(capsys, "--verify", "--out-dir", tmp_path)
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and len(failed) == 1 and victim in failed[0] and "sha256" in failed[0], out
    os.remove(tmp_path / "edufineweb_train_000001.npy")
    problems = fineweb.verify(str(tmp_path), log=lambda *a: None)
    assert any("edufineweb_train_000001.npy: missing" in p for p in problems)
    assert "has no manifest.json" in main_error(capsys, "--verify", "--out-dir", tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text("{")
    assert "manifest.json is unreadable" in main_error(capsys, "--verify", "--out-dir", tmp_path)


def test_rerun_repairs_missing_and_corrupt_shards(parquet_corpus, built, expected, tmp_path, capsys):
    """One shard deleted, one with a byte changed, one truncated; --verify names them and says how to repair;
    the same build command rewrites just those three, byte for byte."""
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)
    entries = [entry for _, entry in expected.values()]
    # the changed one begins inside a document: rebuilding it starts at a recorded token offset
    split = next(i for i, e in enumerate(entries) if e["start"][1] > 0 and 2 <= i < len(entries) - 1)
    deleted, changed, truncated = (entries[i]["file"] for i in (1, split, len(entries) - 1))
    os.remove(tmp_path / deleted)
    data = bytearray(expected[changed][0])
    data[-7] ^= 0x01
    (tmp_path / changed).write_bytes(bytes(data))
    (tmp_path / truncated).write_bytes(expected[truncated][0][:1000])
    untouched = {n: os.stat(tmp_path / n).st_mtime_ns for n in expected if n not in (deleted, changed, truncated)}

    code, out, _ = run_main(capsys, "--verify", "--out-dir", tmp_path)
    failed = sorted(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("FAIL"))
    assert code == 1 and failed == sorted([deleted, changed, truncated])
    assert "3 problem(s); rerun the same build command to repair them" in out

    code, out, err = run_main(capsys, "--dataset", parquet_corpus, "--out-dir", tmp_path, "--shard-size", SHARD,
                              "--workers", 2)
    assert code == 0 and "rewriting" in out and "nothing more to do" in out, err
    assert_built(tmp_path, expected)
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in untouched} == untouched  # the others were left alone


# -----------------------------------------------------------------------------------------------
# Sources


def test_jsonl_json_and_txt_sources(documents, expected, tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", documents, key="content")
    build(jsonl, tmp_path / "from_jsonl", text_column="content", workers=2)
    assert_built(tmp_path / "from_jsonl", expected)

    with open(tmp_path / "array.json", "w", encoding="utf-8") as f:
        json.dump([{"text": d} for d in documents], f)
    build(tmp_path / "array.json", tmp_path / "from_json", workers=0)
    assert_built(tmp_path / "from_json", expected)

    txt_dir = tmp_path / "txt"  # one document per .txt file, read in sorted name order
    os.makedirs(txt_dir)
    for i, doc in enumerate(documents):
        (txt_dir / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    build(txt_dir, tmp_path / "from_txt", workers=2)
    assert_built(tmp_path / "from_txt", expected)


def lines_of(text) -> list[str]:
    """--txt-docs line: the text cut at each "\\n" (blank lines too), without a last empty piece."""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def paragraphs_of(text) -> list[str]:
    """--txt-docs paragraph: the text cut at each "\\n\\n", without empty pieces."""
    return [p for p in text.split("\n\n") if p]


def test_files_and_folders_of_each_kind(hellaswag_val, play, tmp_path, monkeypatch):
    """Parquet, JSON lines and text files made from the test data, one by one and as one folder (nested, hidden
    and other files skipped): the shards are the reference build of the documents each holds."""
    monkeypatch.setattr(fineweb, "READ_DOCS", 7)  # `datasets` hands over 7 documents at a time
    with open(hellaswag_val, encoding="utf-8") as f:
        contexts = [json.loads(line)["ctx"] for line, _ in zip(f, range(300))]
    folder = tmp_path / "corpus"
    os.makedirs(folder / "z")
    write_parquet(folder / "a.parquet", paragraphs_of(play)[:200])
    write_jsonl(folder / "b[1].jsonl", contexts)  # a glob character: `datasets` must not take it as a pattern
    (folder / "z" / "c.txt").write_text(play, encoding="utf-8")
    (folder / ".hidden.txt").write_text("not read", encoding="utf-8")
    (folder / "notes.md").write_text("not read either", encoding="utf-8")
    sources = {  # --dataset, --txt-docs: the documents it holds
        ("a.parquet", "file"): paragraphs_of(play)[:200],
        ("b[1].jsonl", "file"): contexts,
        ("z/c.txt", "paragraph"): paragraphs_of(play),
        ("z/c.txt", "line"): lines_of(play),
        ("z/c.txt", "file"): [play],
        (".", "file"): paragraphs_of(play)[:200] + contexts + [play],  # the folder: files in path order
    }
    for (name, txt_docs), docs in sources.items():
        out = tmp_path / f"{name.replace('/', '_').replace('[', '_').replace(']', '_')}_{txt_docs}"
        if txt_docs == "paragraph" or name == ".":  # stopped, then continued: skips through `datasets` too
            build(folder / name, out, txt_docs=txt_docs, workers=2, max_tokens=2 * SHARD + 123)
        build(folder / name, out, txt_docs=txt_docs, workers=2)
        assert_built(out, expected_build(docs))


def test_paragraph_and_line_documents_at_blank_lines(tmp_path):
    """`datasets`' text builder decides: "\\r\\n" reads as "\\n"; a paragraph ends at "\\n\\n" and a line at "\\n";
    so a line of spaces is a line, and extra newlines join the next paragraph or make empty lines."""
    text = "\n  \nfirst para\nline two  \n\n\n\nsecond\r\nwith crlf\r\n \t \nthird\n\n \nlast words\n"
    (tmp_path / "edge.txt").write_bytes(text.encode())
    normalized = text.replace("\r\n", "\n")
    for mode, docs in [("paragraph", paragraphs_of(normalized)), ("line", lines_of(normalized))]:
        cfg = fineweb.BuildConfig(dataset=str(tmp_path), txt_docs=mode)
        tasks = fineweb.tasks(cfg, [str(tmp_path / "edge.txt")], 0)  # Arrow texts read by `datasets`
        assert [d for _, batch in tasks for d in batch.to_pylist()] == docs


def test_hub_dataset_streamed_and_downloaded(documents, expected, tmp_path, monkeypatch, capsys):
    """A hub name through `datasets` (offline: a local folder is a valid dataset path for load_dataset). Streamed:
    `load_dataset_builder` names its parquet files and the workers read them; downloaded to the HF cache first:
    `datasets` reads it here."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # as HF_DATASETS_CACHE sets it
    monkeypatch.setattr(fineweb, "local_files", lambda dataset: None)  # the folder stands for a hub name
    monkeypatch.setattr(fineweb, "READ_DOCS", 7)
    folder = tmp_path / "hub_like"
    os.makedirs(folder)
    write_parquet(folder / "train.parquet", documents)
    assert fineweb.open_dataset(fineweb.BuildConfig(dataset=str(folder)), None) == [str(folder / "train.parquet")]
    for streaming in (True, False):
        out = tmp_path / f"out_{streaming}"
        build(folder, out, streaming=streaming, workers=2, max_tokens=2 * SHARD + 123)  # stopped, then continued
        build(folder, out, streaming=streaming, workers=2)
        assert_built(out, expected)
    assert os.listdir(tmp_path / "cache")
    for streaming, where in [("--streaming", r".*train\.parquet: cannot read it as parquet"),
                             ("--no-streaming", r"cannot load --dataset .*hub_like from the hub")]:
        line = main_error(capsys, "--dataset", folder, "--text-column", "body", streaming, "--out-dir", tmp_path / "o")
        assert re.search(where + r".*'body'.*'id', 'text'", line), line  # `datasets` names the columns
    assert not os.path.exists(tmp_path / "o")


# -----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback, nothing half-written


@pytest.fixture(scope="session")
def small_jsonl(documents, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("small") / "d.jsonl", documents[:200])


def test_command_line_error_exit(tmp_path):
    """The real process: the one test of main's exit through the interpreter (the others run main in process)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--dataset", tmp_path / "nope.jsonl",
                             "--out-dir", tmp_path / "out"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"fineweb.py: error: --dataset {tmp_path / 'nope.jsonl'}: no such file or "
                                          "folder (nor a hub name)"]
    assert not os.path.exists(tmp_path / "out")


def test_missing_path(tmp_path, capsys):
    for missing in (tmp_path / "nope.jsonl", "nope.parquet", "./nope", "a/b/c"):
        assert f"--dataset {missing}: no such file or folder" in main_error(capsys, "--dataset", missing, "--out-dir",
                                                                           tmp_path / "out")
    (tmp_path / "notes.md").write_text("x")
    assert "not a .parquet/.jsonl/.json/.txt file" in main_error(capsys, "--dataset", tmp_path / "notes.md")
    assert "nor a folder with one" in main_error(capsys, "--dataset", tmp_path, "--out-dir", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_unknown_column_lists_the_columns(documents, small_jsonl, tmp_path, capsys):
    parquet = write_parquet(tmp_path / "d.parquet", documents[:20])
    for source in (parquet, small_jsonl):
        line = main_error(capsys, "--dataset", source, "--text-column", "body", "--out-dir", tmp_path / "out")
        assert f"{source}: cannot read it as" in line and "--text-column body" in line
        assert "'body'" in line and "'id', 'text'" in line  # `datasets` names the columns there are
    assert not os.path.exists(tmp_path / "out")


def test_non_string_text(documents, tmp_path, capsys, monkeypatch):
    parquet = write_parquet(tmp_path / "d.parquet", documents[:20], number=list(range(20)))
    assert "column 'number' holds int64, not text" in main_error(capsys, "--dataset", parquet, "--text-column",
                                                                 "number", "--out-dir", tmp_path / "o1")
    parquet = write_parquet(tmp_path / "nulls.parquet", documents[:100] + [None] + documents[100:110])
    assert "nulls.parquet: document 100 (counting from 0) has no text" in main_error(
        capsys, "--dataset", parquet, "--out-dir", tmp_path / "o3")
    # a JSON key holding a number in one line and strings in the others
    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for doc in (documents * 3)[:1100]:
            f.write(json.dumps({"text": doc}) + "\n")
        f.write(json.dumps({"text": 42}) + "\n")
    line = main_error(capsys, "--dataset", tmp_path / "d.jsonl", "--out-dir", tmp_path / "o4")
    # datasets >= 5 loads the column as JSON values, 4.x fails to load it
    assert "d.jsonl" in line and ("holds values of mixed JSON types" in line or "changed from string to number" in line)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o")]  # no folder for a run that wrote nothing
    # a bad value deep in the file, found while building: the shards before it are kept whole, nothing half-written
    monkeypatch.setattr(fineweb, "TASK_BYTES", 1)  # a task a row group: the shards before go to the workers first
    parquet = write_parquet(tmp_path / "deep.parquet", (documents * 13)[:5000] + [None])
    assert "deep.parquet: document 5,000 (counting from 0) has no text" in main_error(
        capsys, "--dataset", parquet, "--out-dir", tmp_path / "o2", "--shard-size", 20000)
    assert len(shard_files(tmp_path / "o2")) >= 2 and fineweb.verify(str(tmp_path / "o2"), log=lambda *a: None) == []
    assert not [n for n in os.listdir(tmp_path / "o2") if n.endswith(".tmp")]


def test_unwritable_out_dir(small_jsonl, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert "a_file" in main_error(capsys, "--dataset", small_jsonl, "--out-dir", tmp_path / "a_file" / "out",
                                  "--shard-size", 1025)
    if os.geteuid() != 0:  # root writes anywhere
        os.makedirs(tmp_path / "read_only")
        os.chmod(tmp_path / "read_only", 0o555)
        assert "Permission denied" in main_error(capsys, "--dataset", small_jsonl, "--out-dir", tmp_path / "read_only",
                                                 "--shard-size", 1025)
    assert os.listdir(tmp_path) == ["a_file"] + (["read_only"] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("flag, value, message", [
    ("--shard-size", 1024, "argument --shard-size: must be an integer from 1,025 to 1,000,000,000 (a shard holds "
                           "at least one GPT-2 sequence of 1024 tokens + 1; at most a 2 GB buffer), got 1,024"),
    ("--shard-size", 10**10, "argument --shard-size: must be an integer from 1,025 to 1,000,000,000 (a shard"),
    ("--max-tokens", 0, "argument --max-tokens: must be an integer of at least 1,026, got 0"),
    ("--workers", -1, "argument --workers: must be an integer from 0 to 1,024, got -1"),
    ("--workers", 5000, "argument --workers: must be an integer from 0 to 1,024, got 5,000"),
    ("--txt-docs", "para", "argument --txt-docs: invalid choice: 'para'"),
    ("--batch-chars", 100, "unrecognized arguments: --batch-chars 100"),  # options that are gone
    ("--prefix", "x", "unrecognized arguments: --prefix x"),
    ("--split", "test", "unrecognized arguments: --split test"),
    ("--cache-dir", "c", "unrecognized arguments: --cache-dir c"),
])
def test_flags_are_checked_before_anything_runs(tmp_path, capsys, flag, value, message):
    assert message in main_error(capsys, "--dataset", tmp_path / "none.jsonl", "--out-dir", tmp_path / "out",
                                 flag, value)
    assert not os.path.exists(tmp_path / "out")


def test_refuses_output_the_trainer_cannot_use(documents, small_jsonl, tmp_path, capsys):
    """A dataset, or a --max-tokens, that leaves nothing for a train shard: nothing is written (an empty folder
    given stays empty), and the message says how many tokens there are."""
    n = len(token_stream(documents[:200]))
    os.makedirs(tmp_path / "given")
    for out, args in [(tmp_path / "out", ["--shard-size", n]), (tmp_path / "given", ["--shard-size", n]),
                      (tmp_path / "out", ["--shard-size", 5000, "--max-tokens", 5000])]:
        line = main_error(capsys, "--dataset", small_jsonl, "--out-dir", out, *args)
        tokens = 5000 if "--max-tokens" in args else n
        assert f"gives {tokens:,} tokens (all, or --max-tokens): too few for a val and a train shard" in line
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path / "given") == []
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["A few words."])
    assert "gives 5 tokens" in main_error(capsys, "--dataset", tiny, "--out-dir", tmp_path / "out",
                                          "--shard-size", 1025)
    code, _, err = run_main(capsys, "--dataset", small_jsonl, "--out-dir", tmp_path / "out", "--shard-size",
                            (n + 1) // 2)
    assert code == 0, err
    assert shard_files(tmp_path / "out") == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy"]


# -----------------------------------------------------------------------------------------------
# Shared helpers: atomic_write, shard names


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
    for name, parts in [("edufineweb_val_000000.npy", ("edufineweb", "val", "000000")),
                        ("my_data_train_000123.npy", ("my_data", "train", "000123"))]:
        assert fineweb.SHARD_RE.match(name).group("prefix", "split", "index") == parts
    for name in ["x_val_00001.npy", "x_test_000001.npy", "x_val_000000.npy.tmp", ".x_val_000000.npy.ab1.tmp"]:
        assert fineweb.SHARD_RE.match(name) is None, name
