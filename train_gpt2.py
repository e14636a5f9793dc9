"""
train_gpt2.py: GPT-2 (124M) from scratch, in one file you can read top to bottom.

Part 1 is the lecture: the model, the data loader, the learning-rate schedule, evaluation,
processes and precision, then train() with the loop. Part 2 is what running it for real takes: the
command line, pre-flight checks, checkpoints and the run folder, the log, signals, speed, main().

    python train_gpt2.py --preset shakespeare              # CPU or Mac: Tiny Shakespeare, minutes
    python train_gpt2.py                                   # one GPU: GPT-2 124M on FineWeb-Edu
    torchrun --standalone --nproc_per_node=8 train_gpt2.py                # eight GPUs: 10B tokens
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --preset gpt2-350m   # the miniseries
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_gpt2.py --resume auto  # README
    python train_gpt2.py --init-from gpt2 --max-lr 1e-4 ...         # fine-tune OpenAI's weights
    python train_gpt2.py --eval-only --resume auto --export-hf my-gpt2  # evaluate, sample, export

Every flag: python train_gpt2.py --help; the README is the manual.
"""
import argparse
import datetime
import importlib.util
import math
import mmap
import os
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
from fineweb import (EOT, SHARD_RE, OneLineParser, UserError, add_flags, atomic_write, flag,
                     given_flags, gpt2_bpe_files, gpt2_tokenizer, number, tokenize_batch)

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
    dropout: float = 0.0  # GPT-2 used 0.1; one epoch of pretraining data needs none, small data may
    # the embedding table's rows: vocab_size rounded up, 50257 -> 50304 = 393 * 128, a shape the
    # matmul kernels like; the extra rows are never used
    vocab_multiple: int = 128

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


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
        if kv_cache is not None:  # generation: a list of each layer's keys and values so far
            if kv_cache[self.layer_idx] is not None:  # earlier tokens' come first: (B, nh, past + T, hs)
                k, v = (torch.cat(pair, dim=2) for pair in zip(kv_cache[self.layer_idx], (k, v)))
                assert T == 1, "after a cached prefix, one new token at a time"
            kv_cache[self.layer_idx] = (k, v)
        # flash attention on a GPU: the (T, T) matrix is never stored. Causal: token t sees
        # tokens 0..t (a single new token of generation sees everything cached). HellaSwag's
        # packed rows bring their own mask.
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                           is_causal=T > 1 and attn_mask is None)
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
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# Hugging Face's GPT-2 stores these as Conv1D, whose weight is (in, out): nn.Linear's transposed.
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
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) weights, zero biases; the two projections into the residual stream get
        # std / sqrt(2 * n_layer), so the stream's variance does not grow with depth
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
        """Final-LayerNorm outputs (B, T, C) for tokens idx (B, T), after any cached tokens (HellaSwag's
        packed rows bring position ids (B, T) and a boolean attn_mask (B, 1, T, T))."""
        B, T = idx.size()
        past = kv_cache[0][0].size(2) if kv_cache and kv_cache[0] is not None else 0
        if pos is None and past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's block_size "
                             f"{self.config.block_size}: crop it to the last block_size tokens")
        if pos is None:
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        return self.transformer.ln_f(x)

    def padded_logits(self, x):  # hidden states (..., C) -> (..., padded V), -inf on the padding
        # Speed: the -inf bias is added inside the lm_head matmul, so the softmax is the one over the
        # real vocabulary without a copy of the logits (README). Not a buffer: DDP would sync it.
        bias = torch.full((self.config.padded_vocab_size,), float("-inf"), device=x.device)
        bias[: self.config.vocab_size] = 0.0
        return F.linear(x, self.lm_head.weight, bias)

    def logits(self, x):  # hidden states (..., C) -> logits over the real vocabulary (..., V)
        return self.padded_logits(x)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, kv_cache=None, return_logits=True):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None). Targets
        of -1 are ignored. Training passes return_logits=False: a compiled model that returns the
        logits also runs their (zero) gradient through backward."""
        logits = self.padded_logits(self.hidden_states(idx, kv_cache=kv_cache))  # (B, T, padded V)
        loss = None
        if targets is not None:  # in fp32, also under autocast: a sum over 50k probabilities
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return (logits[..., : self.config.vocab_size] if return_logits else None), loss

    def num_params(self, include_position_embeddings: bool = True) -> int:  # tied table once
        n = sum(p.numel() for p in self.parameters())
        return n if include_position_embeddings else n - self.transformer.wpe.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (PaLM, appendix B): 6N + 12 * n_layer * n_embd * T, N the parameters
        but the position table, 6 = 2 (multiply-add) x 3 (forward, backward); then attention's QK^T, AV."""
        T = seq_len or self.config.block_size
        N = self.num_params(include_position_embeddings=False)
        return 6 * N + 12 * self.config.n_layer * self.config.n_embd * T

    def configure_optimizer(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95), eps=1e-8):
        """AdamW; weight decay on matrices and embeddings (2-D), none on biases and LayerNorm."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: each tensor updated in one pass instead of one kernel per operation
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens. temperature 0 is greedy; top_k keeps the k
        most likely tokens; `generator` makes sampling reproducible. A new token costs one token's
        forward pass (the KV cache keeps the earlier keys and values); once the context is full it
        is cropped to the last block_size tokens, which shifts every position: the cache restarts."""
        block_size, cache = self.config.block_size, None
        for _ in range(max_new_tokens):
            if cache is None or cache[0][0].size(2) >= block_size:
                cache = [None] * self.config.n_layer
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
        local folder in Hugging Face GPT-2 format, read by transformers. dropout: for fine-tuning."""
        from transformers import GPT2LMHeadModel
        hub = f"openai-community/{name_or_dir}" if name_or_dir in HF_MODEL_NAMES else name_or_dir
        return cls.from_hf(GPT2LMHeadModel.from_pretrained(hub), dropout)

    @classmethod
    def from_hf(cls, hf, dropout: float = 0.0) -> "GPT":
        c = hf.config  # a transformers.GPT2LMHeadModel
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, dropout=dropout))
        theirs = hf.state_dict()
        with torch.no_grad():
            model.lm_head.weight.zero_()  # the padded vocabulary rows
            for k, v in model.hf_state_dict().items():  # views of our weights, in their layout
                v.copy_(theirs[k])
        return model

    def hf_state_dict(self) -> dict:
        """Views of our weights under GPT2LMHeadModel's names (Conv1D weights transposed, no padding)."""
        out = {k: v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v for k, v in self.state_dict().items()}
        out["transformer.wte.weight"] = out["lm_head.weight"] = out["lm_head.weight"][: self.config.vocab_size]
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
        hf.load_state_dict({k: v.contiguous() for k, v in self.hf_state_dict().items()}, strict=False)
        hf.save_pretrained(out_dir)
        # OpenAI's encoder.json is Hugging Face's vocab.json, vocab.bpe its merges.txt: with them,
        # other tools (lm-evaluation-harness) need nothing else
        vocab_bpe, encoder_json = gpt2_bpe_files()
        shutil.copyfile(encoder_json, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(vocab_bpe, os.path.join(out_dir, "merges.txt"))
        return out_dir


# ------------------------------------------------------------------------------------------------
# The data loader


def find_shards(data_dir: str, split: str) -> list[str]:
    """Shard files `<prefix>_<split>_<NNNNNN>.npy` of a split (fineweb.py writes them), in order."""
    fix = ("run `python fineweb.py` to build them, or train on a text file with `--preset "
           "shakespeare` / `--input FILE`")
    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: no such data directory: {fix}")
    matches = [m for m in map(SHARD_RE.fullmatch, os.listdir(data_dir)) if m and m["split"] == split]
    found = sorted((int(m["index"]), m[0]) for m in matches)
    if not found:
        raise UserError(f"{data_dir}: no {split} shards (*_{split}_NNNNNN.npy): {fix}")
    return [os.path.join(data_dir, name) for _, name in found]


SHARD_CHECK_WINDOWS, SHARD_CHECK_TOKENS = 16, 4096


def open_shard(path: str) -> np.ndarray:
    """Memory-map a shard and check it: 1-D uint16, ids < 50257 in 16 windows of 4,096 tokens spread
    over it (128 KB read, whatever its size). The loader checks every id it reads."""
    fix = "rebuild it with `python fineweb.py` (or delete it)"
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated file, bad header, not a .npy at all
        raise UserError(f"{path}: unreadable shard ({e}); {fix}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path}: shard has dtype {tokens.dtype} and shape {tokens.shape}, "
                        f"expected 1-D uint16; {fix}")
    if hasattr(mmap, "MADV_RANDOM") and getattr(tokens, "_mmap", None):  # read at random places: no
        tokens._mmap.madvise(mmap.MADV_RANDOM)  # read-ahead (Linux reads 8 MB for a 2 KB sequence)
    starts = np.linspace(0, max(0, len(tokens) - SHARD_CHECK_TOKENS), SHARD_CHECK_WINDOWS)
    top = max((int(tokens[s : s + SHARD_CHECK_TOKENS].max()) for s in starts.astype(np.int64)
               if len(tokens)), default=0)
    if top >= GPT2_VOCAB_SIZE:
        raise UserError(f"{path}: token id {top} >= {GPT2_VOCAB_SIZE}: not GPT-2 tokens; {fix}")
    return tokens


def load_shards(data_dir: str, split: str) -> tuple[list[np.ndarray], list[str]]:
    paths = find_shards(data_dir, split)
    return [open_shard(p) for p in paths], paths


def load_text(path: str, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A UTF-8 text file as one document (<|endoftext|>, then its tokens); the last 10% of the
    tokens is the validation split."""
    ids = tokenize_batch([read_text(path)])  # the tokens of fineweb.py's shards, for the same text
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:]


class DataLoader:
    """Batches of sequences (x, y = the same tokens shifted by one) from token arrays.

    Each array (a shard, or a split of a text file) is cut into sequences of T + 1 tokens with
    stride T. Sequences are numbered globally, epoch after epoch; with `shuffle`, each epoch visits
    the arrays, and each array's sequences, in a fresh order drawn from (seed, epoch). Step s uses
    sequences [s * N, (s + 1) * N), N per optimizer step; rank r's micro-step m takes the B starting
    at (m * world_size + r) * B. So a step's data depends on the seed, T and N only, never on B or
    the number of ranks, and `state_dict()` is one integer."""

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

    def batch(self, seq_numbers, device=None):
        """Sequences by global number -> (x, y) int64 tensors (len, T) on `device`, contiguous (a
        compiled model sees one memory layout). Every id is checked: a max() costs little."""
        seq_numbers = list(seq_numbers)
        tokens = np.stack([self.arrays[a][start : start + self.T + 1]  # views of the memory map
                           for a, start in map(self.locate, seq_numbers)])
        if tokens.max(initial=0) >= GPT2_VOCAB_SIZE:
            r, c = np.argwhere(tokens >= GPT2_VOCAB_SIZE)[0]
            a, start = self.locate(seq_numbers[r])
            raise UserError(f"{self.names[a]}: token id {tokens[r, c]} at position {start + c:,} "
                            f"is not a GPT-2 token (ids must be < {GPT2_VOCAB_SIZE}): rebuild the "
                            f"shard with `python fineweb.py`")
        xy = np.stack([tokens[:, :-1], tokens[:, 1:]])  # (2, len, T)
        xy = torch.from_numpy(xy.astype(np.int64))  # only this batch becomes int64
        if device is not None:  # Speed, on a GPU: one copy of the (2, B, T) block from pinned memory,
            # queued without making the CPU wait, so it goes on launching the step's kernels
            xy = xy.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xy.to(device)
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
        return {"position": self.position}

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
    """Mean loss over the first num_seqs validation sequences, the same tokens on any world size:
    rank r takes sequences r, r + world, ..., in batches of the training shape (the last one padded
    with ignored targets, so a compiled model sees no new shape); sums and counts are all-reduced."""
    mine = list(range(loader.rank, num_seqs, loader.world_size))
    B, T = loader.B, loader.T
    sums = [torch.zeros(2, device=device)]  # per batch: (summed loss, scored tokens)
    for i in range(0, len(mine), B):
        x, y = loader.batch(mine[i : i + B], device)
        if len(x) < B:  # pad to the training shape; padded rows score nothing
            x = torch.cat([x, x.new_zeros(B - len(x), T)])
            y = torch.cat([y, y.new_full((B - len(y), T), -1)])
        with autocast:
            _, loss = model(x, y, return_logits=False)  # else a compiled model outputs all logits
        n = (y != -1).sum().float()
        sums.append(torch.stack([loss.float() * n, n]))
    total = torch.stack(sums).cpu().double().sum(dim=0)
    if loader.world_size > 1:
        total = total.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total[0] / total[1]).item()


def evaluate(step, kinds, model, raw_model, val_loader, cfg, d, prep, autocast, log):
    """The evaluations of `kinds` ("val", "hella", "sample") at `step`, logged; returns the val loss or
    None. HellaSwag and sampling change shapes every batch (a compiled model would recompile): raw model."""
    val_loss = None
    if "val" in kinds:
        was_training = raw_model.training
        model.eval()  # dropout off
        val_loss = validation_loss(model, val_loader, prep.val_seqs, d.device, autocast)
        model.train(was_training)
        log.record(step, "val", val_loss, f"val loss {val_loss:.4f}")
    if "hella" in kinds:
        result = hellaswag.evaluate(raw_model, prep.hellaswag, device=d.device,
                                    batch_size=max(1, val_loader.B // 4), autocast=autocast,
                                    rank=d.rank, world_size=d.world_size)
        log.record(step, "hella", result["acc_norm"], hellaswag.summary(result))
    if "sample" in kinds:  # each rank its own samples; an empty prompt starts from <|endoftext|>
        enc, was_training = gpt2_tokenizer(), raw_model.training
        ids = enc.encode(cfg.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
        generator = torch.Generator(d.device).manual_seed(cfg.seed + 1000 * d.rank + step)
        with torch.no_grad(), autocast:
            out = raw_model.eval().generate(torch.tensor([ids] * cfg.num_samples, device=d.device),
                                            cfg.sample_tokens, top_k=50, generator=generator)
        raw_model.train(was_training)
        for i, row in enumerate(out.tolist()):
            print(f"rank {d.rank} sample {i}: {enc.decode(row)!r}", flush=True)
    return val_loss


# ------------------------------------------------------------------------------------------------
# Processes, devices and precision


@dataclass
class Dist:
    rank: int  # this process among all processes
    local_rank: int  # this process on its node (its GPU index)
    world_size: int
    device: torch.device
    device_type: str  # "cuda", "mps" or "cpu": compare this, never device strings
    ddp: bool  # more than one process
    is_main: bool  # rank 0: the one that writes files and prints


def setup_distributed(device_arg: str = "auto", timeout_minutes: float = 10) -> Dist:
    """The one setup of processes and devices (training, hellaswag.py): torchrun's ranks, the device,
    the process group (NCCL on CUDA, gloo on CPU; a collective waiting over timeout_minutes fails)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device_arg == "auto":
        device_arg = next(kind for kind, here in available.items() if here)
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = torch.device("meta")
    if device.type not in available:
        raise UserError(f"--device {device_arg}: use auto, cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise UserError(f"--device {device_arg}: not available on this machine; use --device cpu")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # torchrun sets all three
    if device.type == "cuda":  # under torchrun, each process takes the GPU of its local rank
        index = local_rank if world_size > 1 or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if world_size > 1:
        if device.type == "mps":
            raise UserError("torchrun with --device mps is not supported: use --device cpu, or one process")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, local_rank, world_size, device, device.type, world_size > 1, rank == 0)


def cleanup_distributed(finished=False):
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        if finished:  # exit now: Python's teardown has aborted finished ranks (SIGABRT, a c10d thread)
            sys.stdout.flush(), sys.stderr.flush(), os._exit(0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16() -> str | None:
    """This CPU's bf16 instructions, if any: AMX (Xeon Sapphire Rapids on), AVX512-BF16 (Zen 4, 5).
    Elsewhere bf16 is emulated, many times slower than fp32."""
    caps = torch.cpu.get_capabilities()
    return "AMX" if caps.get("amx_bf16") else "AVX512-BF16" if caps.get("avx512_bf16") else None


def autocast_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The one precision decision: the dtype of the forward pass's matmuls. `auto`: bf16 on GPUs of
    compute capability 8.0 and up (A100, H100, RTX 30xx/40xx), fp16 on older ones (V100, T4), bf16
    on CPUs with bf16 instructions, else fp32. Weights, optimizer state and the loss stay fp32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            name = torch.cuda.get_device_name(device)
            raise UserError(f"--dtype bf16: {name} (compute capability {major}.{minor}) has no "
                            f"bf16 hardware; use --dtype fp16 (or auto)")
        if requested == "auto":
            return torch.bfloat16 if major >= 8 else torch.float16
    if requested == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16() else torch.float32
    return DTYPES[requested]


def autocast_context(device_type: str, dtype: torch.dtype):  # around every forward pass
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def synchronize(device: torch.device):
    """Wait for the device's queued work (GPU work is asynchronous): then a clock read is honest."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


# ------------------------------------------------------------------------------------------------
# Training: gradient accumulation, DDP and the loop


def forward_backward(model, loader, grad_accum_steps: int, device, autocast, scaler, ddp=None):
    """The gradients of one optimizer step: grad_accum_steps micro-batches of B sequences on this
    rank, added up in .grad. Returns this rank's mean loss, on the device (no wait for it)."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch(device)
        # DDP averages the gradients over the ranks during backward; only the last micro-step
        # needs that: before it, no_sync() (entered before the forward pass) lets them pile up
        last = micro_step == grad_accum_steps - 1
        with ddp.no_sync() if ddp and not last else nullcontext():
            with autocast:
                _, loss = model(x, y, return_logits=False)
            # backward adds gradients up: dividing each micro-batch's mean loss by the number of
            # micro-steps makes the sum the gradient of the whole batch's mean
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # fp16: the loss times a large scale (else unchanged)
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
        raw_model = GPT(GPTConfig(block_size=T, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:  # fine-tuning: OpenAI's GPT-2 (from the hub) or a Hugging Face GPT-2 folder
        raw_model = load_model(cfg.init_from, dropout=cfg.dropout).train()
    check_seq_len(cfg, raw_model)
    raw_model.to(d.device)  # saved, sampled; `model` (below) is the same weights compiled, wrapped
    # TF32: the fp32 matmuls left outside autocast run on tensor cores (with a 10-bit mantissa)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = d.device_type == "cuda"
    autocast = autocast_context(d.device_type, prep.dtype)  # around every forward pass
    flops_per_token = raw_model.flops_per_token(T)
    print0(f"model: {raw_model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOP/token")

    # --- the micro-batch -------------------------------------------------------------------
    # A step sees total_batch_size tokens = B x T x processes x grad_accum_steps: B sequences are
    # what fits in memory at once, and adding up the gradients of micro-steps does the rest
    B = auto_micro_batch(cfg, raw_model, d, autocast) if cfg.batch_size == "auto" else cfg.batch_size
    grad_accum_steps = micro_steps(cfg, B, d.world_size)
    print0(f"batch: {cfg.total_batch_size:,} tokens per step = {B} x {T} x {d.world_size} "
           f"processes x {grad_accum_steps} micro-steps")

    # --- the loaders -----------------------------------------------------------------------
    # which sequences a step sees depends on the seed only, never on B or the number of processes
    shape = dict(B=B, T=T, grad_accum_steps=grad_accum_steps, rank=d.rank, world_size=d.world_size)
    train_loader = DataLoader(*prep.train, **shape, seed=cfg.seed, shuffle=True)
    val_loader = DataLoader(*prep.val, **shape, shuffle=False)  # the same sequences every time
    print0(f"data: {train_loader.seqs_per_epoch:,} training sequences per epoch")

    # --- the optimizer and the loss scaler --------------------------------------------------
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, d.device_type)
    # fp16 has 5 exponent bits: small gradients underflow. The scaler multiplies the loss by a large
    # scale, skips a step whose gradients overflowed and lowers the scale; elsewhere it does nothing
    scaler = torch.amp.GradScaler(d.device_type, enabled=prep.dtype == torch.float16)

    # --- resume ----------------------------------------------------------------------------
    # weights, optimizer moments, loss scale, data position, random states: as if it never stopped
    start_step, val_loss, skipped = 0, None, 0
    if prep.ckpt is not None:
        start_step, val_loss, skipped = resume(prep, raw_model, optimizer, scaler, train_loader, d)

    # --- compile and DDP -------------------------------------------------------------------
    # DDP first, then the compiler, as PyTorch documents it: the compiler then splits the
    # backward pass at DDP's gradient buckets, so each bucket's all-reduce overlaps the rest
    ddp = d.ddp and DDP(raw_model, device_ids=[d.local_rank] if d.device_type == "cuda" else None,
                        gradient_as_bucket_view=True)
    model = ddp or raw_model
    # default: on CUDA GPUs of compute capability 7.0 and up, the oldest that Triton supports
    use_compile = cfg.compile if cfg.compile is not None else (
        d.device_type == "cuda" and torch.cuda.get_device_capability(d.device) >= (7, 0))
    if use_compile:
        model = torch.compile(model)  # the first step compiles (a minute for 124M on a GPU)
    print0(f"device: {d.device} x {d.world_size} process(es), autocast: {str(prep.dtype)[6:]}"
           f"{' with loss scaling' if scaler.is_enabled() else ''}, compile: {use_compile}, "
           f"deterministic: {torch.are_deterministic_algorithms_enabled()}")
    on_rank0(d, lambda: clear_folder(cfg.log_dir, cfg.overwrite))  # --overwrite takes effect now
    log = RunLog(cfg.log_dir if d.is_main else None, run_header(cfg, d),
                 start_step if prep.ckpt_path else None, cfg.tensorboard)
    # MFU against the GPU's bf16 (fp16) peak: none for fp32
    peak = d.device_type == "cuda" and prep.dtype != torch.float32 and peak_flops(
        torch.cuda.get_device_name(d.device))
    stop = StopRequest()  # SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit
    bad_in_a_row, step_times = 0, []

    # --- the loop --------------------------------------------------------------------------
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last_step = step == cfg.max_steps
            # Evaluation comes before the step: step 0 shows the untrained model (a loss near
            # ln 50257 = 10.8), and the last step, max_steps, the weights after every update, which
            # the last checkpoint saves. Every rank takes part, so each decides by the step alone.
            kinds = [kind for kind, every in (("val", cfg.val_every), ("hella", cfg.hellaswag_every),
                                              ("sample", cfg.sample_every))
                     if due(every, step, last_step) and (kind != "sample" or step > 0)]
            if kinds:
                val_loss = evaluate(step, kinds, model, raw_model, val_loader, cfg, d, prep,
                                    autocast, log) or val_loss
            # a checkpoint of the weights after `step` updates, with the evaluation just made;
            # none while the losses are not finite, so that the last good ones stay on disk
            if due(cfg.checkpoint_every, step, last_step) and step > start_step and not bad_in_a_row:
                save(step, cfg, d, raw_model, optimizer, scaler, train_loader, val_loss, skipped)
            if last_step:
                break

            # ------------------------------- BEGIN the optimization step -----------------------
            t0 = time.perf_counter()
            # the last step's gradients go (set_to_none frees them), then this step's add up
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(model, train_loader, grad_accum_steps, d.device, autocast,
                                    scaler, ddp)
            scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
            # clipping the gradient's global norm keeps one bad batch from throwing the weights far
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            # the learning rate of this step: linear warmup, then cosine decay
            lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the step's one wait for the device, and one all-reduce: the loss averaged over the
            # ranks (the gradients already are), the norm, and whether any rank was asked to stop,
            # so that every rank stops after the same step
            stats = torch.stack([loss, norm.float(), torch.full((), float(stop.requested),
                                                                device=d.device)])
            if d.ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            loss, norm, stop_now = (stats / d.world_size).tolist()
            if math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()):
                scaler.step(optimizer)  # optimizer.step(); fp16: skipped if gradients overflowed
                bad_in_a_row = 0
            else:  # a non-finite loss: no update, the step is counted; too many in a row stop
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                log.record(step, "skipped", skipped, f"non-finite loss {loss} / grad norm {norm}: "
                           f"update skipped ({bad_in_a_row} in a row, {skipped} in all)")
                if bad_in_a_row == MAX_BAD_STEPS:
                    raise UserError(f"{bad_in_a_row} non-finite losses in a row at step {step}: "
                                    f"stopping. {last_good(cfg.log_dir)}; lower --max-lr or raise "
                                    f"--warmup-steps, then --resume auto")
            scaler.update()  # fp16: halve the scale after an overflow, double it after 2,000 steps
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
                if not bad_in_a_row:  # (unless its loss was not finite: keep the good ones)
                    save(step + 1, cfg, d, raw_model, optimizer, scaler, train_loader, val_loss,
                         skipped)
                print0(f"stopped by signal after step {step}; continue with --resume auto")
                return
    finally:
        log.close()  # TensorBoard's last points too, whatever ends the run
    if bad_in_a_row:
        raise UserError(f"the last step ({cfg.max_steps - 1}) was skipped: its loss was not "
                        f"finite; {last_good(cfg.log_dir)}")
    times = sorted(step_times[1:] or step_times) or [math.nan]  # the median leaves out the first step
    tokens_per_sec = cfg.total_batch_size / times[len(times) // 2]  # (it compiles)
    done = (f"done: {len(step_times)} steps, median {1000 * times[len(times) // 2]:.1f} ms/step, "
            f"{tokens_per_sec:,.0f} tokens/s")
    if peak:
        done += f", mfu {100 * flops_per_token * tokens_per_sec / d.world_size / peak:.1f}%"
    if d.device_type == "cuda":
        done += f", peak memory {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB"
    print0(done)
    return raw_model


# ================================================================================================
# PART 2: RUNNING IT FOR REAL
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# The command line and the presets

PRESETS = {
    # GPT-2 124M on 10B tokens of FineWeb-Edu: 19073 steps of 2**19 tokens (the RunConfig defaults)
    "gpt2-124m": {},
    # The rest of the GPT-2 miniseries: OpenAI's shapes for GPT-2 medium, large and xl, trained with
    # the recipes llm.c published (scripts/run_gpt2_350M.sh, run_gpt2_774M.sh, run_gpt2_1558M.sh):
    # the same AdamW (weight decay 0.1, grad clip 1.0), 700 warmup steps, cosine decay, T = 1024.
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, max_lr=3e-4, min_lr_ratio=0.0,  # GPT-2 medium
                      warmup_steps=700, total_batch_size=524288, max_steps=60000,  # 31.5B tokens
                      data_dir="fineweb100B", checkpoint_every=2000),  # FineWeb (not -Edu) 100B
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, max_lr=2.5e-4, min_lr_ratio=0.0,  # large
                      warmup_steps=700, total_batch_size=524288, max_steps=286102,  # 150B: 1.5 epochs
                      data_dir="fineweb100B", checkpoint_every=4000),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, max_lr=6e-4, min_lr_ratio=0.1,  # GPT-2 xl
                       warmup_steps=700, total_batch_size=1048576, max_steps=32000,  # 33.6B tokens
                       data_dir="edu_fineweb100B", checkpoint_every=2000),  # FineWeb-Edu 100B
    # Tiny Shakespeare (or any --input text) on a laptop CPU: a model that learns in minutes (how
    # it was tuned: bench/README.md)
    "shakespeare": dict(
        input="input.txt", n_layer=4, n_head=4, n_embd=128, dropout=0.1, batch_size=8, seq_len=128,
        total_batch_size=1024, max_steps=1200, warmup_steps=100, max_lr=4e-3, val_every=200,
        val_tokens=32768, hellaswag_every=0, sample_every=400, checkpoint_every=400,
    ),
}
NO_PROBE_MICRO_BATCH = 8  # --batch-size auto where no memory probe runs (CPU, MPS): at most this
MAX_BAD_STEPS = 5  # non-finite losses in a row that stop a run


def batch_size_value(text: str):
    """--batch-size: auto, or a whole number of at least 1."""
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be auto or an integer of at least 1, got {text!r}")
    return text if text == "auto" else int(text)


NATURAL, POSITIVE, NONNEGATIVE = number(int, 0), number(int, 1), number(float, 0)


@dataclass
class RunConfig:  # every field with a help text is a flag: --n-layer for n_layer
    preset: str = flag("gpt2-124m", "settings to start from; flags override them", choices=tuple(PRESETS))
    # data
    data_dir: str = flag("edu_fineweb10B", "folder of .npy token shards (python fineweb.py makes it)")
    input: str = flag("", "train on this UTF-8 text file instead (its last 10% is validation)")
    # model
    init_from: str = flag("scratch", "scratch, a GPT-2 name (gpt2, ...) or a Hugging Face GPT-2 folder")
    n_layer: int = flag(12, "transformer blocks", POSITIVE)
    n_head: int = flag(12, "attention heads", POSITIVE)
    n_embd: int = flag(768, "model width (channels), a multiple of --n-head", POSITIVE)
    dropout: float = flag(0.0, "dropout probability in training", number(float, 0, below=1))
    # batch
    batch_size: int | str = flag("auto", "micro-batch B (sequences per forward pass per process); "
                                 "auto: on CUDA the largest that fits, else at most 8", batch_size_value)
    seq_len: int = flag(1024, "sequence length T (tokens)", POSITIVE)
    total_batch_size: int = flag(524288, "tokens per optimizer step, all processes and micro-steps", POSITIVE)
    # optimization
    max_steps: int = flag(19073, "optimizer steps (19073 x 524288 tokens = 10B tokens)", POSITIVE)
    warmup_steps: int = flag(715, "linear LR warmup steps", NATURAL)
    max_lr: float = flag(6e-4, "peak learning rate", number(float, above=0))
    min_lr_ratio: float = flag(0.1, "the cosine decay ends at this fraction of --max-lr", number(float, 0, 1))
    weight_decay: float = flag(0.1, "AdamW weight decay of 2-D parameters", NONNEGATIVE)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)", NONNEGATIVE)
    seed: int = flag(1337, "seed of the initial weights and of the data order", NATURAL)
    dtype: str = flag("auto", "autocast precision; auto: bf16 where the GPU or CPU has bf16 hardware, "
                      "fp16 on older GPUs, else fp32", choices=("auto", *DTYPES))
    deterministic: bool = flag(None, "the same losses to the bit from the same command (default: on "
                               "for CPU runs)", bool)
    # periodic work (0 = off; each also runs at the end)
    val_every: int = flag(250, "validation loss every N steps", NATURAL)
    val_tokens: int = flag(10485760, "validation tokens (a fixed set, whatever the world size); not "
                           "given: the whole val split, up to this many", POSITIVE)
    hellaswag_every: int = flag(250, "HellaSwag accuracy every N steps", NATURAL)
    hellaswag_data: str = flag("", "local HellaSwag JSON-lines file (default: the download)")
    hellaswag_limit: int = flag(0, "score the first N HellaSwag examples (0 = all)", NATURAL)
    sample_every: int = flag(250, "print --num-samples samples every N steps", NATURAL)
    prompt: str = flag("Hello, I'm a language model,", "what samples continue")
    num_samples: int = flag(4, "samples each time", POSITIVE)
    sample_tokens: int = flag(32, "new tokens per sample", POSITIVE)
    checkpoint_every: int = flag(1000, "checkpoint every N steps", NATURAL)
    keep_checkpoints: int = flag(3, "keep the last N checkpoints (0 = all)", NATURAL)
    # run
    log_dir: str = flag("log", "folder of log.txt and checkpoints; one run per folder")
    overwrite: bool = flag(False, "delete another run's log and checkpoints in --log-dir first")
    tensorboard: bool = flag(False, "also write TensorBoard curves to --log-dir")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = flag(None, "torch.compile the model (default: on CUDA GPUs that Triton supports)", bool)
    resume: str = flag("", "'auto' (the latest checkpoint in --log-dir, if any) or a checkpoint")
    eval_only: bool = flag(False, "with --resume or --init-from: evaluate, sample, export; write no log")
    export_hf: str = flag("", "at the end, write the model to this folder in Hugging Face format")
    dist_timeout: float = flag(30, "minutes a process waits for the others (rank 0 saving a checkpoint) "
                               "before the run fails", number(float, above=0))
    argv: tuple = field(default=())  # the command line's arguments
    given: frozenset = field(default=frozenset())  # the flags among them


