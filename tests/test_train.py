"""The training half of train_gpt2.py: loader, schedule, accumulation, DDP, compile, CLI."""
import contextlib
import copy
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hellaswag
import train_gpt2 as tg
from helpers import ROOT, SHAKESPEARE, TINY, read_log, run_train


# --- learning-rate schedule --------------------------------------------------------------------

def test_lr_schedule():
    lr = lambda s: tg.get_lr(s, max_lr=6e-4, warmup_steps=10, max_steps=110)
    assert lr(0) == pytest.approx(6e-5)  # warmup starts at max_lr / warmup_steps, never at 0
    assert lr(9) == pytest.approx(6e-4)  # end of warmup
    assert lr(10) == pytest.approx(6e-4)
    assert lr(60) == pytest.approx(0.5 * (6e-4 + 6e-5))  # half way through the cosine
    assert lr(110) == pytest.approx(6e-5)  # 10% of max at the end, and after
    assert lr(500) == pytest.approx(6e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


# --- loader --------------------------------------------------------------------------------------

def make_loader(arrays, B, world_size=1, rank=0, seqs_per_step=8, seed=0, shuffle=True, T=4):
    return tg.DataLoader(arrays, [f"a{i}" for i in range(len(arrays))], B=B, T=T,
                         grad_accum_steps=seqs_per_step // (B * world_size), rank=rank, world_size=world_size,
                         seed=seed, shuffle=shuffle)


def shards_with_ids(lengths, T=4):
    """Arrays whose sequence k (stride T) starts with a unique token, so a batch tells what it holds."""
    arrays, next_id = [], 0
    for n in lengths:
        a = np.zeros(n, dtype=np.uint16)
        for k in range((n - 1) // T):
            a[k * T] = next_id
            next_id += 1
        arrays.append(a)
    return arrays, next_id


def step_sequences(loader, steps):
    """The sequence ids each optimizer step of one rank sees."""
    out = []
    for _ in range(steps):
        ids = []
        for _ in range(loader.grad_accum_steps):
            x, _ = loader.next_batch()
            ids += x[:, 0].tolist()
        out.append(ids)
    return out


def test_loader_epoch_covers_every_sequence_once_and_reshuffles():
    arrays, n = shards_with_ids([41, 33, 57, 29])  # 10 + 8 + 14 + 7 = 39 sequences of T+1 = 5 tokens
    assert n == 39
    loader = make_loader(arrays, B=1, seqs_per_step=1)
    epoch1 = [loader.next_batch()[0][0, 0].item() for _ in range(n)]
    epoch2 = [loader.next_batch()[0][0, 0].item() for _ in range(n)]
    assert sorted(epoch1) == list(range(n)) and sorted(epoch2) == list(range(n))
    assert epoch1 != epoch2  # a new order every epoch: no periodic wave in the loss
    again = make_loader(arrays, B=1, seqs_per_step=1)
    assert [again.next_batch()[0][0, 0].item() for _ in range(n)] == epoch1  # reproducible from the seed
    other = make_loader(arrays, B=1, seqs_per_step=1, seed=1)
    assert [other.next_batch()[0][0, 0].item() for _ in range(n)] != epoch1
    # y is x shifted by one token
    x, y = make_loader(arrays, B=2).next_batch()
    assert x.dtype == torch.int64 and x.shape == (2, 4)


def test_loader_ranks_disjoint_and_independent_of_micro_batch_and_world_size():
    arrays, n = shards_with_ids([401, 333, 257])
    reference = step_sequences(make_loader(arrays, B=8, seqs_per_step=8), 12)  # one process, one micro-step
    for B, world in [(4, 1), (2, 1), (4, 2), (2, 2), (1, 4), (2, 4)]:
        loaders = [make_loader(arrays, B=B, world_size=world, rank=r, seqs_per_step=8) for r in range(world)]
        per_rank = [step_sequences(loader, 12) for loader in loaders]
        for s in range(12):
            union = [i for r in range(world) for i in per_rank[r][s]]
            assert len(set(union)) == len(union) == 8  # ranks disjoint
            assert sorted(union) == sorted(reference[s]), (B, world, s)  # same data in the same step


def test_loader_state_dict_resumes_with_the_next_batch():
    arrays, _ = shards_with_ids([401, 333, 257])
    a = make_loader(arrays, B=2, world_size=2, rank=1)
    step_sequences(a, 7)
    b = make_loader(arrays, B=2, world_size=2, rank=1)
    b.load_state_dict(a.state_dict())
    assert step_sequences(a, 5) == step_sequences(b, 5)


def test_validation_order_is_fixed():
    arrays, n = shards_with_ids([41, 33])
    v = make_loader(arrays, B=2, shuffle=False)
    x, _ = v.batch(range(n))
    assert x[:, 0].tolist() == list(range(n))


def write_shards(folder, n_train=2, tokens=3000, dtype=np.uint16):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ["t_val_000000.npy"] + [f"t_train_{i:06d}.npy" for i in range(1, n_train + 1)]
    for name in names:
        np.save(os.path.join(folder, name), rng.integers(0, 50257, tokens).astype(dtype))
    return [os.path.join(folder, n) for n in names]


def test_shard_errors(tmp_path):
    with pytest.raises(tg.UserError, match="python fineweb.py"):
        tg.find_shards(str(tmp_path), "train")  # empty directory
    paths = write_shards(str(tmp_path / "ok"))
    assert tg.find_shards(str(tmp_path / "ok"), "train") == paths[1:]
    assert tg.find_shards(str(tmp_path / "ok"), "val") == paths[:1]
    # a truncated shard (a crash while writing, a partial copy)
    raw = open(paths[1], "rb").read()
    open(paths[1], "wb").write(raw[: len(raw) // 2])
    with pytest.raises(tg.UserError, match="t_train_000001.npy.*unreadable.*fineweb.py"):
        tg.open_shard(paths[1])
    # the wrong dtype
    wrong = write_shards(str(tmp_path / "wrong"), dtype=np.int32)
    with pytest.raises(tg.UserError, match="t_train_000001.npy.*int32.*uint16"):
        tg.open_shard(wrong[1])
    # ids that are not GPT-2 tokens
    bad = str(tmp_path / "bad_val_000000.npy")
    np.save(bad, np.full(100, 60000, dtype=np.uint16))
    with pytest.raises(tg.UserError, match="60000"):
        tg.open_shard(bad)


def test_cli_errors_are_one_line(tmp_path):
    p = run_train("--data-dir", str(tmp_path / "missing"), "--device", "cpu", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "python fineweb.py" in p.stderr and "--preset shakespeare" in p.stderr
    p = run_train(*TINY, "--max-steps", "1", "--batch-size", "3", "--log-dir", str(tmp_path / "l"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--total-batch-size 256 is not divisible" in p.stderr and "use 192 or 288" in p.stderr
    truncated = write_shards(str(tmp_path / "trunc"))
    open(truncated[2], "r+b").truncate(500)
    p = run_train("--data-dir", str(tmp_path / "trunc"), "--seq-len", "32", "--batch-size", "4", "--total-batch-size",
                  "128", "--val-tokens", "256", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--device", "cpu",
                  check=False)
    assert p.returncode != 0 and "t_train_000002.npy" in p.stderr and "Traceback" not in p.stderr


def test_import_does_nothing(tmp_path):
    code = "import train_gpt2, fineweb, hellaswag; print('imported')"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "imported\n" and os.listdir(tmp_path) == []


# --- optimization ---------------------------------------------------------------------------------

PAGE_FAULTS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "keep":
    import train_gpt2
    assert train_gpt2.keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(25_000_000).fill_(1.0)  # 100 MB, the size of a small run's logits
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_big_tensors():
    def faults(mode):
        p = subprocess.run([sys.executable, "-c", PAGE_FAULTS, ROOT, mode], capture_output=True, text=True, check=True)
        return [int(n) for n in p.stdout.split()]

    default, kept = faults("default"), faults("keep")
    print(f"page faults of twenty 100 MB tensors in turn: {default} by default, {kept} with keep_freed_memory()")
    assert min(default) > 20_000  # glibc maps each one afresh: a fault per 4 KB page (24,414 pages)
    # the heap grows during the first ones (up to 8 seen), then the freed memory is reused: no faults at all
    assert all(n < 1_000 for n in kept[12:]), kept


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (8, 16), generator=g)
    y = torch.randint(0, 50257, (8, 16), generator=g)

    def one_step(m, k):
        opt = m.configure_optimizer(0.1, 1e-3, "cpu")
        total = 0.0
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            _, loss = m(xb, yb)
            loss = loss / k
            total += loss.item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return total

    big, small = copy.deepcopy(model), copy.deepcopy(model)
    loss_big, loss_small = one_step(big, 1), one_step(small, 4)
    assert loss_small == pytest.approx(loss_big, abs=1e-6)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_weight_decay_only_on_2d_parameters():
    m = tg.GPT(tg.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    decay, no_decay = m.configure_optimizer(0.1, 1e-3, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8


# --- the real CLI: DDP and micro-batches ------------------------------------------------------

def test_micro_batches_and_ddp_compiled_give_the_same_losses_and_evaluate(tmp_path, hellaswag_val):
    """One process in one micro-step, one in four, and two gloo ranks of two micro-steps each,
    DDP-wrapped then compiled (inductor) and evaluating as they train (validation on the compiled
    model, HellaSwag and samples on the raw one): the same losses."""
    args = [*TINY, "--max-steps", "4", "--val-every", "2"]
    run_train(*args, "--batch-size", "8", "--log-dir", str(tmp_path / "one"))  # 1 process, 1 micro-step
    run_train(*args, "--batch-size", "2", "--log-dir", str(tmp_path / "small"))  # 1 process, 4 micro-steps
    p = run_train(*args, "--batch-size", "2", "--compile", "--hellaswag-every", "2", "--hellaswag-limit", "8",
                  "--hellaswag-data", hellaswag_val, "--sample-every", "2", "--log-dir", str(tmp_path / "ddp"), nproc=2)
    assert "compile: True" in p.stdout and p.stdout.count("rank 0 sample 0:") == 2  # steps 2 and 4
    ref = read_log(tmp_path / "one")
    assert [k for _, k, _ in ref].count("train") == 4 and [k for _, k, _ in ref].count("val") == 3  # 0, 2, 4
    for other in ("small", "ddp"):
        got = [r for r in read_log(tmp_path / other) if r[1] != "hella"]
        assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in ref]
        for (s, k, a), (_, _, b) in zip(ref, got):
            assert abs(a - b) < 2e-5, (other, s, k, a, b)
    assert sorted(read_log(tmp_path / "ddp", "hella")) == [0, 2, 4]


def test_shakespeare_preset_learns(tmp_path):
    # the real preset, shortened (and its warmup with it): validation loss must fall well below its
    # start at ln(50257)
    run_train("--preset", "shakespeare", "--input", SHAKESPEARE,
              "--max-steps", "30", "--warmup-steps", "10", "--val-every", "29", "--val-tokens", "4096",
              "--sample-every", "0",
              "--checkpoint-every", "0", "--device", "cpu", "--log-dir", str(tmp_path / "s"))
    val = read_log(tmp_path / "s", "val")
    assert val[0] > 10.5 and val[30] < val[0] - 2.0, val


def test_fineweb_shards_train_end_to_end(tmp_path, hellaswag_val):
    # fineweb.py turns real text into shards; train_gpt2.py's loader reads them and trains
    import fineweb

    out = tmp_path / "shards"
    fineweb.main(["--dataset", SHAKESPEARE, "--txt-docs", "paragraph", "--out-dir", str(out), "--shard-size",
                  "40000", "--workers", "0"])
    arrays, paths = tg.load_shards(str(out), "train")
    assert len(paths) >= 5 and all(a.dtype == np.uint16 for a in arrays)
    run_train(*[a for a in TINY if a not in ("--input", SHAKESPEARE)],
              "--data-dir", str(out), "--max-steps", "3", "--val-every", "2", "--batch-size", "8",
              "--log-dir", str(tmp_path / "l"))
    assert sorted(read_log(tmp_path / "l", "val")) == [0, 2, 3]


# --- precision, peak FLOP/s, the micro-batch probe (the GPU paths, as far as a CPU can show them) ---

def test_peak_flops_matches_exact_model_names():
    assert tg.peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert tg.peak_flops("NVIDIA H100 PCIe") == 756e12  # not half of the SXM part
    assert tg.peak_flops("NVIDIA H100 NVL") == 835e12
    assert tg.peak_flops("NVIDIA L40S") == 362e12 and tg.peak_flops("NVIDIA L4") == 121e12  # "L4" is in "L40S"
    assert tg.peak_flops("NVIDIA L40") == 181e12
    assert tg.peak_flops("NVIDIA A100-SXM4-80GB") == tg.peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert tg.peak_flops("Tesla V100-SXM2-16GB") == 125e12 and tg.peak_flops("Tesla V100-PCIE-32GB") == 112e12
    assert tg.peak_flops("Tesla T4") == 65e12  # fp16: no bf16 before Ampere
    assert tg.peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    unknown = ("NVIDIA A10G", "NVIDIA GeForce RTX 3080", "Quadro RTX 6000", "NVIDIA GeForce RTX 3090 Ti",
               "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "cpu", "")  # a 3090 Ti is no 3090; a MIG slice no whole GPU
    for unknown in unknown:
        assert tg.peak_flops(unknown) is None, unknown


@pytest.mark.parametrize("capabilities, want", [
    ({"architecture": "x86_64", "avx2": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True},
     torch.bfloat16),  # Intel Xeon, Sapphire Rapids and later
    ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False},
     torch.bfloat16),  # AMD Zen 4 and 5
    ({"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False},
     torch.float32),  # the AVX2-only EPYC: bf16 is emulated there
    ({"architecture": "aarch64", "neon": True, "bf16": True}, torch.float32),
])
def test_one_dtype_decision_on_cpu(monkeypatch, capabilities, want):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)  # what torch detects
    assert tg.autocast_dtype(cpu) == want
    assert tg.autocast_dtype(cpu, "fp32") == torch.float32  # asked for
    assert tg.autocast_dtype(cpu, "fp16") == torch.float16 and tg.autocast_dtype(cpu, "bf16") == torch.bfloat16


def test_validation_accumulates_no_float64_on_the_device():
    """MPS has no float64: every float64 tensor validation makes must come from a tensor moved to the
    host first (.cpu()). Watched through torch's function hook, on a CPU."""
    from torch.overrides import TorchFunctionMode

    class Float64Watch(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.on_host, self.bad = set(), []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            if func is torch.Tensor.cpu:
                self.on_host.add(id(out))
            elif isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                if not inputs or not all(id(a) in self.on_host for a in inputs):
                    self.bad.append(func.__name__)
                self.on_host.add(id(out))
            return out

    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    arrays, _ = shards_with_ids([200])
    loader = make_loader(arrays, B=4, T=8, seqs_per_step=4)
    with Float64Watch() as watch:
        loss = tg.validation_loss(model, loader, 10, torch.device("cpu"), contextlib.nullcontext())  # 2 full batches + 1 padded
    assert math.isfinite(loss) and watch.bad == [], watch.bad


def test_micro_batch_probe_leaves_no_trace():
    """--batch-size auto tries a forward and backward pass; afterwards the random state, the weights
    and the gradients are those of before, so the run trains as with that --batch-size by hand."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)).train()
    weights = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    B, too_big = tg.fit_micro_batch(model, 12, 16, torch.device("cpu"), contextlib.nullcontext(), reserve_bytes=1000)
    assert (B, too_big) == (12, [])  # a CPU never runs out of memory here: the largest divisor, 12
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_micro_batch_probe_halves_until_it_fits():
    """What the probe does when the GPU runs out of memory, with a model that runs out above 3 rows."""

    class OutOfMemoryAbove(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.rows, self.w, self.tried = rows, torch.nn.Parameter(torch.ones(1)), []

        def forward(self, x, y, return_logits=False):
            self.tried.append(len(x))
            if len(x) > self.rows:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return None, (self.w * x.float()).sum()

    model = OutOfMemoryAbove(3)
    assert tg.fit_micro_batch(model, 24, 4, torch.device("cpu"), contextlib.nullcontext(), 0) == (3, [24, 12, 6])
    assert model.tried == [24, 12, 6, 3]  # halving, each a divisor of 24
    model = OutOfMemoryAbove(4)
    assert tg.fit_micro_batch(model, 18, 4, torch.device("cpu"), contextlib.nullcontext(), 0) == (3, [18, 9])
    assert tg.fit_micro_batch(OutOfMemoryAbove(0), 8, 4, torch.device("cpu"), contextlib.nullcontext(), 0) == \
        (0, [8, 4, 2, 1])  # not even one sequence: auto_micro_batch says so, on every rank


def test_fp16_trains_on_cpu_through_overflows(tmp_path):
    """--dtype fp16 with a GradScaler, on a CPU. A first loss scale of 2**23 makes the fp16 gradients
    overflow: the scaler skips those updates (the validation loss does not move) and lowers the
    scale; none of this counts as a bad step, and training then goes on."""
    p = run_train(*TINY, "--dtype", "fp16", "--max-steps", "12", "--val-every", "1", "--val-tokens", "256",
                  "--max-lr", "3e-3", "--checkpoint-every", "12", "--log-dir", str(tmp_path), init_scale=2.0**23)
    assert "autocast: float16 with loss scaling" in p.stdout
    val = read_log(tmp_path, "val")
    assert val[1] == val[0]  # the first step overflowed: no weight changed
    assert read_log(tmp_path, "skipped") == {}  # overflows are not bad steps
    assert all(math.isfinite(v) for v in read_log(tmp_path, "train").values())
    assert val[12] < val[0] - 0.05  # it trained once the scale fitted
    assert tg.read_checkpoint(tg.latest_checkpoint(str(tmp_path)))["scaler"]["scale"] < 2.0**23  # lowered


def readme_commands(script):
    """The arguments of each `python|torchrun ... SCRIPT ARGS` line of the README's bash blocks."""
    import re
    import shlex

    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if script in words and "..." not in words:
            commands.append(words[words.index(script) + 1 :])
    return commands


def test_readme_names_every_flag_and_its_commands_parse():
    readme = open(os.path.join(ROOT, "README.md")).read()
    flags = [a.option_strings[0] for a in tg.make_parser()._actions if a.option_strings[0] != "-h"]
    missing = [f for f in flags if f not in readme]
    assert len(flags) > 30 and not missing, f"flags of train_gpt2.py --help the README does not mention: {missing}"
    commands = readme_commands("train_gpt2.py")
    assert len(commands) >= 8
    for args in commands:
        tg.parse_args(args)  # argparse and the checks of several flags: a typo fails here
    for args in readme_commands("hellaswag.py"):
        hellaswag.parse_args(args)
    import fineweb

    fineweb_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(fineweb.BuildConfig)} | {"--verify"}
    for args in readme_commands("fineweb.py"):
        assert {a for a in args if a.startswith("--")} <= fineweb_flags, args


def test_readme_sections_of_train_gpt2_are_its_sections():
    """"How to read the code" names the rulers' titles of train_gpt2.py, in their order."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    how = readme.split("## How to read the code")[1].split("\n## ")[0]
    named = [t.replace("\n", " ") for t in re.findall(r"(?<!\*)\*([^*\s][^*]*?)\*(?!\*)", how)]
    lines = open(os.path.join(ROOT, "train_gpt2.py")).read().splitlines()
    titles = [lines[i + 1][2:] for i, line in enumerate(lines[:-1]) if line.startswith("# ----") and
              lines[i + 1].startswith("# ")]
    starts = [next(t for t in titles if t.startswith(name)) for name in named]
    assert len(named) >= 10 and starts == sorted(starts, key=titles.index), (named, titles)
    loop = next(i for i, line in enumerate(lines) if line.strip().startswith("for step in range("))
    assert loop < lines.index("# PART 2: RUNNING IT FOR REAL") < 900 + 700


def test_readme_opens_the_notebook_with_a_program_the_install_brings():
    """The README's `LOG_DIR=log jupyter notebook play.ipynb`: requirements.txt brings that program."""
    import shutil

    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "LOG_DIR=log jupyter notebook play.ipynb" in readme
    assert "notebook" in open(os.path.join(ROOT, "requirements.txt")).read().split()  # not only a kernel
    jupyter = shutil.which("jupyter", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    p = subprocess.run([jupyter, "notebook", "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip()[0].isdigit(), p.stderr


# --- GPU readiness, as far as a CPU can show it -----------------------------------------------------

def test_compiled_model_sees_one_layout_and_two_graphs():
    """Training and validation batches are contiguous, so the compiled model makes one graph for
    training and one for validation (eval mode, no grad), and no third one for a new memory layout
    (with training batches as strided views of one (B, T + 1) block, there were 3)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    raw = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    model = torch.compile(raw, backend="eager")  # graphs are counted before the backend compiles them
    arrays, _ = shards_with_ids([2000])
    train = make_loader(arrays, B=4, T=16, seqs_per_step=8)
    val = make_loader(arrays, B=4, T=16, seqs_per_step=8, shuffle=False)
    x, y = train.batch([0, 1, 2, 3])
    assert x.is_contiguous() and y.is_contiguous() and torch.equal(x[:, 1:], y[:, :-1])
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # as in the loop: validation (at step 0 first), then training
        model.eval()
        tg.validation_loss(model, val, 6, torch.device("cpu"), contextlib.nullcontext())  # 4 + 2 padded
        model.train()
        tg.forward_backward(model, train, train.grad_accum_steps, torch.device("cpu"), contextlib.nullcontext(),
                            torch.amp.GradScaler("cpu", enabled=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2, dict(torch._dynamo.utils.counters["stats"])


def test_the_last_evaluation_scores_the_saved_weights(tmp_path):
    """Validation runs after the last update too, and the last checkpoint holds what it scored:
    --eval-only on that checkpoint prints the last validation loss of log.txt."""
    d = tmp_path / "run"
    run_train(*TINY, "--batch-size", "8", "--max-steps", "6", "--val-every", "4", "--checkpoint-every", "6",
              "--log-dir", str(d))
    val = read_log(d, "val")
    assert sorted(val) == [0, 4, 6]
    ckpt = tg.read_checkpoint(tg.latest_checkpoint(str(d)))
    assert ckpt["step"] == 6 and ckpt["val_loss"] == val[6]
    p = run_train("--eval-only", "--resume", "auto", "--log-dir", str(d), "--device", "cpu", "--val-every", "1",
                  "--hellaswag-every", "0", "--num-samples", "1", "--sample-tokens", "2", "--dtype", "fp32")
    assert f"step     6 | val loss {val[6]:.4f}" in p.stdout


@pytest.mark.parametrize("preset, hf_shape", [
    ("gpt2-124m", (12, 12, 768)), ("gpt2-350m", (24, 16, 1024)), ("gpt2-774m", (36, 20, 1280)),
    ("gpt2-1558m", (48, 25, 1600)),
])
def test_miniseries_presets_have_gpt2s_shapes_and_pass_preflight(preset, hf_shape, tmp_path, hellaswag_val):
    """Each preset's model has the parameters of Hugging Face's GPT-2 of that size (both built on the
    meta device: no memory, no download), and its command line passes every start-up check."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = tg.parse_args(["--preset", preset, "--data-dir", str(tmp_path / "shards"), "--log-dir",
                         str(tmp_path / "log"), "--hellaswag-data", hellaswag_val,
                         "--device", "cpu"])
    n_layer, n_head, n_embd = hf_shape
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == hf_shape
    with torch.device("meta"):
        ours = tg.GPT(tg.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    padding_rows = (ours.config.padded_vocab_size - ours.config.vocab_size) * n_embd  # ours alone, never used
    assert ours.num_params() - padding_rows == sum(p.numel() for p in hf.parameters())
    # one optimizer step of data (1,024 sequences for 1558M) and a val shard, then the checks
    write_shards(str(tmp_path / "shards"), n_train=1, tokens=cfg.total_batch_size + 2 * cfg.seq_len)
    prep = tg.Prepared(dtype=torch.float32)
    tg.preflight(cfg, tg.setup_distributed("cpu"), prep)
    os.close(prep.lock)
    assert tg.count_sequences(prep.train[0], cfg.seq_len) * cfg.seq_len >= cfg.total_batch_size
    assert prep.val_seqs >= 1 and len(prep.hellaswag) == 300


def test_bf16_on_the_cpu_trains_like_fp32_and_scores_hellaswag_alike(tmp_path, hellaswag_val):
    """bf16 autocast on the CPU (the default where the CPU has bf16 instructions; emulated, and slow,
    elsewhere): the same run in fp32 and bf16 ends at nearly the same validation loss, and HellaSwag
    in bf16 predicts what fp32 predicts on the trained model."""
    args = [*TINY, "--batch-size", "8", "--max-steps", "10", "--val-every", "10", "--max-lr", "3e-3",
            "--checkpoint-every", "10"]
    run_train(*args, "--dtype", "fp32", "--log-dir", str(tmp_path / "fp32"))
    # two threads: emulated bf16 (on CPUs without bf16 instructions) takes 0.8 s a step even so
    p = run_train(*args, "--dtype", "bf16", "--log-dir", str(tmp_path / "bf16"))
    assert "autocast: bfloat16, compile: False" in p.stdout
    fp32, bf16 = read_log(tmp_path / "fp32", "val"), read_log(tmp_path / "bf16", "val")
    assert all(math.isfinite(v) for v in read_log(tmp_path / "bf16", "train").values())
    assert bf16[10] < bf16[0] - 0.5, bf16  # it learns (10.81 -> 10.18)
    print(f"validation loss after 10 steps: fp32 {fp32[10]:.5f}, bf16 {bf16[10]:.5f}")
    assert abs(bf16[10] - fp32[10]) < 0.02, (fp32, bf16)  # measured: 10.18470 and 10.18466

    model = tg.load_model(tg.latest_checkpoint(str(tmp_path / "bf16")))
    examples = hellaswag.load_examples(hellaswag_val, limit=40)
    preds = {}
    for dtype in (torch.float32, torch.bfloat16):
        result = hellaswag.evaluate(model, examples, device=torch.device("cpu"), batch_size=16,
                                    autocast=tg.autocast_context("cpu", dtype))
        preds[dtype] = [(p["pred"], p["pred_norm"]) for p in result["predictions"]]
    same = sum(a == b for a, b in zip(preds[torch.float32], preds[torch.bfloat16]))
    print(f"HellaSwag predictions the same in bf16 as in fp32: {same}/40")
    assert same >= 38  # measured: 40/40; bf16 may flip a near tie


def test_a_training_step_waits_for_the_device_once(monkeypatch, tmp_path):
    """The loss, the gradient norm and the stop flag come to the host in one read a step (on a GPU
    each read stalls the queue of kernels): every way a tensor's value reaches Python is counted."""
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)
        return lambda self, *args, **kwargs: (reads.append(name), original(self, *args, **kwargs))[1]

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    run_train(*TINY, "--batch-size", "4", "--max-steps", "6", "--log-dir", str(tmp_path))  # 2 micro-steps
    assert reads == ["tolist"] * 6, reads
