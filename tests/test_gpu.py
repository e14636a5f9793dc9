"""The CUDA and MPS paths, on the real device; skipped where there is none (CI has none).

    python -m pytest -q -s tests/test_gpu.py          # on a machine with a GPU (or a Mac); -s shows the figures

Sized for about 4 minutes on one H100 or H200, compiling included: small models but for two tests,
which measure GPT-2 124M (the micro-batch probe uncompiled, and a short compiled run of the script).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from helpers import ROOT, SHAKESPEARE, env1, read_log, run_train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
mps = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS device")

# a small model on Tiny Shakespeare, on the GPU, in the default precision (bf16 from Ampere on)
GPU = ["--preset", "gpt2-124m", "--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "4", "--n-embd", "128",
       "--seq-len", "128", "--total-batch-size", "8192", "--batch-size", "16", "--warmup-steps", "5",
       "--max-lr", "3e-3", "--val-tokens", "16384", "--hellaswag-every", "0", "--sample-every", "0",
       "--checkpoint-every", "0", "--val-every", "0", "--device", "cuda"]


def hellaswag_data():
    return os.path.join(ROOT, "tests", "data", "hellaswag_val_300.jsonl")


@cuda
def test_cuda_compiled_run_with_validation_hellaswag_and_sampling(tmp_path):
    p = run_train(*GPU, "--max-steps", "30", "--val-every", "10", "--hellaswag-every", "15", "--hellaswag-limit", "64",
                  "--hellaswag-data", hellaswag_data(), "--sample-every", "15", "--checkpoint-every", "30",
                  "--log-dir", str(tmp_path))
    want = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16 with loss scaling"
    assert f"autocast: {want}, compile: True" in p.stdout, p.stdout[:2000]
    val, train = read_log(tmp_path, "val"), read_log(tmp_path, "train")
    assert sorted(val) == [0, 10, 20, 30] and len(train) == 30 and all(map(math.isfinite, train.values()))
    assert val[30] < val[0] - 2
    assert sorted(read_log(tmp_path, "hella")) == [0, 15, 30]
    assert p.stdout.count("rank 0 sample 0:") == 2  # steps 15 and 30
    assert "mfu" in p.stdout or tg.peak_flops(torch.cuda.get_device_name()) is None
    ckpt = tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))
    assert ckpt["rng"][0]["torch"].device.type == "cpu" and ckpt["rng"][0]["cuda"].device.type == "cpu"


@cuda
def test_cuda_sigterm_then_resume_auto_continues_the_unbroken_run(tmp_path):
    # eager (the compiler has its own test above); the run sends itself SIGTERM during step 25, which no
    # clock can race however fast the GPU
    args = [*GPU, "--no-compile", "--max-steps", "60", "--val-every", "20", "--checkpoint-every", "10"]
    run_train(*args, "--log-dir", str(tmp_path / "unbroken"))
    d = tmp_path / "run"
    p = run_train(*args, "--log-dir", str(d), sigterm_at=25)
    assert "stopped by signal after step 25" in p.stdout
    assert tg.read_checkpoint(tg.latest_checkpoint(str(d)))["step"] == 26
    p = run_train(*args, "--resume", "auto", "--log-dir", str(d))  # resumes on the GPU (RNG states load to the CPU)
    assert "at step 26" in p.stdout
    a, b = read_log(tmp_path / "unbroken"), read_log(d)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    diff = max(abs(x - y) for (_, _, x), (_, _, y) in zip(a, b))
    print(f"\nresumed vs unbroken run on {torch.cuda.get_device_name()}: largest loss difference {diff:.2e}")
    assert diff < 1e-2


@cuda
def test_cuda_fp16_trains_through_overflows(tmp_path):
    # a first loss scale of 2**22: the test's fp16 gradients overflow from about 2**20 up (2**19 is clean),
    # so the first steps are skipped, each halving the scale, and the rest train
    p = run_train(*GPU, "--no-compile", "--dtype", "fp16", "--max-steps", "20", "--val-every", "20",
                  "--checkpoint-every", "20", "--log-dir", str(tmp_path), init_scale=2.0**22)
    assert "autocast: float16 with loss scaling" in p.stdout and read_log(tmp_path, "skipped") == {}
    scale = tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))["scaler"]["scale"]
    val = read_log(tmp_path, "val")
    print(f"\nfp16 from loss scale 2**22: scale {scale:g} after 20 steps, val {val[0]:.3f} -> {val[20]:.3f}")
    assert scale < 2.0**22 and val[20] < val[0] - 0.5


@cuda
def test_cuda_batch_size_auto_probe_on_gpt2_124m():
    """The probe of --batch-size auto, on GPT-2 124M at T=1024 (uncompiled, as the probe runs): the
    largest micro-batch that divides 256 and trains in memory, found by halving. That the probe leaves
    no trace (the run trains as with that --batch-size by hand) is shown on the CPU."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig()).cuda()
    autocast = tg.autocast_context("cuda", tg.autocast_dtype(torch.device("cuda")))
    reserve = 8 * model.num_params() + (512 << 20)
    B, too_big = tg.fit_micro_batch(model, 256, 1024, torch.device("cuda"), autocast, reserve_bytes=reserve)
    print(f"\n--batch-size auto on {torch.cuda.get_device_name()}: {B} (out of memory at {too_big})")
    assert B in (1, 2, 4, 8, 16, 32, 64, 128) and too_big and too_big[-1] == 2 * B
    assert all(p.grad is None for p in model.parameters())