def make_parser() -> OneLineParser:
    """A flag per RunConfig field; --help shows each default and the shakespeare preset's value."""
    parser = OneLineParser(prog="train_gpt2.py", description="Train GPT-2 (the module docstring "
                           "has the commands). Explicit flags override the preset.")
    small = PRESETS["shakespeare"]
    add_flags(parser, RunConfig, note=lambda f: f"; shakespeare: {small[f.name]!r}"
              if f.name in small else "")
    return parser


def parse_args(argv=None) -> RunConfig:
    """Flags over the preset over the defaults (argparse checks each range), then cross-flag checks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = given_flags(make_parser().parse_args(argv))
    preset = given.get("preset") or ("shakespeare" if given.get("input") else RunConfig.preset)
    cfg = RunConfig(**{**PRESETS[preset], **given, "preset": preset, "argv": tuple(argv),
                       "given": frozenset(given)})
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}: the "
                        f"heads split the width")
    if cfg.overwrite and cfg.resume:
        raise UserError("--overwrite deletes the run that --resume would continue: pass one")
    if cfg.eval_only and not cfg.resume and cfg.init_from == "scratch":
        raise UserError("--eval-only needs a model: pass --resume PATH|auto or --init-from")
    return cfg


def micro_steps(cfg: RunConfig, B: int | None, world_size: int) -> int:
    """The one check that the batch sizes fit together: gradient-accumulation steps per optimizer
    step for micro-batch B (None: not known yet), or an error that proposes valid values."""
    per_micro_step = (B or 1) * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro_step:
        lower = max(1, cfg.total_batch_size // per_micro_step) * per_micro_step
        what = f"batch-size x seq-len x processes = {B} x " if B else "seq-len x processes = "
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not divisible by {what}"
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
    lock: int | None = None  # rank 0's lock on the run folder, held while the process lives


def preflight(cfg: RunConfig, d: Dist, prep: Prepared):
    """Everything that can fail before the model is built (which, compiled, takes a while)."""
    for package, flag_name, value in (("tensorboard", "--tensorboard", cfg.tensorboard),
                                      ("transformers", "--export-hf", cfg.export_hf)):
        if value and importlib.util.find_spec(package) is None:  # found out now, not after hours
            raise UserError(f"{flag_name} needs the {package} package: pip install {package}")
    if cfg.export_hf and os.path.isfile(cfg.export_hf):
        raise UserError(f"--export-hf {cfg.export_hf}: a file, not a folder")
    if not cfg.eval_only:  # one run, one writer (rank 0); --eval-only writes nothing there
        prep.lock = on_rank0(d, lambda: claim_folder(cfg.log_dir, bool(cfg.resume), cfg.overwrite))
    if cfg.resume:
        prep.ckpt_path, prep.ckpt = find_resume_checkpoint(cfg, d)
    if prep.ckpt is not None and cfg.eval_only:  # evaluate on the run's own validation tokens
        for key in ("input", "data_dir", "seq_len", "val_tokens"):
            if key not in cfg.given and key in prep.ckpt["run_config"]:
                setattr(cfg, key, prep.ckpt["run_config"][key])
    if not cfg.eval_only:
        micro_steps(cfg, None if cfg.batch_size == "auto" else cfg.batch_size, d.world_size)
    if not cfg.eval_only or cfg.val_every:
        prep.train, prep.val, prep.val_seqs = read_data(cfg)
    if cfg.hellaswag_every:
        # one download per node: local rank 0 fetches the file while the others wait
        if d.ddp and d.local_rank != 0:
            dist.barrier()
        prep.hellaswag = hellaswag.load_examples(
            cfg.hellaswag_data or None, split="val", limit=cfg.hellaswag_limit or None,
            fix="pass --hellaswag-data FILE with a local copy, or --hellaswag-every 0")
        if d.ddp and d.local_rank == 0:
            dist.barrier()


def read_data(cfg: RunConfig):
    """(train, val) token arrays with their names, from --input or --data-dir (no train split for
    --eval-only), and the sequences per validation: --val-tokens, at most the whole split."""
    T, seqs_per_step = cfg.seq_len, cfg.total_batch_size // cfg.seq_len
    if cfg.input:
        train_ids, val_ids = load_text(cfg.input)
        train, val = ([train_ids], [f"{cfg.input} (first 90%)"]), ([val_ids], [f"{cfg.input} (last 10%)"])
        fix = "use a longer text, or lower --seq-len / --total-batch-size"
    else:
        train = ((), ()) if cfg.eval_only else load_shards(cfg.data_dir, "train")
        val = load_shards(cfg.data_dir, "val")
        fix = "build more data with `python fineweb.py`, or lower --total-batch-size"
    have = count_sequences(train[0], T)
    if not cfg.eval_only and have < seqs_per_step:
        raise UserError(f"{describe(train[1])}: the train split has {have} sequences of T={T} "
                        f"tokens, fewer than the {seqs_per_step} one optimizer step needs; {fix}")
    have, wanted = count_sequences(val[0], T), max(1, cfg.val_tokens // T)
    if cfg.val_every and "val_tokens" in cfg.given and wanted > have:
        raise UserError(f"--val-tokens {cfg.val_tokens}: the val split ({describe(val[1])}) has "
                        f"{have * T:,} tokens in sequences of T={T}; pass at most {have * T}, or "
                        f"leave --val-tokens out")
    if cfg.val_every and have == 0:
        raise UserError(f"{describe(val[1])}: the val split has no sequence of T={T} tokens; lower "
                        f"--seq-len, or --val-every 0 to train without validation")
    if cfg.val_every:
        print0(f"validation: {min(wanted, have) * T:,} tokens" + (" (the whole val split)" * (wanted >= have)))
    return train, val, min(wanted, have)


def count_sequences(arrays, T: int) -> int:
    return sum((len(a) - 1) // T for a in arrays)  # as DataLoader cuts them


def describe(names) -> str:
    return ", ".join(names[:3]) + ("..." if len(names) > 3 else "")


def read_text(path: str) -> str:
    """The text of --input, checked: a UTF-8 text file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:  # missing, a folder, unreadable
        raise UserError(f"{path}: {e.strerror.lower()}: pass --input with a UTF-8 text file") from None
    if b"\0" in raw:
        raise UserError(f"{path}: byte {raw.index(0):,} is NUL: a binary file, not text; pass --input "
                        f"with a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start:,} is 0x{raw[e.start]:02x}); convert "
                        f"it to UTF-8 (for example `iconv -f latin1 -t utf-8`) or pass another --input"
                        ) from None


