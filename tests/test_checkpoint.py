"""Checkpoints: exact resume after SIGTERM and SIGKILL, safe writes, NaN skipping, bad state."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from helpers import ROOT, TINY, env1, read_log, run_train, train_cmd

ARGS = [*TINY, "--batch-size", "8", "--val-every", "10", "--max-steps", "40", "--dropout", "0.1"]  # dropout: random states


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


def test_sigterm_mid_run_then_resume_equals_unbroken(unbroken, tmp_path):
    """A real SIGTERM, sent by the run to itself during step 23: the step is finished and saved."""
    d = tmp_path / "run"
    p = run_train(*ARGS, "--log-dir", str(d), sigterm_at=23)
    assert "stopped by signal after step 23" in p.stdout and tg.checkpoint_steps(str(d)) == [24]
    p = run_train(*ARGS, "--log-dir", str(d), "--resume", "auto")
    assert "resumed from" in p.stdout and "at step 24" in p.stdout
    assert_same_records(unbroken, d)


def test_sigkill_after_checkpoint_then_resume_equals_unbroken(unbroken, tmp_path):
    d = tmp_path / "run"
    p = subprocess.Popen(train_cmd(*ARGS, "--log-dir", str(d), "--checkpoint-every", "10", patched=True), cwd=ROOT,
                         env={**env1(), "PATCH_STEP_SECONDS": "0.05"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: tg.checkpoint_steps(str(d)) and train_steps(d) >= 14, p)
    p.kill()  # no handler runs: the steps after the checkpoint are lost
    p.communicate()
    run_train(*ARGS, "--log-dir", str(d), "--resume", "auto", "--checkpoint-every", "10")
    assert_same_records(unbroken, d)  # the lost steps' records were dropped, then redone identically


DDP = [*ARGS, "--max-steps", "12", "--val-every", "4", "--batch-size", "4", "--checkpoint-every", "4",
       "--val-tokens", "32"]  # one validation sequence: rank 1 has none, yet takes part


@pytest.fixture(scope="module")
def unbroken_ddp(tmp_path_factory):
    d = tmp_path_factory.mktemp("unbroken_ddp")
    run_train(*DDP, "--log-dir", str(d), nproc=2)
    return d


def test_torchrun_restarts_a_lost_rank_and_the_run_ends_as_an_unbroken_one(unbroken_ddp, tmp_path):
    """torchrun --max-restarts 3 with --resume auto, as the README launches it: rank 1 is SIGKILLed
    during step 6 (the first attempt only); torchrun stops rank 0 and starts both again, which resume
    from step 4. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it the restarted group shares torchrun's
    store with the dead one and may read its addresses (2 of 5 restarts failed at gloo's connect)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "3", os.path.join(ROOT, "tests", "patched_train.py"), *DDP, "--resume", "auto",
           "--log-dir", str(tmp_path)]
    env = {**env1(), "PATCH_SIGKILL_AT": "6", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 4" in p.stdout  # the second attempt
    assert_same_records(unbroken_ddp, tmp_path)


def test_ranks_without_a_shared_disk_resume_from_the_one_that_has_the_checkpoint(unbroken_ddp, tmp_path):
    """Two DDP ranks, each in its own folder (as on two nodes without a shared disk), so only rank
    0's folder gets the checkpoints. Both are stopped by SIGTERM after step 5; they restart with the
    folders swapped: the new rank 0 has no checkpoint and receives it from rank 1. log.txt goes on in
    the new rank 0's folder; together the two logs are the unbroken run's. (One torchrun: two
    launchers on one 2-core machine made this test fail at their rendezvous and exit, not in ours.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out = run_train(*DDP, "--log-dir", "log", nproc=2, folders=f"{a},{b}", sigterm_at=5).stdout
    assert "stopped by signal after step 5" in out
    assert tg.checkpoint_steps(str(a / "log")) == [4, 6] and not tg.checkpoint_steps(str(b / "log"))
    out = run_train(*DDP, "--log-dir", "log", "--resume", "auto", nproc=2, folders=f"{b},{a}").stdout
    assert "read by rank 1, sent to the ranks without it" in out and "at step 6" in out
    records = [r for r in read_log(a / "log") if r[0] < 6] + read_log(b / "log")
    assert records == read_log(unbroken_ddp)
    assert tg.checkpoint_steps(str(b / "log")) == [8, 12]  # new checkpoints: where rank 0 is


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
    assert sorted(os.listdir(d)) == ["ckpt_000001.pt"]
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
    p = run_train(*ARGS, "--max-steps", "20", "--checkpoint-every", "2", "--log-dir", str(tmp_path), check=False,
                  nan_steps="5,6,7,8,9,10")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{tg.MAX_BAD_STEPS} non-finite losses in a row at step 9" in p.stderr and "ckpt_000004.pt" in p.stderr
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
    other_version = tmp_path / "v1.pt"
    torch.save({**tg.read_checkpoint(str(good)), "version": 1}, other_version)
    for path, message in [(truncated, "not a readable checkpoint"), (foreign, "not a train_gpt2.py checkpoint"),
                          (garbage, "not a readable checkpoint"), (tmp_path / "missing.pt", "no such checkpoint"),
                          (other_version, "checkpoint format version 1, this script reads 2")]:
        with pytest.raises(tg.UserError) as e:
            tg.read_checkpoint(str(path))
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    # a checkpoint that lacks a part, or holds weights of the wrong shape: load_state_dict's error, on one line
    ckpt = tg.read_checkpoint(str(good))
    weights = {k: v for k, v in ckpt["model"].items() if k != "lm_head.weight"}
    cases = [({k: v for k, v in ckpt.items() if k != "model"}, "'model'"),
             ({**ckpt, "model": weights}, "Missing key(s) in state_dict: \"lm_head.weight\""),
             ({**ckpt, "model": {**ckpt["model"], "transformer.wpe.weight": torch.zeros(3)}},
              "size mismatch for transformer.wpe.weight")]
    damaged = tmp_path / "damaged.pt"
    for state, message in cases:
        torch.save(state, damaged)
        with pytest.raises(tg.UserError, match="damaged checkpoint") as e:
            tg.load_model(str(damaged))
        assert str(damaged) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), (message, e.value)
    # on the command line: one line and exit 1, in the real process (one), and in this one
    p = subprocess.run(train_cmd(*ARGS, "--max-steps", "3", "--resume", str(truncated), "--log-dir", str(tmp_path / "x")),
                       cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith(f"train_gpt2.py: error: {truncated}: not a readable checkpoint")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run_train(*ARGS, "--max-steps", "3", "--n-layer", "3", "--resume", str(good), "--log-dir", str(tmp_path / "y"),
                  check=False)
    assert p.returncode == 1 and "the checkpoint's model differs from this run's: n_layer 2 (this run: 3)" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run_train(*ARGS, "--eval-only", "--resume", str(damaged), check=False)  # the last case
    assert p.returncode == 1 and p.stderr.startswith(f"train_gpt2.py: error: {damaged}: a damaged checkpoint")


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
        with pytest.raises(tg.UserError, match="refused"):
            load(str(crafted))
    for args in ([*ARGS, "--resume", str(crafted), "--log-dir", str(tmp_path / "a")],
                 [*ARGS, "--eval-only", "--resume", str(crafted)]):
        p = run_train(*args, check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and refused in p.stderr, p.stderr
    import hellaswag

    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--checkpoint", str(crafted), "--data", hellaswag_val, "--limit", "2"])
    assert e.value.code == 1
    assert not created.exists()
    torch.load(crafted, weights_only=False)  # the full unpickler runs the code: the test can see it
    assert created.exists()


def test_deterministic_runs_repeat_to_the_bit_with_two_threads(tmp_path):
    """With two threads (where MKL's dynamic threading can reorder sums), --deterministic, which CPU
    runs get by default: two runs of a command log the same losses to the bit, and a run stopped by
    SIGTERM then resumed equals them."""
    args = [*TINY, "--batch-size", "8", "--max-steps", "16", "--val-every", "8", "--checkpoint-every", "8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = run_train(*args, "--log-dir", str(tmp_path / "a"))
        assert "deterministic: True" in p.stdout  # the CPU default
        run_train(*args, "--log-dir", str(tmp_path / "b"), "--deterministic")
        assert_same_records(tmp_path / "a", tmp_path / "b")
        p = run_train(*args, "--log-dir", str(tmp_path / "c"), sigterm_at=9)
        assert "stopped by signal after step 9" in p.stdout
        run_train(*args, "--log-dir", str(tmp_path / "c"), "--resume", "auto")
        assert_same_records(tmp_path / "a", tmp_path / "c")
    finally:
        torch.set_num_threads(threads)
