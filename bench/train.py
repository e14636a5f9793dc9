"""
bench/train.py: training throughput of our GPT-2 (train_gpt2.GPT) beside Hugging Face's GPT2LMHeadModel.

It times what training runs: a step is train_gpt2.forward_backward (micro-steps, autocast, backward)
+ clip_grad_norm_ + optimizer.step(), with the optimizer of configure_optimizer (fused AdamW) and
the training loader (train_gpt2.DataLoader) serving random tokens held in memory (no disk reads
inside the clock). The peer gets the same shapes,
optimizer settings, precision, compile setting and tokens, in the same process; its rounds of steps
alternate with ours, so a busy machine slows both alike. Warm-up steps are not timed (the first one
compiles; its time is shown apart); CUDA is synchronized before every clock read.

Commands
    python -m bench.train                            # CPU: the shakespeare preset's model (4x4x128), B=8, T=128
    python -m bench.train --compile                  # the same, both models torch.compiled
    python -m bench.train --no-peer --steps 30       # ours only
    python -m bench.train --precisions               # ours in bf16, fp32, bf16 compiled (default on a bf16 CPU)
    python -m bench.train --model 124m -B 4 -T 256   # GPT-2 124M shapes (slow on a CPU)
    python -m bench.train --device cuda              # a GPU: 124M, B=64, T=1024, bf16 autocast, compiled, TF32
    python -m bench.train --device cuda --attn flash --profile prof   # force an SDPA kernel; write profiles to prof/
    TORCH_LOGS=graph_breaks python -m bench.train --compile --no-peer --steps 2   # silent if no graph breaks

Output: a row per model: parameters, first step (s, compilation included), median ms/step and its
tokens/s over the timed steps, MFU, peak memory; then ours / peer, from the median step times.
MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token = our model.flops_per_token(T) =
6N + 12 * n_layer * n_embd * T for both rows (the same work, so their MFU ratio is their speed ratio);
the peak is train_gpt2.peak_flops (dense bf16, fp16 before Ampere) on CUDA, --peak-tflops otherwise (no MFU on a
CPU without it). Peak memory = the model's parameters, gradients and optimizer state + the most its
steps allocated beyond what was allocated when they started (CUDA: allocator statistics; CPU: the
resident set, approximate; not shown while freed memory is kept, the CPU default).
"""
import argparse
import inspect
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn

import train_gpt2
from train_gpt2 import GPT, PRESETS, Dist, GPTConfig, RunConfig

MODEL_PRESETS = {"124m": "gpt2-124m", "shakespeare": "shakespeare"}  # --model -> train_gpt2 preset


BENCH_MICRO_BATCH = 64  # the 124M preset's --batch-size is auto (a memory probe); the benchmark times B=64


def preset_shapes(preset: str) -> dict:
    """n_layer, n_head, n_embd, batch_size, seq_len of a training preset."""
    values = {**vars(RunConfig()), **PRESETS[preset]}
    shapes = {k: values[k] for k in ("n_layer", "n_head", "n_embd", "batch_size", "seq_len")}
    return {**shapes, "batch_size": BENCH_MICRO_BATCH if shapes["batch_size"] == "auto" else shapes["batch_size"]}


# -----------------------------------------------------------------------------------------------
# What is timed


def random_loader(B, T, grad_accum=1, n_batches=8, seed=0) -> train_gpt2.DataLoader:
    """The loader training uses (train_gpt2.DataLoader: token-id check, one pinned copy per batch on
    CUDA), over random GPT-2 tokens made up front from a fixed seed: n_batches optimizer steps' worth,
    served again and again."""
    n_seqs = n_batches * B * grad_accum
    tokens = np.random.default_rng(seed).integers(0, train_gpt2.GPT2_VOCAB_SIZE, n_seqs * T + 1, dtype=np.uint16)
    return train_gpt2.DataLoader([tokens], ["random tokens"], B=B, T=T, grad_accum_steps=grad_accum, seed=seed)