def check_seq_len(cfg: RunConfig, model: GPT):
    """--seq-len must fit the model's position table (a pretrained model brings its own)."""
    if cfg.seq_len > model.config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {model.config.block_size}")


# ------------------------------------------------------------------------------------------------
# Checkpoints and the run folder

CHECKPOINT_FORMAT = "build-gpt2-checkpoint"
CHECKPOINT_VERSION = 2  # 2: tensors and plain values only, which torch's safe loader reads
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{6,})\.pt")


def one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit] or type(e).__name__


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint of this script onto the CPU (its random states must stay CPU tensors;
    load_state_dict copies the rest to the device), or raise UserError naming the file."""
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint file"
        raise UserError(f"{path}: {what}")
    try:
        # weights_only: torch's restricted unpickler builds tensors and plain values only, so a
        # checkpoint from elsewhere cannot run code. mmap: the ranks of a node do not each hold a
        # whole checkpoint in memory (25 GB for GPT-2 1558M)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a refused object, a truncated zip, random bytes...
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise UserError(f"{path}: holds a Python object ({found[1] if found else 'not a tensor'})"
                            f" that loading would have to run code to build: refused") from None
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); it may be "
                        f"truncated: use an earlier checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a train_gpt2.py checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format version {ckpt.get('version')}, this script reads "
                        f"{CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str, dropout: float | None = None) -> GPT:
    try:
        model = GPT(GPTConfig(**{**ckpt["model_config"], **({} if dropout is None else {"dropout": dropout})}))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged checkpoint ({one_line(e)})") from None
    return model


def load_model(source: str, device="cpu", dropout: float | None = None) -> GPT:
    """The one model loader (--init-from, --eval-only, hellaswag.py, the notebook): a checkpoint
    (.pt), a GPT-2 name (gpt2, ..., from the hub) or a Hugging Face GPT-2 folder; in eval mode."""
    if os.path.isfile(source) or source.endswith(".pt"):
        model = model_from_checkpoint(read_checkpoint(source), source, dropout)
    else:
        try:
            model = GPT.from_pretrained(source, dropout=dropout or 0.0)
        except Exception as e:  # a bad name, an incomplete folder, no network for the hub...
            raise UserError(f"cannot load model {source!r}: {one_line(e)}") from None
    return model.to(device).eval()


def rng_state(device_type: str) -> dict:
    """The random states a run draws from: Python's, NumPy's (its key as a list: a checkpoint holds
    no NumPy objects), torch's CPU one and the device's."""
    name, key, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), *rest),
             "torch": torch.get_rng_state()}
    if device_type in ("cuda", "mps"):
        state[device_type] = getattr(torch, device_type).get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device_type in state:
        getattr(torch, device_type).set_rng_state(state[device_type])


def checkpoint_path(log_dir: str, step: int) -> str:  # ckpt_<step>.pt
    return os.path.join(log_dir, f"ckpt_{step:06d}.pt")


def checkpoint_steps(log_dir: str) -> list[int]:  # oldest first
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    return sorted(int(m[1]) for m in map(CHECKPOINT_NAME.fullmatch, names) if m)


def latest_checkpoint(log_dir: str) -> str | None:  # complete: atomic_write renames it into place
    steps = checkpoint_steps(log_dir)
    return checkpoint_path(log_dir, steps[-1]) if steps else None


def last_good(log_dir: str) -> str:
    path = latest_checkpoint(log_dir)
    return f"the last good checkpoint is {path}" if path else "no checkpoint was saved"


def save_checkpoint(log_dir: str, state: dict, keep: int) -> str:
    """Write ckpt_<step>.pt atomically (a failed write leaves the previous ones), then prune."""
    path = checkpoint_path(log_dir, state["step"])
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        free = shutil.disk_usage(log_dir).free / 1e9
        raise UserError(f"{path}: could not be written ({one_line(e, 200)}; {free:.1f} GB free in "
                        f"{log_dir}); {last_good(log_dir)}: free some space, then continue with "
                        f"--resume auto") from None
    if keep > 0:  # the newest `keep` up to this one stay; later ones (before a resume) are not ours
        older = [s for s in checkpoint_steps(log_dir) if s < state["step"]]
        for step in older[: max(0, len(older) - (keep - 1))]:
            os.remove(checkpoint_path(log_dir, step))
    return path


def find_resume_checkpoint(cfg: RunConfig, d: Dist) -> tuple[str | None, dict | None]:
    """(path, contents) of --resume PATH, or of --resume auto: the newest checkpoint in --log-dir on any
    rank's disk; a rank without that file (no shared disk) gets it from one that has it."""
    path = cfg.resume if cfg.resume != "auto" else latest_checkpoint(cfg.log_dir)
    mine = -1  # what this rank can offer: the step of its newest checkpoint (0: --resume PATH)
    if path is not None and os.path.isfile(path):
        mine = int(CHECKPOINT_NAME.fullmatch(os.path.basename(path))[1]) if cfg.resume == "auto" else 0
    offers = [mine] * d.world_size
    if d.ddp:
        dist.all_gather_object(offers, mine)
    if max(offers) < 0 and cfg.resume == "auto":
        if cfg.eval_only:
            raise UserError(f"--resume auto: no checkpoint in {cfg.log_dir}")
        print0(f"--resume auto: no checkpoint in {cfg.log_dir} yet, starting from scratch")
        return None, None
    ckpt, error = None, None
    if mine == max(offers):  # the ranks that have it read it
        try:
            ckpt = read_checkpoint(path)
        except UserError as e:
            error = str(e)
    errors = [error] * d.world_size
    if d.ddp:  # an error on any rank stops every rank
        dist.all_gather_object(errors, error)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    if all(offer == max(offers) for offer in offers):  # one disk, or the same file on each
        return path, ckpt
    box, src = [path, ckpt], offers.index(max(offers))
    dist.broadcast_object_list(box, src=src)
    print0(f"{box[0]}: read by rank {src}, sent to the ranks without it")
    return (path, ckpt) if mine == max(offers) else tuple(box)


