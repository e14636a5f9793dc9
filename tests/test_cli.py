"""train_gpt2.py as a new user meets it, through the real command line: your own text, every flag
checked, live curves, a checkpoint evaluated, sampled and exported, and a run folder that stays safe."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from helpers import ROOT, SHAKESPEARE, TINY, env1, read_log, run_train, train_cmd

ARGS = [*TINY, "--batch-size", "8"]


def one_line_error(p, *needles):
    """The run failed with a one-line error (the last line of stderr), no traceback, containing every needle."""
    assert p.returncode != 0, p.stdout[-2000:]
    lines = p.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("train_gpt2.py: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, shakespeare_text):
    """A text of our own: about 12k tokens of Shakespeare."""
    path = tmp_path_factory.mktemp("text") / "my.txt"
    path.write_text(shakespeare_text[:50_000], encoding="utf-8")
    return str(path)


# --- your own text ---------------------------------------------------------------------------------

def test_own_text_with_only_model_size_flags_trains_and_validates(small_text, tmp_path):
    # --input alone starts from the shakespeare preset; validation takes the whole (small) val split.
    # (--max-steps only shortens the preset's 1,200 steps for the test.)
    p = run_train("--input", small_text, "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "30",
                  "--log-dir", str(tmp_path / "run"))
    assert "(the whole val split)" in p.stdout and "batch: 1,024 tokens per step = 8 x 128" in p.stdout
    val = read_log(tmp_path / "run", "val")
    assert sorted(val) == [0, 30]  # before the first update, and after the last
    assert val[30] < val[0] - 0.5  # it learned (10.82 -> 10.01 in 30 steps; the preset warms up for 100)


def test_val_tokens_larger_than_the_split_names_the_flag(small_text, tmp_path):
    p = run_train("--input", small_text, "--val-tokens", "1000000", "--device", "cpu", "--log-dir", str(tmp_path / "x"),
                  check=False)
    one_line_error(p, "--val-tokens 1000000", "the val split", "pass at most")


# --- every flag checked before anything runs ---------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--n-layer", "0"], "argument --n-layer: must be an integer of at least 1, got 0"),
    (["--n-layer", "two"], "argument --n-layer: must be an integer of at least 1, got 'two'"),
    (["--n-head", "3"], "--n-embd 128 is not divisible by --n-head 3"),
    (["--grad-clip", "-1"], "argument --grad-clip: must be a number of at least 0, got -1.0"),
    (["--batch-size", "0"], "argument --batch-size: must be auto or an integer of at least 1, got '0'"),
    (["--hellaswag-limit", "-1"], "argument --hellaswag-limit: must be an integer of at least 0, got -1"),
    (["--max-steps", "0"], "argument --max-steps: must be an integer of at least 1, got 0"),
    (["--max-lr", "0"], "argument --max-lr: must be a number above 0, got 0.0"),
    (["--dropout", "1"], "argument --dropout: must be a number of at least 0 and below 1, got 1.0"),
    (["--min-lr-ratio", "2"], "argument --min-lr-ratio: must be a number from 0 to 1, got 2.0"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda, cuda:N or mps"),
    (["--eval-only"], "--eval-only needs a model"),
    (["--resume", "auto", "--overwrite"], "--overwrite deletes the run that --resume would continue"),
])
def test_bad_flags_are_one_line_errors_and_write_nothing(tmp_path, flags, message):
    p = run_train("--input", SHAKESPEARE, "--log-dir", str(tmp_path / "log"), *flags, check=False)
    one_line_error(p, message)
    assert not (tmp_path / "log").exists()


def test_hellaswag_without_data_names_the_training_flag(tmp_path, monkeypatch):
    env = {"HELLASWAG_CACHE": str(tmp_path / "empty_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = run_train(*ARGS, "--max-steps", "1", "--hellaswag-every", "1", "--log-dir", str(tmp_path / "l"), check=False)
    one_line_error(p, "cannot download", "--hellaswag-data FILE", "--hellaswag-every 0")
    assert "model:" not in p.stdout  # before the model was built


# --- HellaSwag at any context length ---------------------------------------------------------------

def test_hellaswag_in_training_crops_long_examples(tmp_path, hellaswag_val):
    p = run_train(*ARGS, "--max-steps", "2", "--hellaswag-every", "1", "--hellaswag-limit", "16",
                  "--hellaswag-data", hellaswag_val, "--log-dir", str(tmp_path))
    assert p.stdout.count("examples longer than block_size 32: contexts cropped from the left") == 3  # 0, 1, 2
    hella = read_log(tmp_path, "hella")
    assert sorted(hella) == [0, 1, 2] and all(0 <= v <= 1 for v in hella.values())


# --- live curves -----------------------------------------------------------------------------------

def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_equal_the_log_and_continue_after_resume(tmp_path):
    d = tmp_path / "run"
    args = [*ARGS, "--max-steps", "8", "--val-every", "3", "--checkpoint-every", "4", "--tensorboard",
            "--log-dir", str(d)]
    run_train(*args)
    # lose steps 4..7 (their checkpoint at step 8 too), then continue from the checkpoint of step 4
    os.remove(d / "ckpt_000008.pt")
    run_train(*args, "--resume", "auto")
    scalars = tensorboard_scalars(d)
    for kind, tag in tg.TENSORBOARD_TAGS.items():
        logged = read_log(d, kind)
        if kind == "hella":
            assert tag not in scalars
            continue
        assert scalars[tag].keys() == logged.keys(), (tag, scalars[tag], logged)
        for step, value in logged.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard stores fp32
    assert sorted(scalars["lr"]) == list(range(8)) and sorted(scalars["grad_norm"]) == list(range(8))
    assert all(v > 0 for v in scalars["tokens_per_sec"].values())


# --- a checkpoint from the command line ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained") / "run"
    run_train(*ARGS, "--max-steps", "6", "--checkpoint-every", "6", "--log-dir", str(d))
    return d


def test_eval_only_validates_samples_and_writes_nothing(trained, hellaswag_val):
    before = {n: os.path.getmtime(trained / n) for n in os.listdir(trained)}
    p = run_train("--eval-only", "--resume", "auto", "--log-dir", str(trained), "--device", "cpu", "--val-every", "1",
                  "--hellaswag-every", "1", "--hellaswag-limit", "8",
                  "--hellaswag-data", hellaswag_val,
                  "--prompt", "ROMEO:", "--num-samples", "2", "--sample-tokens", "5")
    assert "loaded" in p.stdout and "step 6" in p.stdout
    assert "val loss" in p.stdout and "hellaswag val: n=8 acc=" in p.stdout
    samples = [line for line in p.stdout.splitlines() if " sample " in line]
    assert len(samples) == 2 and all("'ROMEO:" in s for s in samples)
    assert {n: os.path.getmtime(trained / n) for n in os.listdir(trained)} == before  # nothing written


def test_eval_only_of_a_pretrained_model_and_export(tmp_path, tiny_hf_dir):
    out = tmp_path / "hf"
    p = run_train("--eval-only", "--init-from", tiny_hf_dir, "--input", SHAKESPEARE, "--seq-len", "64",
                  "--device", "cpu",
                  "--val-every", "1", "--hellaswag-every", "0", "--sample-tokens", "4", "--export-hf", str(out),
                  "--log-dir", str(tmp_path / "log"))
    assert "val loss" in p.stdout and "exported" in p.stdout
    assert not (tmp_path / "log").exists()
    from transformers import AutoTokenizer, GPT2LMHeadModel

    original = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    exported = GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)
    # the tokenizer travels with it, so lm-evaluation-harness needs nothing else
    assert AutoTokenizer.from_pretrained(out).encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257,
                                                                                          3303, 2746, 11]


def test_eval_only_reads_only_what_it_uses_and_checks_the_sequence_length(trained, tmp_path, tiny_hf_dir):
    # without validation, no data is read (the training data may be on another machine), and the
    # batch sizes, which only training uses, are not checked
    p = run_train("--eval-only", "--resume", "auto", "--log-dir", str(trained), "--device", "cpu", "--val-every",
                  "0", "--hellaswag-every", "0", "--num-samples", "1", "--sample-tokens", "2", "--data-dir",
                  str(tmp_path / "nowhere"), "--input", "", "--batch-size", "3")
    assert "loaded" in p.stdout and "rank 0 sample 0:" in p.stdout and "val loss" not in p.stdout
    # a sequence longer than the pretrained model's position table: one line, before anything runs
    p = run_train("--eval-only", "--init-from", tiny_hf_dir, "--input", SHAKESPEARE, "--seq-len", "256",
                  "--device", "cpu", "--log-dir", str(tmp_path / "log"), check=False)
    one_line_error(p, "--seq-len 256 exceeds the model's block_size 128")


def test_export_after_training_gives_the_same_logits(trained, tmp_path):
    out = tmp_path / "hf"
    run_train(*ARGS, "--max-steps", "2", "--checkpoint-every", "2", "--export-hf", str(out), "--log-dir",
              str(tmp_path / "run"))
    from transformers import GPT2LMHeadModel

    ours = tg.load_model(tg.latest_checkpoint(str(tmp_path / "run")))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)


# --- a run folder belongs to one run ---------------------------------------------------------------

def test_a_used_folder_is_refused_then_overwritten_and_pruning_keeps_the_new_checkpoint(tmp_path):
    d = tmp_path / "run"
    run_train(*ARGS, "--max-steps", "12", "--checkpoint-every", "1", "--keep-checkpoints", "3", "--log-dir", str(d))
    assert sorted(tg.checkpoint_steps(str(d))) == [10, 11, 12]
    p = run_train(*ARGS, "--max-steps", "2", "--log-dir", str(d), check=False)
    one_line_error(p, f"--log-dir {d} holds another run", "--resume auto", "--log-dir", "--overwrite")
    assert sorted(tg.checkpoint_steps(str(d))) == [10, 11, 12]  # untouched
    # --overwrite with a mistake elsewhere: the error comes first, the old run stays
    p = run_train(*ARGS, "--max-steps", "2", "--input", str(tmp_path / "typo.txt"), "--log-dir", str(d), "--overwrite",
                  check=False)
    one_line_error(p, "typo.txt: no such file")
    assert sorted(tg.checkpoint_steps(str(d))) == [10, 11, 12] and (d / "log.txt").exists()
    p = run_train(*ARGS, "--max-steps", "2", "--checkpoint-every", "1", "--log-dir", str(d), "--overwrite")
    assert "--overwrite: deleted" in p.stdout
    assert tg.checkpoint_steps(str(d)) == [1, 2] and tg.latest_checkpoint(str(d)).endswith("ckpt_000002.pt")
    assert sorted(read_log(d, "train")) == [0, 1]  # the old run's records are gone


def test_resume_auto_names_a_damaged_newest_checkpoint_and_goes_on_without_it(tmp_path):
    d = tmp_path / "run"
    run_train(*ARGS, "--max-steps", "6", "--checkpoint-every", "2", "--log-dir", str(d))
    with open(d / "ckpt_000006.pt", "r+b") as f:  # damage the newest one (a disk fault: saves are atomic)
        f.truncate(1000)
    with open(d / "log.txt", "a") as f:  # and add lines that are not records
        f.write("\ngarbage line\n7 train\n")
    args = [*ARGS, "--max-steps", "8", "--checkpoint-every", "2", "--resume", "auto", "--log-dir", str(d)]
    p = run_train(*args, check=False)
    one_line_error(p, "ckpt_000006.pt: not a readable checkpoint")
    assert "model:" not in p.stdout  # before anything was built
    os.remove(d / "ckpt_000006.pt")  # as the error says: use an earlier checkpoint
    p = run_train(*args)
    assert "resumed from" in p.stdout and "ckpt_000004.pt at step 4" in p.stdout
    assert sorted(read_log(d, "train")) == list(range(8))  # the lines that are not records are gone


def test_log_dir_that_is_not_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "a file, not a folder"), (tmp_path / "file" / "sub", "not writable")]
    for log_dir, message in cases:
        p = run_train(*ARGS, "--max-steps", "1", "--log-dir", str(log_dir), check=False)
        one_line_error(p, f"--log-dir {log_dir}", message)
        assert "model:" not in p.stdout
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        p = run_train(*ARGS, "--max-steps", "1", "--log-dir", str(ro), check=False)
        one_line_error(p, f"--log-dir {ro}", "not writable")


def test_one_writer_per_folder_and_the_lock_dies_with_its_process(tmp_path):
    d = tmp_path / "run"
    first = subprocess.Popen(train_cmd(*ARGS, "--max-steps", "100000", "--log-dir", str(d)), cwd=ROOT, env=env1(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (d / "log.txt").exists() and time.time() - t0 < 120:
            time.sleep(0.05)
        p = run_train(*ARGS, "--max-steps", "2", "--resume", "auto", "--log-dir", str(d), check=False)
        one_line_error(p, f"--log-dir {d}: in use by another run (pid {first.pid})")
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        first.communicate()
    p = run_train(*ARGS, "--max-steps", "2", "--resume", "auto", "--log-dir", str(d))
    assert p.returncode == 0


# --- data that cannot be used --------------------------------------------------------------------------

def test_out_of_range_token_ids_are_caught_where_they_are_read(tmp_path):
    """A shard whose bad ids sit where the start-up check does not look: the batch that reads them
    stops the run with the shard and the position."""
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "t_val_000000.npy", rng.integers(0, 50257, 5000).astype(np.uint16))
    train = np.full(200_000, 50300, dtype=np.uint16)
    n, w = tg.SHARD_CHECK_WINDOWS, tg.SHARD_CHECK_TOKENS
    for start in np.linspace(0, len(train) - w, n).astype(np.int64):  # the windows checked up front
        train[start : start + w] = rng.integers(0, 50257, w)
    np.save(folder / "t_train_000001.npy", train)
    data = [a for a in ARGS if a not in ("--input", SHAKESPEARE)]
    p = run_train(*data, "--data-dir", str(folder), "--max-steps", "3", "--log-dir", str(tmp_path / "l"), check=False)
    line = one_line_error(p, "t_train_000001.npy: token id 50300 at position", "python fineweb.py")
    position = int(line.split("at position ")[1].split()[0].replace(",", ""))
    assert train[position] == 50300


@pytest.mark.parametrize("content, message", [
    (b"ROMEO: \xff\xfe speaks", "not UTF-8 text (byte 7 is 0xff)"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "byte 7 is NUL: a binary file"),
])
def test_input_that_is_not_utf8_text(tmp_path, content, message):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    p = run_train(*ARGS, "--input", str(path), "--max-steps", "1", "--log-dir", str(tmp_path / "l"), check=False)
    one_line_error(p, str(path), message)


# --- failure never exits 0 ----------------------------------------------------------------------------

def test_a_skipped_last_step_exits_nonzero_naming_the_last_good_checkpoint(tmp_path):
    p = run_train(*ARGS, "--max-steps", "6", "--checkpoint-every", "2", "--log-dir", str(tmp_path), check=False,
                  nan_steps=5)
    one_line_error(p, "the last step (5) was skipped", "ckpt_000004.pt")
    assert tg.latest_checkpoint(str(tmp_path)).endswith("ckpt_000004.pt")


def test_an_update_that_breaks_the_weights_exits_nonzero(tmp_path):
    p = run_train(*ARGS, "--max-steps", "20", "--max-lr", "1e30", "--warmup-steps", "0", "--log-dir", str(tmp_path),
                  check=False)
    one_line_error(p, "no checkpoint was saved")
    assert "non-finite" in p.stderr


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit makes the second save fail the way a full disk does (the write returns an
    error): a one-line error, the first checkpoint intact and named, no temporary file left."""
    import resource

    d = tmp_path / "run"
    run_train(*ARGS, "--max-steps", "2", "--checkpoint-every", "2", "--log-dir", str(d))
    size = os.path.getsize(d / "ckpt_000002.pt")

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    p = subprocess.run(train_cmd(*ARGS, "--max-steps", "4", "--checkpoint-every", "2", "--resume", "auto", "--log-dir",
                                 str(d)), cwd=ROOT, env=env1(), capture_output=True, text=True, preexec_fn=small_files)
    one_line_error(p, "ckpt_000004.pt: could not be written", "the last good checkpoint is", "ckpt_000002.pt",
                   "--resume auto")
    assert sorted(os.listdir(d)) == [".lock", "ckpt_000002.pt", "log.txt"]
    assert tg.read_checkpoint(tg.latest_checkpoint(str(d)))["step"] == 2


