"""
hellaswag.py: HellaSwag accuracy of a GPT-2 model, completion style.

Each HellaSwag task is a context ("A man is sitting on a roof. he") and four endings, one of them
right. The model scores each ending as a continuation of the context: `acc` picks the lowest summed
cross-entropy over the ending's tokens, `acc_norm` the lowest mean per token (long endings do not
lose for being long). train_gpt2.py calls `evaluate()` during training; this file is also a CLI:

    python hellaswag.py -m gpt2                                # OpenAI's GPT-2 124M (Hugging Face hub)
    python hellaswag.py --checkpoint log/ckpt_019073.pt --out hella.json  # a train_gpt2.py checkpoint
    python hellaswag.py -m gpt2 --data ../shared/data/hellaswag_val.jsonl --limit 500 --device cpu
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl      # examples split over 8 GPUs

The data is downloaded from rowanz/hellaswag on first use (into hellaswag/ or $HELLASWAG_CACHE).
GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on the 10,042 val examples; GPT-3 Small 0.337.
Scoring is batched and packed (score_batch), with the results of scoring each example alone; the
README has the flags and the measured speed.
"""
import contextlib
import functools
import json
import os
import shutil
import sys
import time
import urllib.request

import torch
import torch.distributed as dist
from tqdm import tqdm

from fineweb import OneLineParser, UserError, atomic_write, gpt2_tokenizer, number

# -----------------------------------------------------------------------------------------------
# Data

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
NUM_ENDINGS = 4


def cache_dir() -> str:
    """Where downloads go: $HELLASWAG_CACHE, else a `hellaswag/` folder next to this file."""
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
    return os.environ.get("HELLASWAG_CACHE") or default


def download(split: str = "val", fix: str = "pass --data FILE with a local copy") -> str:
    """Path of hellaswag_{split}.jsonl in the cache, downloaded first if it is not there. `fix` ends
    the error message when the download fails (it names the caller's flag)."""
    folder = cache_dir()
    path = os.path.join(folder, f"hellaswag_{split}.jsonl")
    if os.path.isfile(path):
        return path
    url = HELLASWAG_URL.format(split=split)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:  # into a temporary file, renamed when complete
        os.makedirs(folder, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:  # its URLError is an OSError
            atomic_write(path, lambda f: shutil.copyfileobj(response, f))
    except OSError as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {url} ({reason}); without network, {fix}") from None
    return path


def check_example(example, where: str):
    """Raise UserError naming `where` (file:line) unless example has a context, 4 endings, a label."""
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
    ctx = example.get("ctx")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if "label" not in example:
        raise UserError(f"{where}: no 'label' (the HellaSwag test split is unlabelled: evaluate on val)")
    label = example["label"]
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label!r}")


def load_examples(path: str | None = None, split: str = "val", limit: int | None = None,
                  fix: str = "pass --data FILE with a local copy") -> list[dict]:
    """HellaSwag examples (dicts with at least ctx, endings, label) from a JSON-lines file.

    path None reads the cached download of `split` (downloading it first); a path reads that file
    (its own split, whatever `split` says). limit keeps the first `limit` examples (None or 0: all).
    Every line is checked; a bad one raises UserError naming the file and line number.
    """
    if path is None:
        path = download(split, fix)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            check_example(example, where)
            examples.append(example)
    return examples


# -----------------------------------------------------------------------------------------------
# Rendering and scoring


@functools.cache
def encode(text: str) -> list[int]:  # once per run: training evaluates the same examples again
    return gpt2_tokenizer().encode_ordinary(text)


def render_example(example: dict) -> tuple[list[int], list[list[int]]]:
    """Tokens of the context and of each ending (" " + ending: the space joins it to the context)."""
    return encode(example["ctx"]), [encode(" " + end) for end in example["endings"]]