def resume(prep: Prepared, model: GPT, optimizer, scaler, train_loader: DataLoader, d: Dist):
    """Restore a run: (the step to go on from, the last val loss, the updates skipped so far)."""
    ckpt, path = prep.ckpt, prep.ckpt_path
    ours = asdict(model.config)
    diffs = [f"{k} {v} (this run: {ours.get(k)})" for k, v in ckpt.get("model_config", {}).items()
             if k != "dropout" and v != ours.get(k)]
    if diffs:
        raise UserError(f"{path}: the checkpoint's model differs from this run's: {', '.join(diffs)}")
    try:
        model.load_state_dict(ckpt["model"])
        ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        for group, settings in zip(optimizer.param_groups, ours):  # but weight decay, betas,
            group.update(settings)  # fused... are this run's, not the checkpoint's
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["train_loader"])
        same_world = ckpt["world_size"] == d.world_size
        if same_world:
            set_rng_state(ckpt["rng"][d.rank], d.device_type)
        step, val_loss, skipped = int(ckpt["step"]), ckpt.get("val_loss"), ckpt.get("skipped_steps", 0)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged checkpoint ({one_line(e)})") from None
    if not same_world:  # the data does not depend on the number of processes; dropout does
        print0(f"warning: checkpoint of {ckpt['world_size']} processes, now {d.world_size}: the "
               f"random states are not restored")
    print0(f"resumed from {path} at step {step}")
    prep.ckpt = None  # the only reference: its memory goes back before training starts
    return step, val_loss, skipped


