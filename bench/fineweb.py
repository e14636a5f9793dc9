"""
bench/fineweb.py: how fast fineweb.py turns text into shards, next to two yardsticks.

    python -m bench.fineweb                              # ~45 MB corpus from the test data
    python -m bench.fineweb --corpus-mb 20 --repeat 1    # quicker
    python -m bench.fineweb --data-dir /path/to/data --workers 8

It builds a local corpus of real text (Tiny Shakespeare paragraphs, and every HellaSwag context
followed by each of its endings, as documents, repeated up to --corpus-mb) in a parquet file, then
times on the same documents:
  (a) fineweb:  fineweb.build() itself on the parquet file: the main process hands out its row
                groups to --workers processes that read and tokenize them and write the .npy
                shards (in a temporary folder); it renames them and writes the manifest. Its
                CPU-seconds, the main process's and the workers', say how many workers one main
                process can feed
  (b) simple:   the approach of the original build-nanogpt script: a Pool of cpu_count()//2
                processes, pool.imap(tokenize, docs, chunksize=16), one uint16 array per document
                (made from a Python list with 50256 in front), copied into a shard buffer, np.save
  (c) limit:    tiktoken alone, no reading, transfer or writing: --workers processes each encode
                their share of the documents (preloaded) with encode_ordinary in a plain loop
  (c') limit':  as (c) but encoding fineweb's way (fineweb.tokenize_batch on whole row groups)
Start-up (worker processes, tokenizer load, opening the dataset) is not timed. Each method runs
--repeat times, interleaved, and the fastest run counts. It prints tokens/s, the ratios, the peak
memory of the parent plus its children (sampled every 50 ms in one more, untimed run of each method:
the RSS sum, which counts pages that forked processes share once per process, and the PSS sum, which
splits them), and the share of the CPUs that other processes used during the timed run (on a shared
machine that makes a timing pessimistic; --wait-idle waits for a quiet moment before each run). The
tokens of (a) and (b) are checked to be identical. Not a test: the figures depend on the machine.
"""
import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

import fineweb

ROW_GROUP = 1000  # documents per parquet row group of the corpus


# -----------------------------------------------------------------------------------------------
# Corpus


