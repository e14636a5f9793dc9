"""
train_gpt2.py: GPT-2 (124M) from scratch, in one file you can read top to bottom.

Part 1 is the lecture, in its order: the model (and OpenAI's weights), the data loader, the
learning-rate schedule, evaluation, processes and precision, then train(): gradient accumulation,
DDP and the loop. Part 2 is what running it for real takes: the command line and the presets,
pre-flight checks, the run folder and checkpoints, the log, signals, numerics and speed, main().

    python train_gpt2.py --preset shakespeare              # CPU or Mac: Tiny Shakespeare, minutes
    python train_gpt2.py --input my.txt                    # your own text, the same small settings
    python train_gpt2.py                                   # one GPU: GPT-2 124M on FineWeb-Edu
    torchrun --standalone --nproc_per_node=8 train_gpt2.py                # eight GPUs: 10B tokens
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --preset gpt2-350m   # the miniseries
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        train_gpt2.py                                                 # two nodes of eight GPUs
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_gpt2.py --resume auto  # crashes
    python train_gpt2.py --init-from gpt2 --max-lr 1e-4 ...         # fine-tune OpenAI's weights
    python train_gpt2.py --eval-only --resume auto --export-hf my-gpt2  # evaluate, sample, export

Every flag and its default: python train_gpt2.py --help; the README is the manual. A run writes
into --log-dir: log.txt (one `STEP KIND VALUE` record per line), checkpoints, and TensorBoard
curves with --tensorboard.
"""
import argparse
import inspect
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from fineweb import (EOT, SHARD_RE, OneLineParser, UserError, add_flags, atomic_write, download,
                     flag, given_flags, gpt2_bpe_files, gpt2_tokenizer, number, tokenize_batch)

# ================================================================================================
# PART 1: THE LECTURE
# ================================================================================================

# ------------------------------------------------------------------------------------------------
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
    # used 0.1, but one epoch of pretraining data needs none. It fights overfitting on small data.
    dropout: float = 0.0
    # The embedding / lm_head table has vocab_size rows rounded up to a multiple of this: 50257 ->
    # 50304 = 393 * 128, a shape the matmul kernels like. The extra rows are never a target, never
    # sampled and never scored (see GPT.vocab_bias).
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
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything cached
        else:  # several new tokens after a cached prefix: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C): the heads' outputs side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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


# Hugging Face's GPT-2 stores these as Conv1D, whose weight is (in, out): nn.Linear's transposed.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight")
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
        # vocabulary, with no slicing copy of the (B*T, 50304) logits before the loss: the
        # shakespeare preset's step is 1.11x faster than with the slice (2-core CPU, 20 alternating
        # rounds, quartiles 1.06-1.14x). Not saved: it follows from the config.
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
        attn_mask: boolean (B or 1, 1, T, T_keys), True where a query may attend; default causal."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if past + T > self.config.block_size:
                bs = self.config.block_size
                raise ValueError(f"sequence of {past + T} tokens is longer than the model's "
                                 f"block_size {bs}: crop the input to the last {bs} tokens")
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

    def configure_optimizer(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95),
                            eps=1e-8):
        """AdamW; weight decay on matrices and embeddings (2-D), none on biases and LayerNorm."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel updates each tensor in one pass (on a CPU, 13% faster shakespeare steps
        # than the per-operation loop); CUDA and CPU have one
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                 use_cache=True):
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
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # --- OpenAI's weights, through Hugging Face's format, in and out ------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> "GPT":
        """OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, from the Hugging Face hub) or a
        local folder in Hugging Face GPT-2 format (config.json + model.safetensors or
        pytorch_model.bin). dropout: for fine-tuning (the weights do not depend on it)."""
        import json

        if os.path.isdir(name_or_dir):
            folder = name_or_dir
        elif name_or_dir in HF_MODEL_NAMES:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(f"openai-community/{name_or_dir}",
                                       allow_patterns=["config.json", "*.safetensors"])
        else:
            names = ", ".join(HF_MODEL_NAMES)
            raise ValueError(f"{name_or_dir!r} is neither a local directory nor one of {names}")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: a Hugging Face folder needs it")
        with open(config_path) as f:
            hf = json.load(f)
        model = cls(GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                              n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                              dropout=dropout))
        model.load_hf_state_dict(_read_hf_weights(folder))
        return model

    def load_hf_state_dict(self, hf_sd: dict):
        """Copy a Hugging Face GPT-2 state dict (keys with or without 'transformer.') into ours."""
        hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
        # causal-mask buffers of old transformers versions, and the tied lm_head: not weights
        hf_sd = {k: v for k, v in hf_sd.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        ours = {k.removeprefix("transformer."): v for k, v in self.state_dict().items()
                if k != "lm_head.weight"}
        missing, unexpected = sorted(set(ours) - set(hf_sd)), sorted(set(hf_sd) - set(ours))
        if missing or unexpected:
            raise ValueError(f"GPT-2 checkpoint keys differ: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        V = self.config.vocab_size
        with torch.no_grad():
            for k, dst in ours.items():
                src = hf_sd[k].t() if k.endswith(HF_CONV1D_WEIGHTS) else hf_sd[k]
                want = (V, dst.shape[1]) if k == "wte.weight" else dst.shape  # padding: ours alone
                if tuple(src.shape) != tuple(want):
                    raise ValueError(f"shape mismatch for tensor {k!r}: checkpoint has "
                                     f"{tuple(src.shape)}, model expects {tuple(want)} (check the "
                                     f"sizes in config.json)")
                if k == "wte.weight":
                    dst.zero_()
                    dst[:V].copy_(src)
                else:
                    dst.copy_(src)

    def hf_state_dict(self) -> dict:
        """Our weights in GPT2LMHeadModel's layout (the padded vocabulary rows dropped)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            v = v.detach().t() if k.endswith(HF_CONV1D_WEIGHTS) else v.detach()
            if k == "transformer.wte.weight":
                v = v[: self.config.vocab_size]
            out[k] = v.contiguous().clone()
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def export_hf(self, out_dir: str):
        """Write a folder that transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads with
        the same logits as this model, with the GPT-2 tokenizer beside it."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, activation_function="gelu_new", resid_pdrop=c.dropout,
            embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True))
        result = hf.load_state_dict(self.hf_state_dict(), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(k.endswith(".attn.bias") for k in result.missing_keys), result.missing_keys
        hf.save_pretrained(out_dir)
        # OpenAI's encoder.json is Hugging Face's vocab.json, vocab.bpe its merges.txt: with them,
        # other tools (lm-evaluation-harness) need nothing else
        vocab_bpe, encoder_json = gpt2_bpe_files()
        shutil.copyfile(encoder_json, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(vocab_bpe, os.path.join(out_dir, "merges.txt"))
        return out_dir


def _read_hf_weights(folder: str) -> dict:
    """State dict of a Hugging Face model folder (safetensors first, else pytorch_model.bin)."""
    st = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")



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
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


# ------------------------------------------------------------------------------------------------
# The data loader


class DataError(UserError):
    """Training data that cannot be used; the message names the file and the fix."""


def find_shards(data_dir: str, split: str) -> list[str]:
    """Shard files `<prefix>_<split>_<NNNNNN>.npy` of a split (fineweb.py writes them), in order."""
    fix = ("run `python fineweb.py` to build them, or train on a text file with `--preset "
           "shakespeare` / `--input FILE`")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory: {fix}")
    matches = [m for m in map(SHARD_RE.fullmatch, os.listdir(data_dir))
               if m and m["split"] == split]
    found = sorted((int(m["index"]), m[0]) for m in matches)
    if not found:
        raise DataError(f"{data_dir}: no {split} shards (*_{split}_NNNNNN.npy): {fix}")
    return [os.path.join(data_dir, name) for _, name in found]


def open_shard(path: str) -> np.ndarray:
    """Memory-map a shard and check it: 1-D uint16, and a sample of its ids < 50257 (the loader
    checks every id it reads)."""
    fix = "rebuild it with `python fineweb.py` (or delete it)"
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated file, bad header, not a .npy at all
        raise DataError(f"{path}: unreadable shard ({e}); {fix}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise DataError(f"{path}: shard has dtype {tokens.dtype} and shape {tokens.shape}, "
                        f"expected 1-D uint16; {fix}")
    sample = np.concatenate([tokens[: 1 << 16], tokens[:: max(1, len(tokens) // (1 << 16))]])
    if len(sample) and int(sample.max()) >= GPT2_VOCAB_SIZE:
        raise DataError(f"{path}: token id {int(sample.max())} >= {GPT2_VOCAB_SIZE}: not GPT-2 "
                        f"tokens; {fix}")
    return tokens


def load_shards(data_dir: str, split: str) -> tuple[list[np.ndarray], list[str]]:
    paths = find_shards(data_dir, split)
    return [open_shard(p) for p in paths], paths


def load_text(path: str, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A UTF-8 text file as one document, <|endoftext|> and its tokens, cut in two: the last 10% of
    the tokens is the validation split. read_text (Part 2) checks the file."""
    ids = tokenize_batch([read_text(path)])  # the tokens of fineweb.py's shards, for the same text
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:]


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

    def __init__(self, arrays, names, B, T, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                 shuffle=True):
        self.arrays, self.names = list(arrays), list(names)
        self.B, self.T, self.grad_accum_steps = B, T, grad_accum_steps
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.seqs_per_step = B * world_size * grad_accum_steps
        self.counts = np.array([(len(a) - 1) // T for a in self.arrays], dtype=np.int64)
        self.seqs_per_epoch = int(self.counts.sum())
        self.position = 0  # sequences consumed by all ranks before the current optimizer step
        self.micro_step = 0
        self._epoch = None

    def _order(self, epoch):
        """(array visiting order, start offset of each visited array) for an epoch, cached."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.arrays)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
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
                rng = np.random.default_rng([self.seed, epoch, a + 1])
                self._perms[a] = rng.permutation(int(self.counts[a]))
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
            raise DataError(f"{self.names[a]}: token id {tokens[r, c]} at position {start + c:,} "
                            f"is not a GPT-2 token (ids must be < {GPT2_VOCAB_SIZE}): rebuild the "
                            f"shard with `python fineweb.py`")
        return tokens

    def batch(self, seq_numbers, device=None):
        """Sequences by global number -> (x, y) int64 tensors of shape (len, T), on `device`. Both
        are contiguous: a compiled model sees one memory layout in training and in validation."""
        tokens = self.tokens(seq_numbers)
        xy = np.stack([tokens[:, :-1], tokens[:, 1:]])  # (2, len, T)
        xy = torch.from_numpy(xy.astype(np.int64))  # only this batch becomes int64
        if device is not None and device.type == "cuda":
            # Speed: one copy of the (2, B, T) block, from pinned (page-locked) memory, is queued
            # without making the CPU wait, so it goes on launching the step's kernels
            xy = xy.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            xy = xy.to(device)
        return xy[0], xy[1]

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
        return {"position": self.position, "seqs_per_step": self.seqs_per_step, "seq_len": self.T,
                "seed": self.seed}

    def load_state_dict(self, state):
        self.position, self.micro_step = int(state["position"]), 0


# ------------------------------------------------------------------------------------------------
# The learning-rate schedule


def get_lr(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio=0.1) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ------------------------------------------------------------------------------------------------
# Evaluation: validation loss and samples here, HellaSwag in hellaswag.py


@torch.no_grad()
def validation_loss(model, loader: DataLoader, num_seqs: int, device, autocast) -> float:
    """Mean loss over the first num_seqs validation sequences (the same set on any world size).

    Rank r takes sequences r, r + world, ...; batches keep the training shape (B, T), the last one
    padded with targets of -1 (ignored), so a compiled model sees no new shape. Summed losses and
    token counts are all-reduced, so the mean is over exactly the same tokens on 1 or 8 GPUs. Each
    batch's sum is fp32 on the device (MPS has no float64); they add up in float64 on the host."""
    mine = list(range(loader.rank, num_seqs, loader.world_size))
    B, T = loader.B, loader.T
    sums = []  # per batch: (summed loss, scored tokens), fp32 on the device
    for i in range(0, len(mine), B):
        x, y = loader.batch(mine[i : i + B])
        if len(x) < B:  # pad to the training shape; padded rows score nothing
            x = torch.cat([x, torch.zeros(B - len(x), T, dtype=x.dtype)])
            y = torch.cat([y, torch.full((B - len(y), T), -1, dtype=y.dtype)])
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y, return_logits=False)  # else a compiled model outputs all logits
        n = (y != -1).sum().float()
        sums.append(torch.stack([loss.float() * n, n]))
    # a rank may have no sequence at all (fewer of them than ranks)
    total = torch.stack(sums).cpu().double().sum(dim=0) if sums else torch.zeros(2, dtype=torch.float64)
    if loader.world_size > 1:
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
    was_training = model.training
    model.eval()
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=top_k, generator=generator)
    model.train(was_training)
    return [enc.decode(row) for row in out.tolist()]


