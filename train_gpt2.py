"""
train_gpt2.py: GPT-2 (124M) from scratch, in one file you can read top to bottom.

Sections, in reading order: model, data, learning-rate schedule, evaluation, checkpoints,
setup, command line, training.

Run it
  CPU or Mac, Tiny Shakespeare, a small model, minutes:
      python train_gpt2.py --preset shakespeare
  One GPU, GPT-2 124M on FineWeb-Edu (first: python fineweb.py):
      python train_gpt2.py
  Eight GPUs on one node (the 10B-token reproduction):
      torchrun --standalone --nproc_per_node=8 train_gpt2.py
  Several nodes (run on each node; torchrun's own rendezvous):
      torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_gpt2.py
  Resume after a crash or preemption (also what torchrun --max-restarts relaunches):
      torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_gpt2.py --resume auto
  Fine-tune OpenAI's weights:
      python train_gpt2.py --init-from gpt2 --max-lr 1e-4 ...

Every flag and its default: python train_gpt2.py --help. Logs and checkpoints go to --log-dir
(log.txt has one record per line: `STEP train LOSS`, `STEP val LOSS`, `STEP hella ACC`).
"""
import argparse
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------------------------
# Model

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + 1 special token (<|endoftext|>)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model sees (tokens); rows of the position table
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens; logits are returned for these only
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream (channels)
    # dropout probability in training (embeddings, attention weights, each residual branch); GPT-2
    # used 0.1, but a single epoch of pretraining data needs none. It fights overfitting on small data.
    dropout: float = 0.0
    # The embedding / lm_head table gets this many rows rounded up to a multiple of `vocab_multiple`:
    # 50257 -> 50304 = 393 * 128, a shape the matmul kernels like. The extra rows are never a target,
    # never sampled and never scored: forward() cuts the logits back to vocab_size.
    vocab_multiple: int = 128

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, for generation."""

    def __init__(self, n_layer: int):
        self.layers = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's keys/values (B, nh, T, hs) and return all of them so far."""
        past = self.layers[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled at init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()  # batch, time (sequence length), channels (n_embd)
        nh, hs = self.n_head, C // self.n_head  # number of heads, head size
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # heads become a batch dimension: (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            cached = kv_cache.layers[self.layer_idx]
            past = 0 if cached is None else cached[0].size(2)
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif past == 0:  # flash attention on GPU
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token attends to everything cached
        else:
            # several new tokens after a cached prefix: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, kv_cache=kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) for targets (N,), targets of -1 ignored: F.cross_entropy's
    value and gradient, with a backward that allocates nothing.

    With V = 50k classes the loss moves more memory than the small model it trains. F.cross_entropy's
    backward allocates and writes two new (N, V) tensors (a zeroed gradient for the NLL, then the
    log-softmax's); here the gradient, (softmax - onehot(target)) / N, is written in place over the
    saved fp32 log-probabilities, which are ours alone and not needed again. Eager mode only: under
    torch.compile, forward() uses F.cross_entropy, which the compiler fuses itself.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # fp32 even under autocast, no copy first
        ctx.save_for_backward(logp, targets)
        ctx.logits_dtype = logits.dtype
        return F.nll_loss(logp, targets, ignore_index=-1)  # F.cross_entropy's value, to the last bit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logp, targets = ctx.saved_tensors  # a second backward raises: logp is overwritten below
        valid = targets != -1
        grad = logp.exp_()  # softmax, in place
        grad[torch.arange(len(targets), device=grad.device), targets.clamp(min=0)] -= 1
        scale = grad_loss / valid.sum().clamp(min=1)  # the loss is a mean over the valid targets
        grad.mul_(scale * valid.unsqueeze(1))  # ignored rows get 0
        return grad.to(ctx.logits_dtype), None


# Hugging Face GPT-2 stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding table (GPT-2 does this)
        self.transformer.wte.weight = self.lm_head.weight
        # 0 for real tokens, -inf for the padded rows: added inside the lm_head matmul, it gives the
        # padded logits zero probability, so the softmax is exactly the one over the real vocabulary
        # (no slicing copy in the loss). Not saved: it follows from the config.
        vocab_bias = torch.zeros(config.padded_vocab_size)
        vocab_bias[config.vocab_size :] = float("-inf")
        self.register_buffer("vocab_bias", vocab_bias, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) weights, zero biases; the two projections that write into the residual
        # stream get std / sqrt(2 * n_layer), so the stream's variance does not grow with depth
        # (each block adds to it twice).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, pos=None, attn_mask=None, kv_cache=None):
        """Final-LayerNorm outputs (B, T, C) for tokens idx (B, T).

        pos: position ids (T,) or (B, T); default 0..T-1, or following the cached prefix.
        attn_mask: boolean (B or 1, 1, T, T_keys), True where a query may attend; default causal.
        """
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if past + T > self.config.block_size:
                raise ValueError(
                    f"sequence of {past + T} tokens is longer than the model's block_size "
                    f"{self.config.block_size}: crop the input to the last {self.config.block_size} tokens"
                )
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        # with explicit position ids (packed rows), the position table bounds the positions, not T
        x = self.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask=attn_mask, kv_cache=kv_cache)
        return self.transformer.ln_f(x)

    def padded_logits(self, x):
        """Hidden states (..., C) -> logits (..., padded_vocab_size), -inf on the padded rows."""
        return F.linear(x, self.lm_head.weight, self.vocab_bias)

    def logits(self, x):
        """Hidden states (..., C) -> logits over the real vocabulary (..., vocab_size)."""
        # the padded rows exist for kernel speed only: they never score or get sampled
        return self.padded_logits(x)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, kv_cache=None, return_logits=True):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets of -1 are ignored (padding). return_logits=False gives None for the logits: training
        does not read them, and a compiled model that returns them also runs their (zero) gradient
        through backward, a pass over B*T*V floats."""
        padded = self.padded_logits(self.hidden_states(idx, kv_cache=kv_cache))  # (B, T, padded V)
        loss = None
        if targets is not None:
            logits_2d, targets_1d = padded.reshape(-1, padded.size(-1)), targets.reshape(-1)
            if torch.compiler.is_compiling():  # the compiler fuses F.cross_entropy's passes itself
                loss = F.cross_entropy(logits_2d.float(), targets_1d, ignore_index=-1)
            else:
                loss = CrossEntropy.apply(logits_2d, targets_1d)
        logits = padded[..., : self.config.vocab_size] if return_logits else None  # a view: no copy
        return logits, loss

    # --- size and cost ---------------------------------------------------------------------------

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Parameters (the tied embedding/lm_head table counted once, padded rows included)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_position_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper (appendix B):

            6 * N + 12 * n_layer * n_embd * T

        N is the parameter count without position embeddings (the token table counts: it is also
        the lm_head matmul). 6N = 2 (multiply-add) x 3 (forward, backward for inputs and weights);
        the second term is attention's QK^T and AV, which have no parameters.
        """
        T = seq_len or self.config.block_size
        N = self.num_params(include_position_embeddings=False)
        return 6 * N + 12 * self.config.n_layer * self.config.n_embd * T

    # --- optimizer -------------------------------------------------------------------------------

    def configure_optimizer(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95), eps=1e-8):
        """AdamW; weight decay on matrices and embeddings (2-D), none on biases and LayerNorm."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # the fused kernel updates each tensor in one pass (on a CPU, 13% faster shakespeare steps than
        # the per-operation loop); CUDA and CPU have one
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))

    # --- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        temperature == 0 is greedy; top_k keeps the k most likely tokens; `generator` (a
        torch.Generator on idx's device) makes sampling reproducible. The context is cropped to the
        last block_size tokens. With use_cache, each new token costs one token's forward pass
        (keys and values of earlier tokens are kept); once the context is full, cropping shifts
        every position, so the cache is rebuilt from the cropped context.
        """
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.length >= block_size:
                cache = KVCache(self.config.n_layer)
                logits, _ = self(idx[:, -block_size:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            logits = logits[:, -1, :].float()  # (B, vocab_size)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # --- Hugging Face import / export ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> "GPT":
        """Load OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, from the Hugging Face
        hub) or a local directory in Hugging Face GPT-2 format (config.json + model.safetensors or
        pytorch_model.bin). dropout: for fine-tuning (the weights do not depend on it)."""
        import json

        if os.path.isdir(name_or_dir):
            folder = name_or_dir
        elif name_or_dir in HF_MODEL_NAMES:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(f"openai-community/{name_or_dir}", allow_patterns=["config.json", "*.safetensors"])
        else:
            raise ValueError(
                f"{name_or_dir!r} is neither a local directory nor one of {', '.join(HF_MODEL_NAMES)}"
            )
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: a Hugging Face GPT-2 directory needs config.json")
        with open(config_path) as f:
            hf = json.load(f)
        config = GPTConfig(
            block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout,
        )
        model = cls(config)
        model.load_hf_state_dict(_read_hf_weights(folder))
        return model

    def load_hf_state_dict(self, hf_sd: dict):
        """Copy a Hugging Face GPT-2 state dict (keys with or without 'transformer.') into this model."""
        hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
        # causal-mask buffers of old transformers versions and the tied lm_head are not weights to copy
        hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        ours = {k.removeprefix("transformer."): v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        missing = sorted(set(ours) - set(hf_sd))
        unexpected = sorted(set(hf_sd) - set(ours))
        if missing or unexpected:
            raise ValueError(f"GPT-2 checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        V = self.config.vocab_size
        with torch.no_grad():
            for k, dst in ours.items():
                src = hf_sd[k]
                if k.endswith(HF_CONV1D_WEIGHTS):
                    src = src.t()
                want = dst.shape
                if k == "wte.weight":
                    want = (V, dst.shape[1])  # padded rows are ours alone
                if tuple(src.shape) != tuple(want):
                    raise ValueError(
                        f"shape mismatch for tensor {k!r}: checkpoint has {tuple(src.shape)}, model expects "
                        f"{tuple(want)} (check n_layer/n_head/n_embd/n_positions/vocab_size in config.json)"
                    )
                if k == "wte.weight":
                    dst.zero_()
                    dst[:V].copy_(src)
                else:
                    dst.copy_(src)

    def hf_state_dict(self) -> dict:
        """This model's weights in Hugging Face GPT2LMHeadModel layout (padded vocabulary rows dropped)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            v = v.detach()
            if k.endswith(HF_CONV1D_WEIGHTS):
                v = v.t()
            if k == "transformer.wte.weight":
                v = v[: self.config.vocab_size]
            out[k] = v.contiguous().clone()
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def export_hf(self, out_dir: str):
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads, with the
        same logits as this model."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf_config = GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, activation_function="gelu_new", bos_token_id=GPT2_VOCAB_SIZE - 1,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            eos_token_id=GPT2_VOCAB_SIZE - 1, tie_word_embeddings=True,
        )
        hf = GPT2LMHeadModel(hf_config)
        result = hf.load_state_dict(self.hf_state_dict(), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(k.endswith(".attn.bias") for k in result.missing_keys), result.missing_keys
        hf.save_pretrained(out_dir)
        return out_dir


def _read_hf_weights(folder: str) -> dict:
    """State dict from a Hugging Face model folder (safetensors preferred, else pytorch_model.bin)."""
    st = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


# -----------------------------------------------------------------------------------------------
# Data

SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


def find_shards(data_dir: str, split: str) -> list[str]:
    """Shard files `<prefix>_<split>_<NNNNNN>.npy` of a split, in index order."""
    if not os.path.isdir(data_dir):
        raise DataError(
            f"{data_dir}: no such data directory: run `python fineweb.py` to build FineWeb-Edu shards, "
            f"or train on a text file with `--preset shakespeare` / `--input FILE`"
        )
    found = []
    for name in os.listdir(data_dir):
        m = SHARD_NAME.match(name)
        if m and m["split"] == split:
            found.append((int(m["index"]), name))
    if not found:
        raise DataError(
            f"{data_dir}: no {split} shards (*_{split}_NNNNNN.npy): run `python fineweb.py` to build them, "
            f"or train on a text file with `--preset shakespeare` / `--input FILE`"
        )
    return [os.path.join(data_dir, name) for _, name in sorted(found)]


def open_shard(path: str, seq_len: int) -> np.ndarray:
    """Memory-map a shard and check it: 1-D uint16, at least one sequence, token ids < 50257."""
    fix = "rebuild it with `python fineweb.py` (or delete it)"
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated file, bad header, not a .npy at all
        raise DataError(f"{path}: unreadable shard ({e}); {fix}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise DataError(f"{path}: shard has dtype {tokens.dtype} and shape {tokens.shape}, expected 1-D uint16; {fix}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"{path}: shard has {len(tokens)} tokens, fewer than one sequence of T+1 = {seq_len + 1}; {fix}")
    # a sample of the ids (the start, and one strided pass) must be GPT-2 tokens
    sample = np.concatenate([tokens[: 1 << 16], tokens[:: max(1, len(tokens) // (1 << 16))]])
    if int(sample.max()) >= GPT2_VOCAB_SIZE:
        raise DataError(f"{path}: token id {int(sample.max())} >= {GPT2_VOCAB_SIZE}: not GPT-2 tokens; {fix}")
    return tokens


class DataLoader:
    """Batches of sequences (x, y = the same tokens shifted by one) from token arrays.

    Every array (a shard, or a split of a text file) is cut into sequences of T + 1 tokens with
    stride T (the < T tokens at an array's end are left out). Sequences are numbered globally:
    sequence g belongs to epoch g // sequences_per_epoch. With `shuffle`, each epoch visits the
    arrays in a fresh random order and each array's sequences in a fresh random order, both drawn
    from (seed, epoch), so the loss curve has no periodic wave. Optimizer step s uses sequences
    [s * N, (s + 1) * N), N = sequences per optimizer step; rank r's micro-step m takes the B of
    them starting at (m * world_size + r) * B. So the data of a step depends on the seed, T and N
    only, never on B or the number of ranks, and `state_dict()` is one integer.
    """

    def __init__(self, arrays, names, B, T, seqs_per_step, rank=0, world_size=1, seed=0, shuffle=True):
        if seqs_per_step % (B * world_size):
            raise ValueError(f"{seqs_per_step} sequences per step do not split into micro-batches of {B} x {world_size} ranks")
        self.arrays, self.names = list(arrays), list(names)
        self.B, self.T, self.seqs_per_step = B, T, seqs_per_step
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.grad_accum_steps = seqs_per_step // (B * world_size)
        self.counts = np.array([(len(a) - 1) // T for a in self.arrays], dtype=np.int64)
        self.seqs_per_epoch = int(self.counts.sum())
        self.position = 0  # sequences consumed by all ranks before the current optimizer step
        self.micro_step = 0
        self._epoch = None

    # --- order --------------------------------------------------------------------------------

    def _order(self, epoch):
        """(array visiting order, start offset of each visited array) for an epoch, cached."""
        if self._epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.arrays))
            else:
                order = np.arange(len(self.arrays))
            self._epoch, self._array_order, self._perms = epoch, order, {}
            self._starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        return self._array_order, self._starts

    def locate(self, g: int):
        """Global sequence number -> (array index, first token) of that sequence."""
        epoch, i = divmod(g, self.seqs_per_epoch)
        order, starts = self._order(epoch)
        slot = int(np.searchsorted(starts, i, side="right") - 1)
        a = int(order[slot])
        j = i - int(starts[slot])
        if self.shuffle:
            if a not in self._perms:
                self._perms[a] = np.random.default_rng([self.seed, epoch, a + 1]).permutation(int(self.counts[a]))
            j = int(self._perms[a][j])
        return a, j * self.T

    def batch(self, seq_numbers):
        """Sequences by global number -> (x, y) int64 tensors of shape (len, T)."""
        rows = []
        for g in seq_numbers:
            a, start = self.locate(int(g))
            rows.append(self.arrays[a][start : start + self.T + 1])  # uint16 view of the memory map
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # only this batch becomes int64
        return buf[:, :-1], buf[:, 1:]

    # --- training -----------------------------------------------------------------------------

    def next_batch(self):
        """This rank's next micro-batch (x, y), each (B, T)."""
        first = self.position + (self.micro_step * self.world_size + self.rank) * self.B
        x, y = self.batch(range(first, first + self.B))
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.micro_step = 0
            self.position += self.seqs_per_step
        return x, y

    def state_dict(self):
        assert self.micro_step == 0, "save the loader between optimizer steps"
        return {"position": self.position, "seqs_per_step": self.seqs_per_step, "seq_len": self.T, "seed": self.seed}

    def load_state_dict(self, state):
        self.position, self.micro_step = int(state["position"]), 0


def load_shards(data_dir, split, T):
    paths = find_shards(data_dir, split)
    return [open_shard(p, T) for p in paths], paths


def load_text(path: str, val_fraction: float = 0.1):
    """A plain text file as one document: tokenized once; the last 10% of tokens is validation."""
    from fineweb import EOT, gpt2_tokenizer

    if not os.path.isfile(path):
        if os.path.basename(path) != "input.txt":
            raise DataError(f"{path}: no such file: pass --input with a plain text file")
        download_tiny_shakespeare(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    ids = np.array([EOT] + gpt2_tokenizer().encode_ordinary(text), dtype=np.uint16)
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:]


def download_tiny_shakespeare(path: str):
    import urllib.request

    tmp = path + ".download"
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(
            f"{path}: missing, and downloading Tiny Shakespeare failed ({e}); download "
            f"{TINY_SHAKESPEARE_URL} to {path} by hand, or pass --input with another text file"
        ) from None


def check_enough(arrays, names, split, T, seqs_needed, fix):
    have = sum((len(a) - 1) // T for a in arrays)
    if have < seqs_needed:
        raise DataError(
            f"{', '.join(names[:3])}{'...' if len(names) > 3 else ''}: the {split} split has {have} sequences "
            f"of T={T} tokens, fewer than the {seqs_needed} one {'optimizer step' if split == 'train' else 'evaluation'} needs; {fix}"
        )


# -----------------------------------------------------------------------------------------------
# Learning-rate schedule


def get_lr(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at max_steps."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, loader: DataLoader, num_seqs: int, device, autocast, rank=0, world_size=1) -> float:
    """Mean loss over the first num_seqs validation sequences (a fixed set, whatever the world size).

    Rank r takes sequences r, r + world, ...; batches keep the training shape (B, T), the last one
    padded with targets of -1 (ignored), so a compiled model sees no new shape. Summed losses and
    token counts are all-reduced, so the mean is over exactly the same tokens on 1 or 8 GPUs.
    """
    mine = list(range(rank, num_seqs, world_size))
    B, T = loader.B, loader.T
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for i in range(0, len(mine), B):
        x, y = loader.batch(mine[i : i + B])
        if len(x) < B:  # pad to the training shape; padded rows score nothing
            pad = B - len(x)
            x = torch.cat([x, torch.zeros(pad, T, dtype=x.dtype)])
            y = torch.cat([y, torch.full((pad, T), -1, dtype=y.dtype)])
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y)
        n = (y != -1).sum()
        total += torch.stack([loss.double() * n, n.double()])
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_text(model, enc, prompt, num_samples, max_new_tokens, device, autocast, seed, top_k=50):
    """Samples from the raw model. Generation uses the KV cache at shapes that change every token,
    which a compiled model would recompile for; the raw module shares the trained weights, and
    sampling is a small share of a run's time, so it runs uncompiled."""
    idx = torch.tensor([enc.encode(prompt)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=top_k, generator=generator)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = "build-gpt2-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, foreign, or for another model)."""


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint dict written by this script, or raise CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else...
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}); it may be truncated by a crash "
            f"during saving: use an earlier checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train_gpt2.py checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')}, this script reads {CHECKPOINT_VERSION}")
    return ckpt


def load_model_from_checkpoint(path: str, device="cpu") -> GPT:
    """The trained model of a checkpoint (for evaluation, sampling, the notebook), in eval mode."""
    ckpt = read_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_write(path: str, write):
    """write(file) into path.tmp, flush and fsync, then rename over path: a crash leaves either the
    old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def checkpoint_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, f"ckpt_{step:06d}.pt")


def save_checkpoint(log_dir: str, state: dict, keep: int) -> str:
    """Write ckpt_<step>.pt safely, then point LOG_DIR/latest at it, then prune old checkpoints."""
    path = checkpoint_path(log_dir, state["step"])
    atomic_write(path, lambda f: torch.save(state, f))
    # "latest" is updated only once the checkpoint it names is complete on disk
    atomic_write(os.path.join(log_dir, "latest"), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
    if keep > 0:
        ckpts = sorted(n for n in os.listdir(log_dir) if re.fullmatch(r"ckpt_\d{6}\.pt", n))
        for old in ckpts[:-keep]:
            os.remove(os.path.join(log_dir, old))
    return path


def latest_checkpoint(log_dir: str) -> str | None:
    """The checkpoint LOG_DIR/latest names, or None when the run has none yet."""
    pointer = os.path.join(log_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(log_dir, f.read().strip())
    if not os.path.isfile(path):
        raise CheckpointError(f"{pointer} names {path}, which does not exist: pass --resume PATH with a checkpoint")
    return path


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# -----------------------------------------------------------------------------------------------
# Setup: processes, devices, precision, logging


@dataclass
class Dist:
    rank: int  # this process among all processes
    local_rank: int  # this process on its node (its GPU index)
    world_size: int
    device: torch.device
    device_type: str  # "cuda", "mps" or "cpu": compare this, never device strings

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str = "auto") -> Dist:
    """Detect torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment), pick the device, and join
    the process group: NCCL on CUDA, gloo on CPU."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if device_arg == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ["WORLD_SIZE"])
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        if device.type == "mps":
            raise ConfigError("torchrun with --device mps is not supported: use --device cpu or one process")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device, device.type)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_context(device_type: str):
    """The one autocast context for every forward pass: bf16 on CUDA (fp16 where the GPU has no
    bf16; then a GradScaler is needed), nothing (fp32) on CPU and MPS."""
    if device_type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


def keep_freed_memory():
    """On Linux (glibc), keep freed memory in the process instead of giving it back to the kernel.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, and the kernel
    then zeroes each 4 KB page on first touch. A CPU training step allocates and frees its (tokens x
    50304) logits and their gradient several times, so without this about a third of the step is
    spent in page faults (shakespeare preset on a 2-core CPU: 2,200 -> 3,050 tokens/s). Memory that
    is freed stays reserved by the process for the next step. No effect where mallopt is missing."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    ok = mallopt(M_MMAP_MAX, 0)  # every allocation comes from the heap, none from its own mmap
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap
    ok &= mallopt(M_TOP_PAD, 64 << 20)  # grow it 64 MB at a time
    return bool(ok)


# dense bf16 peak of one GPU, FLOP/s, for MFU
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12,
                 "A800": 312e12, "A10": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def device_peak_flops(d: Dist) -> float | None:
    if d.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    for key, flops in GPU_BF16_PEAK.items():
        if key in name:
            return flops / 2 if ("H100" in name and "PCIe" in name) else flops
    return None


class RunLog:
    """print0 (rank 0 prints) and LOG_DIR/log.txt: one record per line, `STEP KIND VALUE`."""

    def __init__(self, log_dir: str, is_main: bool):
        self.is_main = is_main
        self.path = os.path.join(log_dir, "log.txt")

    def print0(self, *args):
        if self.is_main:
            print(*args, flush=True)

    def start(self, header_lines, resume_step=None):
        """New run: write the header. Resumed run: keep records before resume_step, append."""
        if not self.is_main:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                # records of steps after the checkpoint were made by the lost part of the run
                kept = [ln for ln in f if ln.startswith("#") or int(ln.split()[0]) < resume_step]
        atomic_write(self.path, lambda f: f.write("".join(kept + [f"# {h}\n" for h in header_lines]).encode()))

    def record(self, step: int, kind: str, value: float):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(f"{step} {kind} {float(value)!r}\n")  # full precision: resumed runs compare exactly


def run_header(argv, d: Dist) -> list[str]:
    import platform
    import subprocess

    import tiktoken

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else d.device_type
    return [
        f"command: {' '.join(argv)}",
        f"started: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, tiktoken {tiktoken.__version__}",
        f"device: {device} x {d.world_size}",
        f"git: {commit or 'unknown'}",
    ]


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits 0.
    A second SIGINT stops at once."""

    def __init__(self):
        self.requested = False

    def install(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


class ConfigError(ValueError):
    """A command-line setting that cannot work; the message names the flag and the fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many non-finite losses in a row)."""


# -----------------------------------------------------------------------------------------------
# Command line


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    preset: str = arg("gpt2-124m", "settings to start from: " + ", ".join(["gpt2-124m", "shakespeare"]) + "; flags override it")
    # data
    data_dir: str = arg("edu_fineweb10B", "folder of .npy token shards (python fineweb.py builds it)")
    input: str = arg("", "train on this plain text file instead of shards (last 10%% is validation); input.txt is downloaded if missing")
    # model
    init_from: str = arg("scratch", "scratch, a GPT-2 name (gpt2, gpt2-medium, ...) or a local Hugging Face GPT-2 folder (fine-tuning)")
    n_layer: int = arg(12, "transformer blocks")
    n_head: int = arg(12, "attention heads")
    n_embd: int = arg(768, "model width (channels)")
    dropout: float = arg(0.0, "dropout probability in training (0 = off; against overfitting on small data)")
    block_size: int = arg(0, "position-table size (tokens); 0 = --seq-len")
    # batch
    batch_size: int = arg(64, "micro-batch B (sequences per forward pass per process)")
    seq_len: int = arg(1024, "sequence length T (tokens)")
    total_batch_size: int = arg(524288, "tokens per optimizer step, over all processes and micro-steps")
    # optimization
    max_steps: int = arg(19073, "optimizer steps (19073 x 524288 tokens = 10B tokens)")
    warmup_steps: int = arg(715, "linear LR warmup steps")
    max_lr: float = arg(6e-4, "peak learning rate; decays by cosine to 10%% of it")
    weight_decay: float = arg(0.1, "AdamW weight decay of 2-D parameters")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this")
    seed: int = arg(1337, "seed of the initial weights and of the data order")
    # periodic work (0 = off; each also runs on the last step)
    val_every: int = arg(250, "validation loss every N steps")
    val_tokens: int = arg(10485760, "validation tokens per evaluation (a fixed set, whatever the world size)")
    hellaswag_every: int = arg(250, "HellaSwag accuracy every N steps")
    hellaswag_data: str = arg("", "local HellaSwag JSON-lines file (default: the downloaded validation set)")
    hellaswag_limit: int = arg(0, "score only the first N HellaSwag examples (0 = all 10,042)")
    sample_every: int = arg(250, "print 4 samples of 32 tokens every N steps")
    checkpoint_every: int = arg(1000, "checkpoint every N steps")
    keep_checkpoints: int = arg(3, "keep the last N checkpoints (0 = all)")
    # run
    log_dir: str = arg("log", "folder of log.txt and checkpoints")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    compile: bool = arg(None, "torch.compile the model (default: on for CUDA, off elsewhere)")
    resume: str = arg("", "'auto' (latest checkpoint in --log-dir, if any) or a checkpoint path")
    max_bad_steps: int = arg(5, "stop after this many non-finite losses in a row")
    inject_nan: str = arg("", "testing aid: comma-separated steps whose loss is made NaN")


PRESETS = {
    # GPT-2 124M on 10B tokens of FineWeb-Edu: 19073 steps of 2**19 tokens (the dataclass defaults)
    "gpt2-124m": {},
    # Tiny Shakespeare on a laptop CPU: a small model that learns visibly within minutes
    "shakespeare": dict(
        # Tuned on a 2-core CPU (about 7 minutes there). At equal tokens, 1,024-token steps beat 2,048
        # (val 4.82 vs 5.13 after 1.6M tokens) and 512; dropout 0.1 helps a little (each token is
        # seen about 4 times); 8 layers instead of 4 did not help. With 1,024-token steps, LR 6e-3
        # after 50 warmup steps had gradient-norm spikes (up to 23) that cost 0.3 of loss for good;
        # 4e-3 after 100 steps trained smoothly and ended lower than 6e-3 (4.81 vs 4.86 in 1,400 steps).
        input="input.txt", n_layer=4, n_head=4, n_embd=128, dropout=0.1, batch_size=8, seq_len=128,
        total_batch_size=1024, max_steps=1200, warmup_steps=100, max_lr=4e-3, val_every=200,
        val_tokens=32768, hellaswag_every=0, sample_every=400, checkpoint_every=400,
    ),
}


def parse_args(argv=None) -> RunConfig:
    parser = argparse.ArgumentParser(description="Train GPT-2 (see the module docstring for the commands). "
                                     "Explicit flags override the preset.")
    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = f"default: {getattr(defaults, f.name)!r}"
        if f.name in PRESETS["shakespeare"]:
            shown += f"; shakespeare: {PRESETS['shakespeare'][f.name]!r}"
        help_text = f"{f.metadata['help']} ({shown})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=help_text)
    ns = vars(parser.parse_args(argv))
    preset = ns["preset"] or defaults.preset
    if preset not in PRESETS:
        parser.error(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    values = {**vars(defaults), **PRESETS[preset], **{k: v for k, v in ns.items() if v is not None}}
    values["preset"] = preset
    return RunConfig(**values)


def check_batch_sizes(cfg: RunConfig, world_size: int) -> int:
    """Gradient-accumulation steps, or a ConfigError that proposes valid --total-batch-size values."""
    per_micro_step = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro_step:
        lower = max(1, cfg.total_batch_size // per_micro_step) * per_micro_step
        raise ConfigError(
            f"--total-batch-size {cfg.total_batch_size} is not divisible by batch-size x seq-len x processes = "
            f"{cfg.batch_size} x {cfg.seq_len} x {world_size} = {per_micro_step}: use {lower} or {lower + per_micro_step}, "
            f"or change --batch-size"
        )
    return cfg.total_batch_size // per_micro_step


# -----------------------------------------------------------------------------------------------
# Training


def forward_backward(model, optimizer, loader, grad_accum_steps: int, d: Dist, autocast, scaler=None):
    """Gradients of one optimizer step's batch: grad_accum_steps micro-batches of this rank.
    Returns this rank's mean loss as a device tensor (no host sync). bench/train.py times this too."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=d.device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        if d.device_type == "cuda":  # pinned host memory lets the copy overlap with compute
            x, y = x.pin_memory().to(d.device, non_blocking=True), y.pin_memory().to(d.device, non_blocking=True)
        else:
            x, y = x.to(d.device), y.to(d.device)
        # DDP all-reduces gradients during backward; only the last micro-step needs that. no_sync()
        # is entered before the forward pass, which is where DDP decides.
        sync = micro_step == grad_accum_steps - 1
        with nullcontext() if sync or not isinstance(model, DDP) else model.no_sync():
            with autocast:
                _, loss = model(x, y, return_logits=False)
            # each micro-batch loss is a mean over B*T tokens; dividing by the number of micro-steps
            # makes the summed gradients those of the mean over the whole batch
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss_accum


def build_data(cfg: RunConfig, d: Dist, seqs_per_step: int):
    """Train and validation loaders over shards (--data-dir) or a text file (--input)."""
    T = cfg.seq_len
    if cfg.input:
        train_ids, val_ids = load_text(cfg.input)
        train, val = ([train_ids], [f"{cfg.input} (first 90%)"]), ([val_ids], [f"{cfg.input} (last 10%)"])
        fix = "use a longer text file or a smaller --seq-len / --total-batch-size"
    else:
        train, val = load_shards(cfg.data_dir, "train", T), load_shards(cfg.data_dir, "val", T)
        fix = "build more data with `python fineweb.py`, or lower --total-batch-size / --val-tokens"
    check_enough(*train, "train", T, seqs_per_step, fix)
    val_seqs = max(1, cfg.val_tokens // T)
    if cfg.val_every:
        check_enough(*val, "val", T, val_seqs, fix)
    common = dict(B=cfg.batch_size, T=T, seqs_per_step=seqs_per_step, rank=d.rank, world_size=d.world_size, seed=cfg.seed)
    return DataLoader(*train, shuffle=True, **common), DataLoader(*val, shuffle=False, **common), val_seqs


def build_model(cfg: RunConfig) -> GPT:
    if cfg.init_from == "scratch":
        config = GPTConfig(block_size=cfg.block_size or cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                           n_embd=cfg.n_embd, dropout=cfg.dropout)
        return GPT(config)
    try:
        return GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None


def train(cfg: RunConfig, d: Dist, argv: list[str]):
    log = RunLog(cfg.log_dir, d.is_main)
    print0 = log.print0
    grad_accum_steps = check_batch_sizes(cfg, d.world_size)
    seqs_per_step = cfg.total_batch_size // cfg.seq_len
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if d.device_type == "cpu":
        keep_freed_memory()
    if d.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_context(d.device_type)
    use_compile = cfg.compile if cfg.compile is not None else d.device_type == "cuda"

    train_loader, val_loader, val_seqs = build_data(cfg, d, seqs_per_step)
    raw_model = build_model(cfg)
    if cfg.seq_len > raw_model.config.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {raw_model.config.block_size}")
    raw_model.to(d.device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, d.device_type)
    # fp16 (GPUs without bf16) needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda") if d.device_type == "cuda" and not torch.cuda.is_bf16_supported() else None

    # resume: weights, optimizer, step, data position and random state of an interrupted run
    start_step, skipped_total, last_val = 0, 0, None
    resume_path = latest_checkpoint(cfg.log_dir) if cfg.resume == "auto" else (cfg.resume or None)
    if cfg.resume == "auto" and resume_path is None:
        print0(f"--resume auto: no checkpoint in {cfg.log_dir} yet, starting from scratch")
    if resume_path:
        ckpt = read_checkpoint(resume_path, map_location=d.device)
        diffs = config_differences(asdict(GPTConfig(**ckpt["model_config"])), asdict(raw_model.config))
        if diffs:
            raise CheckpointError(f"{resume_path}: the checkpoint's model differs from this run's: " + "; ".join(diffs))
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        saved_run = ckpt["run_config"]
        data_keys = ("seed", "seq_len", "total_batch_size", "input", "data_dir")
        data_diffs = [f"--{k.replace('_', '-')} {saved_run.get(k)!r} -> {getattr(cfg, k)!r}" for k in data_keys if saved_run.get(k) != getattr(cfg, k)]
        if data_diffs:
            print0(f"warning: {', '.join(data_diffs)}: the data order differs from the original run")
        train_loader.load_state_dict(ckpt["train_loader"])
        if ckpt["world_size"] == d.world_size:
            set_rng_state(ckpt["rng"][d.rank])
        else:
            print0(f"warning: checkpoint made by {ckpt['world_size']} processes, now {d.world_size}: weights, optimizer, "
                   f"step and data position are kept (a step's data does not depend on the number of processes); "
                   f"per-process random states are not restored")
        start_step, skipped_total, last_val = ckpt["step"], ckpt.get("skipped_steps", 0), ckpt.get("val_loss")
        print0(f"resumed from {resume_path} at step {start_step}")
        del ckpt
    if d.is_main:
        os.makedirs(cfg.log_dir, exist_ok=True)
    log.start(run_header(argv, d), resume_step=start_step if resume_path else None)

    # what trains: maybe compiled, maybe DDP-wrapped; raw_model (same weights) is what we save and sample
    model = torch.compile(raw_model) if use_compile else raw_model
    ddp_model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None, gradient_as_bucket_view=True) if d.ddp else model

    enc = None
    hellaswag_examples = None
    if cfg.hellaswag_every:
        import hellaswag

        hellaswag_examples = hellaswag.load_examples(cfg.hellaswag_data or None, split="val", limit=cfg.hellaswag_limit or None)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = device_peak_flops(d)
    nan_steps = {int(s) for s in cfg.inject_nan.split(",") if s.strip()}
    stop = StopRequest()
    stop.install()

    print0(f"model: {raw_model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOP per token (6N + 12LCT)")
    print0(f"device: {d.device} x {d.world_size} process(es), autocast: {'bf16/fp16' if d.device_type == 'cuda' else 'fp32'}, compile: {use_compile}")
    print0(f"batch: {cfg.total_batch_size:,} tokens per step = {cfg.batch_size} x {cfg.seq_len} x {d.world_size} processes x {grad_accum_steps} micro-steps")
    print0(f"data: {train_loader.seqs_per_epoch:,} training sequences per epoch ({train_loader.seqs_per_epoch / seqs_per_step:.1f} steps)")

    bad_in_a_row = 0
    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1

        if cfg.val_every and (step % cfg.val_every == 0 or last_step):
            model.eval()
            last_val = validation_loss(model, val_loader, val_seqs, d.device, autocast, d.rank, d.world_size)
            model.train()
            print0(f"step {step:5d} | val loss {last_val:.4f}")
            log.record(step, "val", last_val)

        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last_step):
            import hellaswag  # scoring lives there; the raw model shares the trained weights

            raw_model.eval()
            result = hellaswag.evaluate(raw_model, hellaswag_examples, device=d.device, batch_size=max(1, cfg.batch_size // 4),
                                        autocast=autocast, rank=d.rank, world_size=d.world_size)
            raw_model.train()
            print0(f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['correct_norm']}/{result['n']})")
            log.record(step, "hella", result["acc_norm"])

        if cfg.sample_every and (step % cfg.sample_every == 0 or last_step) and step > 0:
            from fineweb import gpt2_tokenizer

            enc = enc or gpt2_tokenizer()
            raw_model.eval()
            samples = sample_text(raw_model, enc, "Hello, I'm a language model,", 4, 32, d.device, autocast,
                                  seed=cfg.seed + 1000 * d.rank + step)
            raw_model.train()
            for i, text in enumerate(samples):
                print(f"rank {d.rank} sample {i}: {text!r}", flush=True)

        # ---- one optimization step: grad_accum_steps micro-batches, then one update ----
        t0 = time.perf_counter()
        loss_accum = forward_backward(ddp_model, optimizer, train_loader, grad_accum_steps, d, autocast, scaler)
        if step in nan_steps:
            loss_accum = loss_accum * float("nan")
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # one all-reduce per step: the loss averaged over ranks, and whether any rank was told to stop
        stats = torch.stack([loss_accum.float(), torch.tensor(float(stop.requested), device=d.device)])
        if d.ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        loss_value, stop_now = stats[0].item() / d.world_size, stats[1].item() > 0
        norm_value = norm.item()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            bad_in_a_row = 0
        else:  # a non-finite loss or gradient: skip the update, keep the weights
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            skipped_total += 1
            log.record(step, "skipped", skipped_total)
            print0(f"step {step:5d} | non-finite loss {loss_value} / grad norm {norm_value}: update skipped "
                   f"({bad_in_a_row} in a row, {skipped_total} in all)")
            if bad_in_a_row >= cfg.max_bad_steps:
                last = latest_checkpoint(cfg.log_dir)
                raise TrainingError(
                    f"{bad_in_a_row} non-finite losses in a row at step {step}: stopping. The last good checkpoint is "
                    f"{last or '(none)'}; lower --max-lr or raise --warmup-steps, then --resume auto"
                )
        if d.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_per_sec = cfg.total_batch_size / dt
        mfu = f" | mfu {100 * flops_per_token * tokens_per_sec / d.world_size / peak:.1f}%" if peak else ""
        print0(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
               f"dt {1000 * dt:.1f}ms | tok/sec {tokens_per_sec:,.0f}{mfu}")
        log.record(step, "train", loss_value)

        done = step + 1
        periodic = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or last_step)
        # no periodic checkpoint during a run of non-finite losses: keep the last good ones on disk
        if (periodic and bad_in_a_row == 0) or stop_now:
            rngs = [None] * d.world_size
            if d.ddp:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs[0] = rng_state()
            if d.is_main:
                t_save = time.perf_counter()
                path = save_checkpoint(cfg.log_dir, {
                    "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": done,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "train_loader": train_loader.state_dict(), "rng": rngs,
                    "model_config": asdict(raw_model.config), "run_config": asdict(cfg),
                    "world_size": d.world_size, "val_loss": last_val, "skipped_steps": skipped_total,
                }, keep=cfg.keep_checkpoints)
                print0(f"saved {path} ({time.perf_counter() - t_save:.2f}s)")
            if d.ddp:
                dist.barrier()
        if stop_now:
            print0(f"stopped by signal after step {step}; continue with --resume auto")
            return


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        d = setup_distributed(cfg.device)
    except ConfigError as e:
        print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train(cfg, d, ["train_gpt2.py", *argv])
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