def save(step: int, cfg: RunConfig, d: Dist, model: GPT, optimizer, scaler, train_loader, val_loss,
         skipped: int):
    """A checkpoint after `step` updates: every rank's random state is gathered; rank 0 writes."""
    # a huge learning rate can break the weights with finite gradients: never save those
    if not torch.isfinite(torch.nn.utils.get_total_norm(list(model.parameters()))):
        raise UserError(f"step {step}: the weights are not finite (--max-lr {cfg.max_lr} too "
                        f"high?); {last_good(cfg.log_dir)}")
    rngs = [None] * d.world_size
    if d.ddp:
        dist.all_gather_object(rngs, rng_state(d.device_type))
    else:
        rngs[0] = rng_state(d.device_type)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "train_loader": train_loader.state_dict(), "rng": rngs,
             "model_config": asdict(model.config),
             "run_config": {**asdict(cfg), "given": sorted(cfg.given)}, "world_size": d.world_size,
             "val_loss": val_loss, "skipped_steps": skipped}
    t0 = time.perf_counter()
    # rank 0 writes, every rank waits (and raises its error, if any)
    on_rank0(d, lambda: save_checkpoint(cfg.log_dir, state, keep=cfg.keep_checkpoints))
    print0(f"saved {checkpoint_path(cfg.log_dir, step)} ({time.perf_counter() - t0:.2f}s)")


