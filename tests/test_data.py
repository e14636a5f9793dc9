"""bench/data.py, where the tests and benchmarks get their data, in a copy of the repository with no
../shared beside it: it finds the files where a user's first run leaves them, else fetches them (from
a local HTTP server standing in for the two public URLs: no network here), checks them and refuses a
cut one; offline with neither, pytest stops before collecting with one line."""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from bench.data import data_file
from helpers import ROOT, env1

# the lookup, run in the copy, with the scripts' two URLs pointed at the test's server
LOOKUP = """
import sys, hellaswag, train_gpt2
train_gpt2.TINY_SHAKESPEARE_URL = sys.argv[1] + "/input.txt"
hellaswag.HELLASWAG_URL = sys.argv[1] + "/hellaswag_{split}.jsonl"
from bench.data import DataError, data_file
try:
    print(data_file("tinyshakespeare.txt"))
    print(data_file("hellaswag_val.jsonl"))
except DataError as e:
    sys.exit(f"DataError: {e}")
"""
# no request may leave this machine, whatever the machine running the tests can reach
OFFLINE = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


@pytest.fixture
def lone_repo(tmp_path):
    """The scripts, bench/ and tests/ copied to tmp_path/repo: nothing is at tmp_path/shared."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("train_gpt2.py", "fineweb.py", "hellaswag.py", "bench", "tests"):
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / name)
    return repo


@pytest.fixture
def server(tmp_path):
    """An HTTP server of tmp_path/served; .requests lists the paths asked for."""
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url, httpd.served, httpd.requests = f"http://127.0.0.1:{httpd.server_port}", served, requests
    yield httpd
    httpd.shutdown()


def lookup(repo, url):
    env = {**env1(), **OFFLINE, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    env.pop("HELLASWAG_CACHE", None)
    return subprocess.run([sys.executable, "-c", LOOKUP, url], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)


def test_finds_fetches_checks_and_refuses_cut_files(lone_repo, server):
    shakespeare, val = data_file("tinyshakespeare.txt"), data_file("hellaswag_val.jsonl")
    shutil.copy(shakespeare, server.served / "input.txt")
    shutil.copy(val, server.served / "hellaswag_val.jsonl")
    where = [str(lone_repo / "input.txt"), str(lone_repo / "hellaswag" / "hellaswag_val.jsonl")]

    p = lookup(lone_repo, server.url)  # nothing there yet: both are downloaded to where a user's run keeps them
    assert p.returncode == 0 and p.stdout.split() == where, p.stderr
    assert sorted(server.requests) == ["/hellaswag_val.jsonl", "/input.txt"]
    assert open(where[0], "rb").read() == open(shakespeare, "rb").read()
    assert sorted(os.listdir(lone_repo / "hellaswag")) == ["hellaswag_val.jsonl"]  # no temporary file left

    p = lookup(lone_repo, server.url)  # found: nothing is downloaded again
    assert p.returncode == 0 and p.stdout.split() == where and len(server.requests) == 2, p.stderr

    with open(where[0], "r+b") as f:  # a user's input.txt that is not the whole of Tiny Shakespeare
        f.truncate(500_000)
    p = lookup(lone_repo, server.url)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"DataError: {where[0]}: not Tiny Shakespeare (sha256 {p.stderr.split('sha256 ')[1][:12]}..., expected "
        f"86c4e6aa9db7...): cut short, or another text; delete it and it is downloaded again"]
    assert os.path.getsize(where[0]) == 500_000  # a user's file is never deleted

    # a cut download (half the bytes: the last line is not JSON) is refused and removed
    os.remove(where[0])
    os.remove(where[1])
    data = open(val, "rb").read()
    (server.served / "hellaswag_val.jsonl").write_bytes(data[: len(data) // 2])
    p = lookup(lone_repo, server.url)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[:-1] == [
        f"downloaded {server.url}/input.txt -> {where[0]}"], p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"DataError: downloaded, then removed: {where[1]}:") and "not valid JSON" in last
    assert not os.path.exists(where[1]) and os.path.exists(where[0])  # Tiny Shakespeare was fetched and checked


def test_offline_without_data_pytest_stops_with_one_line(lone_repo):
    env = {**env1(), **OFFLINE}
    env.pop("HELLASWAG_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tokenizer.py"],
                       cwd=lone_repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 4, p.stdout + p.stderr  # pytest's usage error: nothing was collected
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: the tests need their data: tinyshakespeare.txt: not in "), \
        p.stderr
    assert f"nor at {lone_repo / 'input.txt'}, and downloading https://" in lines[0]
    assert lines[0].endswith(f"connect to the internet once (the file is then kept at {lone_repo / 'input.txt'}), "
                             f"or copy the file there")
    assert not os.path.exists(lone_repo / "input.txt")