def score_batch(model, batch, device, autocast=contextlib.nullcontext()):
    """Summed and mean cross-entropy (B, 4) of each ending of rendered examples, fp32, on the CPU.

    An example is one row "context, ending 0, ..., ending 3" (an ending's last token predicts
    nothing, so it is left out): the context is computed once, each ending's position ids restart
    after it, and the attention mask lets an ending see the context and itself only. An example
    whose row would not fit in block_size gets a row per ending instead, cropped from the left if
    need be, like lm-evaluation-harness: the last block_size + 1 tokens of context + ending (an
    ending longer than block_size keeps its last block_size tokens). Logits are computed only where
    an ending token is predicted."""
    block_size = model.config.block_size
    tokens, pos, seg = [], [], []  # per row: token ids, position ids, 0 context / 1 + i ending i
    where, target, owner = [], [], []  # per scored token: (row, column) predicting it, it, ending
    for b, (ctx, endings) in enumerate(batch):
        one_row = len(ctx) + sum(len(e) - 1 for e in endings) <= block_size
        for i, end in enumerate(endings):
            n = min(len(end), block_size)  # the crop (a no-op for examples that fit)
            window = (ctx + end)[-(block_size + 1) :]
            context, end = window[:-n], window[-n:]
            if i == 0 or not one_row:  # a row starts with the context
                tokens.append(list(context))
                pos.append(list(range(len(context))))
                seg.append([0] * len(context))
            r, start = len(tokens) - 1, len(tokens[-1])
            # the context's last token predicts the ending's first, ending token j - 1 its token j
            where += [(r, len(context) - 1)] + [(r, start + j) for j in range(len(end) - 1)]
            target += end
            owner += [NUM_ENDINGS * b + i] * len(end)
            tokens[r] += end[:-1]
            pos[r] += range(len(context), len(context) + len(end) - 1)
            seg[r] += [1 + i] * (len(end) - 1)
    width = max(map(len, tokens))
    grid = torch.tensor([[r + [fill] * (width - len(r)) for r in rows] for rows, fill in
                         ((tokens, 0), (pos, 0), (seg, -1))])  # (3, R, T): ids, positions, segments
    flat = torch.tensor([[r for r, _ in where], [c for _, c in where], target, owner])  # (4, N)
    # one copy to the device, from pinned memory on a GPU, queued without waiting
    host = torch.cat([grid.flatten(), flat.flatten()])
    pinned = host.pin_memory() if torch.device(device).type == "cuda" else host
    both, n = pinned.to(device, non_blocking=True), grid.numel()
    (tokens, pos, seg), (rows, cols, target, owner) = both[:n].view(grid.shape), both[n:].view(flat.shape)
    # query t sees key s <= t where s is context or in t's own segment; padding sees padding, so no
    # query row is fully masked (that would give NaN)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = causal & ((seg.unsqueeze(1) == 0) | (seg.unsqueeze(1) == seg.unsqueeze(2)))  # (R, T, T)
    loss = torch.empty(len(where), device=device)
    # logits for this many positions at a time: on a CPU, 128 positions' logits (26 MB) stay in the
    # cache until logsumexp reads them; a GPU wants big matrix multiplications
    chunk = 128 if torch.device(device).type == "cpu" else 2048
    with autocast:
        h = model.hidden_states(tokens, pos=pos, attn_mask=mask.unsqueeze(1))  # (R, T, C)
        h = h[rows, cols]  # (N, C): only the positions that predict an ending token
        for i in range(0, len(h), chunk):
            logits = model.logits(h[i : i + chunk]).float()  # (n, vocab_size), fp32 from here on
            # cross-entropy, as F.cross_entropy computes it but without copying the strided logits
            t = target[i : i + chunk, None]
            loss[i : i + chunk] = torch.logsumexp(logits, -1) - logits.gather(1, t).squeeze(1)
    sums = torch.zeros(NUM_ENDINGS * len(batch), device=device).index_add_(0, owner, loss)
    means = sums / torch.bincount(owner)
    return sums.view(-1, NUM_ENDINGS).cpu(), means.view(-1, NUM_ENDINGS).cpu()


# -----------------------------------------------------------------------------------------------
# Evaluation (one function for training and the CLI)