def test_second_ctrl_c_exits_at_once_leaving_a_loadable_checkpoint(tmp_path):
    """The first Ctrl-C asks for a checkpoint after the step (and says so); a second one, during a long
    step, stops at once with status 130. The last complete checkpoint stays loadable."""
    import threading

    d = tmp_path / "run"
    env = {**env1(), "PATCH_STEP_SECONDS": "0.5"}  # steps of half a second
    p = subprocess.Popen(train_cmd(*ARGS, "--max-steps", "100000", "--checkpoint-every", "1", "--log-dir", str(d),
                                   patched=True), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    reader.start()
    try:
        t0 = time.time()
        while not tg.checkpoint_steps(str(d)) and time.time() - t0 < 120:
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        while not any("second Ctrl-C stops at once" in line for line in err) and time.time() - t0 < 120:
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=20)
    finally:
        p.kill()
    reader.join(timeout=5)
    out = p.stdout.read()
    assert p.returncode == 130, (p.returncode, err[-20:])
    assert err[-1] == "train_gpt2.py: interrupted\n" and "stopped by signal" not in out
    assert tg.read_checkpoint(tg.latest_checkpoint(str(d)))["format"] == tg.CHECKPOINT_FORMAT  # loadable


def test_every_ddp_rank_stops_on_a_refused_folder(tmp_path):
    """Rank 0 checks the folder; the other ranks learn its verdict instead of waiting for it forever."""
    d = tmp_path / "run"
    run_train(*ARGS, "--max-steps", "1", "--checkpoint-every", "1", "--log-dir", str(d))
    p = run_train(*ARGS, "--batch-size", "4", "--max-steps", "1", "--log-dir", str(d), nproc=2, check=False,
                  timeout=180)
    assert p.returncode != 0 and p.stderr.count("holds another run") == 1, p.stderr[-3000:]


def test_resume_takes_the_optimizer_settings_of_the_command_line(tmp_path):
    """The checkpoint brings AdamW's moments; weight decay and the like are what this run asks for."""
    d = tmp_path / "run"
    run_train(*ARGS, "--max-steps", "2", "--checkpoint-every", "2", "--log-dir", str(d))
    run_train(*ARGS, "--max-steps", "3", "--checkpoint-every", "1", "--weight-decay", "0.5", "--resume", "auto",
              "--log-dir", str(d))
    groups = tg.read_checkpoint(tg.latest_checkpoint(str(d)))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
