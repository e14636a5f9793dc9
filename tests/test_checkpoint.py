"""Checkpoints: exact resume after SIGTERM and SIGKILL, safe writes, NaN skipping, bad state."""
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from helpers import ROOT, TINY, env1, read_log, run_train, train_cmd

ARGS = [*TINY, "--batch-size", "8", "--val-every", "25", "--max-steps", "100"]


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before the test could interrupt it:\n{out[-2000:]}\n{err[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def train_steps(log_dir):
    path = os.path.join(log_dir, "log.txt")
    if not os.path.exists(path):
        return 0
    return sum(1 for line in open(path) if " train " in line)


def assert_same_records(a, b):
    ra, rb = read_log(a), read_log(b)
    assert [(s, k) for s, k, _ in ra] == [(s, k) for s, k, _ in rb]
    diffs = [(s, k, x, y) for (s, k, x), (_, _, y) in zip(ra, rb) if x != y]
    assert not diffs, diffs[:5]  # bit-identical on CPU in fp32


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    d = tmp_path_factory.mktemp("unbroken")
    run_train(*ARGS, "--log-dir", str(d))
    return d


def start(log_dir, *extra, nproc=1):
    return subprocess.Popen(train_cmd(*ARGS, "--log-dir", str(log_dir), *extra, nproc=nproc), cwd=ROOT, env=env1(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_run_then_resume_equals_unbroken(unbroken, tmp_path):
    d = tmp_path / "run"
    p = start(d)
    wait_for(lambda: train_steps(d) >= 30, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    stopped_at = tg.read_checkpoint(tg.latest_checkpoint(str(d)))["step"]
    assert 30 <= stopped_at < 100
    p = run_train(*ARGS, "--log-dir", str(d), "--resume", "auto")
    assert "resumed from" in p.stdout and f"at step {stopped_at}" in p.stdout
    assert_same_records(unbroken, d)


def test_sigkill_after_checkpoint_then_resume_equals_unbroken(unbroken, tmp_path):
    d = tmp_path / "run"
    p = start(d, "--checkpoint-every", "20")
    wait_for(lambda: os.path.exists(d / "latest") and train_steps(d) >= 25, p)
    p.kill()  # no handler runs: the steps after the checkpoint are lost
    p.communicate()
    run_train(*ARGS, "--log-dir", str(d), "--resume", "auto", "--checkpoint-every", "20")
    assert_same_records(unbroken, d)  # the lost steps' records were dropped, then redone identically


def test_ddp_resume_equals_unbroken_two_rank_run(tmp_path):
    args = ["--max-steps", "60", "--batch-size", "4"]
    run_train(*ARGS, *args, "--log-dir", str(tmp_path / "unbroken"), nproc=2)
    d = tmp_path / "run"
    p = start(d, *args, nproc=2)
    wait_for(lambda: train_steps(d) >= 30, p)
    p.send_signal(signal.SIGTERM)  # to torchrun, which passes it to both ranks
    p.communicate(timeout=90)
    assert os.path.exists(d / "latest")
    run_train(*ARGS, *args, "--log-dir", str(d), "--resume", "auto", nproc=2)
    assert_same_records(tmp_path / "unbroken", d)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    # a child process writes ~40 MB checkpoints in a loop; we SIGKILL it at arbitrary moments
    script = (
        "import sys, torch, train_gpt2 as tg\n"
        "d = sys.argv[1]\n"
        "for step in range(1, 1000):\n"
        "    tg.save_checkpoint(d, {'format': tg.CHECKPOINT_FORMAT, 'version': tg.CHECKPOINT_VERSION, 'step': step,\n"
        "                           'blob': torch.full((10_000_000,), float(step))}, keep=2)\n"
        "    print(step, flush=True)\n"
    )
    d = str(tmp_path)
    for delay in (0.05, 0.2, 0.45):
        p = subprocess.Popen([sys.executable, "-c", script, d], cwd=ROOT, env={**env1(), "PYTHONPATH": ROOT},
                             stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # one save finished: the next one is under way
        time.sleep(delay)  # then kill it somewhere inside a later save
        p.kill()
        p.communicate()
        ckpt = torch.load(tg.latest_checkpoint(d), weights_only=True)  # loads: never a half-written file
        assert ckpt["blob"][0].item() == ckpt["step"]
        assert not [n for n in os.listdir(d) if n.endswith(".pt") and n != os.path.basename(tg.latest_checkpoint(d))
                    and not n.startswith("ckpt_")]


def test_interrupted_save_keeps_previous_and_leaves_no_temp_file(tmp_path, monkeypatch):
    d = str(tmp_path)
    state = lambda step: {"format": tg.CHECKPOINT_FORMAT, "version": tg.CHECKPOINT_VERSION, "step": step}
    tg.save_checkpoint(d, state(1), keep=3)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(tg.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        tg.save_checkpoint(d, state(2), keep=3)
    assert sorted(os.listdir(d)) == ["ckpt_000001.pt", "latest"]
    assert torch.load(tg.latest_checkpoint(d), weights_only=True)["step"] == 1


def test_keep_last_checkpoints(tmp_path):
    run_train(*ARGS, "--max-steps", "10", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--log-dir",
              str(tmp_path))
    kept = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
    assert kept == ["ckpt_000006.pt", "ckpt_000008.pt", "ckpt_000010.pt"]
    ckpt = tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))
    assert ckpt["step"] == 10 and ckpt["world_size"] == 1 and ckpt["train_loader"]["position"] == 10 * 8
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model = tg.load_model(tg.latest_checkpoint(str(tmp_path)))
    assert model.config.n_layer == 2


def test_nan_loss_is_skipped_and_counted(tmp_path):
    p = run_train(*ARGS, "--max-steps", "8", "--log-dir", str(tmp_path), nan_steps=3)
    assert "update skipped" in p.stdout
    records = read_log(tmp_path)
    assert (3, "skipped", 1.0) in records
    assert len(read_log(tmp_path, "train")) == 8


def test_repeated_nan_stops_cleanly_keeping_last_good_checkpoint(tmp_path):
    p = run_train(*ARGS, "--max-steps", "20", "--checkpoint-every", "2", "--max-bad-steps", "3",
                  "--log-dir", str(tmp_path), check=False, nan_steps="5,6,7,8")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "3 non-finite losses in a row at step 7" in p.stderr and "ckpt_000004.pt" in p.stderr
    assert p.stderr.strip().count("\n") == 0  # one line
    assert tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))["step"] == 4


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    run_train(*ARGS, "--max-steps", "2", "--checkpoint-every", "2", "--log-dir", str(tmp_path / "ok"))
    good = tmp_path / "ok" / "ckpt_000002.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    for path, message in [(truncated, "not a readable checkpoint"), (foreign, "not a train_gpt2.py checkpoint"),
                          (garbage, "not a readable checkpoint"), (tmp_path / "missing.pt", "no such checkpoint")]:
        with pytest.raises(tg.CheckpointError) as e:
            tg.read_checkpoint(str(path))
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    # on the command line, such an error is one line and exit 1
    p = run_train(*ARGS, "--max-steps", "3", "--resume", str(truncated), "--log-dir", str(tmp_path / "x"), check=False)
    assert p.returncode == 1 and p.stderr.startswith(f"train_gpt2.py: error: {truncated}: not a readable checkpoint")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run_train(*ARGS, "--max-steps", "3", "--n-layer", "3", "--resume", str(good), "--log-dir", str(tmp_path / "y"),
                  check=False)
    assert p.returncode == 1 and "n_layer: checkpoint 2, now 3" in p.stderr and "Traceback" not in p.stderr

    # a checkpoint without each key the readers use, or with a part of the wrong type or shape
    ckpt = tg.read_checkpoint(str(good))
    cases = [({k: v for k, v in ckpt.items() if k != key}, f"{key} (") for key in tg.CHECKPOINT_KEYS]
    weights = {k: v for k, v in ckpt["model"].items() if k != "lm_head.weight"}
    cases += [({**ckpt, "step": "2"}, "step (int)"),
              ({**ckpt, "model": weights}, "model['lm_head.weight'] (a tensor of shape (50304, 32))"),
              ({**ckpt, "model": {**ckpt["model"], "transformer.wpe.weight": torch.zeros(3)}},
               "model['transformer.wpe.weight'] (a tensor of shape (32, 32))"),
              ({**ckpt, "model_config": {**ckpt["model_config"], "n_layers": 2}}, "model_config (unknown n_layers)"),
              ({**ckpt, "optimizer": {"state": {}}}, "optimizer['param_groups']"),
              ({**ckpt, "train_loader": {}}, "train_loader['position']"),
              ({**ckpt, "rng": []}, "rng (one dict of numpy, python, torch per process)")]
    damaged = tmp_path / "damaged.pt"
    for state, message in cases:
        torch.save(state, damaged)
        with pytest.raises(tg.CheckpointError, match="damaged checkpoint") as e:
            tg.read_checkpoint(str(damaged))
        assert str(damaged) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), (message, e.value)
    p = run_train(*ARGS, "--eval-only", "--resume", str(damaged), check=False)  # the last case, on the command line
    want = f"train_gpt2.py: error: {damaged}: a damaged checkpoint: missing or wrong: rng (one dict of numpy, " \
        f"python, torch per process)"
    assert p.returncode == 1 and p.stderr.strip() == want, p.stderr


class RunsCode:
    """Unpickling this calls open(path, "w"): it stands for any code a crafted checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_that_would_run_code_is_refused_by_every_reader(tmp_path, hellaswag_val):
    crafted = tmp_path / "crafted.pt"
    created = tmp_path / "created-by-the-checkpoint"
    torch.save({"format": tg.CHECKPOINT_FORMAT, "version": tg.CHECKPOINT_VERSION, "step": 1,
                "model": {"transformer.wte.weight": RunsCode(str(created))}}, crafted)
    refused = f"{crafted}: holds a Python object (io.open) that loading would have to run code to build: refused"
    for load in (tg.read_checkpoint, tg.load_model):  # load_model: --init-from, the notebook, bench.hellaswag
        with pytest.raises(tg.CheckpointFormatError, match="refused"):
            load(str(crafted))
    hellaswag = [sys.executable, os.path.join(ROOT, "hellaswag.py"), "--checkpoint", str(crafted),
                 "--data", hellaswag_val, "--limit", "2"]
    for cmd in (train_cmd(*ARGS, "--resume", str(crafted), "--log-dir", str(tmp_path / "a")),
                train_cmd(*ARGS, "--eval-only", "--resume", str(crafted)), hellaswag):
        p = subprocess.run(cmd, cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and refused in p.stderr, p.stderr
        assert "convert it: python -c" in p.stderr  # the way out for an old checkpoint one trusts
    assert not created.exists()
    torch.load(crafted, weights_only=False)  # the full unpickler runs the code: the test can see it
    assert created.exists()


def test_format_1_checkpoint_is_refused_then_converted_and_resumes_exactly(unbroken, tmp_path):
    d = tmp_path / "run"
    run_train(*ARGS, "--log-dir", str(d), sigterm_at=50)
    path = tg.latest_checkpoint(str(d))
    # the checkpoint as train_gpt2.py wrote it before format 2: NumPy's random state with its array,
    # the given flags as a frozenset (both need the full unpickler)
    ckpt = torch.load(path, weights_only=True)  # not mmap: the file is rewritten below
    for state in ckpt["rng"]:
        name, key, *rest = state["numpy"]
        state["numpy"] = (name, np.array(key, dtype=np.uint32), *rest)
    ckpt["run_config"]["given"] = frozenset(ckpt["run_config"]["given"])
    torch.save({**ckpt, "version": 1}, path)
    p = run_train(*ARGS, "--log-dir", str(d), "--resume", "auto", check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr  # not skipped for an older one
    assert f"{path}: holds a Python object (numpy." in p.stderr and tg.CONVERT.format(path) in p.stderr
    python, option, code = shlex.split(tg.CONVERT.format(path))  # the documented command,
    assert (python, option) == ("python", "-c")
    exec(code)  # run here rather than in a new process
    assert tg.read_checkpoint(path)["version"] == tg.CHECKPOINT_VERSION
    run_train(*ARGS, "--log-dir", str(d), "--resume", "auto")
    assert_same_records(unbroken, d)


def test_deterministic_runs_repeat_to_the_bit_with_the_default_threads(tmp_path):
    """With torch's own number of threads (not the tests' one), --deterministic, which CPU runs get by
    default: two runs of a command log the same losses to the bit, and a run stopped by SIGTERM then
    resumed equals them."""
    env = {k: v for k, v in env1().items() if k != "OMP_NUM_THREADS"}
    args = [*TINY, "--batch-size", "8", "--max-steps", "24", "--val-every", "8", "--checkpoint-every", "8"]

    def run(name, *extra, **patches):
        return run_train(*args, "--log-dir", str(tmp_path / name), *extra, extra_env=env, **patches)

    p = run("a")
    assert "deterministic: True" in p.stdout  # the CPU default
    run("b", "--deterministic")
    assert_same_records(tmp_path / "a", tmp_path / "b")
    p = run("c", sigterm_at=13)
    assert "stopped by signal after step 13" in p.stdout
    run("c", "--resume", "auto")
    assert_same_records(tmp_path / "a", tmp_path / "c")