class HFPeer(nn.Module):
    """transformers.GPT2LMHeadModel behind our model's call: (idx, targets) -> (logits, loss)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        # HF shifts `labels` by one itself (so the last position scores nothing); `shift_labels`
        # (newer transformers) takes targets already shifted: both models then score the same B*T
        # next tokens. Without it, labels=idx: the same B*T tokens of compute, B*(T-1) scored.
        try:
            from transformers.loss.loss_utils import ForCausalLMLoss

            self.shifted = "shift_labels" in inspect.signature(ForCausalLMLoss).parameters
        except ImportError:
            self.shifted = False

    def forward(self, idx, targets, return_logits=True):
        # the loader's x and y are views of one (B, T + 1) block; Hugging Face's loss needs contiguous labels
        idx, targets = idx.contiguous(), targets.contiguous()
        if self.shifted:
            out = self.hf(input_ids=idx, labels=targets, shift_labels=targets)
        else:
            out = self.hf(input_ids=idx, labels=idx)
        # training asks for no logits; under torch.compile that spares the peer their gradient too
        return (out.logits if return_logits else None), out.loss


def build_ours(args, device) -> GPT:
    config = GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    return GPT(config).to(device)


def build_peer(args, device) -> HFPeer:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=train_gpt2.GPT2_VOCAB_SIZE, n_positions=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        use_cache=False,  # training keeps no key/value cache
        attn_implementation="sdpa", tie_word_embeddings=True,
    )
    return HFPeer(GPT2LMHeadModel(config)).to(device)


class Contender:
    """A model with its optimizer, compiled or not, and the measurements of its steps."""

    def __init__(self, name, raw_model, args, d: Dist, autocast, scaler, compile=None):
        self.name, self.raw_model, self.args, self.d = name, raw_model, args, d
        self.autocast, self.scaler = autocast, scaler
        raw_model.train()
        # one optimizer recipe for both: configure_optimizer reads only .parameters(), so it builds the
        # peer's too (AdamW, betas (0.9, 0.95), eps 1e-8, decay 0.1 on 2-D tensors, fused kernel)
        self.optimizer = GPT.configure_optimizer(raw_model, weight_decay=0.1, learning_rate=6e-4,
                                                 device_type=d.device_type)
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.compiled = args.compile if compile is None else compile
        self.model = torch.compile(raw_model) if self.compiled else raw_model
        self.loader = random_loader(args.batch_size, args.seq_len, args.grad_accum, seed=args.seed)
        self.step_times, self.round_times = [], []
        self.first_step_s, self.peak_bytes, self.error = None, 0, None

    def step(self):
        """One optimizer step, as train_gpt2.train takes it."""
        self.optimizer.zero_grad(set_to_none=True)
        train_gpt2.forward_backward(self.model, self.loader, self.args.grad_accum, self.d.device, self.autocast,
                                    self.scaler)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def run_steps(self, n, record=True):
        times = []
        for _ in range(n):
            train_gpt2.synchronize(self.d.device)
            t0 = time.perf_counter()
            self.step()
            train_gpt2.synchronize(self.d.device)
            times.append(time.perf_counter() - t0)
        if record:
            self.step_times += times
            self.round_times.append(sum(times))

    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state: what stays allocated between steps."""
        tensors = self.params + [p.grad for p in self.params if p.grad is not None]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


# -----------------------------------------------------------------------------------------------
# Measuring


