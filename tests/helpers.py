"""Running train_gpt2.py's command line (in this process, or in fresh ones), and reading its logs."""
import contextlib
import io
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAKESPEARE = os.path.join(ROOT, "input.txt")

# a tiny model on Tiny Shakespeare: each step takes a few milliseconds. The preset is named because
# --input alone would start from the shakespeare preset (dropout 0.1, another LR).
TINY = ["--preset", "gpt2-124m", "--input", SHAKESPEARE, "--n-layer", "2", "--n-head", "2",
        "--n-embd", "32", "--seq-len", "32", "--total-batch-size", "256", "--warmup-steps", "2",
        "--val-tokens", "1024", "--hellaswag-every", "0", "--sample-every", "0",
        "--checkpoint-every", "0", "--val-every", "0", "--no-compile", "--device", "cpu",
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


def run_train(*args, nproc=1, check=True, timeout=600, extra_env=None, fresh=False, **patches):
    """train_gpt2.py's main() with these arguments: in this process (the suite's threads), or with
    nproc > 1 or fresh=True in new processes (one thread each). patches: nan_steps="3,5",
    init_scale=2**23 (see tests/patched_train.py). Returns returncode, stdout and stderr."""
    if nproc == 1 and not fresh and not extra_env:
        import train_gpt2
        from patched_train import patch

        out, err, undo = io.StringIO(), io.StringIO(), patch(**patches)
        handlers, code = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                train_gpt2.main(list(args))
        except SystemExit as e:
            code = e.code
        finally:
            undo()
            for s, handler in handlers.items():  # the run's stop handlers go with it
                signal.signal(s, handler)
        p = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    else:
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
