"""
train_gpt2.py: GPT-2 (124M) from scratch, in one file you can read top to bottom.

Sections, in the order of the lecture: the model (and OpenAI's weights), the data loader, the
learning-rate schedule, evaluation, checkpoints, setup (processes, devices, precision), the command
line, and the training loop (gradient accumulation, DDP) at the end.

    python train_gpt2.py --preset shakespeare              # CPU or Mac: Tiny Shakespeare, minutes
    python train_gpt2.py --input my.txt                    # your own text, the same small settings
    python train_gpt2.py                                   # one GPU: GPT-2 124M on FineWeb-Edu (python fineweb.py)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py                  # eight GPUs: the 10B-token run
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_gpt2.py
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_gpt2.py --resume auto  # survive crashes
    python train_gpt2.py --init-from gpt2 --max-lr 1e-4 ...                 # fine-tune OpenAI's weights
    python train_gpt2.py --eval-only --resume auto --export-hf my-gpt2      # evaluate, sample and export

Every flag and its default: python train_gpt2.py --help; the README is the manual. A run writes into
--log-dir: log.txt (one `STEP KIND VALUE` record per line), checkpoints, and TensorBoard curves with
--tensorboard.
"""
import argparse
import inspect
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from fineweb import EOT, SHARD_RE, atomic_write, download, gpt2_bpe_files, gpt2_tokenizer

# -----------------------------------------------------------------------------------------------
# The model

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
    # never sampled and never scored (see GPT.vocab_bias).
    vocab_multiple: int = 128

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled at init, see GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.layer_idx, self.dropout = config.n_head, layer_idx, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
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
        if kv_cache is not None:  # generation: attend to the keys and values of earlier tokens too
            past = kv_cache.length_of(self.layer_idx)
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        if attn_mask is not None:  # HellaSwag's packed rows bring their own mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif past == 0:  # training: flash attention on GPU, the (T, T) matrix is never stored
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token attends to everything cached
        else:  # several new tokens after a cached prefix: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


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


