"""Benchmarks: each prints a figure beside a baseline run in the same process or command.

Run them from the repository root as modules (so that `import train_gpt2` finds the scripts):
    python -m bench.train       training step: ours vs Hugging Face's GPT2LMHeadModel
    python -m bench.fineweb     fineweb.py vs the simple pool vs tiktoken alone
    python -m bench.hellaswag   batched HellaSwag scoring vs one example at a time
    python -m bench.generate    generation with vs without the key/value cache
"""
import time


def timed(fn, device):
    """(fn(), seconds), with the device's queued work finished before each clock read."""
    from train_gpt2 import synchronize

    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0