def measure(contenders, args, d: Dist):
    """Warm-up steps for each model (the first compiles), then args.steps timed steps each, in
    args.rounds rounds that alternate the models, each round after one untimed step. A model that
    fails (say, out of GPU memory) is reported as such; the others go on."""
    for c in contenders:
        try:
            train_gpt2.synchronize(d.device)
            t0 = time.perf_counter()
            c.run_steps(1, record=False)
            c.first_step_s = time.perf_counter() - t0
            c.run_steps(max(0, args.warmup - 1), record=False)
        except RuntimeError as e:  # torch.OutOfMemoryError included
            c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
            c.optimizer.zero_grad(set_to_none=True)
            if d.device_type == "cuda":
                torch.cuda.empty_cache()
    running = [c for c in contenders if c.error is None]
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    for r, n in enumerate(per_round):
        # ABBA order: neither model always runs right after the other
        for c in running if r % 2 == 0 else running[::-1]:
            # the first step after the other model ran is slower (on a CPU, by up to half for the models
            # that allocate most: their memory is faulted in afresh); training never pays that, so it is
            # not timed
            c.run_steps(1, record=False)
            if args.keep_freed_memory:  # freed memory stays resident: the resident set says nothing per model
                c.run_steps(n)
                c.peak_bytes = None
                continue
            with PeakMemory(d) as mem:
                own = c.state_bytes()
                c.run_steps(n)
            beyond = mem.beyond_start()
            c.peak_bytes = max(c.peak_bytes, mem.peak if beyond is None else own + beyond)


class PeakMemory:
    """Peak memory over a block of steps: the allocator's peak on CUDA; on Linux, the resident set's
    high-water mark, reset through /proc/self/clear_refs; elsewhere the process's peak RSS (which
    counts the other model too)."""

    def __init__(self, d: Dist):
        self.d = d

    def __enter__(self):
        train_gpt2.synchronize(self.d.device)
        if self.d.device_type == "cuda":
            self.start = torch.cuda.memory_allocated(self.d.device)
            torch.cuda.reset_peak_memory_stats(self.d.device)
        else:
            self.start = _proc_status_bytes("VmRSS") if _reset_rss_peak() else None
        return self

    def __exit__(self, *exc):
        train_gpt2.synchronize(self.d.device)
        if self.d.device_type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.d.device)
        elif self.start is not None:
            self.peak = _proc_status_bytes("VmHWM")
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def beyond_start(self) -> int | None:
        return None if self.start is None else max(0, self.peak - self.start)


