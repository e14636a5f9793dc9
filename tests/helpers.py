"""Running the real scripts in fresh processes, and reading their logs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.data import data_file  # noqa: E402

SHAKESPEARE = data_file("tinyshakespeare.txt")  # conftest has found (or fetched) it before collection

# a tiny model on Tiny Shakespeare: each step takes a few milliseconds on one CPU thread. The preset is
# named because --input alone would start from the shakespeare preset (dropout 0.1, another LR).
TINY = ["--preset", "gpt2-124m", "--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--seq-len", "32",
        "--total-batch-size", "256", "--warmup-steps", "2", "--val-tokens", "1024", "--hellaswag-every", "0",
        "--sample-every", "0", "--checkpoint-every", "0", "--val-every", "0", "--no-compile", "--device", "cpu",
        "--dtype", "fp32"]  # the reference precision: auto picks bf16 on a CPU with bf16 instructions


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(*args, nproc=1, patched=False):
    """The command of train_gpt2.py; patched: through tests/patched_train.py (PATCH_* variables)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    script = os.path.join(ROOT, "tests", "patched_train.py") if patched else os.path.join(ROOT, "train_gpt2.py")
    return launcher + [script, *args]


def run_train(*args, nproc=1, check=True, timeout=600, extra_env=None, **patches):
    """train_gpt2.py in a fresh process. patches: nan_steps="3,5", init_scale=2**23, sigterm_at=30,
    no_bpe_wheel=1 (see tests/patched_train.py)."""
    env = {**env1(), **(extra_env or {}), **{f"PATCH_{k.upper()}": str(v) for k, v in patches.items()}}
    p = subprocess.run(train_cmd(*args, nproc=nproc, patched=bool(patches)), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train_gpt2.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(log_dir, kind=None):
    """{step: value} of one record kind of LOG_DIR/log.txt (or all records as (step, kind, value))."""
    records = []
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            if line.startswith("#"):
                continue
            step, k, value = line.split()
            records.append((int(step), k, float(value)))
    if kind is None:
        return records
    return {s: v for s, k, v in records if k == kind}
