"""
A base model made ready for inference, the one way generate.py, eval.py, export.py and analyze.py
load it: the checkpoint (either layout), its tokenizer checked against it, an adapter applied (the
file checked against this base first) or merged into the weights.
"""

import json
import os

import torch

import checkpoint
import multilora
from tokenizer import check_tokenizer, load_tokenizer


def stored_dtype(ckpt_dir):
    """The dtype the base checkpoint is stored in (config.json's torch_dtype / dtype), else
    float32; Meta's consolidated.*.pth are bf16."""
    checkpoint.read_config(ckpt_dir)  # the checkpoint checked before config.json is read raw
    if checkpoint.checkpoint_layout(ckpt_dir) == "meta":
        return torch.bfloat16
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    name = str(cfg.get("torch_dtype") or cfg.get("dtype"))
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32


def load_for_inference(ckpt_dir, tokenizer, adapter, dtype, device, merge):
    """-> (model in eval mode, tokenizer). tokenizer: a tokenizer.model path, "" for the one in
    ckpt_dir, None for none (None is returned). adapter: a file, or "" for the base alone. dtype: a
    torch dtype's name, or "auto" for the one the checkpoint is stored in."""
    dtype = stored_dtype(ckpt_dir) if dtype == "auto" else getattr(torch, dtype)
    model = checkpoint.load_model(ckpt_dir, dtype=dtype, device=device).eval()
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer or ckpt_dir)
        check_tokenizer(tok, model.config, ckpt_dir)
    if adapter:
        multilora.apply_adapter(model, adapter, merge=merge)
    return model, tok
