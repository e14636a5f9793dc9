"""
hellaswag.py: HellaSwag accuracy of a GPT-2 model, completion style.

Each HellaSwag task is a context ("A man is sitting on a roof. he") and four endings, one of them
right. The model scores each ending as a continuation of the context: `acc` picks the lowest summed
cross-entropy over the ending's tokens, `acc_norm` the lowest mean per token (long endings do not
lose for being long). train_gpt2.py calls `evaluate()` during training; this file is also a CLI:

    python hellaswag.py -m gpt2                                  # OpenAI's GPT-2 124M (Hugging Face hub)
    python hellaswag.py --checkpoint log/ckpt_019073.pt --out hella.json    # a train_gpt2.py checkpoint
    python hellaswag.py -m gpt2 --data ../shared/data/hellaswag_val.jsonl --limit 500 --device cpu
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl        # examples split over 8 GPUs

The data is downloaded from rowanz/hellaswag on first use (into hellaswag/ or $HELLASWAG_CACHE).
GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on the 10,042 val examples; GPT-3 Small 0.337.

Fast, with the results of scoring each example alone: the context is computed once, in one row
"context, ending 0, ..., ending 3" where each ending restarts its position ids after the context and
attends to the context and itself only; examples share padded batches; and the vocabulary projection
runs only where an ending token is predicted. The README has the flags and the measured speed.
"""
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from fineweb import OneLineParser, UserError, atomic_write, gpt2_tokenizer, number
from fineweb import download as download_file

# -----------------------------------------------------------------------------------------------
# Data

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
NUM_ENDINGS = 4


class HellaSwagError(UserError):
    """Data that cannot be used (missing, unreadable, malformed): the message says which file and line."""


def cache_dir() -> str:
    """Where downloads go: $HELLASWAG_CACHE, else a `hellaswag/` folder next to this file."""
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
    return os.environ.get("HELLASWAG_CACHE") or default


def download(split: str = "val", fix: str = "pass --data FILE with a local copy") -> str:
    """Path of hellaswag_{split}.jsonl in the cache, downloaded first if it is not there. `fix` ends
    the error message when the download fails (it names the caller's flag)."""
    if split not in SPLITS:
        raise HellaSwagError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    folder = cache_dir()
    path = os.path.join(folder, f"hellaswag_{split}.jsonl")
    if os.path.isfile(path):
        return path
    url = HELLASWAG_URL.format(split=split)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        download_file(url, path)  # into a temporary file, renamed when complete
    except OSError as e:
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"cannot download {url} ({reason}); without network, {fix}") from None
    return path


def check_example(example, where: str):
    """Raise HellaSwagError naming `where` (file:line) unless example has a context, 4 endings and a label."""
    if not isinstance(example, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(example).__name__}")
    ctx = example.get("ctx")
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if "label" not in example:
        raise HellaSwagError(f"{where}: no 'label' (the HellaSwag test split is unlabelled: evaluate on val)")
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label!r}")


def load_examples(path: str | None = None, split: str = "val", limit: int | None = None,
                  fix: str = "pass --data FILE with a local copy") -> list[dict]:
    """HellaSwag examples (dicts with at least ctx, endings, label) from a JSON-lines file.

    path None reads the cached download of `split` (downloading it first); a path reads that file
    (its own split, whatever `split` says). limit keeps the first `limit` examples (None or 0: all).
    Every line is checked; a bad one raises HellaSwagError naming the file and line number.
    """
    if path is None:
        path = download(split, fix)
    if not os.path.isfile(path):
        raise HellaSwagError(f"{path}: no such file")
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
                raise HellaSwagError(f"{where}: not valid JSON ({e.msg})") from None
            check_example(example, where)
            examples.append(example)
    return examples


# -----------------------------------------------------------------------------------------------
# Rendering: text -> tokens


@dataclass
class Rendered:
    ctx: list[int]  # tokens of the context
    endings: list[list[int]]  # tokens of " " + ending, for each ending (the space joins it to the context)
    label: int  # index of the right ending

    def windows(self, block_size: int):
        """(context, ending) of each ending as the model reads it, within block_size tokens.

        The model reads context + ending without the ending's last token (it predicts nothing). An
        example too long for that keeps, like lm-evaluation-harness, the last block_size + 1 tokens
        of context + ending: the whole ending and the end of the context, cropped from the left (an
        ending of more than block_size tokens is scored on its last block_size tokens). The
        context is then per ending; otherwise it is the one shared context."""
        out = []
        for end in self.endings:
            if len(self.ctx) + len(end) <= block_size + 1:
                out.append((self.ctx, end))
            else:
                n = min(len(end), block_size)  # scored tokens: each needs one token before it
                window = (self.ctx + end)[-(block_size + 1) :]
                out.append((window[:-n], window[-n:]))
        return out

    def cropped(self, block_size: int) -> bool:
        return len(self.ctx) + max(map(len, self.endings)) > block_size + 1


