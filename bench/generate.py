"""
bench/generate.py: generation speed with and without the key/value cache, side by side.

    python -m bench.generate                      # GPT-2 124M shapes (random weights), CPU
    python -m bench.generate --device cuda --new-tokens 512
    python -m bench.generate -m gpt2              # OpenAI's weights (needs the hub once)

Both paths run on the same model, prompt and seed, alternating rounds; the script checks that they
produce the same tokens and prints tokens/s of each and the speed-up.
"""
import argparse
import statistics

import torch

from bench import timed
from train_gpt2 import GPT, GPTConfig


def main(argv=None):
    p = argparse.ArgumentParser(description="KV-cache generation against full recompute")
    p.add_argument("-m", "--model", default="", help="a GPT-2 name or Hugging Face folder (default: random 124M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from fineweb import gpt2_tokenizer

    torch.manual_seed(0)
    model = GPT.from_pretrained(args.model) if args.model else GPT(GPTConfig())
    model = model.to(args.device).eval()
    device = torch.device(args.device)
    idx = torch.tensor([gpt2_tokenizer().encode(args.prompt)] * args.batch, device=args.device)
    results = {True: [], False: []}
    outputs = {}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            g = torch.Generator(device=args.device).manual_seed(1)
            out, dt = timed(lambda: model.generate(idx, args.new_tokens, top_k=50, generator=g, use_cache=use_cache),
                            device)
            results[use_cache].append(args.batch * args.new_tokens / dt)
            outputs[use_cache] = out
    same = torch.equal(outputs[True], outputs[False])
    with_cache, without = statistics.median(results[True]), statistics.median(results[False])
    print(f"model: {model.num_params():,} parameters, prompt {idx.size(1)} tokens, {args.new_tokens} new tokens x "
          f"{args.batch}, {args.device}")
    print(f"{'path':<22}{'tokens/s (median)':>20}")
    print(f"{'KV cache':<22}{with_cache:>20.1f}")
    print(f"{'full recompute':<22}{without:>20.1f}")
    print(f"speed-up: {with_cache / without:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
