"""Checkpoints: exact resume after SIGTERM and SIGKILL, safe writes, NaN skipping, bad state."""
import os
import signal
import subprocess
import sys
import time

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
    stopped_at = torch.load(tg.latest_checkpoint(str(d)), weights_only=False)["step"]
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
        ckpt = tg.read_checkpoint(tg.latest_checkpoint(d))  # loads: never a half-written file
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
    assert tg.read_checkpoint(tg.latest_checkpoint(d))["step"] == 1


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
        p = run_train(*ARGS, "--max-steps", "3", "--resume", str(path), "--log-dir", str(tmp_path / "x"), check=False)
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr and str(path) in p.stderr and message in p.stderr
    p = run_train(*ARGS, "--max-steps", "3", "--n-layer", "3", "--resume", str(good), "--log-dir", str(tmp_path / "y"),
                  check=False)
    assert p.returncode == 1 and "n_layer: checkpoint 2, now 3" in p.stderr and "Traceback" not in p.stderr


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