# ------------------------------------------------------------------------------------------------
# Processes, devices and precision


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
        mps = torch.backends.mps.is_available()
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
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
        index = local_rank if world_size > 1 or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if world_size > 1:
        if device.type == "mps":
            raise ConfigError("torchrun with --device mps is not supported: use --device cpu, or "
                              "one process")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device, device.type)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16() -> str | None:
    """The bf16 matrix instructions of this CPU, as torch detects them: "AMX" (Intel Xeon from
    Sapphire Rapids on), "AVX512-BF16" (AMD Zen 4 and 5, Intel Cooper Lake), or None (AVX2 only,
    where bf16 autocast is emulated and measured 14-190x slower than fp32; Arm CPUs: not measured)."""
    caps = torch.cpu.get_capabilities()
    if caps.get("amx_bf16"):
        return "AMX"
    return "AVX512-BF16" if caps.get("avx512_bf16") else None


def autocast_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The one precision decision (training, hellaswag.py and the benchmarks ask here): the dtype of
    the matmuls in every forward pass. `auto` gives bf16 on a GPU with bf16 tensor cores (compute
    capability 8.0 or higher: A100, H100, RTX 30xx/40xx), fp16 on older GPUs (V100, T4; there
    torch.cuda.is_bf16_supported() answers True since torch 2.4, counting slow emulation), bf16 on
    a CPU with bf16 instructions (cpu_bf16), and fp32 on other CPUs and MPS. Weights, optimizer
    state and the loss stay fp32 whatever the dtype."""
    if requested not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype {requested}: choose auto, {', '.join(DTYPES)}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"--dtype bf16: {name} (compute capability {major}.{minor}) has no "
                              f"bf16 hardware; use --dtype fp16 (or auto)")
        if requested == "auto":
            return torch.bfloat16 if major >= 8 else torch.float16
    if requested == "auto":
        # bf16 against fp32 on a 2-core Xeon with AMX (issue 22's figures): a 2048^3 matmul 2,513 vs
        # 347 GFLOP/s; the shakespeare preset 1.37x faster, final val loss 4.850 vs 4.816
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16() else torch.float32
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def autocast_context(device_type: str, dtype: torch.dtype):
    """The one autocast context, built once, entered around every forward pass (none for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def synchronize(device: torch.device):
    """Wait for the device's queued work: GPU work is asynchronous, so a clock read without this
    times only the launching of kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------------------------------------
# Training: gradient accumulation, DDP and the loop


def forward_backward(model, loader, grad_accum_steps: int, device, autocast, scaler=None, ddp=None):
    """The gradients of one optimizer step: grad_accum_steps micro-batches of B sequences on this
    rank, added up in the parameters' .grad. Returns this rank's mean loss as a device tensor (no
    host sync). `ddp`: the DDP wrapper of a multi-process run. bench/train.py times this too."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch(device)
        # DDP all-reduces (averages) the gradients over the ranks during backward. Only the last
        # micro-step needs that: before it, no_sync() lets the gradients pile up locally. It has to
        # be entered before the forward pass, which is where DDP decides.
        last = micro_step == grad_accum_steps - 1
        with ddp.no_sync() if ddp is not None and not last else nullcontext():
            with autocast:
                _, loss = model(x, y, return_logits=False)
            # backward adds gradients up; each micro-batch loss is a mean over its B*T tokens, so
            # dividing by the number of micro-steps makes the sum the whole batch's mean's gradient
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss_accum


def due(every: int, step: int, last_step: bool) -> bool:
    """Periodic work (every N steps, 0 = never) runs on multiples of N and on the last step."""
    return bool(every) and (step % every == 0 or last_step)


def train(cfg: "RunConfig", d: Dist, prep: "Prepared"):
    """One training run, as a script body in the lecture's order. preflight() has already checked
    every flag, the run folder, the checkpoint and the data files."""
    T = cfg.seq_len

    # --- the model -------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.init_from == "scratch":
        raw_model = GPT(GPTConfig(block_size=cfg.block_size or T, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:  # fine-tuning: OpenAI's GPT-2 (from the hub) or a Hugging Face GPT-2 folder
        raw_model = load_model(cfg.init_from, dropout=cfg.dropout).train()
    check_model(cfg, raw_model, prep)  # it fits --seq-len, and the checkpoint we resume
    # raw_model stays the plain module: we save, sample and run HellaSwag with it. `model`, made
    # under "compile and DDP" below, holds the same weights, compiled and wrapped for training
    raw_model.to(d.device)
    # TF32: the fp32 matmuls left outside autocast run on tensor cores (with a 10-bit mantissa)
    tf32 = d.device_type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    autocast = autocast_context(d.device_type, prep.dtype)  # around every forward pass
    flops_per_token = raw_model.flops_per_token(T)
    print0(f"model: {raw_model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOP per "
           f"token (6N + 12LCT)")

    # --- the micro-batch -------------------------------------------------------------------
    # A step sees total_batch_size tokens = B x T x processes x grad_accum_steps: B sequences are
    # what fits in memory at once, and adding up the gradients of micro-steps does the rest
    if cfg.batch_size == "auto":
        B = auto_micro_batch(cfg, raw_model, d, autocast)
    else:
        B = cfg.batch_size
    grad_accum_steps = micro_steps(cfg, B, d.world_size)
    print0(f"batch: {cfg.total_batch_size:,} tokens per step = {B} x {T} x {d.world_size} "
           f"processes x {grad_accum_steps} micro-steps")

    # --- the loaders -----------------------------------------------------------------------
    # which sequences a step sees depends on the seed only, never on B or the number of processes
    shape = dict(B=B, T=T, grad_accum_steps=grad_accum_steps, rank=d.rank, world_size=d.world_size)
    train_loader = DataLoader(*prep.train, **shape, seed=cfg.seed, shuffle=True)
    val_loader = DataLoader(*prep.val, **shape, shuffle=False)  # the same sequences every time
    epoch = train_loader.seqs_per_epoch
    steps = epoch / train_loader.seqs_per_step
    print0(f"data: {epoch:,} training sequences per epoch ({steps:.1f} steps)")

    # --- the optimizer ---------------------------------------------------------------------
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, d.device_type)
    # updater.apply_update() calls optimizer.step(), with loss scaling when autocast is fp16, and
    # skips the update of a non-finite loss
    updater = Updater(optimizer, grad_scaler(d.device_type, prep.dtype), raw_model, cfg)

    # --- resume ----------------------------------------------------------------------------
    # weights, optimizer moments, loss scale, data position and random states: the run goes on
    # as if it had never stopped
    start_step, val_loss = 0, None
    if prep.ckpt is not None:
        start_step, val_loss = resume(prep, raw_model, updater, train_loader, cfg, d)

    # --- compile and DDP -------------------------------------------------------------------
    # DDP first, then the compiler, as PyTorch documents it: the compiler then splits the
    # backward pass at DDP's gradient buckets, so each bucket's all-reduce overlaps the rest
    ddp = None
    if d.ddp:
        # no buffer broadcast before each pass: the one buffer (the vocabulary bias) never changes
        ddp = DDP(raw_model, device_ids=[d.local_rank] if d.device_type == "cuda" else None,
                  gradient_as_bucket_view=True, **{DDP_BUFFER_SYNC: False})
    model = ddp or raw_model
    use_compile, why = compile_choice(cfg, d)
    if use_compile:
        model = torch.compile(model)  # the first step compiles (a minute for 124M on a GPU)
    scaled = " with loss scaling" if updater.scaler else ""
    print0(f"device: {d.device} x {d.world_size} process(es), autocast: {dtype_name(prep.dtype)}"
           f"{dtype_reason(d.device, cfg.dtype)}{scaled}, compile: {use_compile}{why}, deterministic: "
           f"{torch.are_deterministic_algorithms_enabled()}")
    log = start_log(cfg, d, prep, start_step)  # log.txt from here on; --overwrite takes effect
    peak = None  # the bf16 (fp16) peak: no MFU for fp32
    if d.device_type == "cuda" and prep.dtype != torch.float32:
        peak = peak_flops(torch.cuda.get_device_name(d.device))
    stop = StopRequest()  # SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit
    step_times = []

    # --- the loop --------------------------------------------------------------------------
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last_step = step == cfg.max_steps
            # Evaluation comes before the step: step 0 shows the untrained model (a loss near
            # ln 50257 = 10.8), and the last step, max_steps, the weights after every update, which
            # the last checkpoint saves. Every rank takes part, so each decides by the step alone.
            if due(cfg.val_every, step, last_step):
                model.eval()  # dropout off
                val_loss = validation_loss(model, val_loader, prep.val_seqs, d.device, autocast)
                model.train()
                log.record(step, "val", val_loss, f"val loss {val_loss:.4f}")
            if due(cfg.hellaswag_every, step, last_step):
                # on the raw model: the shapes change with every batch, which would recompile
                result = hellaswag.evaluate(raw_model, prep.hellaswag, device=d.device,
                                            batch_size=max(1, B // 4), autocast=autocast,
                                            rank=d.rank, world_size=d.world_size)
                log.record(step, "hella", result["acc_norm"], hellaswag.summary(result))
            if due(cfg.sample_every, step, last_step) and step > 0:
                for i, text in enumerate(sample_text(raw_model, cfg.prompt, cfg.num_samples,
                                                     cfg.sample_tokens, d.device, autocast,
                                                     seed=cfg.seed + 1000 * d.rank + step)):
                    print(f"rank {d.rank} sample {i}: {text!r}", flush=True)  # every rank its own
            # a checkpoint of the weights after `step` updates, with the evaluation just made;
            # none while the losses are not finite, so that the last good ones stay on disk
            saving = due(cfg.checkpoint_every, step, last_step) and not updater.bad_in_a_row
            if saving and step > start_step:
                save(step, cfg, d, raw_model, updater, train_loader, val_loss)
            if last_step:
                break

            # ------------------------------- BEGIN the optimization step -----------------------
            t0 = time.perf_counter()
            # the last step's gradients go (set_to_none frees them), then this step's add up
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(model, train_loader, grad_accum_steps, d.device, autocast,
                                    updater.scaler, ddp)
            if updater.scaler is not None:
                updater.scaler.unscale_(optimizer)  # fp16: clip the true gradients, not scaled ones
            # clipping the gradient's global norm keeps one bad batch from throwing the weights far
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            # the learning rate of this step: linear warmup, then cosine decay
            lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # one all-reduce per step, for the log and for stopping: the loss averaged over the
            # ranks (the gradients already are), and whether any rank was asked to stop, so that
            # every rank stops after the same step
            stop_flag = torch.tensor(float(stop.requested), device=d.device)
            stats = torch.stack([loss.float(), stop_flag])
            if d.ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            loss, stop_now, norm = stats[0].item() / d.world_size, stats[1].item() > 0, norm.item()
            updater.apply_update(step, loss, norm, log)  # optimizer.step(), unless not finite
            synchronize(d.device)  # the clock measures finished work, not queued kernels
            dt = time.perf_counter() - t0
            step_times.append(dt)
            # one line per step: loss, learning rate, gradient norm, time, throughput, MFU
            tokens_per_sec = cfg.total_batch_size / dt
            mfu = flops_per_token * tokens_per_sec / d.world_size / peak if peak else None
            log.record(step, "train", loss, f"loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt "
                       f"{1000 * dt:.1f}ms | tok/sec {tokens_per_sec:,.0f}"
                       + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            log.scalars(step, lr=lr, grad_norm=norm, tokens_per_sec=tokens_per_sec, mfu=mfu)
            # ------------------------------- END the optimization step -------------------------

            if stop_now:  # the step under way when the signal came is finished, then saved
                if not updater.bad_in_a_row:  # (unless its loss was not finite: keep the good ones)
                    save(step + 1, cfg, d, raw_model, updater, train_loader, val_loss)
                print0(f"stopped by signal after step {step}; continue with --resume auto")
                return
    finally:
        log.close()  # TensorBoard's last points too, whatever ends the run
    updater.check_last_step(cfg.max_steps - 1)
    print0(run_summary(step_times, cfg, d, peak, flops_per_token))
    export(raw_model, cfg, d)


# ================================================================================================
# PART 2: RUNNING IT FOR REAL
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# The command line and the presets


class ConfigError(UserError):
    """A command-line setting that cannot work; the message names the flag and the fix."""


PRESETS = {
    # GPT-2 124M on 10B tokens of FineWeb-Edu: 19073 steps of 2**19 tokens (the RunConfig defaults)
    "gpt2-124m": {},
    # The rest of the GPT-2 miniseries: OpenAI's shapes for GPT-2 medium, large and xl, trained with
    # the recipes llm.c published (scripts/run_gpt2_350M.sh, run_gpt2_774M.sh, run_gpt2_1558M.sh):
    # the same AdamW (weight decay 0.1, grad clip 1.0), 700 warmup steps, cosine decay, T = 1024.
    "gpt2-350m": dict(
        n_layer=24, n_head=16, n_embd=1024,  # GPT-2 medium
        max_lr=3e-4, min_lr_ratio=0.0, warmup_steps=700,  # llm.c: -l 0.0003 -q 0.0 -u 700
        total_batch_size=524288, max_steps=60000,  # -d 524288 -x 60000: 31.5B tokens
        data_dir="fineweb100B", checkpoint_every=2000,  # FineWeb (not -Edu) 100B tokens; -n 2000
    ),
    "gpt2-774m": dict(
        n_layer=36, n_head=20, n_embd=1280,  # GPT-2 large
        max_lr=2.5e-4, min_lr_ratio=0.0, warmup_steps=700,  # -l 0.00025 -q 0.0 -u 700
        total_batch_size=524288, max_steps=286102,  # -d 524288 -x 286102: 150B tokens, 1.5 epochs
        data_dir="fineweb100B", checkpoint_every=4000,  # FineWeb 100B; -n 4000
    ),
    "gpt2-1558m": dict(
        n_layer=48, n_head=25, n_embd=1600,  # GPT-2 xl
        max_lr=6e-4, min_lr_ratio=0.1, warmup_steps=700,  # -l 0.0006 -q 0.1 -u 700
        total_batch_size=1048576, max_steps=32000,  # -d 1048576 -x 32000: 33.6B tokens
        data_dir="edu_fineweb100B", checkpoint_every=2000,  # FineWeb-Edu 100B; -n 2000
    ),
    # Tiny Shakespeare (or any --input text) on a laptop CPU: a model that learns in minutes
    "shakespeare": dict(
        # Tuned on a 2-core CPU (7 minutes there; README: Results). At equal tokens, 1,024-token
        # steps beat 2,048 (val 4.82 vs 5.13 after 1.6M tokens) and 512; dropout 0.1 helps a little
        # (each token is seen about 4 times); 8 layers did not help. LR 6e-3 after 50 warmup steps
        # had gradient-norm spikes (up to 23) that cost 0.3 of loss for good; 4e-3 after 100 steps
        # trained smoothly and ended lower than 6e-3 (4.81 vs 4.86 in 1,400 steps).
        input="input.txt", n_layer=4, n_head=4, n_embd=128, dropout=0.1, batch_size=8, seq_len=128,
        total_batch_size=1024, max_steps=1200, warmup_steps=100, max_lr=4e-3, val_every=200,
        val_tokens=32768, hellaswag_every=0, sample_every=400, checkpoint_every=400,
    ),
}
NO_PROBE_MICRO_BATCH = 8  # --batch-size auto where no memory probe runs (CPU, MPS): at most this


def batch_size_value(text: str):
    """--batch-size: auto, or a whole number of at least 1."""
    if text == "auto":
        return text
    try:
        return number(int, 1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer of at least 1, got {text!r}") \
            from None


def at_least(least, kind=int):
    return number(kind, least)


@dataclass
class RunConfig:
    preset: str = flag("gpt2-124m", "settings to start from; flags override them (--input alone "
                       "starts from shakespeare)", choices=tuple(PRESETS))
    # data
    data_dir: str = flag("edu_fineweb10B", "folder of .npy token shards (python fineweb.py makes it)")
    input: str = flag("", "train on this UTF-8 text file instead (its last 10% is validation); "
                      "input.txt is downloaded if missing")
    # model
    init_from: str = flag("scratch", "scratch, a GPT-2 name (gpt2, gpt2-medium, ...) or a local "
                          "Hugging Face GPT-2 folder (fine-tuning)")
    n_layer: int = flag(12, "transformer blocks", at_least(1))
    n_head: int = flag(12, "attention heads", at_least(1))
    n_embd: int = flag(768, "model width (channels), a multiple of --n-head", at_least(1))
    dropout: float = flag(0.0, "dropout probability in training (0 = off; against overfitting on "
                          "small data)", number(float, 0, below=1))
    block_size: int = flag(0, "position-table size (tokens); 0 = --seq-len", at_least(0))
    # batch
    batch_size: int | str = flag("auto", "micro-batch B (sequences per forward pass per process); "
                                 "auto: on CUDA the largest that fits, else at most 8",
                                 batch_size_value)
    seq_len: int = flag(1024, "sequence length T (tokens)", at_least(1))
    total_batch_size: int = flag(524288, "tokens per optimizer step, over all processes and "
                                 "micro-steps", at_least(1))
    # optimization
    max_steps: int = flag(19073, "optimizer steps (19073 x 524288 tokens = 10B tokens)", at_least(1))
    warmup_steps: int = flag(715, "linear LR warmup steps", at_least(0))
    max_lr: float = flag(6e-4, "peak learning rate", number(float, above=0))
    min_lr_ratio: float = flag(0.1, "the cosine decay ends at this fraction of --max-lr",
                               number(float, 0, 1))
    weight_decay: float = flag(0.1, "AdamW weight decay of 2-D parameters", at_least(0, float))
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)", at_least(0, float))
    seed: int = flag(1337, "seed of the initial weights and of the data order", at_least(0))
    dtype: str = flag("auto", "autocast precision; auto: bf16 on GPUs and CPUs with bf16 hardware, "
                      "fp16 on older GPUs, fp32 on other CPUs and MPS", choices=("auto", *DTYPES))
    deterministic: bool = flag(None, "the same losses to the bit from the same command (default: "
                               "on for CPU runs, where it costs nothing measurable; README: "
                               "Reproducibility)", bool)
    # periodic work (0 = off; each also runs at the end)
    val_every: int = flag(250, "validation loss every N steps", at_least(0))
    val_tokens: int = flag(10485760, "validation tokens (a fixed set, whatever the world size); not "
                           "given: the whole val split, up to this many", at_least(1))
    hellaswag_every: int = flag(250, "HellaSwag accuracy every N steps", at_least(0))
    hellaswag_data: str = flag("", "local HellaSwag JSON-lines file (default: the download)")
    hellaswag_limit: int = flag(0, "score the first N HellaSwag examples (0 = all 10,042)",
                                at_least(0))
    sample_every: int = flag(250, "print --num-samples samples every N steps", at_least(0))
    prompt: str = flag("Hello, I'm a language model,", "what samples continue")
    num_samples: int = flag(4, "samples each time", at_least(1))
    sample_tokens: int = flag(32, "new tokens per sample", at_least(1))
    checkpoint_every: int = flag(1000, "checkpoint every N steps", at_least(0))
    keep_checkpoints: int = flag(3, "keep the last N checkpoints (0 = all)", at_least(0))
    # run
    log_dir: str = flag("log", "folder of log.txt and checkpoints; one run per folder")
    overwrite: bool = flag(False, "delete another run's log and checkpoints in --log-dir first")
    tensorboard: bool = flag(False, "also write TensorBoard curves to --log-dir")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = flag(None, "torch.compile the model (default: on for CUDA GPUs of compute "
                         "capability 7.0 and up, which Triton supports)", bool)
    resume: str = flag("", "'auto' (the latest checkpoint in --log-dir, if any) or a checkpoint")
    eval_only: bool = flag(False, "with --resume or --init-from: validate, run HellaSwag (if on), "
                           "sample, then exit without writing to --log-dir")
    export_hf: str = flag("", "after training (or --eval-only), write the model to this folder in "
                          "Hugging Face format")
    max_bad_steps: int = flag(5, "stop after this many non-finite losses in a row", at_least(1))
    # not flags: the command line's arguments, and the flags among them
    argv: tuple = field(default=())
    given: frozenset = field(default=frozenset())


def make_parser() -> OneLineParser:
    """A flag per RunConfig field; --help shows each default and the shakespeare preset's value."""
    parser = OneLineParser(prog="train_gpt2.py", description="Train GPT-2 (the module docstring "
                           "has the commands). Explicit flags override the preset.")
    small = PRESETS["shakespeare"]
    add_flags(parser, RunConfig, note=lambda f: f"; shakespeare: {small[f.name]!r}"
              if f.name in small else "")
    return parser


def parse_args(argv=None) -> RunConfig:
    """Flags over the preset over the defaults (argparse checks each flag's range), then the
    checks that involve several flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = given_flags(make_parser().parse_args(argv))
    preset = given.get("preset") or ("shakespeare" if given.get("input") else RunConfig.preset)
    cfg = RunConfig(**{**PRESETS[preset], **given, "preset": preset, "argv": tuple(argv),
                       "given": frozenset(given)})
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}: the "
                          f"heads split the width")
    if cfg.block_size and cfg.block_size < cfg.seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds --block-size {cfg.block_size}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite deletes the run that --resume would continue: pass one")
    if cfg.eval_only and not cfg.resume and cfg.init_from == "scratch":
        raise ConfigError("--eval-only needs a model: pass --resume PATH|auto or --init-from")
    return cfg


def micro_steps(cfg: RunConfig, B: int | None, world_size: int) -> int:
    """The one check that the batch sizes fit together: gradient-accumulation steps per optimizer
    step for micro-batch B (None: not known yet), or a ConfigError that proposes valid values."""
    per_micro_step = (B or 1) * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro_step:
        lower = max(1, cfg.total_batch_size // per_micro_step) * per_micro_step
        what = f"batch-size x seq-len x processes = {B} x " if B else "seq-len x processes = "
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not divisible by {what}"
                          f"{cfg.seq_len} x {world_size} = {per_micro_step}: use {lower} or "
                          f"{lower + per_micro_step}" + (", or change --batch-size" if B else ""))
    return cfg.total_batch_size // per_micro_step



# ------------------------------------------------------------------------------------------------
# Pre-flight checks: every flag, folder, checkpoint and data file, before the model is built


@dataclass
class Prepared:
    """What preflight() checked and read, for train() or evaluate_only()."""
    dtype: torch.dtype  # autocast's
    ckpt: dict | None = None  # the checkpoint to resume (or evaluate), on the CPU
    ckpt_path: str | None = None
    train: tuple = ((), ())  # (token arrays, their names) of the train split; none for --eval-only
    val: tuple = ((), ())  # the same for the val split
    val_seqs: int = 0  # sequences per validation
    hellaswag: list | None = None  # the HellaSwag examples, when --hellaswag-every is on
    folder: "RunFolder | None" = None  # the run folder, locked by rank 0; none for --eval-only


def preflight(cfg: RunConfig, d: Dist) -> Prepared:
    """Everything that can fail before the model is built (which, compiled, takes a while), in this
    order: precision and packages, the run folder, the checkpoint, the data, HellaSwag."""
    prep = Prepared(dtype=autocast_dtype(d.device, cfg.dtype))
    if cfg.tensorboard:
        need_package("tensorboard", "--tensorboard")
    if cfg.export_hf:  # found out now, not after hours of training
        if os.path.isfile(cfg.export_hf):
            raise ConfigError(f"--export-hf {cfg.export_hf}: a file, not a folder")
        need_package("transformers", "--export-hf")
    if not cfg.eval_only:  # one run, one writer (rank 0); --eval-only writes nothing there
        prep.folder = RunFolder(cfg.log_dir)
        on_rank0(d, lambda: prep.folder.prepare(bool(cfg.resume), cfg.overwrite))
    if cfg.resume:
        prep.ckpt_path, prep.ckpt = find_resume_checkpoint(cfg)
    if prep.ckpt is not None and cfg.eval_only:  # evaluate on the run's own validation tokens
        for key in ("input", "data_dir", "seq_len", "val_tokens"):
            if key not in cfg.given and key in prep.ckpt["run_config"]:
                setattr(cfg, key, prep.ckpt["run_config"][key])
    if not cfg.eval_only:
        micro_steps(cfg, None if cfg.batch_size == "auto" else cfg.batch_size, d.world_size)
    if not cfg.eval_only or cfg.val_every:
        prep.train, prep.val = read_splits(cfg)
    if cfg.val_every:
        prep.val_seqs = plan_validation(cfg, prep.val)
    if cfg.hellaswag_every:
        try:
            prep.hellaswag = hellaswag.load_examples(
                cfg.hellaswag_data or None, split="val", limit=cfg.hellaswag_limit or None,
                fix="pass --hellaswag-data FILE with a local copy, or --hellaswag-every 0")
        except hellaswag.HellaSwagError as e:
            raise ConfigError(f"--hellaswag-every {cfg.hellaswag_every}: {e}") from None
    return prep


def need_package(name: str, flag_name: str):
    try:
        __import__(name)
    except ImportError:
        raise ConfigError(f"{flag_name} needs the {name} package: pip install {name}") from None


def read_splits(cfg: RunConfig) -> tuple[tuple, tuple]:
    """(train, val) token arrays with their names, from --input or --data-dir; --eval-only reads no
    train split."""
    T, seqs_per_step = cfg.seq_len, cfg.total_batch_size // cfg.seq_len
    if cfg.input:
        train_ids, val_ids = load_text(cfg.input)
        train = ([train_ids], [f"{cfg.input} (first 90%)"])
        val = ([val_ids], [f"{cfg.input} (last 10%)"])
        fix = "use a longer text, or lower --seq-len / --total-batch-size"
    else:
        train = ((), ()) if cfg.eval_only else load_shards(cfg.data_dir, "train")
        val = load_shards(cfg.data_dir, "val")
        fix = "build more data with `python fineweb.py`, or lower --total-batch-size"
    have = count_sequences(train[0], T)
    if not cfg.eval_only and have < seqs_per_step:
        raise DataError(f"{describe(train[1])}: the train split has {have} sequences of T={T} "
                        f"tokens, fewer than the {seqs_per_step} one optimizer step needs; {fix}")
    return train, val


def plan_validation(cfg: RunConfig, val) -> int:
    """Sequences per validation: --val-tokens when given (at most the split), else the whole split
    up to the preset's number."""
    T = cfg.seq_len
    have = count_sequences(val[0], T)
    wanted = max(1, cfg.val_tokens // T)
    if "val_tokens" in cfg.given and wanted > have:
        raise ConfigError(f"--val-tokens {cfg.val_tokens}: the val split ({describe(val[1])}) has "
                          f"{have * T:,} tokens in sequences of T={T}; pass at most {have * T}, or "
                          f"leave --val-tokens out")
    if have == 0:
        raise DataError(f"{describe(val[1])}: the val split has no sequence of T={T} tokens; lower "
                        f"--seq-len, or --val-every 0 to train without validation")
    n = min(wanted, have)
    print0(f"validation: {n * T:,} tokens" + (" (the whole val split)" if n == have else ""))
    return n


def count_sequences(arrays, T: int) -> int:
    return sum((len(a) - 1) // T for a in arrays)  # as DataLoader cuts them


def describe(names) -> str:
    return ", ".join(names[:3]) + ("..." if len(names) > 3 else "")


def read_text(path: str) -> str:
    """The text of --input, checked: a UTF-8 text file (input.txt, Tiny Shakespeare, is downloaded
    when it is missing)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder: pass --input with a text file (or build shards with "
                        f"`python fineweb.py`)")
    if not os.path.isfile(path):
        if os.path.basename(path) != "input.txt":
            raise DataError(f"{path}: no such file: pass --input with a plain text file")
        try:
            download(TINY_SHAKESPEARE_URL, path)
        except OSError as e:
            raise DataError(f"{path}: missing, and downloading Tiny Shakespeare failed ({e}); "
                            f"download {TINY_SHAKESPEARE_URL} to {path} by hand, or pass --input with "
                            f"another text file") from None
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        raise DataError(f"{path}: byte {raw.index(0):,} is NUL: a binary file, not text; pass --input "
                        f"with a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start:,} is 0x{raw[e.start]:02x}); convert "
                        f"it to UTF-8 (for example `iconv -f latin1 -t utf-8`) or pass another --input"
                        ) from None


TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                        "tinyshakespeare/input.txt")


def check_model(cfg: RunConfig, model: GPT, prep: Prepared):
    """Checks that need the model: --seq-len fits its position table (a pretrained model brings its
    own), and a checkpoint to resume was made by the same shape of model."""
    if cfg.seq_len > model.config.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's block_size "
                          f"{model.config.block_size}")
    if prep.ckpt is not None:
        diffs = config_differences(prep.ckpt["model_config"], asdict(model.config))
        if diffs:
            raise CheckpointError(f"{prep.ckpt_path}: the checkpoint's model differs from this "
                                  f"run's: " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------
# The run folder, checkpoints and resume

CHECKPOINT_FORMAT = "build-gpt2-checkpoint"
# 2: tensors and plain values only, so torch's restricted unpickler reads it (1 pickled a NumPy array)
CHECKPOINT_VERSION = 2
# what the readers take from a checkpoint, and its type ("scaler", "val_loss", "skipped_steps" are
# optional)
CHECKPOINT_KEYS = {"step": int, "model": dict, "model_config": dict, "run_config": dict,
                   "optimizer": dict, "train_loader": dict, "rng": list, "world_size": int}
CONVERT = "python -c \"import train_gpt2; train_gpt2.convert_checkpoint('{}')\""
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{6,})\.pt")


class CheckpointError(UserError):
    """A checkpoint or model that cannot be used (truncated, foreign, or for another model)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint of another format, or one that would run code: --resume auto stops at it
    rather than going back to an older checkpoint."""


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise CheckpointError naming the file. Always
    onto the CPU: the random states in it must stay CPU tensors (torch.set_rng_state and
    torch.cuda.set_rng_state take nothing else); load_state_dict copies the rest to the device."""
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint file"
        raise CheckpointError(f"{path}: {what}")
    try:
        # weights_only: torch's restricted unpickler builds tensors and plain values, never other
        # objects, so a checkpoint from elsewhere cannot run code while it loads.
        # mmap: the tensors are read from the file as they are copied to the device, so the ranks
        # of a node do not each hold a whole checkpoint (25 GB for GPT-2 1558M) in memory
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found[1] if found else "not a tensor"
        raise CheckpointFormatError(f"{path}: holds a Python object ({what}) that loading would "
                                    f"have to run code to build: refused. If it is a checkpoint of "
                                    f"train_gpt2.py before format 2 and you trust where it came "
                                    f"from, convert it: {CONVERT.format(path)}") from None
    except Exception as e:  # truncated zip, random bytes...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); it may be "
                              f"truncated by a crash during saving: use an earlier checkpoint"
                              ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train_gpt2.py checkpoint (no {CHECKPOINT_FORMAT!r} "
                              f"marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointFormatError(f"{path}: checkpoint format version {ckpt.get('version')}, "
                                    f"this script reads {CHECKPOINT_VERSION}")
    problems = [f"{key} ({kind.__name__})" for key, kind in CHECKPOINT_KEYS.items()
                if not isinstance(ckpt.get(key), kind)]
    if not problems:  # one level down: what load_state_dict and set_rng_state read
        problems = model_problems(ckpt["model_config"], ckpt["model"])
        problems += [f"{key}[{name!r}]" for key, names in (("optimizer", ("state", "param_groups")),
                     ("train_loader", ("position",))) for name in names if name not in ckpt[key]]
        rng_keys = {"python", "numpy", "torch"}
        if len(ckpt["rng"]) != ckpt["world_size"] or not all(
                isinstance(r, dict) and rng_keys <= set(r) for r in ckpt["rng"]):
            problems.append(f"rng (one dict of {', '.join(sorted(rng_keys))} per process)")
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise CheckpointError(f"{path}: a damaged checkpoint: missing or wrong: "
                              f"{', '.join(problems[:4])}{more}")
    return ckpt


def model_problems(model_config: dict, weights: dict) -> list[str]:
    """What keeps a checkpoint's weights from loading into the GPT its model_config describes (the
    model is built on the meta device: no memory, no time)."""
    fields = set(GPTConfig.__dataclass_fields__)
    if set(model_config) - fields:
        return [f"model_config (unknown {', '.join(sorted(set(model_config) - fields))})"]
    try:
        with torch.device("meta"):
            expected = GPT(GPTConfig(**model_config)).state_dict()
    except (TypeError, ValueError) as e:  # a value of the wrong type
        return [f"model_config ({e})"]
    problems = [f"model[{name!r}] (a tensor of shape {tuple(t.shape)})" for name, t in expected.items()
                if not (isinstance(weights.get(name), torch.Tensor) and weights[name].shape == t.shape)]
    return problems + [f"model[{name!r}] (not in this model)" for name in set(weights) - set(expected)]


def convert_checkpoint(path: str):
    """Rewrite a checkpoint of format 1 (train_gpt2.py before format 2) as format 2, in place. It
    unpickles the file with Python's full unpickler, which can run code: only for a file you trust."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
            and ckpt.get("version") == 1):
        raise CheckpointError(f"{path}: not a format 1 train_gpt2.py checkpoint")
    for state in ckpt["rng"]:
        state["numpy"] = plain_numpy_state(state["numpy"])
    ckpt["run_config"]["given"] = sorted(ckpt["run_config"]["given"])
    ckpt["version"] = CHECKPOINT_VERSION
    atomic_write(path, lambda f: torch.save(ckpt, f))
    read_checkpoint(path)
    print(f"converted {path} to checkpoint format {CHECKPOINT_VERSION}")


def model_from_checkpoint(ckpt: dict, dropout: float | None = None) -> GPT:
    config = GPTConfig(**ckpt["model_config"])
    model = GPT(config if dropout is None else GPTConfig(**{**asdict(config), "dropout": dropout}))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(source: str, device="cpu", dropout: float = 0.0) -> GPT:
    """The one model loader (--init-from, --eval-only, hellaswag.py, the notebook): a train_gpt2.py
    checkpoint (a .pt file), a GPT-2 name (gpt2, gpt2-medium, ..., from the Hugging Face hub) or a
    local Hugging Face GPT-2 folder; in eval mode on `device`. A failure is one CheckpointError."""
    if os.path.isfile(source) or source.endswith(".pt"):
        model = model_from_checkpoint(read_checkpoint(source), dropout)
    else:
        try:
            model = GPT.from_pretrained(source, dropout=dropout)
        except Exception as e:  # a bad name, an incomplete folder, no network for the hub...
            reason = " ".join(str(e).split())[:300]  # on one line
            raise CheckpointError(f"cannot load model {source!r}: {reason}") from None
    return model.to(device).eval()


def rng_state(device_type: str) -> dict:
    """The random states a run draws from: Python's, NumPy's, torch's CPU one and the device's."""
    state = {"python": random.getstate(), "numpy": plain_numpy_state(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if device_type in ("cuda", "mps"):
        state[device_type] = getattr(torch, device_type).get_rng_state()
    return state


def plain_numpy_state(state: tuple) -> tuple:
    """NumPy's random state with its key as a list of ints, not an array: a checkpoint holds no
    NumPy objects (np.random.set_state takes it back as it is)."""
    name, key, *rest = state
    return (name, [int(k) for k in key], *rest)


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
    """Write ckpt_<step>.pt safely, then point LOG_DIR/latest at it, then prune old checkpoints.
    A failed write (a full disk) is a CheckpointError; the previous checkpoint and `latest` stay."""
    path = checkpoint_path(log_dir, state["step"])
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        # "latest" is updated only once the checkpoint it names is complete on disk
        name = os.path.basename(path).encode() + b"\n"
        atomic_write(os.path.join(log_dir, "latest"), lambda f: f.write(name))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        previous = [s for s in checkpoint_steps(log_dir) if s != state["step"]]
        kept = (f"{checkpoint_path(log_dir, previous[-1])} is intact" if previous else
                "no earlier checkpoint exists")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        free = shutil.disk_usage(log_dir).free / 1e9
        raise CheckpointError(f"{path}: could not be written ({reason}; {free:.1f} GB free in "
                              f"{log_dir}); {kept}: free some space, then continue with --resume auto"
                              ) from None
    if keep > 0:  # the newest `keep` up to this one stay; later ones (before a resume) are not ours
        older = [s for s in checkpoint_steps(log_dir) if s < state["step"]]
        for step in older[: max(0, len(older) - (keep - 1))]:
            os.remove(checkpoint_path(log_dir, step))
    return path


def latest_checkpoint(log_dir: str, before: int | None = None) -> str | None:
    """The one checkpoint lookup: the newest checkpoint of a run folder, the one LOG_DIR/latest
    names (updated only after a complete save), else the one of the highest step; with `before`,
    the newest of an earlier step. None when there is none."""
    pointer = os.path.join(log_dir, "latest")
    if os.path.isdir(pointer):
        raise CheckpointError(f"{pointer}: a folder where a file naming the latest checkpoint "
                              f"belongs: remove it")
    steps = [s for s in checkpoint_steps(log_dir) if before is None or s < before]
    if before is None and os.path.isfile(pointer):
        with open(pointer, "rb") as f:
            name = f.read(200).decode("utf-8", "replace").strip()
        if CHECKPOINT_NAME.fullmatch(name) and os.path.isfile(os.path.join(log_dir, name)):
            return os.path.join(log_dir, name)
        print0(f"warning: {pointer} names {name!r}, which is not a checkpoint in {log_dir}; using "
               f"the newest one")
    return checkpoint_path(log_dir, steps[-1]) if steps else None


def find_resume_checkpoint(cfg: RunConfig) -> tuple[str | None, dict | None]:
    """--resume PATH, or --resume auto: (path, contents) of the latest checkpoint in --log-dir, or
    of the newest readable one if that one is damaged; (None, None) when there is none yet."""
    if cfg.resume != "auto":
        return cfg.resume, read_checkpoint(cfg.resume)
    path = latest_checkpoint(cfg.log_dir)
    while path is not None:
        try:
            return path, read_checkpoint(path)
        except CheckpointFormatError:
            raise
        except CheckpointError as e:
            print0(f"warning: {e}; trying an older one")
            path = latest_checkpoint(cfg.log_dir, before=int(CHECKPOINT_NAME.search(path)[1]))
    if cfg.eval_only:
        raise CheckpointError(f"--resume auto: no checkpoint in {cfg.log_dir}")
    print0(f"--resume auto: no checkpoint in {cfg.log_dir} yet, starting from scratch")
    return None, None


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def resume(prep: Prepared, model: GPT, updater: "Updater", train_loader: DataLoader,
           cfg: RunConfig, d: Dist) -> tuple[int, float | None]:
    """Restore a run from its checkpoint: (the step to go on from, the last validation loss)."""
    ckpt = prep.ckpt
    model.load_state_dict(ckpt["model"])
    optimizer = updater.optimizer
    ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
    for group, settings in zip(optimizer.param_groups, ours):  # but weight decay, betas, fused...
        group.update(settings)  # are this run's, not the checkpoint's
    if updater.scaler is not None and ckpt.get("scaler"):
        updater.scaler.load_state_dict(ckpt["scaler"])
    updater.skipped_total = ckpt.get("skipped_steps", 0)
    saved = ckpt["run_config"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
               for k in ("seed", "seq_len", "total_batch_size", "input", "data_dir")
               if saved.get(k) != getattr(cfg, k)]
    if changed:
        print0(f"warning: {', '.join(changed)}: the data order differs from the original run")
    train_loader.load_state_dict(ckpt["train_loader"])
    if ckpt["world_size"] == d.world_size:
        set_rng_state(ckpt["rng"][d.rank], d.device_type)
    else:
        print0(f"warning: checkpoint made by {ckpt['world_size']} processes, now {d.world_size}: "
               f"weights, optimizer, step and data position are kept (a step's data does not depend on "
               f"the number of processes); per-process random states are not restored")
    print0(f"resumed from {prep.ckpt_path} at step {ckpt['step']}")
    step, val_loss = ckpt["step"], ckpt.get("val_loss")
    prep.ckpt = None  # the only reference: its memory goes back before training starts
    return step, val_loss


def save(step: int, cfg: RunConfig, d: Dist, model: GPT, updater: "Updater",
         train_loader: DataLoader, val_loss: float | None):
    """A checkpoint after `step` updates: every rank's random state is gathered; rank 0 writes."""
    rngs = [None] * d.world_size
    if d.ddp:
        dist.all_gather_object(rngs, rng_state(d.device_type))
    else:
        rngs[0] = rng_state(d.device_type)
    state = None
    if d.is_main:
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                 "model": model.state_dict(), "optimizer": updater.optimizer.state_dict(),
                 "scaler": updater.scaler.state_dict() if updater.scaler else None,
                 "train_loader": train_loader.state_dict(), "rng": rngs,
                 "model_config": asdict(model.config),
                 "run_config": {**asdict(cfg), "given": sorted(cfg.given)},
                 "world_size": d.world_size, "val_loss": val_loss,
                 "skipped_steps": updater.skipped_total}
    t0 = time.perf_counter()
    # rank 0 writes, every rank waits (and raises its error, if any)
    on_rank0(d, lambda: save_checkpoint(cfg.log_dir, state, keep=cfg.keep_checkpoints))
    print0(f"saved {checkpoint_path(cfg.log_dir, step)} ({time.perf_counter() - t0:.2f}s)")


def export(model: GPT, cfg: RunConfig, d: Dist):
    if cfg.export_hf and d.is_main:
        model.export_hf(cfg.export_hf)
        print0(f"exported the model in Hugging Face format to {cfg.export_hf}")


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
        overwriting it: clear() deletes its files, once everything else has been checked)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"--log-dir {self.path}: a file, not a folder; pass another --log-dir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--log-dir {self.path}: cannot create it ({e.strerror}); pass another "
                              f"--log-dir") from None
        self.lock()
        if self.other_run() and not resuming and not overwrite:
            raise ConfigError(f"--log-dir {self.path} holds another run ({describe(self.other_run())}): "
                              f"continue it with --resume auto, pass another --log-dir, or pass "
                              f"--overwrite to delete that run first")

    def lock(self):
        """Become the folder's one writer, or raise ConfigError naming the process that is."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder is not locked there
            return
        try:
            fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--log-dir {self.path}: not writable ({e.strerror}); pass another "
                              f"--log-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"--log-dir {self.path}: in use by another run (pid {holder}); wait for "
                              f"it to end, or pass another --log-dir") from None
        except OSError as e:  # a file system without locks (some network mounts)
            print0(f"warning: --log-dir {self.path}: cannot be locked ({e.strerror}); one run at a "
                   f"time, please")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd  # held open (and locked) until the process exits

    def other_run(self) -> list[str]:
        """Files of a run in the folder: log.txt, latest, checkpoints, TensorBoard events."""
        return [n for n in sorted(os.listdir(self.path)) if n in ("log.txt", "latest")
                or CHECKPOINT_NAME.fullmatch(n) or n.startswith("events.out.tfevents.")]

    def clear(self, overwrite: bool):
        """With --overwrite, delete the other run's files; always, the temporary files of a killed
        save."""
        theirs = self.other_run() if overwrite else []
        stale = [n for n in os.listdir(self.path) if n.startswith(".") and n.endswith(".tmp")]
        for n in theirs + stale:
            os.remove(os.path.join(self.path, n))
        if theirs:
            print0(f"--overwrite: deleted the previous run's files in {self.path}")



# ------------------------------------------------------------------------------------------------
# The log: print0, log.txt, TensorBoard, the run header

LOG_RECORD = re.compile(r"(\d+) (\w+) (\S+)")
TENSORBOARD_TAGS = {"train": "loss/train", "val": "loss/val", "hella": "hellaswag/acc_norm"}


def print0(*args):
    """print on rank 0 only (torchrun sets RANK in every process; `python` runs rank 0 alone)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def parse_record(line: str):
    """A log.txt line -> (step, kind, value), or None for a line that is not a record."""
    m = LOG_RECORD.fullmatch(line.strip())
    try:
        return (int(m[1]), m[2], float(m[3])) if m else None
    except ValueError:
        return None


class RunLog:
    """The run's records: LOG_DIR/log.txt, one `STEP KIND VALUE` per line, and with --tensorboard
    the same values (and lr, grad norm, tokens/s, MFU) as TensorBoard scalars in LOG_DIR. With
    log_dir None (the other ranks, --eval-only) it only prints."""

    def __init__(self, log_dir: str | None, tensorboard: bool = False):
        self.log_dir, self.tensorboard, self.writer = log_dir, tensorboard, None
        self.path = os.path.join(log_dir, "log.txt") if log_dir else None

    def start(self, header_lines, resume_step=None):
        """A new run writes its header; a resumed one keeps the records before resume_step (the
        later ones were made by the lost part of the run) and appends its header."""
        if self.path is None:
            return
        kept, dropped = [], 0
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    record = parse_record(line)
                    if line.startswith("#") or (record and record[0] < resume_step):
                        kept.append(line)
                    elif record is None and line.strip():
                        dropped += 1
            if dropped:
                print0(f"warning: {self.path}: dropped {dropped} line(s) that are not `STEP KIND "
                       f"VALUE` records")
        text = "".join(kept + [f"# {h}\n" for h in header_lines]).encode()
        atomic_write(self.path, lambda f: f.write(text))
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier files' points from this step on (the lost
            # part of an interrupted run), so a resumed run continues the same curves
            self.writer = SummaryWriter(self.log_dir, purge_step=resume_step)

    def record(self, step: int, kind: str, value: float, line: str | None = None):
        """A `STEP KIND VALUE` record; `line` is printed as `step STEP | line`."""
        if line is not None:
            print0(f"step {step:5d} | {line}")
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(f"{step} {kind} {float(value)!r}\n")  # full precision: resumes compare exactly
        if self.writer and kind in TENSORBOARD_TAGS:
            self.writer.add_scalar(TENSORBOARD_TAGS[kind], value, step)

    def scalars(self, step: int, **values):
        """TensorBoard-only values of a step (lr, grad_norm, tokens_per_sec, mfu), when finite."""
        for tag, value in values.items():
            if self.writer and value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.writer:
            self.writer.close()


def start_log(cfg: RunConfig, d: Dist, prep: Prepared, start_step: int) -> RunLog:
    """Once everything is checked and built: --overwrite deletes the previous run's files, and
    log.txt starts with the run header (a resumed run keeps its records before start_step)."""
    on_rank0(d, lambda: prep.folder.clear(cfg.overwrite))
    log = RunLog(cfg.log_dir if d.is_main else None, cfg.tensorboard)
    log.start(run_header(cfg, d), resume_step=start_step if prep.ckpt_path else None)
    return log


def run_header(cfg: RunConfig, d: Dist) -> list[str]:
    import platform
    import subprocess

    import tiktoken

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else d.device_type
    return [f"command: {shlex.join(['train_gpt2.py', *cfg.argv])}",  # play.ipynb reads it back
            f"started: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy "
            f"{np.__version__}, tiktoken {tiktoken.__version__}",
            f"device: {device} x {d.world_size}",
            f"git: {commit or 'unknown'}"]


def run_summary(step_times: list, cfg: RunConfig, d: Dist, peak: float | None, flops_per_token):
    """The run's speed in one line: the median step (leaving out the first, which compiles), MFU
    and the most memory the GPU allocated."""
    times = sorted(step_times[1:] or step_times) or [math.nan]
    tokens_per_sec = cfg.total_batch_size / times[len(times) // 2]
    line = (f"done: {len(step_times)} steps, median {1000 * times[len(times) // 2]:.1f} ms/step, "
            f"{tokens_per_sec:,.0f} tokens/s")
    if peak:
        line += f", mfu {100 * flops_per_token * tokens_per_sec / d.world_size / peak:.1f}%"
    if d.device_type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB"
    return line


# ------------------------------------------------------------------------------------------------
# Signals and rank-0 work


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT) asks the run to stop: the loop finishes its step, saves a
    checkpoint and exits 0. The first signal also gives SIGINT back to Python, so a second Ctrl-C
    interrupts at once (exit 130); checkpoints are written atomically, so the last complete one
    stays loadable."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if int(os.environ.get("RANK", "0")) == 0:  # os.write: print's buffer may be mid-write
            os.write(2, f"{signal.Signals(signum).name}: saving a checkpoint after this step, then "
                        f"stopping (a second Ctrl-C stops at once)\n".encode())


def on_rank0(d: Dist, work):
    """work() on rank 0 only; if it fails (a ConfigError, CheckpointError or OSError), every rank
    raises the error (so that no rank waits forever in a collective for one that has exited)."""
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


# ------------------------------------------------------------------------------------------------
# Numerics and speed: the guarded update, the micro-batch probe, memory, compile, peak FLOP/s


class TrainingError(UserError):
    """Training cannot go on (non-finite losses or weights); the message names the last good
    checkpoint."""


class Updater:
    """optimizer.step(), guarded. In fp16 a GradScaler (grad_scaler) scales the loss and skips a
    step whose gradients overflowed. In any precision a non-finite loss skips the update and is
    counted: --max-bad-steps of them in a row stop the run, and so does an update that breaks the
    weights."""

    def __init__(self, optimizer, scaler, model: GPT, cfg: RunConfig):
        self.optimizer, self.scaler, self.model, self.cfg = optimizer, scaler, model, cfg
        self.bad_in_a_row = 0  # non-finite losses in a row, up to this step
        self.skipped_total = 0  # updates skipped for a non-finite loss, in the whole run

    def apply_update(self, step: int, loss: float, norm: float, log: RunLog):
        finite = math.isfinite(loss)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            if finite:
                self.scaler.step(self.optimizer)  # skipped by the scaler if the gradients overflowed
            self.scaler.update()  # halves the scale after an overflow, doubles it after 2,000 steps
            updated = finite and math.isfinite(norm)
            if self.scaler.get_scale() != scale:
                overflow = "" if updated or not finite else " (gradients overflowed: update skipped)"
                log.record(step, "scale", self.scaler.get_scale(),
                           f"loss scale {scale:g} -> {self.scaler.get_scale():g}{overflow}")
        else:
            finite = updated = finite and math.isfinite(norm)
            if updated:
                self.optimizer.step()
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if not finite:  # the update was skipped: the weights are those before the step
            self.skipped_total += 1
            log.record(step, "skipped", self.skipped_total, f"non-finite loss {loss} / grad norm "
                       f"{norm}: update skipped ({self.bad_in_a_row} in a row, {self.skipped_total} "
                       f"in all)")
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingError(f"{self.bad_in_a_row} non-finite losses in a row at step {step}: "
                                    f"stopping. {self.last_good()}; lower --max-lr or raise "
                                    f"--warmup-steps, then --resume auto")
        # a huge learning rate can break the weights with finite gradients: one fused norm of all
        weights = torch.nn.utils.get_total_norm(list(self.model.parameters()))
        if updated and not math.isfinite(weights.item()):
            raise TrainingError(f"step {step}: the update made the weights non-finite or too large "
                                f"for fp32 (--max-lr {self.cfg.max_lr} too high?); {self.last_good()}")

    def check_last_step(self, step: int):
        if self.bad_in_a_row:
            raise TrainingError(f"the last step ({step}) was skipped: its loss was not finite; "
                                f"{self.last_good()}")

    def last_good(self) -> str:
        path = latest_checkpoint(self.cfg.log_dir)
        return f"the last good checkpoint is {path}" if path else "no checkpoint was saved"


def dtype_reason(device: torch.device, requested: str) -> str:
    """Why --dtype auto chose what it did on a CPU, for the device line ("" elsewhere)."""
    if requested != "auto" or device.type != "cpu":
        return ""
    return f" (CPU with {cpu_bf16()})" if cpu_bf16() else " (CPU without bf16 instructions)"


def grad_scaler(device_type: str, dtype: torch.dtype):
    """fp16 has 5 exponent bits: small gradients underflow to 0 and big ones overflow. A GradScaler
    multiplies the loss by a large scale before backward, unscales the gradients before clipping,
    skips any step whose gradients overflowed and then halves the scale (it doubles it again after
    2,000 clean steps). bf16 has fp32's range and fp32 needs nothing: None for those."""
    return torch.amp.GradScaler(device_type) if dtype == torch.float16 else None


def auto_micro_batch(cfg: RunConfig, model: GPT, d: Dist, autocast) -> int:
    """--batch-size auto: on CUDA the largest micro-batch that fits in memory (fit_micro_batch),
    the same on every rank; elsewhere the largest divisor of the sequences per rank up to 8."""
    per_rank = cfg.total_batch_size // cfg.seq_len // d.world_size
    if d.device_type != "cuda":
        return max(b for b in range(1, min(per_rank, NO_PROBE_MICRO_BATCH) + 1) if per_rank % b == 0)
    # held aside: AdamW's two fp32 moments, DDP's gradient buckets, 512 MB for NCCL and the compiler
    n_params = sum(p.numel() for p in model.parameters())
    reserve = (12 if d.ddp else 8) * n_params + (512 << 20)
    error = None
    try:
        B, too_big = fit_micro_batch(model, per_rank, cfg.seq_len, d.device, autocast, reserve)
    except ConfigError as e:  # not even one sequence fits: the other ranks must learn it too
        B, too_big, error = 0, [], e
    if d.ddp:  # every rank must use the same B: the smallest that fits everywhere
        agreed = torch.tensor(B, device=d.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        B = int(agreed)
    if B == 0:
        raise error or ConfigError(f"--batch-size auto: not even one sequence of --seq-len "
                                   f"{cfg.seq_len} fits in another rank's GPU memory")
    tried = f" (out of memory at {', '.join(map(str, too_big))})" if too_big else ""
    print0(f"--batch-size auto: micro-batch {B}{tried}")
    return B


def fit_micro_batch(model, per_rank_seqs: int, T: int, device, autocast, reserve_bytes: int):
    """--batch-size auto on CUDA: (the largest micro-batch that divides per_rank_seqs and trains in
    the GPU's memory, the sizes that did not fit). Tries a forward and backward pass at (B, T) with
    reserve_bytes (the optimizer's state, not yet allocated) held aside, and halves B on
    torch.OutOfMemoryError. The passes run uncompiled (which needs more memory than compiled), on
    zeros, under a forked random state: no weight, data or random number of the run changes, so it
    trains exactly as with --batch-size B."""

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
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS failing to get a workspace
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
            raise ConfigError(f"--batch-size auto: not even one sequence of --seq-len {T} fits in "
                              f"GPU memory; lower --seq-len or train a smaller model")
        B = smaller[0]
    torch.cuda.empty_cache()
    return B, too_big


class CrossEntropy(torch.autograd.Function):
    """Memory: F.cross_entropy's value and gradient for logits (N, V) and targets (N,) (-1 ignored),
    with a backward that allocates nothing.

    With V = 50k classes the logits are the largest tensors of a step. F.cross_entropy's backward
    allocates and writes two new (N, V) tensors (a zeroed gradient for the NLL, then the
    log-softmax's); here the gradient, (softmax - onehot(target)) / N, is written in place over
    the saved fp32 log-probabilities, which are ours alone and not needed again. That is one
    (N, V) fp32 tensor less at the peak: 978 vs 1,161 MB resident for the shakespeare preset's
    step, 13 GB at GPT-2 124M's B=64, T=1024; the step time is the same (1.00x, 2-core CPU). Eager
    mode only (CPU, MPS, --no-compile): compiled, GPT.forward uses F.cross_entropy, which the
    compiler fuses."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # fp32 even under autocast
        ctx.save_for_backward(logp, targets)
        ctx.logits_dtype = logits.dtype
        return F.nll_loss(logp, targets, ignore_index=-1)  # F.cross_entropy's value, to the bit

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


def keep_freed_memory():
    """Speed, on Linux (glibc) CPUs: keep freed memory in the process instead of giving it back.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, and the
    kernel then zeroes each 4 KB page on first touch. A CPU training step allocates and frees its
    (tokens x 50304) logits and their gradient several times, so without this about a third of the
    step is spent in page faults (shakespeare preset on a 2-core CPU: 2,200 -> 3,050 tokens/s).
    Memory that is freed stays with the process. No effect where mallopt is missing."""
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
    """Peak FLOP/s (GPU_PEAK_FLOPS) of a GPU from its torch.cuda.get_device_name(), or None.

    Matched on the exact model, never a substring (an "L40S" is not an "L4"): the vendor words are
    dropped, the first word (two for "RTX 4090"-style names) is the model, and a PCIe or NVL form
    factor, which runs at a lower clock, is added when the name says so: "NVIDIA H100 80GB HBM3" ->
    "H100", "NVIDIA H100 PCIe" -> "H100 PCIe", "Tesla V100-SXM2-16GB" -> "V100"."""
    words = [w for w in re.split(r"[\s\-_]+", device_name.upper())
             if w and w not in ("NVIDIA", "TESLA", "GEFORCE")]
    if not words or "MIG" in words:  # a MIG slice has a fraction of the GPU's peak
        return None
    n = 2 if words[0] in ("RTX", "QUADRO") and len(words) > 1 else 1
    n += sum(1 for w in words[n : n + 2] if w in ("TI", "SUPER", "D"))  # a 3090 Ti is no 3090
    model = " ".join(words[:n])
    form = next((f for f in ("PCIE", "NVL") if f in words[1:]), None)
    table = {key.upper(): flops for key, flops in GPU_PEAK_FLOPS.items()}
    return table.get(f"{model} {form}") or table.get(model)


def compile_default(device_type: str, capability: tuple[int, int] | None = None):
    """(whether to torch.compile when --compile is not given, why not on a GPU): on for CUDA GPUs
    of compute capability 7.0 and up, the oldest that the compiler's GPU backend (Triton) supports;
    a GTX 10xx, P100 or P40 (6.x) would fail at the first step, so it runs eager."""
    if device_type != "cuda":
        return False, ""
    if capability < (7, 0):
        major, minor = capability
        return False, f" (Triton needs compute capability 7.0, this GPU has {major}.{minor})"
    return True, ""


def compile_choice(cfg: RunConfig, d: Dist) -> tuple[bool, str]:
    if cfg.compile is not None:
        return cfg.compile, ""
    capability = torch.cuda.get_device_capability(d.device) if d.device_type == "cuda" else None
    return compile_default(d.device_type, capability)


# DDP's option to broadcast buffers before each forward pass (torch 2.13 renamed it)
DDP_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")


def make_deterministic():
    """--deterministic (the default on CPU): the same command gives the same losses to the bit.

    CPU: torch's matmuls run in MKL, whose dynamic threading may use fewer threads when the
    machine is busy, which changes the order of the sums (busy 2-core machines: losses of one
    command differed by up to 3e-5). torch.set_num_threads switches that off (at::set_num_threads
    calls mkl_set_dynamic(false)); that cost nothing measurable (shakespeare preset, 2-core AMD
    EPYC, 3 runs each in turn: median 1,958 vs 1,969 tokens/s). CUDA: cuBLAS's workspaces and
    kernels with atomic adds reorder sums too; torch then takes deterministic kernels where it has
    them, and warns where not."""
    torch.set_num_threads(torch.get_num_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


# ------------------------------------------------------------------------------------------------
# --eval-only and main()


def evaluate_only(cfg: RunConfig, d: Dist, prep: Prepared):
    """--eval-only: the validation loss, HellaSwag and samples of a checkpoint (--resume) or a
    pretrained model (--init-from), then --export-hf; nothing is written to --log-dir."""
    if prep.ckpt is not None:
        model, step = model_from_checkpoint(prep.ckpt), prep.ckpt["step"]
        print0(f"loaded {prep.ckpt_path} (step {step})")
    else:
        model, step = load_model(cfg.init_from), 0
    check_model(cfg, model, prep)
    model.to(d.device).eval()
    autocast = autocast_context(d.device_type, prep.dtype)
    log = RunLog(None)  # prints only
    if cfg.val_every:
        B = NO_PROBE_MICRO_BATCH if cfg.batch_size == "auto" else cfg.batch_size
        loader = DataLoader(*prep.val, B=B, T=cfg.seq_len, rank=d.rank, world_size=d.world_size,
                            shuffle=False)
        val_loss = validation_loss(model, loader, prep.val_seqs, d.device, autocast)
        log.record(step, "val", val_loss, f"val loss {val_loss:.4f}")
    if cfg.hellaswag_every:
        result = hellaswag.evaluate(model, prep.hellaswag, device=d.device, autocast=autocast,
                                    rank=d.rank, world_size=d.world_size)
        log.record(step, "hella", result["acc_norm"], hellaswag.summary(result))
    for i, text in enumerate(sample_text(model, cfg.prompt, cfg.num_samples, cfg.sample_tokens,
                                         d.device, autocast, seed=cfg.seed + 1000 * d.rank + step)):
        print(f"rank {d.rank} sample {i}: {text!r}", flush=True)
    export(model, cfg, d)


def main(argv=None):
    d = None
    try:
        cfg = parse_args(argv)
        d = setup_distributed(cfg.device)
        if cfg.deterministic or (cfg.deterministic is None and d.device_type == "cpu"):
            make_deterministic()  # before the first matmul (cuBLAS reads its setting then)
        if d.device_type == "cpu":
            keep_freed_memory()
        prep = preflight(cfg, d)
        (evaluate_only if cfg.eval_only else train)(cfg, d, prep)
    except UserError as e:
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
