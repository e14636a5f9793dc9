"""The CUDA and MPS paths, on the real device; skipped where there is none (CI has none).

    python -m pytest -q tests/test_gpu.py -s          # on a machine with a GPU (or a Mac); -s shows the figures

A few minutes on one H100 (GPT-2 124M is compiled twice for the micro-batch test).
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt2 as tg
from helpers import ROOT, SHAKESPEARE, env1, read_log, run_train, train_cmd

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
mps = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS device")

# a small model on Tiny Shakespeare, on the GPU: compiled, default precision (bf16 from Ampere on)
GPU = ["--preset", "gpt2-124m", "--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "4", "--n-embd", "128",
       "--seq-len", "128", "--total-batch-size", "8192", "--batch-size", "16", "--warmup-steps", "5",
       "--max-lr", "3e-3",
       "--val-tokens", "16384", "--hellaswag-every", "0", "--sample-every", "0", "--checkpoint-every", "0",
       "--val-every", "0", "--device", "cuda"]


def hellaswag_data():
    return os.path.join(ROOT, "..", "shared", "data", "hellaswag_val.jsonl")


@cuda
def test_cuda_compiled_bf16_run_with_validation_hellaswag_and_sampling(tmp_path):
    p = run_train(*GPU, "--max-steps", "30", "--val-every", "10", "--hellaswag-every", "15", "--hellaswag-limit", "64",
                  "--hellaswag-data", hellaswag_data(), "--sample-every", "15", "--checkpoint-every", "30",
                  "--log-dir", str(tmp_path))
    want = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16 with loss scaling"
    assert f"autocast: {want}, compile: True" in p.stdout, p.stdout[:2000]
    val, train = read_log(tmp_path, "val"), read_log(tmp_path, "train")
    assert sorted(val) == [0, 10, 20, 29] and len(train) == 30 and all(map(math.isfinite, train.values()))
    assert val[29] < val[0] - 2
    assert len(read_log(tmp_path, "hella")) == 3  # steps 0, 15, 29
    assert p.stdout.count("rank 0 sample 0:") == 2  # steps 15 and 29
    assert "mfu" in p.stdout or tg.peak_flops(torch.cuda.get_device_name()) is None
    ckpt = tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))
    assert ckpt["rng"][0]["torch"].device.type == "cpu" and ckpt["rng"][0]["cuda"].device.type == "cpu"


@cuda
def test_cuda_sigterm_then_resume_auto_continues_the_unbroken_run(tmp_path):
    args = [*GPU, "--max-steps", "60", "--val-every", "20", "--checkpoint-every", "10"]
    run_train(*args, "--log-dir", str(tmp_path / "unbroken"))
    d = tmp_path / "run"
    p = subprocess.Popen(train_cmd(*args, "--log-dir", str(d)), cwd=ROOT, env=env1(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(read_log(d, "train") if (d / "log.txt").exists() else {}) < 25 and time.time() - t0 < 300:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "stopped by signal" in out, err[-2000:]
    stopped = tg.read_checkpoint(tg.latest_checkpoint(str(d)))["step"]
    assert 25 <= stopped < 60
    p = run_train(*args, "--resume", "auto", "--log-dir", str(d))  # resumes on the GPU (RNG states load to the CPU)
    assert f"at step {stopped}" in p.stdout
    a, b = read_log(tmp_path / "unbroken"), read_log(d)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    diff = max(abs(x - y) for (_, _, x), (_, _, y) in zip(a, b))
    print(f"\nresumed vs unbroken run on {torch.cuda.get_device_name()}: largest loss difference {diff:.2e}")
    assert diff < 1e-2


@cuda
def test_cuda_fp16_trains_through_overflows(tmp_path):
    p = run_train(*GPU, "--dtype", "fp16", "--max-steps", "20", "--val-every", "19", "--log-dir", str(tmp_path),
                  extra_env={"TRAIN_GPT2_INIT_SCALE": str(2.0**40)})
    assert "autocast: fp16 with loss scaling" in p.stdout and "gradients overflowed: update skipped" in p.stdout
    assert len(read_log(tmp_path, "scale")) >= 2 and read_log(tmp_path, "skipped") == {}
    val = read_log(tmp_path, "val")
    assert val[19] < val[0] - 0.5


@cuda
def test_cuda_batch_size_auto_fits_memory_and_trains_as_the_same_number_by_hand(tmp_path):
    # GPT-2 124M, T=1024, 256 sequences per step: the probe starts at 256 (its logits alone would take 79 GB)
    # and halves on out-of-memory
    args = ["--preset", "gpt2-124m", "--input", SHAKESPEARE, "--total-batch-size", str(256 * 1024), "--max-steps", "2",
            "--val-every", "0", "--hellaswag-every", "0", "--sample-every", "0", "--checkpoint-every", "0",
            "--warmup-steps", "1", "--device", "cuda"]
    p = run_train(*args, "--log-dir", str(tmp_path / "auto"))
    m = re.search(r"--batch-size auto: micro-batch (\d+) \(out of memory at ([\d, ]+)\)", p.stdout)
    assert m, p.stdout[:3000]
    B = int(m[1])
    print(f"\n--batch-size auto on {torch.cuda.get_device_name()}: {B} (out of memory at {m[2]})")
    run_train(*args, "--batch-size", str(B), "--log-dir", str(tmp_path / "hand"))
    auto, hand = read_log(tmp_path / "auto", "train"), read_log(tmp_path / "hand", "train")
    assert auto.keys() == hand.keys() == {0, 1}
    for s in auto:
        assert auto[s] == pytest.approx(hand[s], rel=1e-5), (s, auto[s], hand[s])


@cuda
def test_cuda_hellaswag_predictions_equal_the_cpus(tmp_path):
    run_train(*GPU, "--max-steps", "20", "--checkpoint-every", "20", "--log-dir", str(tmp_path / "run"))
    ckpt = tg.latest_checkpoint(str(tmp_path / "run"))
    results = {}
    for device, dtype in [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "auto")]:
        out = tmp_path / f"{device}_{dtype}.json"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "hellaswag.py"), "--checkpoint", ckpt, "--data",
                            hellaswag_data(), "--limit", "500", "--device", device, "--dtype", dtype,
                            "--out", str(out)],
                           cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        results[device, dtype] = json.loads(out.read_text())["predictions"]
    cpu = results["cpu", "fp32"]
    same = {k: sum(a == b for a, b in zip(v, cpu)) / len(cpu) for k, v in results.items()}
    print(f"\nHellaSwag predictions the same as on the CPU: GPU fp32 {100 * same['cuda', 'fp32']:.1f}%, GPU default "
          f"precision {100 * same['cuda', 'auto']:.1f}%")
    assert same["cuda", "fp32"] >= 0.995  # a near-tie may flip, nothing more
    assert same["cuda", "auto"] >= 0.85


@cuda
def test_cuda_bench_train():
    p = subprocess.run([sys.executable, "-m", "bench.train", "--device", "cuda", "--model", "shakespeare",
                        "--steps", "5",
                        "--warmup", "2", "--rounds", "1"], cwd=ROOT, env=env1(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^\| ours \(train_gpt2\.GPT\) .*\|$", p.stdout, re.M), p.stdout
    assert re.search(r"^ours / peer tokens/s: \d+\.\d\dx", p.stdout, re.M), p.stdout


@mps
def test_mps_quick_start_trains_and_validates(tmp_path):
    p = run_train("--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--max-steps", "20",
                  "--val-every", "10", "--sample-every", "10", "--checkpoint-every", "20", "--device", "mps",
                  "--log-dir", str(tmp_path))
    assert "autocast: fp32" in p.stdout
    val = read_log(tmp_path, "val")
    assert sorted(val) == [0, 10, 19] and val[19] < val[0]
    p = run_train("--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--max-steps", "24",
                  "--val-every", "10", "--device", "mps", "--resume", "auto", "--log-dir", str(tmp_path))
    assert "at step 20" in p.stdout
