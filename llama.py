"""
LLaMA 1/2/3 (and Mistral-7B's shape) and batched generation with a KV cache, top to bottom:
config -> RMSNorm -> RoPE -> attention -> feed-forward -> block -> model -> generate. No file I/O:
checkpoints are checkpoint.py's, the tokenizer tokenizer.py's. Module names are Hugging Face's
without "model.", so the state-dict keys are a HF checkpoint's; RoPE pairs dims as HF's rotate_half.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from chunked_loss import chunked_cross_entropy
from util import UserError

# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0  # 0 = n_heads (multi-head attention); fewer = grouped-query attention
    head_dim: int = 0  # 0 = dim // n_heads; Llama 3.2 / Mistral-Nemo style configs set it
    hidden_dim: int = 11008  # SwiGLU feed-forward width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: list = field(default_factory=lambda: [2])

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise UserError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if isinstance(self.eos_id, int):
            self.eos_id = [self.eos_id]


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 whatever the activation dtype (as Meta's and HF's implementations do)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config):
    """Inverse frequencies θ^(-2j/hd), j = 0..hd/2-1, with Llama 3.1's scaling when configured."""
    hd = config.head_dim
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd
    inv_freq = 1.0 / (config.rope_theta**exponents)
    rs = config.rope_scaling
    if not rs:
        return inv_freq
    # "llama3" scaling, formula of the Llama 3.1 release (docs/formats.md): long wavelengths are
    # divided by factor, short ones kept, those between interpolated
    factor, lo_f, hi_f = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo_f) / (hi_f - lo_f)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    not_long = torch.where(wavelen < orig / hi_f, inv_freq, scaled)
    return torch.where(wavelen > orig / lo_f, inv_freq / factor, not_long)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # dimension j pairs with j + hd/2 (HF layout)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, n_kv_heads, max_len, hd) during generation

    def forward(self, x, cos, sin, start_pos, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # Hkv heads
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.cache_k is not None:
            self.cache_k[:B, :, start_pos : start_pos + T] = k
            self.cache_v[:B, :, start_pos : start_pos + T] = v
            k = self.cache_k[:B, :, : start_pos + T]  # (B, Hkv, S, hd), S = start_pos + T
            v = self.cache_v[:B, :, : start_pos + T]
        # grouped-query attention: each group of H/Hkv query heads shares one key/value head
        gqa = self.n_heads != self.n_kv_heads
        if gqa and mask is not None and T > 1:
            # with a mask, CUDA's fused kernels do not take enable_gqa (PyTorch's sdpa docs: GQA
            # runs on the flash kernel, which takes no mask, or on the math one, which materializes
            # every score): give the memory-efficient kernel full-width keys and values instead
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        # a plain bool: under torch.compile T > 1 is symbolic, and bool() of it stays symbolic
        causal = True if mask is None and T > 1 else False  # noqa: SIM210
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, start_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def padding_mask(start_pos, T, key_valid, device):
    """Explicit (B|1, 1, T, S) bool mask, S = start_pos + T: causal, minus padding (key_valid
    False). Each token sees itself, so a row of padding never becomes all -inf (which would turn
    into NaN and spread through v)."""
    S = start_pos + T
    q_idx = torch.arange(start_pos, S, device=device)[:, None]
    k_idx = torch.arange(S, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :S]) | (k_idx == q_idx)
    return mask