def run_files(path: str) -> list[str]:
    """Files of a run in a folder: log.txt, checkpoints, TensorBoard events."""
    return [n for n in sorted(os.listdir(path)) if n == "log.txt" or CHECKPOINT_NAME.fullmatch(n)
            or n.startswith("events.out.tfevents.")]


def claim_folder(path: str, resuming: bool, overwrite: bool) -> int | None:
    """--log-dir as a folder locked for this run, holding no other run unless resuming (or
    overwriting) it. The lock, an flock on LOG_DIR/.lock (holding the pid), dies with its process."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--log-dir {path}: a file, not a folder; pass another --log-dir")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--log-dir {path}: not writable ({e.strerror}); pass another --log-dir"
                        ) from None
    try:
        import fcntl  # not on Windows: there the folder is not locked
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"--log-dir {path}: in use by another run (pid {holder}); wait for it to "
                        f"end, or pass another --log-dir") from None
    except OSError as e:  # a file system without locks (some network mounts)
        print0(f"warning: --log-dir {path}: not locked ({e.strerror}); one run at a time, please")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    if run_files(path) and not resuming and not overwrite:
        os.close(fd)
        raise UserError(f"--log-dir {path} holds another run ({describe(run_files(path))}): continue "
                        f"it with --resume auto, pass another --log-dir, or pass --overwrite to "
                        f"delete that run first")
    return fd  # held open (and locked) until the process exits


def clear_folder(path: str, overwrite: bool):
    """Delete the files of a killed save, and with --overwrite the other run's."""
    theirs = run_files(path) if overwrite else []
    stale = [n for n in os.listdir(path) if n.startswith(".") and n.endswith(".tmp")]
    for n in theirs + stale:
        os.remove(os.path.join(path, n))
    if theirs:
        print0(f"--overwrite: deleted the previous run's files in {path}")


