"""
bench/hellaswag.py: hellaswag.evaluate() against simpler scorers, same model, same examples.

The straightforward scorer takes one example at a time: four rows of context + ending, logits over
the whole vocabulary at every position, cross-entropy over the ending positions (the way the
reference implementations score HellaSwag). With --plain, a second baseline batches that layout:
the four rows of several examples in one forward pass, logits only where an ending token is
predicted. evaluate() also computes each context once (packed with its four endings in one row).
The benchmark prints examples/s of each, the ratios, and whether the predictions agree (they must:
same numbers up to float rounding).

    python -m bench.hellaswag                                  # small random GPT, first 200 val examples, CPU
    python -m bench.hellaswag --plain --repeat 3               # with the plain batched scorer
    python -m bench.hellaswag --every 50                       # 200 examples spread over the whole file
    python -m bench.hellaswag -m path/to/hf_dir                # or --checkpoint log/model_19072.pt
    python -m bench.hellaswag --device cuda --full-124m --limit 0 --batch-size 64   # all 10,042, GPT-2 124M shapes

Defaults: a random-weights GPT with n_layer=4, n_head=4, n_embd=256, block_size=1024; the first 200
examples of HellaSwag's validation set as bench/data.py finds it (--limit 0: all of them); fp32 (--bf16 for
autocast, where predictions may differ on near ties). On a shared machine the timings vary with the
load: --repeat N runs the scorers N times, alternating, and keeps each one's best; --threads 1 is
steadier than two threads on two busy cores. The README's HellaSwag section has the figures.
"""
import argparse
import contextlib

import torch
from torch.nn import functional as F

import hellaswag
from bench import timed
from bench.data import data_file
from train_gpt2 import GPT, GPTConfig, load_model


def rows(ctx, endings):
    """The straightforward layout of an example: tokens (4, T), one row of context + ending per ending,
    right-padded with 0, and mask (4, T), 1 over the ending's tokens (the ones scored)."""
    T = len(ctx) + max(len(e) for e in endings)
    tokens = torch.zeros(len(endings), T, dtype=torch.long)
    mask = torch.zeros(len(endings), T, dtype=torch.long)
    for i, end in enumerate(endings):
        tokens[i, : len(ctx) + len(end)] = torch.tensor(ctx + end)
        mask[i, len(ctx) : len(ctx) + len(end)] = 1
    return tokens, mask


@torch.no_grad()
def score_one_at_a_time(model, examples, device, autocast):
    """(n, 4) summed and mean cross-entropy, one example (four padded rows) per forward pass."""
    sums, means = [], []
    for example in examples:
        tokens, mask = rows(*hellaswag.render_example(example))  # (4, T) each
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


@torch.no_grad()
def score_plain(model, examples, device, autocast, batch_size):
    """(n, 4) the same, batch_size examples (4 * batch_size rows "context + ending", right-padded,
    default positions and causal attention) per forward pass, longest first as evaluate() orders
    them; logits only at the positions that predict an ending token. Examples must fit block_size."""
    rendered = [hellaswag.render_example(ex) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -(len(rendered[i][0]) + max(map(len, rendered[i][1]))))
    sums, means = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        inputs = [ctx + end[:-1] for i in ids for ctx, ends in [rendered[i]] for end in ends]
        ends = [end for i in ids for end in rendered[i][1]]
        width = max(map(len, inputs))
        idx = torch.tensor([r + [0] * (width - len(r)) for r in inputs], device=device)
        row = torch.tensor([r for r, end in enumerate(ends) for _ in end], device=device)
        col = torch.tensor([c for r, end in zip(inputs, ends) for c in range(len(r) - len(end), len(r))], device=device)
        target = torch.tensor([t for end in ends for t in end], device=device)
        with autocast:
            logits = model.logits(model.hidden_states(idx)[row, col]).float()  # (N, vocab_size)
        loss = F.cross_entropy(logits, target, reduction="none")
        s = torch.zeros(len(ends), device=device).index_add_(0, row, loss).cpu()
        sums[ids] = s.view(-1, 4)
        means[ids] = (s / torch.tensor([len(end) for end in ends])).view(-1, 4)
    return sums, means


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
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (batched scorers)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=1, help="time each scorer this many times, keep the best")
    parser.add_argument("--plain", action="store_true", help="also time the plain batched scorer")
    parser.add_argument("--skip-naive", action="store_true", help="do not time one example at a time")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
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

    def packed(exs):
        result = hellaswag.evaluate(model, exs, device=device, batch_size=args.batch_size, autocast=autocast)
        return result["sum_loss"], result["mean_loss"]

    scorers = {f"evaluate(batch {args.batch_size})": packed}
    if args.plain:
        scorers[f"plain(batch {args.batch_size})"] = lambda exs: score_plain(model, exs, device, autocast,
                                                                            args.batch_size)
    if not args.skip_naive:
        scorers["one example at a time"] = lambda exs: score_one_at_a_time(model, exs, device, autocast)
    for score in scorers.values():  # warm-up (allocator, kernels) on a few examples
        score(examples[:4])
    best, out = {}, {}
    for _ in range(args.repeat):
        for label, score in scorers.items():
            out[label], t = timed(lambda: score(examples), device)
            best[label] = min(best.get(label, float("inf")), t)
            print(f"{label:22s} {t:8.2f} s  {n / t:8.1f} examples/s", flush=True)
    first = next(iter(scorers))
    fast_sum, fast_mean = out[first]
    print(f"best of {args.repeat}, against {first} ({n / best[first]:.1f} examples/s):")
    for label in list(scorers)[1:]:
        s, m = out[label]
        same = (s.argmin(1) == fast_sum.argmin(1)).sum().item()
        same_norm = (m.argmin(1) == fast_mean.argmin(1)).sum().item()
        print(f"  {label:22s} {n / best[label]:8.1f} examples/s, {best[label] / best[first]:.2f}x the time; "
              f"predictions agree: acc {same}/{n}, acc_norm {same_norm}/{n}; max |difference| summed loss "
              f"{(s - fast_sum).abs().max().item():.2e}, mean loss {(m - fast_mean).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