@torch.no_grad()
def evaluate(model, examples, *, device, batch_size=16, autocast=contextlib.nullcontext(),
             rank=0, world_size=1, progress=False) -> dict:
    """HellaSwag accuracy of `model` (a raw GPT: not compiled, not DDP-wrapped) on `examples`.

    Rank r scores examples r, r + world_size, ...; with world_size > 1 the per-example losses are
    summed over ranks (torch.distributed must be initialised), so every rank returns the totals.
    Examples longer than the model's block_size are cropped (score_batch); `cropped` counts them.
    Returns n, cropped, block_size, correct, correct_norm, acc, acc_norm, the per-example sum_loss and
    mean_loss (n, 4) tensors, and predictions: a list of {index, label, pred, pred_norm}.
    """
    n, block_size = len(examples), model.config.block_size
    mine = list(range(rank, n, world_size))
    rendered = {i: render_example(examples[i]) for i in mine}
    cropped = sum(len(ctx) + max(map(len, ends)) > block_size + 1 for ctx, ends in rendered.values())
    # longest first: batches of similar lengths waste little padding, and a batch too big for the
    # device's memory fails at once, not at the end
    mine.sort(key=lambda i: -(len(rendered[i][0]) + sum(map(len, rendered[i][1]))))
    sum_loss, mean_loss = torch.zeros(n, NUM_ENDINGS), torch.zeros(n, NUM_ENDINGS)
    was_training = model.training
    model.eval()
    with tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=not progress) as bar:
        for start in range(0, len(mine), batch_size):
            ids = mine[start : start + batch_size]
            sum_loss[ids], mean_loss[ids] = score_batch(model, [rendered[i] for i in ids], device, autocast)
            bar.update(len(ids))
    model.train(was_training)
    if world_size > 1:  # each example was scored on one rank, zero on the others: sums are totals
        table, count = torch.stack([sum_loss, mean_loss]).to(device), torch.tensor(cropped, device=device)
        dist.all_reduce(table)
        dist.all_reduce(count)
        (sum_loss, mean_loss), cropped = table.cpu(), int(count)
    labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    pred = sum_loss.argmin(dim=1)  # ties go to the first ending, as with argmin anywhere else
    pred_norm = mean_loss.argmin(dim=1)
    correct = int((pred == labels).sum())
    correct_norm = int((pred_norm == labels).sum())
    return {
        "n": n,
        "cropped": cropped,
        "block_size": block_size,
        "correct": correct,
        "correct_norm": correct_norm,
        "acc": correct / max(n, 1),
        "acc_norm": correct_norm / max(n, 1),
        "sum_loss": sum_loss,
        "mean_loss": mean_loss,
        "predictions": [
            {"index": i, "label": int(labels[i]), "pred": int(pred[i]), "pred_norm": int(pred_norm[i])}
            for i in range(n)
        ],
    }


def summary(result: dict, split: str = "val") -> str:
    """The one line of a result, for the CLI and for training."""
    r = result
    line = f"hellaswag {split}: n={r['n']} acc={r['acc']:.4f} acc_norm={r['acc_norm']:.4f}"
    if r["cropped"]:
        line += (f" ({r['cropped']} examples longer than block_size {r['block_size']}: contexts "
                 f"cropped from the left)")
    return line


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = OneLineParser(prog="hellaswag.py",
                           description="HellaSwag accuracy (completion style) of a GPT-2 model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-m", "--model", default="gpt2", help="Hugging Face model name (gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl) or local HF directory (default gpt2)")
    source.add_argument("--checkpoint", default=None, help="a train_gpt2.py checkpoint (.pt)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, mps, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (auto: as train_gpt2.py, bf16 on GPUs and CPUs "
                        "with bf16 hardware, fp16 on older GPUs, fp32 on other CPUs and MPS)")
    parser.add_argument("--batch-size", type=number(int, 1), default=16,
                        help="examples per forward pass")
    parser.add_argument("--limit", type=number(int, 0), default=None,
                        help="score only the first N examples (0: all)")
    parser.add_argument("--data", default=None,
                        help="a local HellaSwag JSON-lines file instead of the download")
    parser.add_argument("--split", default="val", choices=SPLITS,
                        help="which split to download (default val)")
    parser.add_argument("--out", default=None,
                        help="write n, acc, acc_norm and per-example predictions to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import train_gpt2 as tg  # the model loader, device setup and precision decision of training

    d = None
    try:
        d = tg.setup_distributed(args.device)
        dtype = tg.autocast_dtype(d.device, args.dtype)
        examples = load_examples(args.data, split=args.split, limit=args.limit)
        source = args.checkpoint or args.model
        model = tg.load_model(source, d.device)
        tg.print0(f"{source}: {model.num_params() / 1e6:.1f}M parameters, {len(examples)} examples, "
                  f"device {d.device} ({str(dtype).removeprefix('torch.')}), "
                  f"{d.world_size} process(es)")
        t0 = time.time()
        result = evaluate(model, examples, device=d.device, batch_size=args.batch_size, rank=d.rank,
                          world_size=d.world_size, autocast=tg.autocast_context(d.device_type, dtype),
                          progress=d.is_main)
        elapsed = time.time() - t0
        tg.print0(f"scored {result['n']} examples in {elapsed:.1f} s "
                  f"({result['n'] / max(elapsed, 1e-9):.1f} examples/s)")
        if args.out and d.is_main:
            keys = ("n", "cropped", "correct", "correct_norm", "acc", "acc_norm", "predictions")
            record = {"split": args.split, "data": args.data, "model": source,
                      **{k: result[k] for k in keys}}
            atomic_write(args.out, lambda f: f.write(json.dumps(record).encode()))
        tg.print0(summary(result, args.split))
        tg.cleanup_distributed(finished=True)
    except (UserError, OSError, ValueError) as e:
        if d is None or d.is_main or not isinstance(e, UserError):  # ranks share bad input
            print(f"hellaswag.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("hellaswag.py: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        tg.cleanup_distributed()


if __name__ == "__main__":
    main()