# ------------------------------------------------------------------------------------------------
# The log: print0, log.txt, TensorBoard, the run header

LOG_RECORD = re.compile(r"(\d+) (\w+) (\S+)")
TENSORBOARD_TAGS = {"train": "loss/train", "val": "loss/val", "hella": "hellaswag/acc_norm"}


def print0(*args):  # print on rank 0 only (torchrun sets RANK; `python` runs rank 0 alone)
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


class RunLog:
    """LOG_DIR/log.txt, one `STEP KIND VALUE` per line after a header, and with --tensorboard the same
    values (and lr, grad norm, tokens/s, MFU) as TensorBoard scalars; without log_dir it only prints.
    A resumed run keeps the records before resume_step (the later ones came from the lost part)."""

    def __init__(self, log_dir=None, header_lines=(), resume_step=None, tensorboard=False):
        self.path, self.writer = log_dir and os.path.join(log_dir, "log.txt"), None
        if self.path is None:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                kept = [line for line in f if line.startswith("#") or (
                    (record := LOG_RECORD.fullmatch(line.strip())) and int(record[1]) < resume_step)]
        text = "".join(kept + [f"# {h}\n" for h in header_lines]).encode()
        atomic_write(self.path, lambda f: f.write(text))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the lost part's points, so the curves continue
            self.writer = SummaryWriter(log_dir, purge_step=resume_step)

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


