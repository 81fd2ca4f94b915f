"""Tests for multilora.py and export.py. CPU, no network, no ../shared.
References: the formulas in docs/multilora.md (an explicit loop over n modules), PEFT's LoRA on
transformers' LlamaForCausalLM, and transformers alone for the merged Hugging Face export."""

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import multilora  # noqa: E402
from multilora import MultiLoRALinear  # noqa: E402


def make_layer(d_in=24, d_out=20, dtype=torch.float32, **kw):
    base = nn.Linear(d_in, d_out, bias=False).to(dtype)
    return base, MultiLoRALinear(base, **kw)


def loop_forward(layer, x):
    """h = W0·x + (α/r)·Σ_i s_i ⊙ (B_i·A_i·x), one module at a time (multilora.md, no fusing)."""
    r = layer.lora_rank
    h = x @ layer.weight.t()
    for i in range(layer.n_loras):
        A_i = layer.lora_A[i * r:(i + 1) * r]  # (r, d_in)
        B_i = layer.lora_B[:, i * r:(i + 1) * r]  # (d_out, r)
        s_i = layer.lora_s[i] if layer.lora_s is not None else 1.0  # (d_out,) or (1,)
        h = h + layer.scale * s_i * ((x @ A_i.t()) @ B_i.t())
    return h

# -----------------------------------------------------------------------------
# the layer alone


@pytest.mark.parametrize("init,n,scaling", [("multilora", 4, "channel"), ("multilora", 3, "scalar"),
                                            ("lora", 1, "channel")])
def test_init_output_equals_base_exactly(init, n, scaling):
    torch.manual_seed(0)
    base, layer = make_layer(n_loras=n, lora_rank=2, lora_alpha=4, scaling=scaling, init=init)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), base(x))
    assert layer.weight is base.weight and not layer.weight.requires_grad


def test_init_distributions():
    torch.manual_seed(0)
    n, r, d_in, d_out = 4, 8, 256, 192
    _, layer = make_layer(d_in, d_out, n_loras=n, lora_rank=r, lora_alpha=16)
    # Kaiming-uniform a=√5: U(-1/√fan_in, 1/√fan_in); fan_in = d_in for A_i, r for each B_i (not n·r)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert A.abs().max() <= 1 / math.sqrt(d_in) and A.abs().max() > 0.9 / math.sqrt(d_in)
    assert B.abs().max() <= 1 / math.sqrt(r) and B.abs().max() > 0.9 / math.sqrt(r)
    assert abs(B.std().item() - 1 / math.sqrt(3 * r)) < 0.05 / math.sqrt(r)
    blocks = [B[:, i * r:(i + 1) * r] for i in range(n)]
    assert all(not torch.equal(blocks[0], b) for b in blocks[1:])  # each module its own draw
    assert layer.lora_s.shape == (n, d_out) and torch.all(layer.lora_s == 0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_s.dtype == torch.float32
    _, scalar = make_layer(d_in, d_out, n_loras=n, lora_rank=r, scaling="scalar")
    assert scalar.lora_s.shape == (n, 1)
    _, lora = make_layer(d_in, d_out, n_loras=1, lora_rank=r, init="lora")
    assert lora.lora_s is None and torch.all(lora.lora_B == 0) and lora.lora_A.abs().max() > 0


def test_step0_only_s_gets_gradient():
    torch.manual_seed(0)
    _, layer = make_layer(n_loras=4, lora_rank=2, lora_alpha=4)
    layer(torch.randn(2, 7, 24)).square().sum().backward()
    assert torch.all(layer.lora_A.grad == 0) and torch.all(layer.lora_B.grad == 0)
    assert layer.lora_s.grad.abs().min() > 0  # every (module, channel) entry gets a signal
    assert layer.weight.grad is None


@pytest.mark.parametrize("scaling", ["channel", "scalar"])
def test_fused_equals_loop_forward_and_grads(scaling):
    torch.manual_seed(0)
    _, layer = make_layer(n_loras=4, lora_rank=3, lora_alpha=5, scaling=scaling)
    with torch.no_grad():
        layer.lora_s.normal_()
    x = torch.randn(2, 6, 24, requires_grad=True)
    g = torch.randn(2, 6, 20)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_s]
    fused = layer(x)
    grads_fused = torch.autograd.grad((fused * g).sum(), params)
    ref = loop_forward(layer, x)
    grads_ref = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fused, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_layer():
    torch.manual_seed(0)
    base, layer = make_layer(n_loras=4, lora_rank=2, lora_alpha=4)
    W0 = base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_s.normal_()
    x = torch.randn(3, 24)
    y = layer(x)
    layer.merge()
    layer.merge()  # guarded: merging twice is a no-op
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight, W0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)


def test_bf16_base_fp32_adapter():
    torch.manual_seed(0)
    base, layer = make_layer(64, 48, dtype=torch.bfloat16, n_loras=2, lora_rank=4, lora_alpha=8)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_s.normal_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    # merged bf16 differs from unmerged by bf16 rounding of W0+ΔW (relative ~2^-8 of |W|·|x|)
    rel = ((layer(x).float() - y.float()).abs().max() / y.float().abs().max()).item()
    assert rel < 2e-2


def test_layer_refuses_bad_settings():
    base = nn.Linear(16, 8, bias=False)
    with pytest.raises(multilora.UserError, match="n_loras\\*lora_rank"):
        MultiLoRALinear(base, n_loras=3, lora_rank=4)  # 12 > min(16, 8)
    with pytest.raises(multilora.UserError, match="n_loras"):
        MultiLoRALinear(base, n_loras=2, lora_rank=2, init="lora")
    with pytest.raises(multilora.UserError, match="scaling"):
        MultiLoRALinear(base, n_loras=2, lora_rank=2, scaling="row")