def _proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def write_profile(c: Contender, out_dir: str, steps: int):
    """A few steps of one model under torch.profiler: a trace (chrome://tracing, ui.perfetto.dev)
    and a table of operators with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.d.device_type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        c.run_steps(steps, record=False)
    stem = os.path.join(out_dir, c.name.split()[0])
    prof.export_chrome_trace(stem + "_trace.json")
    sort_by = "self_cuda_time_total" if c.d.device_type == "cuda" else "self_cpu_time_total"
    with open(stem + "_ops.txt", "w") as f:
        f.write(f"{c.name}, {steps} steps\n")
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=50) + "\n")
    print(f"\nprofile of {c.name}, {steps} steps: {stem}_trace.json, {stem}_ops.txt")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training throughput of train_gpt2.GPT beside transformers.GPT2LMHeadModel "
                                "(the module docstring has the commands).")
    p.add_argument("--model", choices=list(MODEL_PRESETS), default=None,
                   help="124m (12 layers, 12 heads, 768 wide; B=64, T=1024) or shakespeare (the preset's 4/4/128; B=8, "
                   "T=128); default: 124m on CUDA, shakespeare elsewhere")
    p.add_argument("--n-layer", type=int, help="override the model's number of layers")
    p.add_argument("--n-head", type=int, help="override the model's number of heads")
    p.add_argument("--n-embd", type=int, help="override the model's width")
    p.add_argument("-B", "--batch-size", type=int,
                   help="micro-batch, sequences per forward pass (default: the model's)")
    p.add_argument("-T", "--seq-len", type=int, help="sequence length in tokens (default: the model's)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile both models (default: on for CUDA, off elsewhere, as in training)")
    p.add_argument("--attn", choices=["auto", "flash", "efficient", "cudnn", "math"], default="auto",
                   help="the scaled_dot_product_attention kernel, forced with torch.nn.attention.sdpa_kernel "
                   "(default auto)")
    p.add_argument("--dtype", choices=["auto", *train_gpt2.DTYPES], default="auto",
                   help="autocast precision; auto = train_gpt2.autocast_dtype: bf16 on GPUs with bf16 hardware, "
                   "fp16 on older GPUs, fp32 on CPU and MPS")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--steps", type=int, help="timed steps per model (default: 10 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first, per model (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds the timed steps are split into, alternating the models (default 5)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time GPT2LMHeadModel (default on)")
    p.add_argument("--precisions", action=argparse.BooleanOptionalAction, default=None,
                   help="instead of the peer, time our model in bf16 autocast, in fp32 and in bf16 compiled "
                   "(default: on for a CPU with bf16 instructions, train_gpt2.cpu_bf16)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: train_gpt2.keep_freed_memory() for both models, as training does (default on for "
                   "CPU; then no peak memory is shown: use --no-keep-freed-memory for it)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (default 0: torch's choice)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s for MFU (default: train_gpt2.peak_flops on CUDA, none on CPU)")
    p.add_argument("--profile", metavar="DIR", default="",
                   help="after timing, profile a few steps of each model into DIR")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (default 3)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the weights and tokens")
    return p.parse_args(argv)


def resolve(args) -> Dist:
    """Pick the device and fill the defaults that depend on it; returns the (single-process) Dist."""
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/train.py: error: --device cuda: no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    d = Dist(rank=0, local_rank=device.index or 0, world_size=1, device=device, device_type=device.type, ddp=False,
             is_main=True)
    on_cuda = d.device_type == "cuda"
    args.model = args.model or ("124m" if on_cuda else "shakespeare")
    for key, value in preset_shapes(MODEL_PRESETS[args.model]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile = on_cuda if args.compile is None else args.compile
    if args.precisions is None:
        args.precisions = d.device_type == "cpu" and train_gpt2.cpu_bf16() is not None
    args.keep_freed_memory = d.device_type == "cpu" and args.keep_freed_memory is not False
    args.steps = args.steps or (50 if on_cuda else 10)
    args.warmup = (5 if on_cuda else 2) if args.warmup is None else args.warmup
    args.rounds = max(1, min(args.rounds, args.steps))
    return d


def precision(args, d: Dist):
    """(autocast context, GradScaler, name of the autocast dtype): train_gpt2's decision, as in training."""
    dtype = train_gpt2.autocast_dtype(d.device, args.dtype)
    return train_gpt2.autocast_context(d.device_type, dtype), scaler_for(d, dtype), DTYPE_NAMES[dtype]


DTYPE_NAMES = {dtype: name for name, dtype in train_gpt2.DTYPES.items()}


def scaler_for(d: Dist, dtype):
    return torch.amp.GradScaler(d.device_type, enabled=dtype == torch.float16)  # as train_gpt2.train makes it


def attention_context(backend: str):
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[backend]])


# -----------------------------------------------------------------------------------------------
# Report


