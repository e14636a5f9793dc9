"""
train_gpt2.py: GPT-2 (124M) from scratch, in one file you can read top to bottom.

Sections, in reading order: model, data, learning-rate schedule, evaluation, checkpoints,
setup, command line, training loop.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

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
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on GPU
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token attends to everything cached
        else:
            # several new tokens after a cached prefix: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


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
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding table (GPT-2 does this)
        self.transformer.wte.weight = self.lm_head.weight
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
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask=attn_mask, kv_cache=kv_cache)
        return self.transformer.ln_f(x)

    def logits(self, x):
        """Hidden states (..., C) -> logits over the real vocabulary (..., vocab_size)."""
        logits = self.lm_head(x)
        # the padded rows exist for kernel speed only: cut them so they never score or get sampled
        return logits[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets of -1 are ignored (padding)."""
        logits = self.logits(self.hidden_states(idx, kv_cache=kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
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
        # the fused kernel does the whole update in a few launches (CUDA only)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")

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
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """Load OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, from the Hugging Face
        hub) or a local directory in Hugging Face GPT-2 format (config.json + model.safetensors or
        pytorch_model.bin)."""
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
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
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
