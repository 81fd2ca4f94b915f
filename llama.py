"""
LLaMA in one file: the model, loading real checkpoints (Hugging Face and Meta layouts), a tokenizer,
and batched generation with a key/value cache.

Covers LLaMA 1, Llama 2 (GQA 70B), Llama 3/3.1/3.2 (rope_theta 500000, "llama3" RoPE scaling, tied
embeddings, explicit head_dim) and Mistral-7B-v0.1-shaped checkpoints (same architecture; its
sliding window is not needed for contexts up to 4096).

Module names follow the Hugging Face layout without its "model." prefix, so the state-dict keys of
this model are the keys of a HF checkpoint, e.g. layers.0.self_attn.q_proj.weight. RoPE uses the HF
"rotate_half" convention; Meta checkpoints are converted on load (see _meta_to_hf below).
"""

import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(ValueError):
    """A problem the user can fix (a path, a setting, a file). Scripts print it as one line."""


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# config

@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0          # 0 = n_heads (multi-head attention); fewer = grouped-query attention
    head_dim: int = 0            # 0 = dim // n_heads; Llama 3.2 / Mistral-Nemo style configs set it
    hidden_dim: int = 11008      # SwiGLU feed-forward width
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
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if isinstance(self.eos_id, int):
            self.eos_id = [self.eos_id]

    @classmethod
    def from_hf(cls, cfg, path="config.json"):
        """From a Hugging Face config.json dict."""
        try:
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise UserError(f"{path}: rope type {rope_type!r} is not supported (default or llama3)")
            eos = cfg.get("eos_token_id", 2)
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or 0,
                head_dim=cfg.get("head_dim") or 0,
                hidden_dim=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0,
                rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                bos_id=cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1,
                eos_id=eos if isinstance(eos, list) else [eos if eos is not None else 2],
            )
        except KeyError as e:
            raise UserError(f"{path}: missing key {e.args[0]!r}") from None

    @classmethod
    def from_meta(cls, params, vocab_size, path="params.json"):
        """From Meta's params.json. vocab_size comes from the weights (params.json often says -1)."""
        try:
            dim = params["dim"]
            # FFN width as in Meta's model.py: 2/3 of 4·dim, times an optional multiplier, rounded up.
            hidden = int(2 * 4 * dim / 3)
            if params.get("ffn_dim_multiplier"):
                hidden = int(params["ffn_dim_multiplier"] * hidden)
            multiple_of = params.get("multiple_of", 256)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
            rope_scaling = None
            if params.get("use_scaled_rope"):  # Llama 3.1 / 3.2
                rope_scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                                "low_freq_factor": 1.0, "high_freq_factor": params.get("high_freq_factor", 4.0),
                                "original_max_position_embeddings": 8192}
            llama3 = vocab_size >= 128000
            return cls(
                dim=dim,
                n_layers=params["n_layers"],
                n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads") or 0,
                hidden_dim=hidden,
                vocab_size=vocab_size,
                norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", 10000.0),
                rope_scaling=rope_scaling,
                max_seq_len=params.get("max_seq_len", 8192 if llama3 else 4096),
                bos_id=128000 if llama3 else 1,
                eos_id=[128001, 128008, 128009] if llama3 else [2],
            )
        except KeyError as e:
            raise UserError(f"{path}: missing key {e.args[0]!r}") from None

    def to_hf(self, torch_dtype="float32"):
        """The config.json that transformers' LlamaForCausalLM reads."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id[0] if len(self.eos_id) == 1 else self.eos_id,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "torch_dtype": torch_dtype,
        }


# -----------------------------------------------------------------------------
# the model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 whatever the activation dtype (as Meta's and HF's implementations do)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config):
    """Inverse frequencies θ^(-2j/hd), j = 0..hd/2-1, with Llama 3.1's scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    rs = config.rope_scaling
    if rs:  # "llama3" scaling, formula as in formats.md (Llama 3.1 release)
        factor, lo_f, hi_f = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        orig = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - lo_f) / (hi_f - lo_f)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > orig / lo_f, inv_freq / factor,
                               torch.where(wavelen < orig / hi_f, inv_freq, scaled))
    return inv_freq


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
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.cache_k is not None:
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k = self.cache_k[:B, :, :start_pos + T]  # (B, Hkv, S, hd), S = start_pos + T
            v = self.cache_v[:B, :, :start_pos + T]
        # grouped-query attention: each group of H/Hkv query heads shares one key/value head
        gqa = self.n_heads != self.n_kv_heads
        if gqa and mask is not None and T > 1:
            # with a mask, CUDA's fused kernels do not take enable_gqa (PyTorch's sdpa documentation:
            # GQA runs on the flash kernel, which takes no mask, or on the math one, which materializes
            # every score): give the memory-efficient kernel full-width keys and values instead
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=gqa)
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
        self.inv_freq = rope_inv_freq(config)  # a plain tensor: not in the state dict, never on meta
        self.checkpoint_blocks = False         # activation checkpointing per block (train.py sets it)
        self.loss_chunk = 256                  # target tokens per chunk of the loss (train.py sets it)

    def forward(self, tokens, start_pos=0, positions=None, key_valid=None, last_only=False, logits_at=None,
                segments=None, targets=None):
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only, or (N, V) at the N True
        positions of logits_at (B, T) bool (train.py: the loss targets only, so lm_head and the
        softmax skip prompt and padding positions).
        With targets (N,), the next-token ids at those N positions: -> their cross-entropy losses
        (N,) fp32 instead, computed loss_chunk tokens at a time (chunked_cross_entropy), so that no
        (N, V) logits tensor ever exists whole.

        start_pos: where these tokens go in the KV cache (when one is set up).
        positions: (B, T) RoPE positions; default start_pos + 0..T-1 for every row.
        key_valid: (B, start_pos + T) bool, False at padding, which no token may attend to.
        segments: (B, T) ints for rows that hold several sequences packed end to end (train.py's
            packing): a token attends only to earlier tokens of its own segment. Give the positions
            too, restarting at 0 in each segment; then every sequence gets the logits it would alone.
            The mask costs B·T² elements, once for all layers.
        """
        if segments is not None and positions is None:
            raise ValueError("segments: give the positions too (restarting at 0 in each segment)")
        B, T = tokens.shape
        device = tokens.device
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=device)[None]  # (1, T)
        freqs = positions[..., None].float() * self.inv_freq.to(device)             # (B|1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                            # (B|1, 1, T, hd)
        cos, sin = emb.cos(), emb.sin()
        mask = None
        if key_valid is not None or (start_pos > 0 and T > 1):
            # explicit (B|1, 1, T, S) mask: causal, minus padding; each token sees itself, so a row
            # of padding never becomes all -inf (which would turn into NaN and spread through v)
            S = start_pos + T
            q_idx = torch.arange(start_pos, S, device=device)[:, None]
            k_idx = torch.arange(S, device=device)[None, :]
            mask = (k_idx <= q_idx)[None, None]
            if key_valid is not None:
                mask = (mask & key_valid[:, None, None, :S]) | (k_idx == q_idx)
        h = self.embed_tokens(tokens)  # (B, T, D)
        if segments is not None:
            if start_pos > 0 or mask is not None:
                raise ValueError("segments: packed rows are whole sequences (no KV cache, no key_valid)")
            # block-diagonal causal mask (B, 1, T, T), made additive (0 / -inf) once here in the
            # dtype attention runs in: a bool mask would be converted, and saved for the backward
            # pass, by every layer's scaled_dot_product_attention
            allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril() & \
                (segments[:, None, :, None] == segments[:, None, None, :])
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        for layer in self.layers:
            if self.checkpoint_blocks and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at]  # (N, D)
        if targets is not None:
            return chunked_cross_entropy(self.norm(h), self.lm_head.weight, targets, self.loss_chunk)
        return self.lm_head(self.norm(h))

    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        """Preallocate the KV cache (as Meta's generation.py does): (B, Hkv, max_len, hd) per layer."""
        w = self.embed_tokens.weight
        c = self.config
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        for layer in self.layers:
            layer.self_attn.cache_k = torch.zeros(shape, dtype=dtype or w.dtype, device=device or w.device)
            layer.self_attn.cache_v = torch.zeros(shape, dtype=dtype or w.dtype, device=device or w.device)

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


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of lm_head's logits, chunk by chunk of tokens, in the forward and the backward
    pass. The logits of N target tokens over a vocabulary of V are N·V floats (fp32: 4 GB for
    8,192 tokens at Llama 3's V = 128,256), and autograd would keep them, their softmax and their
    gradient; here only one (chunk, V) block lives at a time, and nothing N·V-sized is kept.
    Per token: loss = logsumexp(z) - z[target]; d loss / dz = softmax(z) - onehot(target).

    The gradient with respect to the hidden states is computed in the forward pass, while each
    chunk's logits are at hand: token i's row depends on token i alone, so the backward pass only
    scales row i by d(total)/d loss_i. Recomputing the logits in the backward pass instead would
    cost a third lm_head matmul next to the two the loss needs (bench.py, vocab 128,256, a busy
    CPU: 1.16x transformers + PEFT's tokens/s with the recomputation, 1.56x without; see
    docs/bench_vocab.md). The weight's gradient sums over tokens with those factors, so when
    lm_head trains (full fine-tuning, or a trained tied embedding) the backward pass does recompute
    each chunk's logits for it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        # hidden (N, D) final-normed states, weight (V, D) lm_head's, targets (N,) -> losses (N,) fp32
        w = weight.to(dtype)  # autocast's cast, done once: a no-op when the weight is already in dtype
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # d loss_i / d h_i
        for s in range(0, len(hidden), chunk):
            z = (hidden[s:s + chunk].to(dtype) @ w.t()).float()  # (C, V)
            t = targets[s:s + chunk]
            lse = z.logsumexp(-1, keepdim=True)
            losses[s:s + chunk] = (lse - z.gather(-1, t[:, None]))[:, 0]
            if grad_h is not None:
                grad_h[s:s + chunk] = grad_logits_(z, lse, t).to(dtype) @ w
        ctx.save_for_backward(hidden if ctx.needs_input_grad[1] else None, weight, targets, grad_h)
        ctx.chunk, ctx.dtype = chunk, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, grad_h = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_losses[:, None].to(grad_h.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:  # summed over the chunks in fp32, as autocast's matmul would give it
            w = weight.to(ctx.dtype)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            for s in range(0, len(hidden), ctx.chunk):
                h = hidden[s:s + ctx.chunk].to(ctx.dtype)
                z = (h @ w.t()).float()
                g = grad_logits_(z, z.logsumexp(-1, keepdim=True), targets[s:s + ctx.chunk])
                g = g.mul_(grad_losses[s:s + ctx.chunk, None]).to(ctx.dtype)
                # in place when the dtypes allow (fp32): no (V, D) temporary
                grad_w.addmm_(g.t(), h) if g.dtype == grad_w.dtype else grad_w.add_(g.t() @ h)
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def grad_logits_(z, lse, targets):
    """d cross-entropy / d logits = softmax(z) - onehot(targets), written over z (C, V) fp32 (no
    second (C, V) buffer); lse = z.logsumexp(-1, keepdim=True)."""
    z.sub_(lse).exp_()
    z[torch.arange(len(z), device=z.device), targets] -= 1
    return z


def chunked_cross_entropy(hidden, weight, targets, chunk_size=256):
    """Per-token cross-entropy (N,) fp32 of the logits hidden @ weight.T without materializing them:
    hidden (N, D), weight (V, D), targets (N,) ids. Equal to F.cross_entropy(hidden @ weight.T,
    targets, reduction="none") up to float rounding, gradients included. Under autocast the matmuls
    run in its dtype (bf16: the logits are rounded as F.linear's would be), the softmax in fp32."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return ChunkedCrossEntropy.apply(hidden, weight, targets, max(1, int(chunk_size)), dtype)


# -----------------------------------------------------------------------------
# reading checkpoints

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path):
    """Parse a .safetensors header: 8 bytes little-endian header length, then a JSON object
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
    (format spec: github.com/huggingface/safetensors). Returns (tensors, metadata, data_start)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated or corrupt safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise UserError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + n + end})")
    for name, t in header.items():
        if t.get("dtype") not in _ST_DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {t.get('dtype')!r}")
    return header, metadata, 8 + n


def iter_safetensors(path):
    """Yield (name, tensor) one at a time, read straight from the file into a fresh CPU tensor.
    Plain reads rather than a memory map keep resident memory at the model plus one tensor."""
    header, _, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = t["data_offsets"]
            out = torch.empty(t["shape"], dtype=_ST_DTYPES[t["dtype"]])
            if out.numel() * out.element_size() != end - begin:
                raise UserError(f"{path}: tensor {name}: shape {t['shape']} does not match its {end - begin} bytes")
            f.seek(start + begin)
            if end > begin:
                f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            yield name, out


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a torch pickle fails in many ways; report the file, not the internals
        raise UserError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _hf_source(ckpt_dir):
    """(config, iterator of (key, tensor, file)) for the Hugging Face layout."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    config = LlamaConfig.from_hf(_read_json(cfg_path), cfg_path)
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(ckpt_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(f"{ckpt_dir}: config.json but no model.safetensors or model.safetensors.index.json")
    paths = [os.path.join(ckpt_dir, f) for f in files]
    for p in paths:  # fail before reading anything
        if not os.path.exists(p):
            raise UserError(f"{p}: missing shard listed in {index_path}")
        read_safetensors_header(p)

    def tensors():
        for p in paths:
            for key, t in iter_safetensors(p):
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # old files carry RoPE buffers: recomputed here
                yield key.removeprefix("model."), t, p
    return config, tensors()


# Meta key -> HF key (without "model."); formats.md
_META_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def _meta_to_hf(key, w, config):
    """Rename a Meta key and permute wq/wk rows from interleaved RoPE pairs (2j, 2j+1) to HF's
    rotate_half pairs (j, j + hd/2)."""
    if key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        return {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}[key], w
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if not m or m.group(2) not in _META_NAMES:
        return key, w  # reported as unexpected by the caller
    name = f"layers.{m.group(1)}.{_META_NAMES[m.group(2)]}.weight"
    if m.group(2) in ("attention.wq", "attention.wk") and w.dim() == 2:
        heads = config.n_heads if m.group(2) == "attention.wq" else config.n_kv_heads
        hd = config.head_dim
        if w.shape[0] == heads * hd:
            w = w.view(heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(heads * hd, w.shape[1])
    return name, w


# Model-parallel shards: column-parallel weights were split on dim 0, row-parallel on dim 1.
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _meta_source(ckpt_dir):
    params_path = os.path.join(ckpt_dir, "params.json")
    params = _read_json(params_path)
    names = sorted(os.listdir(ckpt_dir))
    pths = [n for n in names if re.fullmatch(r"consolidated\.\d+\.pth", n)]
    sts = [n for n in names if re.fullmatch(r"consolidated(\.\d+)?\.safetensors", n)]
    if pths:
        numbers = [int(n.split(".")[1]) for n in pths]
        for i in range(max(numbers) + 1):
            if i not in numbers:
                raise UserError(f"{ckpt_dir}: missing shard consolidated.{i:02d}.pth")
        shards = [_torch_load(os.path.join(ckpt_dir, n)) for n in pths]
        files = [os.path.join(ckpt_dir, n) for n in pths]
    elif sts:
        files = [os.path.join(ckpt_dir, n) for n in sts]
        for f in files:
            read_safetensors_header(f)
        shards = [dict(iter_safetensors(f)) for f in files] if len(files) > 1 else None
    else:
        raise UserError(f"{ckpt_dir}: params.json but no consolidated.NN.pth or consolidated.safetensors")
    if shards is not None:
        emb = [s.get("tok_embeddings.weight") for s in shards]
        if any(e is None for e in emb):
            raise UserError(f"{files[emb.index(None)]}: no tok_embeddings.weight")
        # LLaMA 1/2 split the embedding on dim 1 (each shard holds every row), Llama 3 on dim 0
        if len(emb) == 1 or emb[0].shape[1] != params.get("dim"):
            vocab = emb[0].shape[0]
        else:
            vocab = sum(e.shape[0] for e in emb)
    else:
        header, _, _ = read_safetensors_header(files[0])
        if "tok_embeddings.weight" not in header:
            raise UserError(f"{files[0]}: no tok_embeddings.weight")
        vocab = header["tok_embeddings.weight"]["shape"][0]
    config = LlamaConfig.from_meta(params, vocab, params_path)
    config.tie_embeddings = False  # Meta checkpoints always carry output.weight

    def tensors():
        if shards is None:  # one consolidated.safetensors, read lazily
            for key, t in iter_safetensors(files[0]):
                if key == "rope.freqs":
                    continue
                name, t = _meta_to_hf(key, t, config)
                yield name, t, files[0]
            return
        for key in shards[0]:
            if key == "rope.freqs":
                continue
            parts = [s[key] for s in shards]
            if len(parts) == 1 or parts[0].dim() == 1:
                t = parts[0]  # norms are replicated on every shard
            elif key.endswith(_ROW_PARALLEL):
                t = torch.cat(parts, dim=1)
            elif key == "tok_embeddings.weight" and parts[0].shape[1] != config.dim:
                t = torch.cat(parts, dim=1)
            else:
                t = torch.cat(parts, dim=0)
            name, t = _meta_to_hf(key, t, config)
            yield name, t, files[0] if len(files) == 1 else f"{ckpt_dir}/consolidated.*"
    return config, tensors()


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def checkpoint_layout(ckpt_dir):
    """'hf' or 'meta', by what the directory holds."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: checkpoint directory not found")
    if os.path.exists(os.path.join(ckpt_dir, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(ckpt_dir, "params.json")):
        return "meta"
    raise UserError(f"{ckpt_dir}: neither a Hugging Face checkpoint (config.json + *.safetensors) "
                    f"nor a Meta one (params.json + consolidated.*)")


def load_model(ckpt_dir, dtype=torch.float32, device="cpu"):
    """Build the model on the meta device (no memory), then fill it one tensor at a time from the
    checkpoint, each converted straight to `dtype` on `device`: never two copies of the weights."""
    layout = checkpoint_layout(ckpt_dir)
    config, tensors = _hf_source(ckpt_dir) if layout == "hf" else _meta_source(ckpt_dir)
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    cfg_file = os.path.join(ckpt_dir, "config.json" if layout == "hf" else "params.json")
    seen, unexpected = set(), []
    for key, t, file in tensors:
        if key not in expected:
            if not (key == "lm_head.weight" and config.tie_embeddings):
                unexpected.append(key)
            continue
        if tuple(t.shape) != expected[key]:
            raise UserError(f"{file}: tensor {key} has shape {list(t.shape)}, expected "
                            f"{list(expected[key])} from {cfg_file}")
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[param_name] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=True)
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if unexpected or missing:
        def some(keys):
            return ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")
        problem = "; ".join(p for p in (missing and f"missing keys {some(missing)}",
                                        unexpected and f"unexpected keys {some(unexpected)}") if p)
        raise UserError(f"{ckpt_dir}: {problem}")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_hf_checkpoint(model, out_dir, tokenizer_path=None, dtype=None, config=None):
    """Write config.json + model.safetensors (+ tokenizer.model), the layout transformers reads.
    `model` is a Llama or a state dict with this model's keys (then pass `config`)."""
    from safetensors.torch import save_file
    config = config or model.config
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    tensors = {"model." + k if k != "lm_head.weight" else k:
               (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    write_text_atomic(os.path.join(out_dir, "config.json"), json.dumps(config.to_hf(dtype_name), indent=2))
    if tokenizer_path:
        src = tokenizer_path if os.path.isfile(tokenizer_path) else os.path.join(tokenizer_path, "tokenizer.model")
        if os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
            shutil.copyfile(src, os.path.join(out_dir, "tokenizer.model.tmp"))
            os.replace(os.path.join(out_dir, "tokenizer.model.tmp"), os.path.join(out_dir, "tokenizer.model"))


def write_text_atomic(path, text):
    """Write to a temporary name, then rename: a crash leaves the old file or the new one, never half."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# tokenizer

# Llama 3's pre-tokenizer pattern and special tokens, from Meta's llama3 tokenizer.py release
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


class Tokenizer:
    """SentencePiece (LLaMA 1/2, Mistral) or tiktoken BPE (Llama 3), chosen by the file's content."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                first = f.readline(200)
        except OSError as e:
            raise UserError(f"{path}: cannot read tokenizer ({e.strerror})") from None
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
            self._init_tiktoken(path)
        else:
            self._init_sentencepiece(path)

    def _init_sentencepiece(self, path):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError):
            raise UserError(f"{path}: not a SentencePiece model or tiktoken file") from None
        self.kind = "sentencepiece"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = {self.eos_id}

    def _init_tiktoken(self, path):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise UserError(f"{path}: a Llama 3 (tiktoken) tokenizer needs the optional package "
                            f"'tiktoken': pip install tiktoken") from None
        ranks = load_tiktoken_bpe(path)
        n = len(ranks)
        specials = _LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_SPECIAL) + 2)]
        special_ids = {tok: n + i for i, tok in enumerate(specials)}
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=_LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=special_ids)
        self.kind = "tiktoken"
        self.vocab_size = n + len(specials)
        self.bos_id = special_ids["<|begin_of_text|>"]
        self.eos_id = special_ids["<|end_of_text|>"]
        self.pad_id = special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, special_ids["<|eot_id|>"], special_ids["<|eom_id|>"]}

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text) if self.kind == "sentencepiece" else self.enc.encode(text, disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.kind == "sentencepiece" else self.enc.decode(ids)


def load_tokenizer(path):
    """A tokenizer from a tokenizer.model file or a checkpoint directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.exists(path):
        raise UserError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


def check_tokenizer(tokenizer, config, ckpt_dir=""):
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"{ckpt_dir} has vocab_size {config.vocab_size}")


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
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             seed=None, stop_at_eos=True):
    """Continue each prompt (a string, encoded with BOS, or a list of token ids); returns the new
    tokens of each, without the EOS. Prompts of different lengths are left-padded and share one
    KV cache; each row gets its own RoPE positions and never attends to padding."""
    device = model.embed_tokens.weight.device
    ids = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]
    B, L = len(ids), max(len(p) for p in ids)
    total = L + max_new_tokens
    if total > model.config.max_seq_len:
        raise UserError(f"prompt of {L} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                        f"context of {model.config.max_seq_len} tokens")
    if min(len(p) for p in ids) == 0:
        raise UserError("empty prompt")
    tokens = torch.full((B, total), tokenizer.pad_id, dtype=torch.long, device=device)
    key_valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(ids):
        tokens[i, L - len(p):L] = torch.tensor(p, dtype=torch.long)
        key_valid[i, L - len(p):] = True
    positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, total)
    padded = not bool(key_valid[:, :L].all())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(getattr(tokenizer, "stop_ids", {tokenizer.eos_id})), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    model.setup_cache(B, total)
    try:
        logits = model(tokens[:, :L], 0, positions[:, :L], key_valid[:, :L] if padded else None, last_only=True)
        for cur in range(L, total):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            is_stop = torch.isin(nxt, stop) if stop_at_eos else torch.zeros_like(done)
            for i in range(B):
                if not done[i] and not is_stop[i]:
                    out[i].append(int(nxt[i]))
            done |= is_stop
            if bool(done.all()) or cur == total - 1:
                break
            tokens[:, cur] = nxt
            logits = model(tokens[:, cur:cur + 1], cur, positions[:, cur:cur + 1],
                           key_valid[:, :cur + 1] if padded else None)
    finally:
        model.clear_cache()
    return out