def report(contenders, tokens_per_step: int, flops_per_token: int, peak_flops: float | None):
    """The table, then the first model's speed over each other's."""
    header = ("model", "params", "first step s", "ms/step", "min ms", "tokens/s", "MFU", "peak mem")
    rows = []
    for c in contenders:
        params = f"{sum(p.numel() for p in c.params) / 1e6:.2f}M"
        if c.error:
            rows.append((c.name, params, "failed", c.error, "", "", "", ""))
            continue
        ms = 1000 * statistics.median(c.step_times)
        tokens_per_s = tokens_per_step / (ms / 1000)
        mfu = f"{100 * tokens_per_s * flops_per_token / peak_flops:.1f}%" if peak_flops else "-"
        rows.append((c.name, params, f"{c.first_step_s:.2f}", f"{ms:.1f}", f"{1000 * min(c.step_times):.1f}",
                     f"{tokens_per_s:,.0f}", mfu, "-" if c.peak_bytes is None else _format_bytes(c.peak_bytes)))
    print_table(header, rows)
    first = contenders[0]
    for other in contenders[1:]:
        if first.error or other.error:
            continue
        ratio = statistics.median(other.step_times) / statistics.median(first.step_times)
        # a round's blocks run back to back: their ratio is the least disturbed by changes in load
        per_round = sorted(o / f for f, o in zip(first.round_times, other.round_times))
        print(f"{first.name.split()[0]} / {other.name.split()[0]} tokens/s: {ratio:.2f}x (median step times, "
              f"{len(first.step_times)} steps each); per round: median {statistics.median(per_round):.2f}x, "
              f"{per_round[0]:.2f}x to {per_round[-1]:.2f}x")
        if isinstance(other.raw_model, HFPeer) and not other.raw_model.shifted:
            print("note: this transformers has no shift_labels: the peer scores B*(T-1) targets (same compute)")


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = [str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv=None):
    args = parse_args(argv)
    d = resolve(args)
    autocast, scaler, dtype_name = precision(args, d)
    if d.device_type == "cuda":  # as in training: TF32 for the fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads and d.device_type == "cpu":
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:  # as in training; a process setting, it serves both models alike
        train_gpt2.keep_freed_memory()

    if d.device_type == "cpu" and not train_gpt2.cpu_bf16():
        print("note: this CPU has no bf16 instructions (no AMX, no AVX512-BF16): --dtype auto is fp32 here, and "
              "bf16 would be emulated (--precisions times it)")
    if args.precisions:  # the same weights and tokens in each precision
        contenders = []
        for name, dtype, compiled in (("bf16 (eager)", torch.bfloat16, False), ("fp32 (eager)", torch.float32, False),
                                      ("bf16+compile", torch.bfloat16, True)):
            torch.manual_seed(args.seed)
            contenders.append(Contender(name, build_ours(args, d.device), args, d,
                                        train_gpt2.autocast_context(d.device_type, dtype),
                                        scaler_for(d, dtype), compile=compiled))
        dtype_name = "bf16 vs fp32 vs bf16 compiled"
    else:
        torch.manual_seed(args.seed)
        contenders = [Contender("ours (train_gpt2.GPT)", build_ours(args, d.device), args, d, autocast, scaler)]
    if args.peer and not args.precisions:
        contenders.append(Contender("peer (GPT2LMHeadModel)", build_peer(args, d.device), args, d, autocast, scaler))
    flops_per_token = contenders[0].raw_model.flops_per_token(args.seq_len)
    name = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else ""
    # no MFU in fp32: the table holds the bf16 (fp16) peaks, as in training
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak_flops is None and dtype_name != "fp32":
        peak_flops = train_gpt2.peak_flops(name)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum

    if d.device_type == "cpu":  # the processor, and its bf16 instructions
        cpu = torch.cpu.get_capabilities().get("cpu_name") or "?"
        name = f"cpu ({cpu}, bf16 instructions: {train_gpt2.cpu_bf16() or 'none'})"
    where = name or d.device_type
    where += f", {torch.get_num_threads()} threads" if d.device_type == "cpu" else ""
    where += ", freed memory kept" if args.keep_freed_memory else ""
    compiled = "" if args.precisions else f" | {'compiled' if args.compile else 'eager'}"
    print(f"device: {where} | torch {torch.__version__} | {dtype_name}{compiled} | attention: {args.attn}")
    print(f"model: {args.model}, {args.n_layer} layers x {args.n_head} heads x {args.n_embd} wide | "
          f"B={args.batch_size} T={args.seq_len} grad-accum={args.grad_accum}: {tokens_per_step:,} tokens/step")
    print(f"timing: {args.warmup} warm-up steps, then {args.steps} timed steps per model in {args.rounds} alternating "
          f"rounds | "
          f"FLOPs/token = model.flops_per_token({args.seq_len}) = 6N + 12LCT = {flops_per_token / 1e6:.1f}M"
          + (f" | peak {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else ""), flush=True)

    with attention_context(args.attn):
        measure(contenders, args, d)
        if args.profile:
            for c in contenders:
                if c.error is None:
                    write_profile(c, args.profile, args.profile_steps)
    report(contenders, tokens_per_step, flops_per_token, peak_flops)


if __name__ == "__main__":
    main()