# Hugging Face GPT-2 stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding table (GPT-2 does this)
        self.transformer.wte.weight = self.lm_head.weight
        # Speed: 0 for real tokens, -inf for the padded rows, added inside the lm_head matmul. The
        # padded logits get zero probability, so the softmax is exactly the one over the real
        # vocabulary, with no slicing copy of the (B*T, 50304) logits before the loss: the shakespeare
        # preset's step is 1.11x faster than with the slice (2-core CPU, 20 alternating rounds,
        # quartiles 1.06-1.14x). Not saved: it follows from the config.
        vocab_bias = torch.zeros(config.padded_vocab_size)
        vocab_bias[config.vocab_size :] = float("-inf")
        self.register_buffer("vocab_bias", vocab_bias, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) weights, zero biases; the two projections that write into the residual
        # stream get std / sqrt(2 * n_layer), so the stream's variance does not grow with depth
        # (each block adds to it twice).
        if isinstance(module, nn.Linear):
            std = 0.02 / (math.sqrt(2 * self.config.n_layer) if getattr(module, "RESIDUAL_PROJECTION", False) else 1)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, pos=None, attn_mask=None, kv_cache=None):
        """Final-LayerNorm outputs (B, T, C) for tokens idx (B, T).

        pos: position ids (T,) or (B, T); default 0..T-1, or following the cached prefix.
        attn_mask: boolean (B or 1, 1, T, T_keys), True where a query may attend; default causal."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if past + T > self.config.block_size:
                bs = self.config.block_size
                raise ValueError(f"sequence of {past + T} tokens is longer than the model's block_size {bs}: "
                                 f"crop the input to the last {bs} tokens")
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

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Parameters (the tied embedding/lm_head table counted once, padded rows included)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_position_embeddings else n - self.transformer.wpe.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper (appendix B):
        6 * N + 12 * n_layer * n_embd * T. N counts the parameters without position embeddings (the
        token table counts: it is also the lm_head matmul); 6 = 2 (multiply-add) x 3 (forward, and
        backward for inputs and weights); the second term is attention's QK^T and AV."""
        T = seq_len or self.config.block_size
        N = self.num_params(include_position_embeddings=False)
        return 6 * N + 12 * self.config.n_layer * self.config.n_embd * T

    def configure_optimizer(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95), eps=1e-8):
        """AdamW; weight decay on matrices and embeddings (2-D), none on biases and LayerNorm."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel updates each tensor in one pass (on a CPU, 13% faster shakespeare steps than
        # the per-operation loop); CUDA and CPU have one
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        temperature == 0 is greedy; top_k keeps the k most likely tokens; `generator` (a
        torch.Generator on idx's device) makes sampling reproducible. The context is cropped to the
        last block_size tokens. With use_cache, each new token costs one token's forward pass (the
        keys and values of earlier tokens are kept); once the context is full, cropping shifts every
        position, so the cache is rebuilt from the cropped context."""
        block_size, cache = self.config.block_size, None
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
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # --- OpenAI's weights, through Hugging Face's format, in and out ---------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> "GPT":
        """OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, from the Hugging Face hub) or a
        local directory in Hugging Face GPT-2 format (config.json + model.safetensors or
        pytorch_model.bin). dropout: for fine-tuning (the weights do not depend on it)."""
        import json

        if os.path.isdir(name_or_dir):
            folder = name_or_dir
        elif name_or_dir in HF_MODEL_NAMES:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(f"openai-community/{name_or_dir}",
                                       allow_patterns=["config.json", "*.safetensors"])
        else:
            raise ValueError(f"{name_or_dir!r} is neither a local directory nor one of {', '.join(HF_MODEL_NAMES)}")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: a Hugging Face GPT-2 directory needs config.json")
        with open(config_path) as f:
            hf = json.load(f)
        model = cls(GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                              n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout))
        model.load_hf_state_dict(_read_hf_weights(folder))
        return model

    def load_hf_state_dict(self, hf_sd: dict):
        """Copy a Hugging Face GPT-2 state dict (keys with or without 'transformer.') into this model."""
        hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
        # causal-mask buffers of old transformers versions and the tied lm_head are not weights to copy
        hf_sd = {k: v for k, v in hf_sd.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        ours = {k.removeprefix("transformer."): v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(ours) - set(hf_sd)), sorted(set(hf_sd) - set(ours))
        if missing or unexpected:
            raise ValueError(f"GPT-2 checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        V = self.config.vocab_size
        with torch.no_grad():
            for k, dst in ours.items():
                src = hf_sd[k].t() if k.endswith(HF_CONV1D_WEIGHTS) else hf_sd[k]
                want = (V, dst.shape[1]) if k == "wte.weight" else dst.shape  # padded rows are ours alone
                if tuple(src.shape) != tuple(want):
                    raise ValueError(f"shape mismatch for tensor {k!r}: checkpoint has {tuple(src.shape)}, model "
                                     f"expects {tuple(want)} (check n_layer/n_head/n_embd/n_positions/vocab_size in "
                                     f"config.json)")
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
            v = v.detach().t() if k.endswith(HF_CONV1D_WEIGHTS) else v.detach()
            out[k] = (v[: self.config.vocab_size] if k == "transformer.wte.weight" else v).contiguous().clone()
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def export_hf(self, out_dir: str):
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads with the
        same logits as this model, with the GPT-2 tokenizer beside it."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True))
        result = hf.load_state_dict(self.hf_state_dict(), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(k.endswith(".attn.bias") for k in result.missing_keys), result.missing_keys
        hf.save_pretrained(out_dir)
        # OpenAI's encoder.json is Hugging Face's vocab.json, vocab.bpe its merges.txt: with them, other
        # tools (lm-evaluation-harness) need nothing else
        vocab_bpe, encoder_json = gpt2_bpe_files()
        shutil.copyfile(encoder_json, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(vocab_bpe, os.path.join(out_dir, "merges.txt"))
        return out_dir


def _read_hf_weights(folder: str) -> dict:
    """State dict from a Hugging Face model folder (safetensors preferred, else pytorch_model.bin)."""
    st, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


class CrossEntropy(torch.autograd.Function):
    """Memory: F.cross_entropy's value and gradient for logits (N, V) and targets (N,) (-1 ignored),
    with a backward that allocates nothing.

    With V = 50k classes the logits are the largest tensors of a step. F.cross_entropy's backward
    allocates and writes two new (N, V) tensors (a zeroed gradient for the NLL, then the
    log-softmax's); here the gradient, (softmax - onehot(target)) / N, is written in place over the
    saved fp32 log-probabilities, which are ours alone and not needed again. That is one (N, V) fp32
    tensor less at the peak: 978 vs 1,161 MB resident for the shakespeare preset's step, 13 GB at
    GPT-2 124M's B=64, T=1024; the step time is the same (1.00x, 2-core CPU). Eager mode only (CPU,
    MPS, --no-compile): under torch.compile, GPT.forward uses F.cross_entropy, which the compiler fuses."""

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


class KVCache:
    """For generate(): the keys and values of the tokens seen so far, one (k, v) pair per layer."""

    def __init__(self, n_layer: int):
        self.layers = [None] * n_layer

    def length_of(self, layer: int) -> int:
        return 0 if self.layers[layer] is None else self.layers[layer][0].size(2)

    @property
    def length(self) -> int:
        return self.length_of(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's keys/values (B, nh, T, hs) and return all of them so far."""
        if self.layers[layer] is not None:
            k, v = torch.cat([self.layers[layer][0], k], dim=2), torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


# -----------------------------------------------------------------------------------------------
# The data loader

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


def find_shards(data_dir: str, split: str) -> list[str]:
    """Shard files `<prefix>_<split>_<NNNNNN>.npy` of a split (fineweb.py writes them), in index order."""
    fix = "run `python fineweb.py` to build them, or train on a text file with `--preset shakespeare` / `--input FILE`"
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory: {fix}")
    matches = [m for m in map(SHARD_RE.fullmatch, os.listdir(data_dir)) if m and m["split"] == split]
    found = sorted((int(m["index"]), m[0]) for m in matches)
    if not found:
        raise DataError(f"{data_dir}: no {split} shards (*_{split}_NNNNNN.npy): {fix}")
    return [os.path.join(data_dir, name) for _, name in found]


def open_shard(path: str) -> np.ndarray:
    """Memory-map a shard and check it: 1-D uint16, and a sample of its ids < 50257 (the loader checks
    every id it reads)."""
    fix = "rebuild it with `python fineweb.py` (or delete it)"
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated file, bad header, not a .npy at all
        raise DataError(f"{path}: unreadable shard ({e}); {fix}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise DataError(f"{path}: shard has dtype {tokens.dtype} and shape {tokens.shape}, expected 1-D uint16; {fix}")
    sample = np.concatenate([tokens[: 1 << 16], tokens[:: max(1, len(tokens) // (1 << 16))]])  # the start, and a stride
    if len(sample) and int(sample.max()) >= GPT2_VOCAB_SIZE:
        raise DataError(f"{path}: token id {int(sample.max())} >= {GPT2_VOCAB_SIZE}: not GPT-2 tokens; {fix}")
    return tokens


def load_shards(data_dir, split):
    paths = find_shards(data_dir, split)
    return [open_shard(p) for p in paths], paths


def load_text(path: str, val_fraction: float = 0.1):
    """A UTF-8 text file as one document: tokenized once; the last 10% of tokens is validation.
    input.txt (Tiny Shakespeare) is downloaded when it is missing."""
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder: pass --input with a text file (or build shards with `python fineweb.py`)")
    if not os.path.isfile(path):
        if os.path.basename(path) != "input.txt":
            raise DataError(f"{path}: no such file: pass --input with a plain text file")
        try:
            download(TINY_SHAKESPEARE_URL, path)
        except OSError as e:
            raise DataError(f"{path}: missing, and downloading Tiny Shakespeare failed ({e}); download "
                            f"{TINY_SHAKESPEARE_URL} to {path} by hand, or pass --input with another text file"
                            ) from None
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        raise DataError(f"{path}: byte {raw.index(0):,} is NUL: a binary file, not text; "
                        f"pass --input with a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start:,} is 0x{raw[e.start]:02x}); convert it to UTF-8 "
                        f"(for example `iconv -f latin1 -t utf-8`) or pass another --input") from None
    ids = np.array([EOT] + gpt2_tokenizer().encode_ordinary(text), dtype=np.uint16)  # <|endoftext|> opens a document
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:]


def count_sequences(arrays, T: int) -> int:
    return sum((len(a) - 1) // T for a in arrays)


def describe(names) -> str:
    return ", ".join(names[:3]) + ("..." if len(names) > 3 else "")


class DataLoader:
    """Batches of sequences (x, y = the same tokens shifted by one) from token arrays.

    Every array (a shard, or a split of a text file) is cut into sequences of T + 1 tokens with
    stride T (the < T tokens at an array's end are left out). Sequences are numbered globally:
    sequence g belongs to epoch g // sequences_per_epoch. With `shuffle`, each epoch visits the
    arrays in a fresh random order and each array's sequences in a fresh random order, both drawn
    from (seed, epoch), so the loss curve has no periodic wave. Optimizer step s uses sequences
    [s * N, (s + 1) * N), N = sequences per optimizer step; rank r's micro-step m takes the B of
    them starting at (m * world_size + r) * B. So the data of a step depends on the seed, T and N
    only, never on B or the number of ranks, and `state_dict()` is one integer."""

    def __init__(self, arrays, names, B, T, seqs_per_step, rank=0, world_size=1, seed=0, shuffle=True):
        if seqs_per_step % (B * world_size):
            raise ValueError(f"{seqs_per_step} sequences per step do not split into micro-batches of {B} x "
                             f"{world_size} ranks")
        self.arrays, self.names = list(arrays), list(names)
        self.B, self.T, self.seqs_per_step = B, T, seqs_per_step
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.grad_accum_steps = seqs_per_step // (B * world_size)
        self.counts = np.array([(len(a) - 1) // T for a in self.arrays], dtype=np.int64)
        self.seqs_per_epoch = int(self.counts.sum())
        self.position = 0  # sequences consumed by all ranks before the current optimizer step
        self.micro_step = 0
        self._epoch = None

    def _order(self, epoch):
        """(array visiting order, start offset of each visited array) for an epoch, cached."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.arrays)) if self.shuffle else np.arange(len(self.arrays))
            self._epoch, self._array_order, self._perms = epoch, order, {}
            self._starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        return self._array_order, self._starts

    def locate(self, g: int):
        """Global sequence number -> (array index, first token) of that sequence."""
        epoch, i = divmod(g, self.seqs_per_epoch)
        order, starts = self._order(epoch)
        slot = int(np.searchsorted(starts, i, side="right") - 1)
        a, j = int(order[slot]), i - int(starts[slot])
        if self.shuffle:
            if a not in self._perms:
                self._perms[a] = np.random.default_rng([self.seed, epoch, a + 1]).permutation(int(self.counts[a]))
            j = int(self._perms[a][j])
        return a, j * self.T

    def tokens(self, seq_numbers) -> np.ndarray:
        """Sequences by global number -> uint16 array (len, T + 1), every id checked: a max() over
        B x (T + 1) ints, 2.4 us for 64 x 1,025 against 0.4 ms to gather them (dev CPU), where
        checking whole shards up front would read all of FineWeb-Edu's 20 GB before step 0."""
        rows = []
        for g in seq_numbers:
            a, start = self.locate(int(g))
            rows.append(self.arrays[a][start : start + self.T + 1])  # uint16 view of the memory map
        tokens = np.stack(rows)
        if tokens.max(initial=0) >= GPT2_VOCAB_SIZE:
            r, c = np.argwhere(tokens >= GPT2_VOCAB_SIZE)[0]
            a, start = self.locate(int(seq_numbers[r]))
            raise DataError(f"{self.names[a]}: token id {tokens[r, c]} at position {start + c:,} is not a GPT-2 token "
                            f"(ids must be < {GPT2_VOCAB_SIZE}): rebuild the shard with `python fineweb.py`")
        return tokens

    def batch(self, seq_numbers, device=None):
        """Sequences by global number -> (x, y) int64 tensors of shape (len, T), on `device`."""
        buf = torch.from_numpy(self.tokens(seq_numbers).astype(np.int64))  # only this batch becomes int64
        if device is not None and device.type == "cuda":
            # Speed: one copy of the contiguous (B, T + 1) block, from pinned (page-locked) memory, is queued
            # without making the CPU wait, so it goes on launching the step's kernels; x and y are views of it
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            buf = buf.to(device)
        return buf[:, :-1], buf[:, 1:]

    def next_batch(self, device=None):
        """This rank's next micro-batch (x, y), each (B, T), on `device`."""
        first = self.position + (self.micro_step * self.world_size + self.rank) * self.B
        x, y = self.batch(range(first, first + self.B), device)
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


# -----------------------------------------------------------------------------------------------
# The learning-rate schedule


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
# Evaluation (HellaSwag lives in hellaswag.py)


@torch.no_grad()
def validation_loss(model, loader: DataLoader, num_seqs: int, device, autocast, rank=0, world_size=1) -> float:
    """Mean loss over the first num_seqs validation sequences (a fixed set, whatever the world size).

    Rank r takes sequences r, r + world, ...; batches keep the training shape (B, T), the last one
    padded with targets of -1 (ignored), so a compiled model sees no new shape. Summed losses and
    token counts are all-reduced, so the mean is over exactly the same tokens on 1 or 8 GPUs. Each
    batch's sum is fp32 on the device (MPS has no float64); they are added up in float64 on the host."""
    mine = list(range(rank, num_seqs, world_size))
    B, T = loader.B, loader.T
    sums = []  # per batch: (summed loss, scored tokens), fp32 on the device
    for i in range(0, len(mine), B):
        x, y = loader.batch(mine[i : i + B])
        if len(x) < B:  # pad to the training shape; padded rows score nothing
            x = torch.cat([x, torch.zeros(B - len(x), T, dtype=x.dtype)])
            y = torch.cat([y, torch.full((B - len(y), T), -1, dtype=y.dtype)])
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y, return_logits=False)  # a compiled model would otherwise output all logits
        n = (y != -1).sum().float()
        sums.append(torch.stack([loss.float() * n, n]))
    total = torch.stack(sums).cpu().double().sum(dim=0) if sums else torch.zeros(2, dtype=torch.float64)
    if world_size > 1:
        total = total.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_text(model, prompt, num_samples, max_new_tokens, device, autocast, seed, top_k=50):
    """Samples from the raw model. Generation uses the KV cache at shapes that change every token,
    which a compiled model would recompile for; the raw module shares the trained weights, and
    sampling is a small share of a run's time, so it runs uncompiled. An empty prompt starts from
    <|endoftext|>."""
    enc = gpt2_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=top_k, generator=generator)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------------------------
# Checkpoints and the run folder

CHECKPOINT_FORMAT = "build-gpt2-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{6,})\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, foreign, or for another model)."""


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise CheckpointError naming the file. Always onto
    the CPU: the random states in it must stay CPU tensors (torch.set_rng_state and
    torch.cuda.set_rng_state take nothing else); load_state_dict copies the rest to the device."""
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint file"
        raise CheckpointError(f"{path}: {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); it may be truncated by a "
                              f"crash during saving: use an earlier checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train_gpt2.py checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')}, this script reads "
                              f"{CHECKPOINT_VERSION}")
    return ckpt


def load_model_from_checkpoint(path: str, device="cpu") -> GPT:
    """The trained model of a checkpoint (for evaluation, sampling, the notebook), in eval mode."""
    ckpt = read_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def rng_state(device_type: str) -> dict:
    """The random states a run draws from: Python's, NumPy's, torch's CPU one and its device's (dropout)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device_type in ("cuda", "mps"):
        state[device_type] = getattr(torch, device_type).get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device_type in state:
        getattr(torch, device_type).set_rng_state(state[device_type])


def checkpoint_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, f"ckpt_{step:06d}.pt")


def checkpoint_steps(log_dir: str) -> list[int]:
    """Steps of the checkpoints in a folder, oldest first."""
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    return sorted(int(m[1]) for m in map(CHECKPOINT_NAME.fullmatch, names) if m)


def save_checkpoint(log_dir: str, state: dict, keep: int) -> str:
    """Write ckpt_<step>.pt safely, then point LOG_DIR/latest at it, then prune old checkpoints. A
    failed write (a full disk) is a CheckpointError; the previous checkpoint and `latest` are untouched."""
    path = checkpoint_path(log_dir, state["step"])
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        # "latest" is updated only once the checkpoint it names is complete on disk
        atomic_write(os.path.join(log_dir, "latest"), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        previous = [s for s in checkpoint_steps(log_dir) if s != state["step"]]
        kept = f"{checkpoint_path(log_dir, previous[-1])} is intact" if previous else "no earlier checkpoint exists"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        free = shutil.disk_usage(log_dir).free / 1e9
        raise CheckpointError(f"{path}: could not be written ({reason}; {free:.1f} GB free in {log_dir}); {kept}: "
                              f"free some space, then continue with --resume auto") from None
    if keep > 0:  # the newest `keep` up to this one stay; later ones (from before a resume) are not ours to delete
        older = [s for s in checkpoint_steps(log_dir) if s < state["step"]]
        for step in older[: max(0, len(older) - (keep - 1))]:
            os.remove(checkpoint_path(log_dir, step))
    return path


def latest_checkpoint(log_dir: str, say=lambda *a: None) -> str | None:
    """The checkpoint LOG_DIR/latest names (it is updated only after a complete save), else the one of
    the highest step; None when the folder has none."""
    pointer = os.path.join(log_dir, "latest")
    if os.path.isdir(pointer):
        raise CheckpointError(f"{pointer}: a folder where a file naming the latest checkpoint belongs: remove it")
    if os.path.isfile(pointer):
        with open(pointer, "rb") as f:
            name = f.read(200).decode("utf-8", "replace").strip()
        if CHECKPOINT_NAME.fullmatch(name) and os.path.isfile(os.path.join(log_dir, name)):
            return os.path.join(log_dir, name)
        say(f"warning: {pointer} names {name!r}, which is not a checkpoint in {log_dir}; using the newest one")
    steps = checkpoint_steps(log_dir)
    return checkpoint_path(log_dir, steps[-1]) if steps else None


def find_resume_checkpoint(log_dir: str, say) -> tuple[str | None, dict | None]:
    """--resume auto: (path, contents) of the latest checkpoint, or of the newest readable one if that
    one is damaged; (None, None) when the folder has none."""
    path = latest_checkpoint(log_dir, say)
    candidates = [path] + [checkpoint_path(log_dir, s) for s in reversed(checkpoint_steps(log_dir))] if path else []
    for path in dict.fromkeys(candidates):  # in order, without repeats
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            say(f"warning: {e}; trying an older one")
    return None, None


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


class RunFolder:
    """The --log-dir of one run: a writable folder, locked by rank 0 while the run lives.

    The lock is an flock on LOG_DIR/.lock, which the kernel drops when the process dies in any way
    (kill -9 included), so it never outlives its run; the file holds the owner's pid for the error
    message. Another run's files (log.txt, latest, checkpoints, TensorBoard events) in the folder
    stop a new run unless it resumes (--resume) or clears them (--overwrite)."""

    def __init__(self, path: str):
        self.path, self.lock_fd = path, None

    def prepare(self, resuming: bool, overwrite: bool):
        """Before anything is built: a folder, locked, holding no other run (unless resuming or
        overwriting it: its files are deleted only by clear(), once everything else has been checked)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"--log-dir {self.path}: a file, not a folder; pass another --log-dir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--log-dir {self.path}: cannot create it ({e.strerror}); pass another --log-dir"
                              ) from None
        self.lock()
        if self.other_run() and not resuming and not overwrite:
            raise ConfigError(f"--log-dir {self.path} holds another run ({describe(self.other_run())}): continue "
                              f"it with --resume auto, pass another --log-dir, or pass --overwrite to delete that "
                              f"run first")

    def lock(self):
        """Become the folder's one writer, or raise ConfigError naming the process that is."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder is not locked there
            return
        try:
            fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--log-dir {self.path}: not writable ({e.strerror}); pass another --log-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"--log-dir {self.path}: in use by another run (pid {holder}); wait for it to end, "
                              f"or pass another --log-dir") from None
        except OSError as e:  # a file system without locks (some network mounts)
            print(f"warning: --log-dir {self.path}: cannot be locked ({e.strerror}); one run at a time, please")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd  # held open (and locked) until the process exits

    def other_run(self) -> list[str]:
        """Files of a run in the folder: log.txt, latest, checkpoints, TensorBoard events."""
        return [n for n in sorted(os.listdir(self.path)) if n in ("log.txt", "latest") or CHECKPOINT_NAME.fullmatch(n)
                or n.startswith("events.out.tfevents.")]

    def clear(self, overwrite: bool, say):
        """With --overwrite, delete the other run's files; always, the temporary files of a killed save."""
        theirs = self.other_run() if overwrite else []
        stale = [n for n in os.listdir(self.path) if n.startswith(".") and n.endswith(".tmp")]  # a killed save's
        for n in theirs + stale:
            os.remove(os.path.join(self.path, n))
        if theirs:
            say(f"--overwrite: deleted the previous run's files in {self.path}")


# -----------------------------------------------------------------------------------------------
# Setup: processes and devices, precision, the log, signals


class ConfigError(ValueError):
    """A command-line setting that cannot work; the message names the flag and the fix."""


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
    """The one setup of processes and devices (training, hellaswag.py): detect torchrun (RANK,
    LOCAL_RANK, WORLD_SIZE in the environment), pick the device, and join the process group: NCCL on
    CUDA, gloo on CPU."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device_arg}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device_arg}: no CUDA device is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":  # under torchrun, each process takes the GPU of its local rank
        device = torch.device("cuda", local_rank if world_size > 1 or device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1:
        if device.type == "mps":
            raise ConfigError("torchrun with --device mps is not supported: use --device cpu or one process")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device, device.type)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The one precision decision (training, hellaswag.py and the benchmarks ask here): the dtype of
    the matmuls in every forward pass. `auto` gives bf16 on a GPU with bf16 tensor cores (compute
    capability 8.0 or higher: A100, H100, RTX 30xx/40xx), fp16 on older GPUs (V100, T4; there
    torch.cuda.is_bf16_supported() answers True since torch 2.4, counting slow emulation), and fp32 on
    CPU and MPS. Weights, optimizer state and the loss stay fp32 whatever the dtype."""
    if requested not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype {requested}: choose auto, {', '.join(DTYPES)}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"--dtype bf16: {name} (compute capability {major}.{minor}) has no bf16 hardware; "
                              f"use --dtype fp16 (or auto)")
        if requested == "auto":
            return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32 if requested == "auto" else DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def autocast_context(device_type: str, dtype: torch.dtype):
    """The one autocast context, built once and entered around every forward pass (none for fp32)."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, dtype: torch.dtype):
    """fp16 has 5 exponent bits: small gradients underflow to 0 and big ones overflow. A GradScaler
    multiplies the loss by a large scale before backward, unscales the gradients before clipping,
    skips any step whose gradients overflowed and then halves the scale (it doubles it again after
    2,000 clean steps). bf16 has fp32's range and fp32 needs nothing: None for those."""
    return torch.amp.GradScaler(device_type) if dtype == torch.float16 else None


def synchronize(device: torch.device):
    """Wait for the device's queued work: GPU work is asynchronous, so a clock read without this times
    only the launching of kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_freed_memory():
    """Speed, on Linux (glibc) CPUs: keep freed memory in the process instead of giving it back.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, and the kernel
    then zeroes each 4 KB page on first touch. A CPU training step allocates and frees its (tokens x
    50304) logits and their gradient several times, so without this about a third of the step is
    spent in page faults (shakespeare preset on a 2-core CPU: 2,200 -> 3,050 tokens/s). Memory that
    is freed stays reserved by the process for the next step. No effect where mallopt is missing."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    ok = mallopt(M_MMAP_MAX, 0)  # every allocation comes from the heap, none from its own mmap
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap
    ok &= mallopt(M_TOP_PAD, 64 << 20)  # grow it 64 MB at a time
    return bool(ok)


# Dense (no sparsity) peak FLOP/s of one GPU at the precision training uses there: bf16 with fp32
# accumulation, or fp16 on GPUs older than Ampere (V100, T4). From NVIDIA's data sheets.
GPU_PEAK_FLOPS = {
    "H100": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12, "H200 NVL": 835e12,
    "GH200": 989e12, "H800": 989e12, "H800 PCIe": 756e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A10": 125e12, "A40": 149.7e12, "RTX A6000": 154.8e12,
    "L4": 121e12, "L40": 181e12, "L40S": 362e12, "RTX 6000": 364.2e12,  # RTX 6000 = RTX 6000 Ada
    "RTX 3090": 71e12, "RTX 4090": 165.2e12,
    "V100": 125e12, "V100 PCIe": 112e12, "V100S": 130e12, "T4": 65e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s (GPU_PEAK_FLOPS) of a GPU from its torch.cuda.get_device_name(), or None if unknown.

    Matched on the exact model, never a substring (an "L40S" is not an "L4"): the vendor words are
    dropped, the first word (two for "RTX 4090"-style names) is the model, and a PCIe or NVL form
    factor, which runs at a lower clock, is added when the name says so: "NVIDIA H100 80GB HBM3" ->
    "H100", "NVIDIA H100 PCIe" -> "H100 PCIe", "Tesla V100-SXM2-16GB" -> "V100"."""
    words = [w for w in re.split(r"[\s\-_]+", device_name.upper()) if w and w not in ("NVIDIA", "TESLA", "GEFORCE")]
    if not words or "MIG" in words:  # a MIG slice has a fraction of the GPU's peak
        return None
    n = 2 if words[0] in ("RTX", "QUADRO") and len(words) > 1 else 1
    n += sum(1 for w in words[n : n + 2] if w in ("TI", "SUPER", "D"))  # "RTX 3090 Ti" is not an "RTX 3090"
    model = " ".join(words[:n])
    form = next((f for f in ("PCIE", "NVL") if f in words[1:]), None)
    table = {key.upper(): flops for key, flops in GPU_PEAK_FLOPS.items()}
    return table.get(f"{model} {form}") or table.get(model)


LOG_RECORD = re.compile(r"(\d+) (\w+) (\S+)")
TENSORBOARD_TAGS = {"train": "loss/train", "val": "loss/val", "hella": "hellaswag/acc_norm"}


def parse_record(line: str):
    """A log.txt line -> (step, kind, value), or None for a line that is not a record."""
    m = LOG_RECORD.fullmatch(line.strip())
    try:
        return (int(m[1]), m[2], float(m[3])) if m else None
    except ValueError:
        return None


class RunLog:
    """print0 (rank 0 prints) and the run's records: LOG_DIR/log.txt, one `STEP KIND VALUE` per line,
    and with --tensorboard the same values (and lr, grad norm, tokens/s, MFU) as TensorBoard scalars
    in LOG_DIR. With log_dir None (--eval-only) it only prints."""

    def __init__(self, log_dir: str | None, is_main: bool, tensorboard: bool = False):
        self.is_main, self.tensorboard, self.writer = is_main, tensorboard, None
        self.log_dir = log_dir if is_main else None
        self.path = os.path.join(log_dir, "log.txt") if self.log_dir else None

    def print0(self, *args):
        if self.is_main:
            print(*args, flush=True)

    def start(self, header_lines, resume_step=None):
        """New run: write the header. Resumed run: keep the records before resume_step, then append."""
        if self.path is None:
            return
        kept, dropped = [], 0
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    record = parse_record(line)
                    if line.startswith("#") or (record and record[0] < resume_step):
                        kept.append(line)  # later records were made by the lost part of the run
                    elif record is None and line.strip():
                        dropped += 1
            if dropped:
                self.print0(f"warning: {self.path}: dropped {dropped} line(s) that are not `STEP KIND VALUE` records")
        atomic_write(self.path, lambda f: f.write("".join(kept + [f"# {h}\n" for h in header_lines]).encode()))
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier files' points from this step on (the lost part of
            # an interrupted run), so a resumed run continues the same curves
            self.writer = SummaryWriter(self.log_dir, purge_step=resume_step)

    def record(self, step: int, kind: str, value: float):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(f"{step} {kind} {float(value)!r}\n")  # full precision: resumed runs compare exactly
        if self.writer and kind in TENSORBOARD_TAGS:
            self.writer.add_scalar(TENSORBOARD_TAGS[kind], value, step)

    def scalars(self, step: int, **values):
        """TensorBoard-only values of a step (lr, grad_norm, tokens_per_sec, mfu)."""
        for tag, value in values.items():
            if self.writer and value is not None:
                self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.writer:
            self.writer.close()


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
    return [f"command: {shlex.join(argv)}",  # shlex: play.ipynb reads the flags back
            f"started: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"tiktoken {tiktoken.__version__}",
            f"device: {device} x {d.world_size}",
            f"git: {commit or 'unknown'}"]


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT) asks the run to stop: the loop finishes its step, saves a checkpoint
    and exits 0. A second Ctrl-C exits at once; checkpoints are written atomically, so the last
    complete one stays loadable.

    Python runs a signal handler only between bytecodes, so two Ctrl-C's during one long operation
    reach it once. Every signal does reach the C level, which writes its number into a wakeup pipe
    (signal.set_wakeup_fd): a thread reading that pipe counts each one."""

    def __init__(self):
        self.requested = False

    def install(self):
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C-level handler must never block
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)  # no KeyboardInterrupt: the thread decides
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="stop-request").start()

    def _watch(self, read_fd: int):
        while True:
            for signum in os.read(read_fd, 64):
                if signum == signal.SIGINT and self.requested:
                    print("second interrupt: exiting now", file=sys.stderr, flush=True)
                    os._exit(130)
                self.requested = self.requested or signum in (signal.SIGINT, signal.SIGTERM)


def on_rank0(d: Dist, work):
    """work() on rank 0 only; if it fails (a ConfigError, CheckpointError or OSError), every rank raises
    the error (so that no rank waits forever in a collective for one that has exited)."""
    error = None
    if d.is_main:
        try:
            work()
        except (ConfigError, CheckpointError) as e:
            error = e
        except OSError as e:
            error = CheckpointError(f"{e.filename or 'the run folder'}: {e.strerror or e}")
    if d.ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


# -----------------------------------------------------------------------------------------------
# The command line

PRESETS = {
    # GPT-2 124M on 10B tokens of FineWeb-Edu: 19073 steps of 2**19 tokens (the RunConfig defaults)
    "gpt2-124m": {},
    # Tiny Shakespeare (or any --input text) on a laptop CPU: a small model that learns within minutes
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
NO_PROBE_MICRO_BATCH = 8  # --batch-size auto where no memory probe runs (CPU, MPS): at most this


def arg(default, help, *, at_least=None, above=None, below=None, choices=None, parse=None):
    """A RunConfig field: its default, its --help text, and the values it allows."""
    return field(default=default, metadata=dict(help=help, at_least=at_least, above=above, below=below,
                                                choices=choices, parse=parse))


def batch_size_value(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto or a whole number of at least 1")
    return value


@dataclass
class RunConfig:
    preset: str = arg("gpt2-124m", "settings to start from; flags override them (--input alone starts from "
                      "shakespeare)", choices=tuple(PRESETS))
    # data
    data_dir: str = arg("edu_fineweb10B", "folder of .npy token shards (python fineweb.py builds it)")
    input: str = arg("", "train on this UTF-8 text file instead of shards (last 10%% is validation); "
                     "input.txt is downloaded if missing")
    # model
    init_from: str = arg("scratch", "scratch, a GPT-2 name (gpt2, gpt2-medium, ...) or a local Hugging Face GPT-2 "
                         "folder (fine-tuning)")
    n_layer: int = arg(12, "transformer blocks", at_least=1)
    n_head: int = arg(12, "attention heads", at_least=1)
    n_embd: int = arg(768, "model width (channels), a multiple of --n-head", at_least=1)
    dropout: float = arg(0.0, "dropout probability in training (0 = off; against overfitting on small data)",
                         at_least=0, below=1)
    block_size: int = arg(0, "position-table size (tokens); 0 = --seq-len", at_least=0)
    # batch
    batch_size: int | str = arg("auto", "micro-batch B (sequences per forward pass per process); auto: on CUDA the "
                                "largest that fits in memory, else at most 8", parse=batch_size_value)
    seq_len: int = arg(1024, "sequence length T (tokens)", at_least=1)
    total_batch_size: int = arg(524288, "tokens per optimizer step, over all processes and micro-steps", at_least=1)
    # optimization
    max_steps: int = arg(19073, "optimizer steps (19073 x 524288 tokens = 10B tokens)", at_least=1)
    warmup_steps: int = arg(715, "linear LR warmup steps", at_least=0)
    max_lr: float = arg(6e-4, "peak learning rate; decays by cosine to 10%% of it", above=0)
    weight_decay: float = arg(0.1, "AdamW weight decay of 2-D parameters", at_least=0)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = no clipping)", at_least=0)
    seed: int = arg(1337, "seed of the initial weights and of the data order", at_least=0)
    dtype: str = arg("auto", "autocast precision; auto: bf16 on GPUs with bf16 hardware, fp16 on older GPUs, "
                     "fp32 on CPU and MPS", choices=("auto", *DTYPES))
    # periodic work (0 = off; each also runs on the last step)
    val_every: int = arg(250, "validation loss every N steps", at_least=0)
    val_tokens: int = arg(10485760, "validation tokens per evaluation (a fixed set, whatever the world size); "
                          "not given: the whole val split, up to this many", at_least=1)
    hellaswag_every: int = arg(250, "HellaSwag accuracy every N steps", at_least=0)
    hellaswag_data: str = arg("", "local HellaSwag JSON-lines file (default: the downloaded validation set)")
    hellaswag_limit: int = arg(0, "score only the first N HellaSwag examples (0 = all 10,042)", at_least=0)
    sample_every: int = arg(250, "print --num-samples samples every N steps", at_least=0)
    prompt: str = arg("Hello, I'm a language model,", "what samples continue")
    num_samples: int = arg(4, "samples each time", at_least=1)
    sample_tokens: int = arg(32, "new tokens per sample", at_least=1)
    checkpoint_every: int = arg(1000, "checkpoint every N steps", at_least=0)
    keep_checkpoints: int = arg(3, "keep the last N checkpoints (0 = all)", at_least=0)
    # run
    log_dir: str = arg("log", "folder of log.txt and checkpoints; one run per folder")
    overwrite: bool = arg(False, "delete another run's log and checkpoints in --log-dir first")
    tensorboard: bool = arg(False, "also write TensorBoard curves to --log-dir (tensorboard --logdir LOG_DIR)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    compile: bool = arg(None, "torch.compile the model (default: on for CUDA, off elsewhere)")
    resume: str = arg("", "'auto' (latest checkpoint in --log-dir, if any) or a checkpoint path")
    eval_only: bool = arg(False, "with --resume or --init-from: validate, run HellaSwag (if on), sample, then exit "
                          "without writing to --log-dir")
    export_hf: str = arg("", "after training (or --eval-only), write the model to this folder in Hugging Face format")
    max_bad_steps: int = arg(5, "stop after this many non-finite losses in a row", at_least=1)
    # the flags given on the command line (not a flag itself)
    given: frozenset = field(default=frozenset(), metadata=dict(help=None))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> OneLineParser:
    """A flag per RunConfig field; --help shows each default and the shakespeare preset's value."""
    parser = OneLineParser(prog="train_gpt2.py", description="Train GPT-2 (the module docstring has the commands). "
                           "Explicit flags override the preset.")
    defaults = RunConfig()
    for f in fields(RunConfig):
        if f.metadata["help"] is None:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = f"default: {getattr(defaults, f.name)!r}"
        if f.name in PRESETS["shakespeare"]:
            shown += f"; shakespeare: {PRESETS['shakespeare'][f.name]!r}"
        kwargs = dict(default=None, help=f"{meta['help']} ({shown})")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=meta["parse"] or f.type, choices=meta["choices"], **kwargs)
    return parser


def parse_args(argv=None) -> RunConfig:
    """Flags over the preset over the defaults; every value checked against its field's range."""
    defaults = RunConfig()
    cli_fields = [f for f in fields(RunConfig) if f.metadata["help"] is not None]
    given = {k: v for k, v in vars(make_parser().parse_args(argv)).items() if v is not None}
    preset = given.get("preset") or ("shakespeare" if given.get("input") else defaults.preset)
    cfg = RunConfig(**{**vars(defaults), **PRESETS[preset], **given, "preset": preset, "given": frozenset(given)})
    for f in cli_fields:
        value, meta, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if meta["at_least"] is not None and value < meta["at_least"]:
            raise ConfigError(f"{flag} {value}: must be at least {meta['at_least']}")
        if meta["above"] is not None and not value > meta["above"]:
            raise ConfigError(f"{flag} {value}: must be above {meta['above']}")
        if meta["below"] is not None and not value < meta["below"]:
            raise ConfigError(f"{flag} {value}: must be below {meta['below']}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}: the heads split the width")
    if cfg.block_size and cfg.block_size < cfg.seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds --block-size {cfg.block_size}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite deletes the run that --resume would continue: pass one of them")
    if cfg.eval_only and not cfg.resume and cfg.init_from == "scratch":
        raise ConfigError("--eval-only needs a model: pass --resume PATH|auto or --init-from")
    return cfg


def check_batch_sizes(cfg: RunConfig, B: int, world_size: int) -> int:
    """Gradient-accumulation steps, or a ConfigError that proposes valid --total-batch-size values."""
    per_micro_step = B * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro_step:
        lower = max(1, cfg.total_batch_size // per_micro_step) * per_micro_step
        raise ConfigError(
            f"--total-batch-size {cfg.total_batch_size} is not divisible by batch-size x seq-len x processes = "
            f"{B} x {cfg.seq_len} x {world_size} = {per_micro_step}: use {lower} or {lower + per_micro_step}, "
            f"or change --batch-size"
        )
    return cfg.total_batch_size // per_micro_step


# -----------------------------------------------------------------------------------------------
# Training: gradient accumulation, DDP, the loop


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses or weights); the message names the last good checkpoint."""


def forward_backward(model, optimizer, loader, grad_accum_steps: int, device, autocast, scaler=None):
    """The gradients of one optimizer step: grad_accum_steps micro-batches of B sequences on this rank.
    Returns this rank's mean loss as a device tensor (no host sync). bench/train.py times this too."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch(device)
        # DDP all-reduces (averages) the gradients over the ranks during backward. Only the last
        # micro-step needs that: before it, no_sync() lets the gradients pile up locally. It has to be
        # entered before the forward pass, which is where DDP decides.
        last = micro_step == grad_accum_steps - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast:
                _, loss = model(x, y, return_logits=False)
            # backward adds gradients up; each micro-batch loss is a mean over its B*T tokens, so dividing
            # by the number of micro-steps makes the sum the gradient of the mean over the whole batch
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss_accum


def fit_micro_batch(model, per_rank_seqs: int, T: int, device, autocast, reserve_bytes: int) -> tuple[int, list]:
    """--batch-size auto on CUDA: the largest micro-batch that divides per_rank_seqs and trains in the
    GPU's memory. Tries a forward and backward pass at (B, T) with reserve_bytes (the optimizer's
    state, not yet allocated) held aside, and halves B on torch.OutOfMemoryError. The passes run
    uncompiled (which needs more memory than compiled), on zeros, under a forked random state: no
    weight, data or random number of the run changes, so it trains exactly as with --batch-size B.
    Returns B and the sizes that did not fit."""

    def fits(B):
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
                x = torch.zeros(B, T, dtype=torch.long, device=device)
                with autocast:
                    _, loss = model(x, x, return_logits=False)
                loss.backward()
                del held, x, loss
            return True
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower() \
                    and "ALLOC_FAILED" not in str(e):
                raise
            return False
        finally:
            model.zero_grad(set_to_none=True)

    B, too_big = per_rank_seqs, []
    while not fits(B):
        torch.cuda.empty_cache()  # give back what the failed try reserved
        too_big.append(B)
        smaller = [b for b in range(B // 2, 0, -1) if per_rank_seqs % b == 0]
        if not smaller:
            raise ConfigError(f"--batch-size auto: not even one sequence of --seq-len {T} fits in GPU memory; "
                              f"lower --seq-len or train a smaller model")
        B = smaller[0]
    torch.cuda.empty_cache()
    return B, too_big


def due(every: int, n: int, last_step: bool) -> bool:
    """Periodic work (every N steps, 0 = never) runs on multiples of N and on the last step."""
    return bool(every) and (n % every == 0 or last_step)


class Trainer:
    """One run: what trains, the data it trains on, its run folder and log, and the steps of the loop
    (validate, hellaswag, sample, train_step, save). It is built in an order that lets every bad flag,
    folder, checkpoint and data file fail before the model is built (which, compiled, takes a while):
    precision, run folder, checkpoint, data; then the model, the micro-batch, the optimizer and the
    resumed state."""

    def __init__(self, cfg: RunConfig, d: Dist, argv: list[str]):
        self.cfg, self.d = cfg, d
        self.log = RunLog(None, d.is_main)  # prints only, until the run folder is ready
        say = self.log.print0

        # precision: the autocast dtype, and a loss scaler for fp16
        self.dtype = autocast_dtype(d.device, cfg.dtype)
        self.autocast = autocast_context(d.device_type, self.dtype)
        self.scaler = grad_scaler(d.device_type, self.dtype)
        if os.environ.get("TRAIN_GPT2_INIT_SCALE") and self.scaler:  # a test hook (not a flag): force overflows
            self.scaler = torch.amp.GradScaler(d.device_type, init_scale=float(os.environ["TRAIN_GPT2_INIT_SCALE"]))
        if d.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
            torch.backends.cudnn.allow_tf32 = True
        if d.device_type == "cpu":
            keep_freed_memory()
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        if cfg.export_hf:  # found out now, not after hours of training
            if os.path.isfile(cfg.export_hf):
                raise ConfigError(f"--export-hf {cfg.export_hf}: a file, not a folder")
            try:
                import transformers  # noqa: F401
            except ImportError:
                raise ConfigError("--export-hf needs the transformers package: pip install transformers") from None

        # the run folder: one run, one writer (rank 0); --eval-only writes nothing there
        folder = RunFolder(cfg.log_dir)
        if not cfg.eval_only:
            on_rank0(d, lambda: folder.prepare(bool(cfg.resume), cfg.overwrite))

        # the checkpoint to resume from, read onto the CPU
        self.resume_path, ckpt = cfg.resume or None, None
        if cfg.resume == "auto":
            self.resume_path, ckpt = find_resume_checkpoint(cfg.log_dir, say)
            if ckpt is None and cfg.eval_only:
                raise CheckpointError(f"--resume auto: no checkpoint in {cfg.log_dir}")
            if ckpt is None:
                say(f"--resume auto: no checkpoint in {cfg.log_dir} yet, starting from scratch")
        elif cfg.resume:
            ckpt = read_checkpoint(cfg.resume)
        if ckpt is not None and cfg.eval_only:  # evaluate on the run's own data and sequence length
            for key in ("input", "data_dir", "seq_len"):
                if key not in cfg.given and key in ckpt["run_config"]:
                    setattr(cfg, key, ckpt["run_config"][key])

        # the data: token arrays (shards or a text file), and the HellaSwag examples
        T = cfg.seq_len
        if cfg.input:
            train_ids, val_ids = load_text(cfg.input)
            train, val = ([train_ids], [f"{cfg.input} (first 90%)"]), ([val_ids], [f"{cfg.input} (last 10%)"])
            fix = "use a longer text, or lower --seq-len / --total-batch-size"
        else:
            train, val = load_shards(cfg.data_dir, "train"), load_shards(cfg.data_dir, "val")
            fix = "build more data with `python fineweb.py`, or lower --total-batch-size"
        if cfg.total_batch_size % (T * d.world_size):
            raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --seq-len x processes = "
                              f"{T} x {d.world_size}")
        self.seqs_per_step = cfg.total_batch_size // T
        if not cfg.eval_only and count_sequences(train[0], T) < self.seqs_per_step:
            raise DataError(f"{describe(train[1])}: the train split has {count_sequences(train[0], T)} sequences of "
                            f"T={T} tokens, fewer than the {self.seqs_per_step} one optimizer step needs; {fix}")
        self.val_seqs = self.plan_validation(val, T) if cfg.val_every else 0
        self.hellaswag_examples = None
        if cfg.hellaswag_every:
            try:
                self.hellaswag_examples = hellaswag.load_examples(
                    cfg.hellaswag_data or None, split="val", limit=cfg.hellaswag_limit or None,
                    fix="pass --hellaswag-data FILE with a local copy, or --hellaswag-every 0")
            except hellaswag.HellaSwagError as e:
                raise ConfigError(f"--hellaswag-every {cfg.hellaswag_every}: {e}") from None

        # the model: the checkpoint's (--eval-only), OpenAI's (--init-from) or a new one. raw_model is
        # what we save, sample and evaluate: not compiled, not DDP-wrapped
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if ckpt is not None and cfg.eval_only:
            self.raw_model = GPT(GPTConfig(**ckpt["model_config"]))
        elif cfg.init_from == "scratch":
            self.raw_model = GPT(GPTConfig(block_size=cfg.block_size or T, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                           n_embd=cfg.n_embd, dropout=cfg.dropout))
        else:
            try:
                self.raw_model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
            except (ValueError, OSError) as e:
                raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None
        if ckpt is not None and not cfg.eval_only:
            diffs = config_differences(ckpt["model_config"], asdict(self.raw_model.config))
            if diffs:
                raise CheckpointError(f"{self.resume_path}: the checkpoint's model differs from this run's: "
                                      + "; ".join(diffs))
        if T > self.raw_model.config.block_size:
            raise ConfigError(f"--seq-len {T} exceeds the model's block_size {self.raw_model.config.block_size}")
        self.raw_model.to(d.device)

        # the micro-batch (a step's data does not depend on it), the loaders and the optimizer
        per_rank = self.seqs_per_step // d.world_size
        if cfg.batch_size != "auto":
            B = cfg.batch_size
        elif d.device_type == "cuda":
            # held aside: AdamW's two fp32 moments, DDP's gradient buckets, and 512 MB for NCCL and the compiler
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            reserve = (12 if d.ddp else 8) * n_params + (512 << 20)
            B, too_big = fit_micro_batch(self.raw_model, per_rank, T, d.device, self.autocast, reserve_bytes=reserve)
            if d.ddp:  # every rank must use the same B: the smallest that fits everywhere
                agreed = torch.tensor(B, device=d.device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
                B = int(agreed)
            say(f"--batch-size auto: micro-batch {B}" + (f" (out of memory at {', '.join(map(str, too_big))})"
                                                          if too_big else ""))
        else:
            B = max(b for b in range(1, min(per_rank, NO_PROBE_MICRO_BATCH) + 1) if per_rank % b == 0)
        self.B, self.grad_accum_steps = B, check_batch_sizes(cfg, B, d.world_size)
        common = dict(B=B, T=T, seqs_per_step=self.seqs_per_step, rank=d.rank, world_size=d.world_size, seed=cfg.seed)
        self.train_loader = DataLoader(*train, shuffle=True, **common)
        self.val_loader = DataLoader(*val, shuffle=False, **common)
        self.optimizer = self.raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, d.device_type)

        # the resumed state: weights, optimizer, loss scale, step, data position and random states
        self.start_step, self.skipped_total, self.last_val = 0, 0, None
        if ckpt is not None:
            self.resume(ckpt)
            del ckpt

        # what trains: maybe compiled, maybe DDP-wrapped (both share raw_model's weights). The vocabulary
        # bias is the only buffer and never changes: DDP need not broadcast buffers before each pass
        # (newer torch names that option forward_sync_buffers).
        self.use_compile = cfg.compile if cfg.compile is not None else d.device_type == "cuda"
        self.model = torch.compile(self.raw_model) if self.use_compile else self.raw_model
        if d.ddp:
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
                else "broadcast_buffers"
            self.model = DDP(self.model, device_ids=[d.local_rank] if d.device_type == "cuda" else None,
                             gradient_as_bucket_view=True, **{no_sync: False})

        if not cfg.eval_only:  # everything checked: now --overwrite may delete the previous run
            on_rank0(d, lambda: folder.clear(cfg.overwrite, say))
        self.log = RunLog(None if cfg.eval_only else cfg.log_dir, d.is_main, cfg.tensorboard)
        self.log.start(run_header(argv, d), resume_step=self.start_step if self.resume_path else None)
        name = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else ""
        self.peak = peak_flops(name) if self.dtype != torch.float32 else None
        self.flops_per_token = self.raw_model.flops_per_token(T)
        self.bad_in_a_row, self.cropped_said = 0, False
        # a test hook (not a flag): the losses of these steps are made NaN
        self.nan_steps = {int(s) for s in os.environ.get("TRAIN_GPT2_INJECT_NAN", "").split(",") if s.strip()}
        say(f"model: {self.raw_model.num_params():,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP per token "
            f"(6N + 12LCT)")
        say(f"device: {d.device} x {d.world_size} process(es), autocast: {dtype_name(self.dtype)}"
            f"{' with loss scaling' if self.scaler else ''}, compile: {self.use_compile}")
        say(f"batch: {cfg.total_batch_size:,} tokens per step = {B} x {T} x {d.world_size} processes x "
            f"{self.grad_accum_steps} micro-steps")
        say(f"data: {self.train_loader.seqs_per_epoch:,} training sequences per epoch "
            f"({self.train_loader.seqs_per_epoch / self.seqs_per_step:.1f} steps)")

    def plan_validation(self, val, T: int) -> int:
        """Sequences per validation: --val-tokens when given (at most the split), else the whole split
        up to the preset's number."""
        cfg, have = self.cfg, count_sequences(val[0], T)
        wanted = max(1, cfg.val_tokens // T)
        if "val_tokens" in cfg.given and wanted > have:
            raise ConfigError(f"--val-tokens {cfg.val_tokens}: the val split ({describe(val[1])}) has {have * T:,} "
                              f"tokens in sequences of T={T}; pass at most {have * T}, or leave --val-tokens out")
        if have == 0:
            raise DataError(f"{describe(val[1])}: the val split has no sequence of T={T} tokens; lower --seq-len, "
                            f"or --val-every 0 to train without validation")
        n = min(wanted, have)
        self.log.print0(f"validation: {n * T:,} tokens" + (" (the whole val split)" if n == have else ""))
        return n

    def resume(self, ckpt: dict):
        cfg, d, say = self.cfg, self.d, self.log.print0
        self.raw_model.load_state_dict(ckpt["model"])
        self.start_step, self.last_val = ckpt["step"], ckpt.get("val_loss")
        if cfg.eval_only:
            say(f"loaded {self.resume_path} (step {self.start_step})")
            return
        ours = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        for group, settings in zip(self.optimizer.param_groups, ours):  # but weight decay, betas, fused... are
            group.update(settings)  # this run's, not the checkpoint's
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        saved = ckpt["run_config"]
        data_keys = ("seed", "seq_len", "total_batch_size", "input", "data_dir")
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
                   for k in data_keys if saved.get(k) != getattr(cfg, k)]
        if changed:
            say(f"warning: {', '.join(changed)}: the data order differs from the original run")
        self.train_loader.load_state_dict(ckpt["train_loader"])
        if ckpt["world_size"] == d.world_size:
            set_rng_state(ckpt["rng"][d.rank], d.device_type)
        else:
            say(f"warning: checkpoint made by {ckpt['world_size']} processes, now {d.world_size}: weights, optimizer, "
                f"step and data position are kept (a step's data does not depend on the number of processes); "
                f"per-process random states are not restored")
        self.skipped_total = ckpt.get("skipped_steps", 0)
        say(f"resumed from {self.resume_path} at step {self.start_step}")

    # --- evaluation -------------------------------------------------------------------------------

    def validate(self, step: int):
        """Validation loss on the fixed val set, through the model that trains (compiled: one shape)."""
        self.model.eval()
        self.last_val = validation_loss(self.model, self.val_loader, self.val_seqs, self.d.device, self.autocast,
                                        self.d.rank, self.d.world_size)
        self.model.train()
        self.log.print0(f"step {step:5d} | val loss {self.last_val:.4f}")
        self.log.record(step, "val", self.last_val)

    def hellaswag(self, step: int):
        """HellaSwag accuracy, examples split over the ranks, on the raw model (its shapes change with
        every batch, which a compiled model would recompile for)."""
        result = hellaswag.evaluate(self.raw_model, self.hellaswag_examples, device=self.d.device,
                                    batch_size=max(1, self.B // 4), autocast=self.autocast, rank=self.d.rank,
                                    world_size=self.d.world_size)
        if result["cropped"] and not self.cropped_said:
            self.log.print0(f"hellaswag: {result['cropped']} of {result['n']} examples are longer than block_size "
                            f"{self.raw_model.config.block_size}: their contexts are cropped from the left")
            self.cropped_said = True
        self.log.print0(f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} "
                        f"({result['correct_norm']}/{result['n']})")
        self.log.record(step, "hella", result["acc_norm"])

    def sample(self, step: int):
        """Samples from the raw model; every rank prints its own (different seeds)."""
        cfg = self.cfg
        self.raw_model.eval()
        samples = sample_text(self.raw_model, cfg.prompt, cfg.num_samples, cfg.sample_tokens, self.d.device,
                              self.autocast, seed=cfg.seed + 1000 * self.d.rank + step)
        self.raw_model.train()
        for i, text in enumerate(samples):
            print(f"rank {self.d.rank} sample {i}: {text!r}", flush=True)

    # --- one optimizer step -------------------------------------------------------------------------

    def train_step(self, step: int, stop: "StopRequest") -> bool:
        """Forward and backward over this step's micro-batches, clip the gradient, set the learning
        rate, then update, unless the loss is not finite (in fp16 the scaler also skips a step whose
        gradients overflowed). Prints the step's line; returns whether any rank was asked to stop."""
        cfg, d = self.cfg, self.d
        t0 = time.perf_counter()
        loss = forward_backward(self.model, self.optimizer, self.train_loader, self.grad_accum_steps, d.device,
                                self.autocast, self.scaler)
        if step in self.nan_steps:
            loss = loss * float("nan")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        # clipping the gradient's global norm keeps one bad batch from throwing the weights far away
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip or float("inf"))
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # one all-reduce per step, for the log and the stop: the loss averaged over ranks (the gradients
        # already are), and whether any rank was told to stop, so that all stop after the same step
        stats = torch.stack([loss.float(), torch.tensor(float(stop.requested), device=d.device)])
        if d.ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        loss_value, stop_now, norm_value = stats[0].item() / d.world_size, stats[1].item() > 0, norm.item()
        finite = math.isfinite(loss_value)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            if finite:
                self.scaler.step(self.optimizer)  # skipped by the scaler if the gradients overflowed
            self.scaler.update()  # lowers the scale after an overflow, raises it after 2,000 clean steps
            updated = finite and math.isfinite(norm_value)
            if self.scaler.get_scale() != scale:
                self.log.print0(f"step {step:5d} | loss scale {scale:g} -> {self.scaler.get_scale():g}"
                                + ("" if updated or not finite else " (gradients overflowed: update skipped)"))
                self.log.record(step, "scale", self.scaler.get_scale())
        else:
            finite = updated = finite and math.isfinite(norm_value)
            if updated:
                self.optimizer.step()
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if not finite:  # the update was skipped: the weights are those before the step
            self.skipped_total += 1
            self.log.record(step, "skipped", self.skipped_total)
            self.log.print0(f"step {step:5d} | non-finite loss {loss_value} / grad norm {norm_value}: update skipped "
                            f"({self.bad_in_a_row} in a row, {self.skipped_total} in all)")
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingError(f"{self.bad_in_a_row} non-finite losses in a row at step {step}: stopping. "
                                    f"{self.last_good()}; lower --max-lr or raise --warmup-steps, then --resume auto")
        # a huge learning rate can break the weights with finite gradients: one fused norm over all of them
        if updated and not math.isfinite(torch.nn.utils.get_total_norm(list(self.raw_model.parameters())).item()):
            raise TrainingError(f"step {step}: the update made the weights non-finite or too large for fp32 "
                                f"(--max-lr {cfg.max_lr} too high?); {self.last_good()}")
        synchronize(d.device)  # the clock measures finished work, not queued kernels
        dt = time.perf_counter() - t0
        tokens_per_sec = cfg.total_batch_size / dt
        mfu = self.flops_per_token * tokens_per_sec / d.world_size / self.peak if self.peak else None
        self.log.print0(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                        f"dt {1000 * dt:.1f}ms | tok/sec {tokens_per_sec:,.0f}"
                        + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
        self.log.record(step, "train", loss_value)
        self.log.scalars(step, lr=lr, grad_norm=norm_value if math.isfinite(norm_value) else None,
                         tokens_per_sec=tokens_per_sec, mfu=mfu)
        return stop_now

    def last_good(self) -> str:
        path = latest_checkpoint(self.cfg.log_dir)
        return f"the last good checkpoint is {path}" if path else "no checkpoint was saved"

    # --- checkpoints and export -------------------------------------------------------------------

    def save(self, done: int):
        """A checkpoint after `done` steps: every rank's random state is gathered; rank 0 writes."""
        d = self.d
        rngs = [None] * d.world_size
        if d.ddp:
            dist.all_gather_object(rngs, rng_state(d.device_type))
        else:
            rngs[0] = rng_state(d.device_type)
        state = None
        if d.is_main:
            state = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": done,
                "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "train_loader": self.train_loader.state_dict(), "rng": rngs,
                "model_config": asdict(self.raw_model.config), "run_config": asdict(self.cfg),
                "world_size": d.world_size, "val_loss": self.last_val, "skipped_steps": self.skipped_total}
        t0 = time.perf_counter()
        on_rank0(d, lambda: save_checkpoint(self.cfg.log_dir, state, keep=self.cfg.keep_checkpoints))  # all wait
        self.log.print0(f"saved {checkpoint_path(self.cfg.log_dir, done)} ({time.perf_counter() - t0:.2f}s)")

    def export(self):
        if self.cfg.export_hf and self.d.is_main:
            self.raw_model.export_hf(self.cfg.export_hf)
            self.log.print0(f"exported the model in Hugging Face format to {self.cfg.export_hf}")


def train(cfg: RunConfig, d: Dist, argv: list[str]):
    run = Trainer(cfg, d, argv)
    if cfg.eval_only:
        if cfg.val_every:
            run.validate(run.start_step)
        if cfg.hellaswag_every:
            run.hellaswag(run.start_step)
        run.sample(run.start_step)
        run.export()
        return
    stop = StopRequest()
    stop.install()
    try:
        for step in range(run.start_step, cfg.max_steps):
            last_step = step == cfg.max_steps - 1
            # evaluation comes before the step: at step 0 it shows the untrained model (loss ln 50257 = 10.8).
            # Asked to stop, the run skips it: torchrun allows 30 s between its SIGTERM and a SIGKILL.
            evaluate = not stop.requested
            if evaluate and due(cfg.val_every, step, last_step):
                run.validate(step)
            if evaluate and due(cfg.hellaswag_every, step, last_step):
                run.hellaswag(step)
            if evaluate and due(cfg.sample_every, step, last_step) and step > 0:
                run.sample(step)
            stop_now = run.train_step(step, stop)  # a step under way when a signal comes is finished
            # no periodic checkpoint during a run of non-finite losses: keep the last good ones on disk
            if stop_now or (due(cfg.checkpoint_every, step + 1, last_step) and run.bad_in_a_row == 0):
                run.save(step + 1)
            if stop_now:
                run.log.print0(f"stopped by signal after step {step}; continue with --resume auto")
                return
    finally:
        run.log.close()  # TensorBoard's last points too, whatever ends the run
    if run.bad_in_a_row:
        raise TrainingError(f"the last step ({cfg.max_steps - 1}) was skipped: its loss was not finite; "
                            f"{run.last_good()}")
    run.export()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    d = None
    try:
        cfg = parse_args(argv)
        d = setup_distributed(cfg.device)
        train(cfg, d, ["train_gpt2.py", *argv])
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        # an error every rank shares (on_rank0) is printed once
        if d is None or d.is_main or not isinstance(e, (ConfigError, CheckpointError)):
            print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1 if d is not None else 2)
    except KeyboardInterrupt:
        print("train_gpt2.py: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