def segment_mask(segments, dtype):
    """Block-diagonal causal mask (B, 1, T, T) of packed segments (B, T), additive (0 / -inf) in
    attention's dtype (autocast's, if on, else dtype), made once here: every layer's sdpa would
    convert a bool mask, and save it for the backward pass."""
    T, device = segments.shape[1], segments.device
    same_segment = segments[:, None, :, None] == segments[:, None, None, :]
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril() & same_segment
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, float("-inf"))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(config)  # a plain tensor: not in the state dict, never meta
        self.checkpoint_blocks = False  # activation checkpointing per block (train.py sets it)
        self.loss_chunk = 256  # target tokens per chunk of the loss (train.py sets it)

    def forward(
        self,
        tokens,
        start_pos=0,
        positions=None,
        key_valid=None,
        last_only=False,
        logits_at=None,
        segments=None,
        targets=None,
    ):
        """tokens (B, T) -> logits (B, T, V); (B, 1, V) with last_only; (N, V) at the N True
        positions of logits_at (B, T) bool (train.py: the loss targets, so lm_head skips the rest).
        With targets (N,), the next tokens there: -> their cross-entropy losses (N,) fp32 instead,
        loss_chunk tokens at a time (chunked_cross_entropy): no (N, V) logits exist whole.
        start_pos: where these tokens go in the KV cache (when one is set up).
        positions: (B, T) RoPE positions; default start_pos + 0..T-1 for every row.
        key_valid: (B, start_pos + T) bool, False at padding, which no token may attend to.
        segments: (B, T) ids of sequences packed end to end (train.py's packing): a token attends
            only to earlier tokens of its segment; with positions restarting at 0 in each segment,
            each sequence gets the logits it would alone. The mask holds B·T² elements."""
        if segments is not None and positions is None:
            raise ValueError("segments: give the positions too (restarting at 0 in each segment)")
        if segments is not None and (start_pos > 0 or key_valid is not None):
            raise ValueError(
                "segments: packed rows are whole sequences (no KV cache, no key_valid)"
            )
        B, T = tokens.shape
        device = tokens.device
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=device)[None]  # (1, T)
        freqs = positions[..., None].float() * self.inv_freq.to(device)  # (B|1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, T, hd)
        cos, sin = emb.cos(), emb.sin()
        mask = None
        if key_valid is not None or (start_pos > 0 and T > 1):
            mask = padding_mask(start_pos, T, key_valid, device)
        h = self.embed_tokens(tokens)  # (B, T, D)
        if segments is not None:
            mask = segment_mask(segments, h.dtype)
        for layer in self.layers:
            args = (h, cos, sin, start_pos, mask)
            if self.checkpoint_blocks and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at]  # (N, D)
        h = self.norm(h)
        if targets is not None:
            return chunked_cross_entropy(h, self.lm_head, targets, self.loss_chunk)
        return self.lm_head(h)

    def setup_cache(self, batch_size, max_len):
        """Preallocate the KV cache, as Meta's generation.py does: (B, Hkv, max_len, hd) a layer."""
        w = self.norm.weight  # the base's dtype (the embedding may be gathered on use)
        shape = (batch_size, self.config.n_kv_heads, max_len, self.config.head_dim)
        for layer in self.layers:
            layer.self_attn.cache_k = torch.zeros(shape, dtype=w.dtype, device=w.device)
            layer.self_attn.cache_v = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache_k = layer.self_attn.cache_v = None

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Random init for training from scratch: N(0, std), residual outputs scaled by 1/sqrt(2L)
        (GPT-2's rule), norms at one."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied embedding counts once


# -----------------------------------------------------------------------------
# generation


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose probability mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts,
    max_new_tokens,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seed=None,
    stop_at_eos=True,
):
    """Continue each prompt (a string, encoded with BOS, or a list of token ids); returns the new
    tokens of each, without the EOS. Prompts of different lengths are left-padded and share one
    KV cache; each row gets its own RoPE positions and never attends to padding."""
    device = model.embed_tokens.weight.device
    ids = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]
    B, L = len(ids), max(len(p) for p in ids)
    total = L + max_new_tokens
    if total > model.config.max_seq_len:
        raise UserError(
            f"prompt of {L} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {model.config.max_seq_len} tokens"
        )
    if min(len(p) for p in ids) == 0:
        raise UserError("empty prompt")
    tokens = torch.full((B, total), tokenizer.pad_id, dtype=torch.long, device=device)
    key_valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(ids):
        tokens[i, L - len(p) : L] = torch.tensor(p, dtype=torch.long)
        key_valid[i, L - len(p) :] = True
    positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, total)
    padded = not bool(key_valid[:, :L].all())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(getattr(tokenizer, "stop_ids", {tokenizer.eos_id})), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    model.setup_cache(B, total)
    try:
        start = 0  # the first pass feeds the whole prompt, then one token at a time
        for cur in range(L, total):
            valid = key_valid[:, :cur] if padded else None
            new = slice(start, cur)
            logits = model(tokens[:, new], start, positions[:, new], valid, last_only=True)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            is_stop = torch.isin(nxt, stop) if stop_at_eos else torch.zeros_like(done)
            for i in range(B):
                if not done[i] and not is_stop[i]:
                    out[i].append(int(nxt[i]))
            done |= is_stop
            if bool(done.all()):
                break
            tokens[:, cur] = nxt
            start = cur
    finally:
        model.clear_cache()
    return out