def render_example(example: dict) -> Rendered:
    enc = gpt2_tokenizer()
    return Rendered(
        ctx=enc.encode_ordinary(example["ctx"]),
        endings=[enc.encode_ordinary(" " + end) for end in example["endings"]],
        label=example["label"],
    )


# -----------------------------------------------------------------------------------------------
# Scoring

# Logits are computed for this many positions at a time, which bounds their memory however large
# the batch. On a CPU, 128 positions' fp32 logits (26 MB) stay in the last-level cache until
# logsumexp reads them, which makes the whole evaluation about 25% faster than chunks of 1024;
# a GPU wants bigger matrix multiplications.
LOGITS_CHUNK = {"cpu": 128, "cuda": 2048, "mps": 2048}


@dataclass
class PackedBatch:
    """Several examples laid out for one forward pass: R rows of T tokens; P positions whose
    hidden states predict the N scored tokens (the ending tokens)."""

    idx: torch.Tensor  # (R, T) token ids, 0 in padding
    pos: torch.Tensor  # (R, T) position ids
    segment: torch.Tensor  # (R, T) 0 context, 1 + i ending i, -1 padding
    src_row: torch.Tensor  # (P,) row of each predicting position
    src_col: torch.Tensor  # (P,) its column
    pred: torch.Tensor  # (N,) which of the P positions predicts each scored token
    target: torch.Tensor  # (N,) the scored token
    owner: torch.Tensor  # (N,) NUM_ENDINGS * (example in batch) + ending: where its loss is summed
    lengths: torch.Tensor  # (B, 4) tokens per ending


def pack(batch: list[Rendered], block_size: int) -> PackedBatch:
    """Lay out examples as rows "context, ending 0, ending 1, ...".

    Ending i's tokens get the positions they would have right after the context (the position ids
    restart for every ending), so a row scores all four endings with one copy of the context. The
    first token of every ending is predicted by the context's last token (one position, four
    targets); an ending's last token predicts nothing, so it is left out of the row. An example
    whose endings do not fit in block_size tokens continues on another row that repeats the
    context; an example cropped to fit (Rendered.windows) has a row per ending."""
    rows, positions, segments = [], [], []
    src_row, src_col, pred, target, owner, lengths = [], [], [], [], [], []
    for b, ex in enumerate(batch):
        row, row_ctx = None, None
        lengths.append([])
        for i, (ctx, end) in enumerate(ex.windows(block_size)):
            L = len(ctx)
            if row is None or ctx != row_ctx or len(rows[row]) + len(end) - 1 > block_size:
                rows.append(list(ctx))
                positions.append(list(range(L)))
                segments.append([0] * L)
                row, row_ctx = len(rows) - 1, ctx
                src_row.append(row)
                src_col.append(L - 1)
                ctx_last = len(src_row) - 1  # predicts the first token of each ending in this row
            start = len(rows[row])
            # ending token j is predicted by the context's last token for j = 0, by ending token
            # j - 1 after that
            pred += [ctx_last] + list(range(len(src_row), len(src_row) + len(end) - 1))
            src_row += [row] * (len(end) - 1)
            src_col += range(start, start + len(end) - 1)
            target += end
            owner += [NUM_ENDINGS * b + i] * len(end)
            lengths[-1].append(len(end))
            rows[row] += end[:-1]
            positions[row] += range(L, L + len(end) - 1)
            segments[row] += [1 + i] * (len(end) - 1)
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    for r in range(len(rows)):
        n = len(rows[r])
        idx[r, :n] = torch.tensor(rows[r])
        pos[r, :n] = torch.tensor(positions[r])
        segment[r, :n] = torch.tensor(segments[r])
    vectors = (torch.tensor(x, dtype=torch.long) for x in (src_row, src_col, pred, target, owner, lengths))
    return PackedBatch(idx, pos, segment, *vectors)


def attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(R, T) segment ids -> (R, 1, T, T) boolean mask, True where query t may attend to key s.

    Causal (s <= t), and a key is either context (segment 0) or in the query's own segment: an
    ending sees the context and its own earlier tokens, never another ending. Padding (segment -1)
    attends to earlier padding and context, so it includes itself: no query row is fully masked
    (that would give NaN)."""
    T = segment.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()  # (T query, T key)
    q = segment.unsqueeze(2)  # (R, T, 1)
    k = segment.unsqueeze(1)  # (R, 1, T)
    visible = (k == 0) | (k == q)  # (R, T, T)
    return (visible & causal).unsqueeze(1)  # (R, 1, T, T): broadcast over heads


def score_batch(model, batch: list[Rendered], device, autocast=contextlib.nullcontext()):
    """Summed and mean cross-entropy (B, 4) of each ending of each example, fp32, on the CPU."""
    p = pack(batch, model.config.block_size)
    idx, pos, segment = p.idx.to(device), p.pos.to(device), p.segment.to(device)
    pred, target, owner = p.pred.to(device), p.target.to(device), p.owner.to(device)
    P, chunk = len(p.src_row), LOGITS_CHUNK.get(torch.device(device).type, 128)
    logsumexp = torch.empty(P, device=device)  # log of the softmax denominator, per position
    target_logit = torch.empty(len(target), device=device)  # logit of each scored token
    with autocast:
        h = model.hidden_states(idx, pos=pos, attn_mask=attention_mask(segment))  # (R, T, C)
        h = h[p.src_row.to(device), p.src_col.to(device)]  # (P, C): only the positions that predict a scored token
        for p0 in range(0, P, chunk):
            logits = model.logits(h[p0 : p0 + chunk]).float()  # (n, vocab_size), fp32 from here on
            logsumexp[p0 : p0 + len(logits)] = torch.logsumexp(logits, dim=-1)
            here = (pred >= p0) & (pred < p0 + len(logits))  # scored tokens predicted in this chunk
            target_logit[here] = logits[pred[here] - p0, target[here]]
    # cross-entropy = -log softmax(logits)[target], as F.cross_entropy computes it; this way each
    # position's denominator serves several targets, and the vocabulary-sliced (strided) logits
    # are read once, not copied
    loss = logsumexp[pred] - target_logit  # (N,)
    sums = torch.zeros(len(batch) * NUM_ENDINGS, device=device).index_add_(0, owner, loss)
    sums = sums.view(len(batch), NUM_ENDINGS).cpu()
    return sums, sums / p.lengths


# -----------------------------------------------------------------------------------------------
# Evaluation (one function for training and the CLI)


@torch.no_grad()
def evaluate(model, examples, *, device, batch_size=16, autocast=contextlib.nullcontext(),
             rank=0, world_size=1, progress=False) -> dict:
    """HellaSwag accuracy of `model` (a raw GPT: not compiled, not DDP-wrapped) on `examples`.

    Rank r scores examples r, r + world_size, ...; with world_size > 1 the per-example losses are
    summed over ranks (torch.distributed must be initialised), so every rank returns the totals.
    Examples longer than the model's block_size are cropped (Rendered.windows); `cropped` counts them.
    Returns n, cropped, block_size, correct, correct_norm, acc, acc_norm, the per-example sum_loss and
    mean_loss (n, 4) tensors, and predictions: a list of {index, label, pred, pred_norm}.
    """
    n = len(examples)
    mine = list(range(rank, n, world_size))
    rendered = {i: render_example(examples[i]) for i in mine}
    cropped = sum(r.cropped(model.config.block_size) for r in rendered.values())
    # longest first: batches of similar lengths waste little padding, and a batch too big for the
    # device's memory fails at once, not at the end
    mine.sort(key=lambda i: -(len(rendered[i].ctx) + sum(map(len, rendered[i].endings))))
    sum_loss = torch.zeros(n, NUM_ENDINGS)
    mean_loss = torch.zeros(n, NUM_ENDINGS)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=not progress)
    for start in range(0, len(mine), batch_size):
        ids = mine[start : start + batch_size]
        sum_loss[ids], mean_loss[ids] = score_batch(model, [rendered[i] for i in ids], device, autocast)
        bar.update(len(ids))
    bar.close()
    model.train(was_training)
    if world_size > 1:
        # each example was scored on one rank and is zero on the others: the sum is the full table
        table = torch.stack([sum_loss, mean_loss]).to(device)  # (2, n, 4)
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        sum_loss, mean_loss = table.cpu()
        count = torch.tensor(cropped, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        cropped = int(count)
    labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    pred = sum_loss.argmin(dim=1)  # ties go to the first ending, as with argmin anywhere else
    pred_norm = mean_loss.argmin(dim=1)
    correct = int((pred == labels).sum())
    correct_norm = int((pred_norm == labels).sum())
    return {
        "n": n,
        "cropped": cropped,
        "block_size": model.config.block_size,
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
    # The command line borrows the model loader, the device setup and the precision decision from
    # train_gpt2.py, which imports this file as `hellaswag`: run as a script, this file is
    # `__main__`, so it goes in under its name first (one module, one HellaSwagError, not two)
    sys.modules.setdefault("hellaswag", sys.modules[__name__])
    import train_gpt2 as tg

    d = None
    try:
        d = tg.setup_distributed(args.device)
        dtype = tg.autocast_dtype(d.device, args.dtype)
        examples = load_examples(args.data, split=args.split, limit=args.limit)
        source = args.checkpoint or args.model
        model = tg.load_model(source, d.device)
        tg.print0(f"{source}: {model.num_params() / 1e6:.1f}M parameters, {len(examples)} examples, "
                  f"device {d.device} ({tg.dtype_name(dtype)}{tg.dtype_reason(d.device, args.dtype)}), "
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
