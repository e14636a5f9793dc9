"""bench/train.py (python -m bench.train): it runs end to end, and the peer it compares with does the same work
as our model."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, env1

# --no-precisions: ours against the peer also on a CPU with bf16 instructions (there the default
# compares our model's precisions instead)
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "-B", "2", "-T", "32",
        "--warmup", "2", "--steps", "2", "--no-compile", "--no-precisions"]


def test_bench_prints_both_rows_and_ratio():
    p = subprocess.run([sys.executable, "-m", "bench.train", *TINY, "--peer"], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = p.stdout
    assert re.search(r"^\| ours \(train_gpt2\.GPT\) +\|.*\|$", out, re.M), out
    assert re.search(r"^\| peer \(GPT2LMHeadModel\) +\|.*\|$", out, re.M), out
    assert re.search(r"^ours / peer tokens/s: \d+\.\d\dx", out, re.M), out
    assert "6N + 12LCT" in out


def test_peer_scores_the_same_targets():
    """With our weights copied into it, the peer's loss on (x, y) is our loss: the same next tokens."""
    import bench.train as bench
    from train_gpt2 import GPT, GPTConfig

    args = bench.parse_args(TINY)
    d = bench.resolve(args)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    peer = bench.build_peer(args, d.device)
    peer.hf.load_state_dict(ours.hf_state_dict(), strict=False)
    if not peer.shifted:
        pytest.skip("this transformers has no shift_labels: the peer scores one target fewer per row")
    x, y = bench.random_loader(2, 32).next_batch()
    with torch.no_grad():
        want = ours(x, y)[1].item()
        got = peer(x, y)[1].item()
    assert abs(got - want) < 1e-4


def test_the_124m_shapes_resolve_to_a_number():
    """The 124M preset trains with --batch-size auto; the benchmark times a fixed micro-batch (64)."""
    import bench.train as bench

    args = bench.parse_args(["--device", "cpu", "--model", "124m"])
    bench.resolve(args)
    assert (args.batch_size, args.seq_len, args.n_layer) == (64, 1024, 12)
    assert bench.random_loader(2, 1024, 1).next_batch()[0].shape == (2, 1024)


def test_bench_hellaswag_runs(hellaswag_val):
    """python -m bench.hellaswag runs, and its two scorers agree."""
    p = subprocess.run([sys.executable, "-m", "bench.hellaswag", "--limit", "6", "--batch-size", "4", "--data",
                        hellaswag_val], cwd=ROOT,
                       env=env1(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "predictions agree: acc 6/6, acc_norm 6/6" in p.stdout, p.stdout


def test_bench_fineweb_runs(hellaswag_val, tmp_path):
    """python -m bench.fineweb on a small corpus: its four rows, the CPU-seconds line, the same tokens."""
    shutil.copy(os.path.join(ROOT, "input.txt"), tmp_path / "tinyshakespeare.txt")
    shutil.copy(hellaswag_val, tmp_path / "hellaswag_val.jsonl")
    command = ["-m", "bench.fineweb", "--data-dir", tmp_path, "--corpus-mb", "1", "--repeat", "1", "--wait-idle", "0",
               "--workers", "2", "--shard-size", "100000"]
    p = subprocess.run([sys.executable, *command], cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert len(re.findall(r"M tokens/s", p.stdout)) == 4, p.stdout
    assert re.search(r"CPU-seconds: main process [\d.]+, workers [\d.]+; .*main process feeds \d+ workers", p.stdout)
    assert "wrote the same tokens: yes" in p.stdout