def run_header(cfg: RunConfig, d: Dist) -> list[str]:
    import platform
    import subprocess
    import tiktoken
    try:  # the commit of this file's checkout, if any
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:  # no git
        git = ""
    device = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else d.device_type
    return [f"command: {shlex.join(['train_gpt2.py', *cfg.argv])}",  # play.ipynb reads it back
            f"started: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy "
            f"{np.__version__}, tiktoken {tiktoken.__version__}",
            f"device: {device} x {d.world_size}",
            f"git: {git or 'unknown'}"]


# ------------------------------------------------------------------------------------------------
# Signals and rank-0 work


class StopRequest:
    """SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit 0; a second Ctrl-C stops at once."""

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
    """work() on rank 0 only, returning its result there. If it fails, rank 0 raises the error and
    the others exit 1 quietly: none waits forever for a rank that has exited."""
    result, error = None, None
    if d.is_main:
        try:
            result = work()
        except (UserError, OSError) as e:
            error = e if isinstance(e, UserError) else UserError(f"{e.filename or 'the run folder'}: {e.strerror or e}")
    if d.ddp:
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] and not d.is_main:
            sys.exit(1)
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------------------------------------
# Speed: the micro-batch probe, memory, peak FLOP/s, determinism


def auto_micro_batch(cfg: RunConfig, model: GPT, d: Dist, autocast) -> int:
    """--batch-size auto: on CUDA the largest micro-batch that fits on every rank; else a divisor <= 8."""
    per_rank = cfg.total_batch_size // cfg.seq_len // d.world_size
    if d.device_type != "cuda":
        return max(b for b in range(1, min(per_rank, NO_PROBE_MICRO_BATCH) + 1) if per_rank % b == 0)
    # held aside: AdamW's two fp32 moments, DDP's gradient buckets, 512 MB for NCCL and the compiler
    reserve = (12 if d.ddp else 8) * model.num_params() + (512 << 20)
    B, too_big = fit_micro_batch(model, per_rank, cfg.seq_len, d.device, autocast, reserve)
    if d.ddp:  # every rank must use the same B: the smallest that fits everywhere
        agreed = torch.tensor(B, device=d.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        B = int(agreed)
    if B == 0:
        raise UserError(f"--batch-size auto: not even one sequence of --seq-len {cfg.seq_len} fits "
                        f"in GPU memory; lower --seq-len or train a smaller model")
    torch.cuda.reset_peak_memory_stats(d.device)  # done: reports training's peak, not the probe's
    tried = f" (out of memory at {', '.join(map(str, too_big))})" if too_big else ""
    print0(f"--batch-size auto: micro-batch {B}{tried}")
    return B


def fit_micro_batch(model, per_rank_seqs: int, T: int, device, autocast, reserve_bytes: int):
    """(the largest micro-batch dividing per_rank_seqs that trains in memory, or 0; those that did
    not): a forward and backward pass, uncompiled (more memory than compiled), with reserve_bytes held
    aside (the optimizer's state), on zeros, under a forked random state; B halves after each OOM."""

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
            if device.type == "cuda":
                torch.cuda.empty_cache()  # give back what a failed try reserved

    B, too_big = per_rank_seqs, []
    while B and not fits(B):
        too_big.append(B)
        B = max((b for b in range(1, B // 2 + 1) if per_rank_seqs % b == 0), default=0)
    return B, too_big


def keep_freed_memory():
    """Speed on Linux CPUs: glibc maps each allocation over 32 MB afresh and the kernel zeroes every new
    page: a third of a CPU step went to page faults on the logits (README). Freed memory stays here."""
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


# Dense peak FLOP/s of one GPU in training's precision (bf16; fp16 before Ampere), NVIDIA's data sheets
GPU_PEAK_FLOPS = {  # "RTX 6000": the RTX 6000 Ada
    "H100": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12,
    "H800": 989e12, "H800 PCIe": 756e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "A10": 125e12,
    "A40": 149.7e12, "RTX A6000": 154.8e12, "L4": 121e12, "L40": 181e12, "L40S": 362e12, "RTX 6000": 364.2e12,
    "RTX 3090": 71e12, "RTX 4090": 165.2e12, "V100": 125e12, "V100 PCIe": 112e12, "V100S": 130e12, "T4": 65e12}


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a GPU from its torch.cuda.get_device_name(), or None: the exact model (an "L40S" is
    no "L4") and form ("NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA H100 PCIe" -> "H100 PCIe")."""
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


def make_deterministic():
    """The same command, the same losses to the bit: set_num_threads ends MKL's dynamic threading
    (fewer threads on a busy machine reorder sums); CUDA: deterministic kernels."""
    torch.set_num_threads(torch.get_num_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


# ------------------------------------------------------------------------------------------------
# --eval-only and main()


def evaluate_only(cfg: RunConfig, d: Dist, prep: Prepared):
    """--eval-only: evaluate a checkpoint (--resume) or a pretrained model (--init-from); no log."""
    if prep.ckpt is not None:
        model, step = model_from_checkpoint(prep.ckpt, prep.ckpt_path), prep.ckpt["step"]
        print0(f"loaded {prep.ckpt_path} (step {step})")
    else:
        model, step = load_model(cfg.init_from), 0
    check_seq_len(cfg, model)
    model.to(d.device).eval()
    B = NO_PROBE_MICRO_BATCH if cfg.batch_size == "auto" else cfg.batch_size
    loader = DataLoader(*prep.val, B=B, T=cfg.seq_len, rank=d.rank, world_size=d.world_size, shuffle=False)
    kinds = ["val"] * bool(cfg.val_every) + ["hella"] * bool(cfg.hellaswag_every) + ["sample"]
    evaluate(step, kinds, model, model, loader, cfg, d, prep, autocast_context(d.device_type, prep.dtype),
             RunLog())
    return model


def main(argv=None):
    d = prep = None
    try:
        cfg = parse_args(argv)
        # CUDA memory in growable segments: less fragmentation, so the batch-size probe's answer
        # holds in training (README: memory); read when CUDA first allocates
        if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        d = setup_distributed(cfg.device, cfg.dist_timeout)
        if cfg.deterministic or (cfg.deterministic is None and d.device_type == "cpu"):
            make_deterministic()  # before the first matmul (cuBLAS reads its setting then)
        if d.device_type == "cpu":
            keep_freed_memory()
        prep = Prepared(dtype=autocast_dtype(d.device, cfg.dtype))
        preflight(cfg, d, prep)
        model = (evaluate_only if cfg.eval_only else train)(cfg, d, prep)  # None if stopped
        if model is not None and cfg.export_hf and d.is_main:
            print0(f"exported the model in Hugging Face format to {model.export_hf(cfg.export_hf)}")
        cleanup_distributed(finished=True)
    except UserError as e:
        print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1 if d is not None else 2)
    except KeyboardInterrupt:
        print("train_gpt2.py: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if prep is not None and prep.lock is not None:
            os.close(prep.lock)  # the run folder's lock
        cleanup_distributed()


if __name__ == "__main__":
    main()