@cuda
def test_cuda_gpt2_124m_compiled_run_of_the_script(tmp_path):
    """GPT-2 124M at T=1024 through train_gpt2.py itself: compiled, default precision, --batch-size auto,
    20 steps of 2**16 tokens, validation and HellaSwag at small sizes. Prints the figures."""
    p = run_train("--preset", "gpt2-124m", "--input", SHAKESPEARE, "--total-batch-size", str(64 * 1024),
                  "--max-steps", "20", "--warmup-steps", "5", "--val-every", "20", "--val-tokens", str(32 * 1024),
                  "--hellaswag-every", "20", "--hellaswag-limit", "200", "--hellaswag-data", hellaswag_data(),
                  "--sample-every", "0", "--checkpoint-every", "0", "--device", "cuda", "--log-dir", str(tmp_path),
                  timeout=400)
    done = [line for line in p.stdout.splitlines() if line.startswith("done:")]
    micro = re.search(r"--batch-size auto: micro-batch (\d+)", p.stdout)
    assert done and micro, p.stdout[-3000:]
    print(f"\nGPT-2 124M on {torch.cuda.get_device_name()}, micro-batch {micro[1]}: {done[0]}")
    # training's own peak, not the probe's (which tries sizes until one fits, near the whole memory)
    peak = float(re.search(r"peak memory ([\d.]+) GiB", done[0])[1]) * 2**30
    assert peak < 0.9 * torch.cuda.get_device_properties(0).total_memory
    train = read_log(tmp_path, "train")
    assert len(train) == 20 and train[19] < train[0] - 1


@cuda
def test_cuda_training_step_queues_its_work_without_waiting():
    """The step's parts (the loader's pinned copy, forward and backward with DDP's micro-steps, the
    scaler, clipping, the fused AdamW) never make the host wait for the GPU: under sync debug mode
    "error" a synchronizing call raises. The loop's one wait is its single read of the step's stats."""
    import numpy as np

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = tg.GPT(tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)).to(device)
    tokens = np.random.default_rng(0).integers(0, 50257, 100_000, dtype=np.uint16)
    loader = tg.DataLoader([tokens], ["random tokens"], B=8, T=64, grad_accum_steps=2)
    optimizer = model.configure_optimizer(0.1, 1e-3, "cuda")
    dtype = tg.autocast_dtype(device)
    autocast, scaler = tg.autocast_context("cuda", dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for _ in range(3):
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.zero_grad(set_to_none=True)
            loss = tg.forward_backward(model, loader, 2, device, autocast, scaler)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            stats = torch.stack([loss, norm.float(), torch.full((), 0.0, device=device)])
            if not scaler.is_enabled():  # fp16 (GPUs before Ampere): the scaler reads found_inf
                scaler.step(optimizer)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        loss, norm, stop = stats.tolist()  # the one read
        assert loss == loss and norm == norm


@cuda
def test_cuda_hellaswag_predictions_equal_the_cpus(tmp_path):
    run_train(*GPU, "--max-steps", "20", "--checkpoint-every", "20", "--log-dir", str(tmp_path / "run"))
    ckpt = tg.latest_checkpoint(str(tmp_path / "run"))
    results = {}
    for device, dtype in [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "auto")]:
        out = tmp_path / f"{device}_{dtype}.json"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "hellaswag.py"), "--checkpoint", ckpt, "--data",
                            hellaswag_data(), "--limit", "300", "--device", device, "--dtype", dtype,
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
                        "--steps", "5", "--warmup", "2", "--rounds", "1"], cwd=ROOT, env=env1(), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^\| ours \(train_gpt2\.GPT\) .*\|$", p.stdout, re.M), p.stdout
    assert re.search(r"^ours / peer tokens/s: \d+\.\d\dx", p.stdout, re.M), p.stdout


@mps
def test_mps_quick_start_trains_and_validates(tmp_path):
    p = run_train("--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--max-steps", "20",
                  "--val-every", "10", "--sample-every", "10", "--checkpoint-every", "20", "--device", "mps",
                  "--log-dir", str(tmp_path))
    assert "autocast: float32" in p.stdout
    val = read_log(tmp_path, "val")
    assert sorted(val) == [0, 10, 20] and val[20] < val[0]
    p = run_train("--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--max-steps", "24",
                  "--val-every", "10", "--device", "mps", "--resume", "auto", "--log-dir", str(tmp_path))
    assert "at step 20" in p.stdout