def corpus_documents(data_dir: str | None) -> list[str]:
    """Tiny Shakespeare paragraphs, then each HellaSwag context with each of its four endings (from
    data_dir, else where bench/data.py finds them)."""
    from bench.data import data_file

    def path(name):
        return os.path.join(data_dir, name) if data_dir else data_file(name)

    docs = []
    with open(path("tinyshakespeare.txt"), encoding="utf-8") as f:
        docs += [p for p in f.read().split("\n\n") if p.strip()]
    with open(path("hellaswag_val.jsonl"), encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            docs += [example["ctx"] + " " + ending for ending in example["endings"]]
    return docs


def write_corpus(data_dir: str, corpus_mb: float, path: str) -> dict:
    """Repeat the documents up to corpus_mb megabytes of text and save them as one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = corpus_documents(data_dir)
    base_bytes = sum(len(d.encode()) for d in base)
    copies = max(1, round(corpus_mb * 1e6 / base_bytes))
    docs = base * copies
    # row groups of 1,000 documents, as datatrove (the tool FineWeb was made with) writes them
    pq.write_table(pa.table({"text": docs}), path, row_group_size=ROW_GROUP)
    return {"documents": len(docs), "bytes": base_bytes * copies, "copies": copies}


# -----------------------------------------------------------------------------------------------
# Memory: peak resident set of this process and all its children


class PeakMemory:
    """Peak of the summed RSS, and of the summed PSS, of this process and its children. RSS counts
    pages shared between processes (forked workers share the tokenizer) once per process; PSS
    splits them, so the PSS sum is the memory really used."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.rss, self.pss, self._stop = interval, 0, 0, threading.Event()

    def _sample(self):
        me = psutil.Process()
        rss = pss = 0
        for p in [me] + me.children(recursive=True):
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + m.rss, pss + m.pss
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# -----------------------------------------------------------------------------------------------
# (a) fineweb.py


def run_fineweb(corpus: str, out_dir: str, shard_size: int, workers: int, cpu: dict) -> tuple[int, float]:
    """fineweb.build(); adds the CPU-seconds of this (the main) process and of the workers to `cpu`
    (the workers' are counted once they are reaped, at the end of build())."""
    def times():
        return [sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

    cfg = fineweb.BuildConfig(dataset=corpus, out_dir=out_dir, shard_size=shard_size, workers=workers)
    fineweb.gpt2_tokenizer()  # built once per process (~0.5 s), not per build
    before = times()
    summary = fineweb.build(cfg, progress=False, log=lambda *a: None)
    cpu["main"], cpu["workers"] = (b - a for a, b in zip(before, times()))
    return summary["new_tokens"], summary["seconds"]  # seconds: after the workers are up


# -----------------------------------------------------------------------------------------------
# (b) the simple approach: a pool of cpu_count()//2, one document per task, chunksize 16


def _simple_tokenize(doc: str) -> np.ndarray:
    tokens = [fineweb.EOT]
    tokens.extend(fineweb.gpt2_tokenizer().encode_ordinary(doc))
    tokens = np.array(tokens)
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token ids must fit uint16"
    return tokens.astype(np.uint16)


def _ready(_):
    fineweb.gpt2_tokenizer()
    time.sleep(0.05)  # long enough that every worker takes one of these start-up tasks
    return os.getpid()


def parquet_documents(path: str):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
        yield from batch.column(0).to_pylist()


def run_simple(corpus: str, out_dir: str, shard_size: int) -> tuple[int, float]:
    nprocs = max(1, os.cpu_count() // 2)
    with multiprocessing.Pool(nprocs) as pool:
        pool.map(_ready, range(nprocs), chunksize=1)
        t0 = time.perf_counter()
        docs = parquet_documents(corpus)
        buffer = np.empty(shard_size, dtype=np.uint16)
        index, fill, total = 0, 0, 0
        for tokens in pool.imap(_simple_tokenize, docs, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(len(tokens), shard_size - fill)
                buffer[fill : fill + take] = tokens[:take]
                fill += take
                tokens = tokens[take:]
                if fill == shard_size:
                    np.save(os.path.join(out_dir, f"simple_{index:06d}.npy"), buffer)
                    index, fill = index + 1, 0
        if fill:
            np.save(os.path.join(out_dir, f"simple_{index:06d}.npy"), buffer[:fill])
        return total, time.perf_counter() - t0


# -----------------------------------------------------------------------------------------------
# (c) the limit: tiktoken alone on every core, documents already in the workers' memory


def _limit_worker(corpus, part, parts, batched, barrier, results):
    import pyarrow.parquet as pq

    column = pq.read_table(corpus, columns=["text"]).column(0)
    docs = column[part * len(column) // parts : (part + 1) * len(column) // parts].to_pylist()
    batches = [docs[i : i + ROW_GROUP] for i in range(0, len(docs), ROW_GROUP)]  # fineweb's tasks
    enc = fineweb.gpt2_tokenizer()
    barrier.wait()
    n = 0
    if batched:
        for batch in batches:
            n += len(fineweb.tokenize_batch(batch))
    else:
        for doc in docs:
            n += 1 + len(enc.encode_ordinary(doc))  # + 1: the 50256 the other two add per document
    results.put((n, time.perf_counter()))


def run_limit(corpus: str, workers: int, batched: bool) -> tuple[int, float]:
    barrier, results = multiprocessing.Barrier(workers + 1), multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_limit_worker, args=(corpus, i, workers, batched, barrier, results))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    barrier.wait()  # every worker has its documents and tokenizer: the clock starts
    t0 = time.perf_counter()
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _ in done), max(t for _, t in done) - t0


# -----------------------------------------------------------------------------------------------
# Main


def read_shards(folder: str) -> np.ndarray:
    """All tokens of a folder's shards, in shard order (val first, then train by index)."""
    names = sorted((n for n in os.listdir(folder) if n.endswith(".npy")), key=lambda n: n.rsplit("_", 1)[-1])
    return np.concatenate([np.load(os.path.join(folder, n)) for n in names])


def wait_until_idle(max_wait: float, busy_below: float = 0.10):
    """On a shared machine, wait (at most max_wait s) until other work leaves the CPUs idle."""
    deadline = time.time() + max_wait
    while time.time() < deadline and psutil.cpu_percent(interval=1.0) / 100 > busy_below:
        pass


def measured(method):
    """Run method() -> (tokens, seconds); also return the share of the CPUs that other processes used
    meanwhile (contention that makes the timing pessimistic)."""
    cpu0, ours0, t0 = psutil.cpu_times(), os.times(), time.perf_counter()
    tokens, seconds = method()
    cpu1, ours1, wall = psutil.cpu_times(), os.times(), time.perf_counter() - t0
    busy = sum(cpu1) - sum(cpu0) - (cpu1.idle - cpu0.idle) - (cpu1.iowait - cpu0.iowait)
    ours = sum(ours1[:4]) - sum(ours0[:4])  # this process and its finished children (all are joined)
    other = max(0.0, busy - ours) / (wall * psutil.cpu_count())
    return tokens, seconds, other


def peak_memory(method) -> tuple[int, int]:
    """Peak RSS and PSS sums of method() in a run of its own, not timed: one sample of all the
    processes costs ~15 ms of CPU, which would slow the timed runs (and, in the builder's own
    process, take the GIL from it)."""
    with PeakMemory() as memory:
        method()
    return memory.rss, memory.pss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="folder with tinyshakespeare.txt and hellaswag_val.jsonl (default: bench/data.py finds them)")
    p.add_argument("--corpus-mb", type=float, default=40, help="megabytes of text in the corpus")
    p.add_argument("--shard-size", type=int, default=2 * 10**6, help="tokens per shard for (a) and (b)")
    p.add_argument("--workers", type=int, default=fineweb.available_cpus(), help="processes for (a), (c) and (c')")
    p.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the fastest is reported")
    p.add_argument("--wait-idle", type=float, default=60,
                   help="before each run, wait up to this many seconds for other work to leave the CPUs idle")
    p.add_argument("--work-dir", default=None, help="where the corpus and shards go (default: a temporary folder)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        corpus = os.path.join(tmp, "corpus.parquet")
        # built in a child process so that this process (whose memory is measured) stays small
        with multiprocessing.Pool(1) as pool:
            info = pool.apply(write_corpus, (args.data_dir, args.corpus_mb, corpus))
        cpu = os.cpu_count()
        print(
            f"corpus: {info['documents']:,} documents, {info['bytes'] / 1e6:.1f} MB of text "
            f"({info['copies']} copies of {args.data_dir or 'the test data'}); {cpu} CPUs; workers {args.workers}; "
            f"shards of {args.shard_size:,} tokens; best of {args.repeat}"
        )
        cpu_s = {}  # run -> CPU-seconds of (a)
        methods = {
            "(a) fineweb": lambda run: run_fineweb(corpus, os.path.join(tmp, f"a{run}"), args.shard_size, args.workers,
                                                   cpu_s.setdefault(run, {})),
            f"(b) simple, {max(1, cpu // 2)} procs":
                lambda run: run_simple(corpus, os.path.join(tmp, f"b{run}"), args.shard_size),
            "(c) limit, encode_ordinary": lambda run: run_limit(corpus, args.workers, False),
            "(c') limit, tokenize_batch": lambda run: run_limit(corpus, args.workers, True),
        }
        best = {}  # name -> (tokens, seconds, other load) of its fastest run
        for run in range(args.repeat + 1):  # the last run measures memory
            for name, method in methods.items():
                for folder in (f"a{run}", f"b{run}"):
                    os.makedirs(os.path.join(tmp, folder), exist_ok=True)
                wait_until_idle(args.wait_idle)
                if run == args.repeat:
                    best[name] += peak_memory(lambda: method(run))
                    continue
                result = measured(lambda: method(run))
                if name not in best or result[1] < best[name][1]:
                    best[name] = result
                    cpu_s["best"] = cpu_s[run] if name.startswith("(a)") else cpu_s.get("best")
        same = np.array_equal(read_shards(os.path.join(tmp, "a0")), read_shards(os.path.join(tmp, "b0")))

    rate = {name: best[name][0] / best[name][1] for name in methods}
    for name, (tokens, seconds, other, rss, pss) in best.items():
        print(
            f"{name:28s} {tokens:>11,} tokens {seconds:6.2f} s {rate[name] / 1e6:6.2f} M tokens/s"
            f"   peak RSS {rss / 2**20:4.0f} MiB, PSS {pss / 2**20:4.0f} MiB   other load {other:4.0%}"
        )
    a, b, c, c2 = (rate[name] for name in methods)
    print(f"(a)/(b) = {a / b:.2f}x   (a)/(c) = {a / c:.0%}   (a)/(c') = {a / c2:.0%}")
    main_s, workers_s = cpu_s["best"]["main"], cpu_s["best"]["workers"]
    print(f"(a) CPU-seconds: main process {main_s:.2f}, workers {workers_s:.2f}; workers / main = "
          f"{workers_s / main_s:.1f}: one main process feeds {workers_s / main_s:.0f} workers")
    print(f"(a) and (b) wrote the same tokens: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
