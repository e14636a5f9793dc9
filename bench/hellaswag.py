"""
bench/hellaswag.py: hellaswag.evaluate() against the straightforward scorer, same model, same examples.

The straightforward scorer takes one example at a time: four rows of context + ending, logits over
the whole vocabulary at every position, cross-entropy over the ending positions (the way the
reference implementations score HellaSwag). evaluate() packs the context once per example with its
four endings, puts several examples in one batch, and projects onto the vocabulary only where an
ending token is predicted. The benchmark prints examples/s of both, their ratio, and whether the
predictions agree (they must: same numbers up to float rounding).

    python -m bench.hellaswag                                  # small random GPT, first 200 val examples, CPU
    python -m bench.hellaswag --every 50                       # 200 examples spread over the whole file
    python -m bench.hellaswag -m path/to/hf_dir                # or --checkpoint log/model_19072.pt
    python -m bench.hellaswag --device cuda --full-124m --limit 0 --batch-size 64   # all 10,042, GPT-2 124M shapes

Defaults: a random-weights GPT with n_layer=4, n_head=4, n_embd=256, block_size=1024; the first 200
examples of HellaSwag's validation set as bench/data.py finds it (--limit 0: all of them); fp32 (--bf16 for CUDA
autocast, where predictions may differ on near ties). On a shared machine the timings vary with
the load: --repeat N runs both scorers N times, alternating, and keeps each one's best.

Measured on the 2-core CPU dev machine (shared with other jobs; best of 2-3), default model:
    first 200 examples, 2 threads:      15.7 vs 57.7 examples/s, 3.68x
    first 200 examples, 1 thread:        9.5 vs 36.7 examples/s, 3.85x
    --every 50 (200 over the file), 1 thread: 4.9 vs 17.3 examples/s, 3.57x
predictions identical in all (max |difference| of summed losses 9e-5 and 1.8e-4).
"""
import argparse
import contextlib

import torch
from torch.nn import functional as F

import hellaswag
from bench import timed
from bench.data import data_file
from train_gpt2 import GPT, GPTConfig, load_model



def rows(rendered: hellaswag.Rendered):
    """The straightforward layout of an example: tokens (4, T), one row of context + ending per ending,
    right-padded with 0, and mask (4, T), 1 over the ending's tokens (the ones scored)."""
    T = len(rendered.ctx) + max(len(e) for e in rendered.endings)
    tokens = torch.zeros(hellaswag.NUM_ENDINGS, T, dtype=torch.long)
    mask = torch.zeros(hellaswag.NUM_ENDINGS, T, dtype=torch.long)
    for i, end in enumerate(rendered.endings):
        row = rendered.ctx + end
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(rendered.ctx) : len(row)] = 1
    return tokens, mask


@torch.no_grad()
def score_one_at_a_time(model, examples, device, autocast):
    """(n, 4) summed and mean cross-entropy, one example (four padded rows) per forward pass."""
    sums, means = [], []
    for example in examples:
        tokens, mask = rows(hellaswag.render_example(example))  # (4, T) each
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast:
            logits, _ = model(tokens)  # (4, T, vocab_size): every position
        # position t predicts token t + 1
        logits, targets, mask = logits[:, :-1].float(), tokens[:, 1:], mask[:, 1:].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        s = (ce.view(targets.shape) * mask).sum(dim=1)  # (4,)
        sums.append(s.cpu())
        means.append((s / mask.sum(dim=1)).cpu())
    return torch.stack(sums), torch.stack(means)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-m", "--model", default=None, help="Hugging Face GPT-2 name or local directory")
    source.add_argument("--checkpoint", default=None, help="a train_gpt2.py checkpoint")
    source.add_argument("--full-124m", action="store_true", help="random weights with GPT-2 124M shapes")
    parser.add_argument("--data", default=None, help="HellaSwag JSON-lines file (default: found by bench/data.py)")
    parser.add_argument("--limit", type=int, default=200, help="first N examples (0: all)")
    parser.add_argument("--every", type=int, default=1,
                        help="take every K-th example of the file (the val file's first 3,000 are ActivityNet, the "
                        "rest longer WikiHow tasks)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass for evaluate()")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--repeat", type=int, default=1, help="time each scorer this many times, keep the best")
    parser.add_argument("--skip-naive", action="store_true", help="time evaluate() only")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        model, name = load_model(args.checkpoint, device), args.checkpoint
    elif args.model:
        model, name = GPT.from_pretrained(args.model), args.model
    elif args.full_124m:
        model, name = GPT(GPTConfig()), "random GPT-2 124M shapes"
    else:
        config = GPTConfig(block_size=1024, n_layer=4, n_head=4, n_embd=256)
        model, name = GPT(config), "random GPT n_layer=4 n_head=4 n_embd=256"
    model = model.to(device).eval()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    args.data = args.data or data_file("hellaswag_val.jsonl")
    examples = hellaswag.load_examples(args.data)[:: args.every]
    examples = examples[: args.limit] if args.limit else examples
    n = len(examples)
    print(f"model: {name} ({model.num_params() / 1e6:.1f}M parameters), device {device}, "
          f"{torch.get_num_threads()} CPU threads, {n} examples of {args.data} (every {args.every}), bf16 {args.bf16}")

    # warm up both paths (allocator, kernels) on a few examples
    hellaswag.evaluate(model, examples[:4], device=device, batch_size=args.batch_size, autocast=autocast)
    if not args.skip_naive:
        score_one_at_a_time(model, examples[:4], device, autocast)

    best_naive = best_fast = float("inf")
    for _ in range(args.repeat):
        if not args.skip_naive:
            (naive_sum, naive_mean), t = timed(lambda: score_one_at_a_time(model, examples, device, autocast), device)
            best_naive = min(best_naive, t)
            print(f"one example at a time: {t:8.2f} s  {n / t:8.1f} examples/s")
        result, t = timed(lambda: hellaswag.evaluate(model, examples, device=device, batch_size=args.batch_size,
                                                     autocast=autocast), device)
        best_fast = min(best_fast, t)
        print(f"evaluate(batch {args.batch_size:3d}):   {t:8.2f} s  {n / t:8.1f} examples/s")
    print(f"hellaswag: n={result['n']} acc={result['acc']:.4f} acc_norm={result['acc_norm']:.4f}")
    if args.skip_naive:
        return
    print(f"speed-up: {best_naive / best_fast:.2f}x  (best of {args.repeat}: "
          f"{n / best_naive:.1f} vs {n / best_fast:.1f} examples/s)")
    same = (naive_sum.argmin(1) == result["sum_loss"].argmin(1)).sum().item()
    same_norm = (naive_mean.argmin(1) == result["mean_loss"].argmin(1)).sum().item()
    print(f"predictions agree: acc {same}/{n}, acc_norm {same_norm}/{n}; max |difference| "
          f"summed loss {(naive_sum - result['sum_loss']).abs().max().item():.2e}, "
          f"mean loss {(naive_mean - result['mean_loss']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
