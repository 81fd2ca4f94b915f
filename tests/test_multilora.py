"""Tests for multilora.py and export.py. CPU, no network.
References: the formulas in docs/method.md (an explicit loop over n modules), PEFT's LoRA on
transformers' LlamaForCausalLM, and transformers alone for the merged Hugging Face export."""

import json
import re
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
    """h = W0·x + (α/r)·Σ_i s_i ⊙ (B_i·A_i·x), one module at a time (docs/method.md, no fusing)."""
    r = layer.lora_rank
    h = x @ layer.weight.t()
    for i in range(layer.n_loras):
        A_i = layer.lora_A[i * r : (i + 1) * r]  # (r, d_in)
        B_i = layer.lora_B[:, i * r : (i + 1) * r]  # (d_out, r)
        s_i = layer.lora_s[i] if layer.lora_s is not None else 1.0  # (d_out,) or (1,)
        h = h + layer.scale * s_i * ((x @ A_i.t()) @ B_i.t())
    return h


# -----------------------------------------------------------------------------
# the layer alone


@pytest.mark.parametrize(
    "init,n,scaling",
    [("multilora", 4, "channel"), ("multilora", 3, "scalar"), ("lora", 1, "channel")],
)
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
    # Kaiming-uniform a=√5: U(-1/√fan_in, 1/√fan_in); fan_in = d_in for A_i, r for each B_i
    # (not n·r)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert A.abs().max() <= 1 / math.sqrt(d_in) and A.abs().max() > 0.9 / math.sqrt(d_in)
    assert B.abs().max() <= 1 / math.sqrt(r) and B.abs().max() > 0.9 / math.sqrt(r)
    assert abs(B.std().item() - 1 / math.sqrt(3 * r)) < 0.05 / math.sqrt(r)
    blocks = [B[:, i * r : (i + 1) * r] for i in range(n)]
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


def test_autocast_bf16():
    """Under autocast (how train.py runs bf16 on GPUs) the adapter's matmuls run in bf16 too, its
    parameters and gradients stay fp32, and the result is the fp32 one to bf16 round-off."""
    torch.manual_seed(0)
    _, layer = make_layer(64, 48, n_loras=2, lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_s.normal_()
    x = torch.randn(4, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert layer.lora_s.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0


def test_layer_refuses_bad_settings():
    base = nn.Linear(16, 8, bias=False)
    with pytest.raises(multilora.UserError, match="n_loras\\*lora_rank"):
        MultiLoRALinear(base, n_loras=3, lora_rank=4)  # 12 > min(16, 8)
    # the ablation's LoRA init, n > 1
    horizontal = MultiLoRALinear(base, n_loras=2, lora_rank=2, init="lora")
    assert horizontal.lora_s is None and not horizontal.lora_B.any()
    with pytest.raises(multilora.UserError, match="scaling"):
        MultiLoRALinear(base, n_loras=2, lora_rank=2, scaling="row")


# -----------------------------------------------------------------------------
# on a model: a small random transformers LlamaForCausalLM saved to disk, loaded with
# checkpoint.load_model

import llama  # noqa: E402
import export  # noqa: E402
from util import UserError
import checkpoint
from conftest import python

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_random_hf_llama(out_dir, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_random_hf_llama(tmp_path_factory.mktemp("base"))


def hf_model(path):
    from transformers import LlamaForCausalLM

    # no dtype kwarg: its name changed in 4.56
    return LlamaForCausalLM.from_pretrained(path).float().eval()


def tokens(seed=1, B=2, T=12):
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=0):
    """Stand-in for training: every adapter tensor random (s ≠ 0, B ≠ 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in multilora.adapter_state_dict(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("lora_s") else 0.1))


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x = tokens(seed=10 + i, B=2, T=16)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adapt_model_init_equals_base_and_counts(base_dir):
    model = checkpoint.load_model(base_dir)
    x = tokens()
    with torch.no_grad():
        ref = model(x)
    n, r = 4, 4
    settings = multilora.adapt_model(
        model, targets="q,k,v,o,gate,up,down", n_loras=n, lora_rank=r, lora_alpha=8
    )
    assert settings["targets"] == list(ALL_TARGETS) and settings["n_loras"] == n
    assert torch.equal(model(x), ref)
    # base keys unchanged: the base checkpoint's state dict loads into the adapted model
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert set(multilora.adapter_state_dict(model)) >= {
        "layers.1.mlp.down_proj.lora_A",
        "layers.1.mlp.down_proj.lora_B",
        "layers.1.mlp.down_proj.lora_s",
    }
    # trainable = per layer Σ over the 7 projections of n·r·(d_in + d_out) + n·d_out
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]  # (d_out, d_in)
    expected = 2 * sum(n * r * (d_in + d_out) + n * d_out for d_out, d_in in shapes)
    trainable, base_total = multilora.count_trainable(model)
    assert trainable == expected and base_total == model.num_params() - expected
    # at step 0 only s receives a gradient
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_s"):
            assert p.grad.abs().sum() > 0
        elif name in multilora.adapter_state_dict(model):
            assert torch.all(p.grad == 0), name
        else:
            assert p.grad is None and not p.requires_grad, name
    with pytest.raises(UserError, match="already adapted"):
        multilora.adapt_model(model)


def test_adapters_of_an_eval_model_apply_no_dropout():
    """Adapting a model in eval mode (generate.py's --merge=False) gives adapters in eval mode:
    lora_dropout acts in training only."""
    model = llama.Llama(
        llama.LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=48, vocab_size=50)
    ).eval()
    multilora.adapt_model(model, n_loras=2, lora_rank=2, lora_dropout=0.5)
    perturb(model)
    x = tokens(B=2, T=8) % 50
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert not any(m.training for _, m in multilora.adapter_modules(model))


def test_adapt_model_refuses():
    model = llama.Llama(
        llama.LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=48, vocab_size=50)
    )
    with pytest.raises(UserError, match="targets"):
        multilora.adapt_model(model, targets=("q", "qkv"))
    with pytest.raises(UserError, match="n_loras\\*lora_rank"):
        multilora.adapt_model(model, n_loras=8, lora_rank=8)


def test_lora_n1_equals_peft(base_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, finetune="lora", targets=ALL_TARGETS, lora_rank=4, lora_alpha=8)
    perturb(model)  # B ≠ 0, else both sides are trivially the base
    ref = get_peft_model(
        hf_model(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=HF_NAMES, lora_dropout=0.0)
    )
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in multilora.adapter_modules(model):
            peft_layer = ref_modules[f"base_model.model.model.{name}"]
            peft_layer.lora_A["default"].weight.copy_(m.lora_A)
            peft_layer.lora_B["default"].weight.copy_(m.lora_B)
    x = tokens()
    g = torch.randn(2, 12, 101, generator=torch.Generator().manual_seed(3))
    ours, theirs = model(x), ref(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    for name, m in multilora.adapter_modules(model):
        peft_layer = ref_modules[f"base_model.model.model.{name}"]
        torch.testing.assert_close(
            m.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            m.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5
        )


def test_merge_unmerge_model(base_dir):
    model = checkpoint.load_model(base_dir)
    W0 = {k: v.clone() for k, v in model.state_dict().items()}
    multilora.adapt_model(model, targets=ALL_TARGETS, n_loras=4, lora_rank=4, lora_alpha=8)
    perturb(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        multilora.merge_adapters(model)
        multilora.merge_adapters(model)  # guarded: no double merge
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
        assert not torch.allclose(
            model.layers[0].self_attn.q_proj.weight, W0["layers.0.self_attn.q_proj.weight"]
        )
        multilora.unmerge_adapters(model)
        for k, v in W0.items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-6)


def test_merge_bf16_tolerance(base_dir):
    """bf16 base, fp32 adapter: merged logits differ from unmerged ones by the bf16 rounding of
    W0 + ΔW.
    Measured here (logits up to ~0.55): merged vs unmerged max |diff| 8.3e-3, while bf16 itself is
    6.9e-3 (unmerged) and 6.6e-3 (merged) away from the fp32 model: merging costs no extra
    accuracy."""
    x = tokens()
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = checkpoint.load_model(base_dir, dtype=dtype)
        multilora.adapt_model(model, targets=ALL_TARGETS, n_loras=4, lora_rank=4, lora_alpha=8)
        perturb(model)
        with torch.no_grad():
            unmerged = model(x).float()
            multilora.merge_adapters(model)
            logits[dtype] = unmerged, model(x).float()
    fp32 = logits[torch.float32][0]
    unmerged, merged = logits[torch.bfloat16]
    diff = (merged - unmerged).abs().max().item()
    print(
        f"bf16: merged vs unmerged {diff:.2e}, "
        f"unmerged vs fp32 {(unmerged - fp32).abs().max().item():.2e}, "
        f"merged vs fp32 {(merged - fp32).abs().max().item():.2e}, "
        f"max |logit| {fp32.abs().max().item():.2f}"
    )
    assert diff < 2e-2
    assert (merged - fp32).abs().max() <= 1.5 * (unmerged - fp32).abs().max()


def test_save_load_roundtrip_exact(base_dir, tmp_path):
    model = checkpoint.load_model(base_dir)
    settings = multilora.adapt_model(
        model, targets="q,v,down", n_loras=2, lora_rank=4, lora_alpha=16, scaling="scalar"
    )
    perturb(model)
    path = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, path, settings)
    fresh = checkpoint.load_model(base_dir)
    assert multilora.apply_adapter(fresh, path) == settings
    for (k, a), (k2, b) in zip(
        multilora.adapter_state_dict(model).items(), multilora.adapter_state_dict(fresh).items()
    ):
        assert k == k2 and torch.equal(a, b)
    x = tokens()
    assert torch.equal(model(x), fresh(x))
    state, loaded = multilora.load_adapter(path)
    assert loaded == settings and set(state) == set(multilora.adapter_state_dict(model))
    # apply with merge: same logits as the unmerged source to round-off
    merged = checkpoint.load_model(base_dir)
    multilora.apply_adapter(merged, path, merge=True)
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)


def test_refuses_wrong_base_or_settings(base_dir, tmp_path):
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, n_loras=4, lora_rank=4)
    path = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, path)
    other_base = save_random_hf_llama(tmp_path / "other", hidden=32)
    with pytest.raises(UserError) as e:
        multilora.apply_adapter(checkpoint.load_model(other_base), path)
    assert (
        "base_fingerprint" in str(e.value) and "dim=64" in str(e.value) and "\n" not in str(e.value)
    )
    other = checkpoint.load_model(base_dir)
    multilora.adapt_model(other, n_loras=2, lora_rank=4)
    with pytest.raises(UserError, match="settings.n_loras") as e:
        multilora.apply_adapter(other, path)
    assert "\n" not in str(e.value)
    other = checkpoint.load_model(base_dir)
    multilora.adapt_model(other, n_loras=4, lora_rank=4, scaling="scalar")
    with pytest.raises(UserError, match="settings.scaling"):
        multilora.apply_adapter(other, path)
    with open(tmp_path / "junk.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors"):
        multilora.load_adapter(str(tmp_path / "junk.safetensors"))


def test_refuses_same_shapes_other_weights_unless_asked(base_dir, tmp_path):
    """The fingerprint covers names and shapes; a sample of the base's weights catches a base of the
    same architecture with other weights. The same base in bf16 still matches (bf16 rounding)."""
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, n_loras=2, lora_rank=4)
    perturb(model)
    path = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, path)
    other = checkpoint.load_model(base_dir)
    with torch.no_grad():
        other.embed_tokens.weight.add_(0.1)  # same shapes, other weights: another base
    with pytest.raises(
        UserError,
        match=r"base_sample: the adapter was trained on a base of the same shapes but other "
        r"weights",
    ):
        multilora.apply_adapter(other, path)
    multilora.apply_adapter(other, path, any_base=True)  # the user means it
    # same base, bf16
    multilora.apply_adapter(checkpoint.load_model(base_dir, dtype=torch.bfloat16), path)


def write_adapter(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    return path


def test_refuses_bad_adapter_files(base_dir, tmp_path):
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, n_loras=2, lora_rank=4)
    good = str(tmp_path / "good.safetensors")
    multilora.save_adapter(model, good)
    state, _ = multilora.load_adapter(good)
    _, metadata, _ = checkpoint.read_safetensors_header(good)
    key = sorted(state)[0]
    nan = dict(state, **{key: state[key].clone().fill_(float("nan"))})
    with pytest.raises(
        UserError, match=rf"{key}: not finite \(NaN or inf\): the run that wrote it diverged"
    ):
        multilora.load_adapter(write_adapter(str(tmp_path / "nan.safetensors"), nan, metadata))
    ints = dict(state, **{key: state[key].to(torch.int32)})
    with pytest.raises(
        UserError,
        match=rf"tensor {re.escape(key)}: dtype 'I32', expected one of F64, F32, F16, BF16",
    ):
        multilora.load_adapter(write_adapter(str(tmp_path / "int.safetensors"), ints, metadata))
    settings = json.loads(metadata["settings"])
    for k, bad, expected in (
        ("lora_alpha", "16", "a number"),
        ("n_loras", 0, "an int >= 1"),
        ("targets", ["q", "x"], "a list of names"),
        ("scaling", None, "'channel' or 'scalar'"),
        ("finetune", "qlora", "'multilora' or 'lora'"),
        ("finetune", ["lora"], "'multilora' or 'lora'"),
    ):
        meta = dict(metadata, settings=json.dumps(dict(settings, **{k: bad})))
        with pytest.raises(
            UserError,
            match=rf"metadata.settings.{k}: expected {expected}.*got {re.escape(repr(bad))}",
        ):
            multilora.load_adapter(write_adapter(str(tmp_path / f"{k}.safetensors"), state, meta))


def test_adapter_file_follows_the_umask(base_dir, tmp_path):
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, n_loras=2, lora_rank=4)
    old = os.umask(0o022)
    try:
        multilora.save_adapter(model, str(tmp_path / "a.safetensors"))
    finally:
        os.umask(old)
    # readable by a serving account
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left


@pytest.mark.parametrize(
    "finetune,scaling,init",
    [
        ("multilora", "channel", ""),
        ("multilora", "scalar", ""),
        ("lora", "channel", ""),
        # the ablation's LoRA init with n = 4: no s, but n modules (the rank-(n·r) form)
        ("multilora", "channel", "lora"),
    ],
)
def test_peft_export_equals_ours(base_dir, tmp_path, finetune, scaling, init):
    from peft import PeftModel

    torch.manual_seed(0)
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(
        model,
        finetune=finetune,
        targets=ALL_TARGETS,
        n_loras=4,
        lora_rank=4,
        lora_alpha=8,
        scaling=scaling,
        init=init,
    )
    train_steps(model)  # a trained adapter: A, B and s all moved away from their init
    adapter = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, adapter)
    out = str(tmp_path / "peft")
    export.export_peft(base_dir, adapter, out)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    n_r = 16 if finetune == "multilora" else 4
    assert cfg["r"] == n_r and cfg["lora_alpha"] == (n_r if finetune == "multilora" else 8)
    ref = PeftModel.from_pretrained(hf_model(base_dir), out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_hf_export_equals_ours(base_dir, tmp_path):
    torch.manual_seed(0)
    model = checkpoint.load_model(base_dir)
    multilora.adapt_model(model, targets=ALL_TARGETS, n_loras=4, lora_rank=4, lora_alpha=8)
    train_steps(model)
    adapter = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, adapter)
    out = str(tmp_path / "hf")
    export.export_hf(base_dir, adapter, out)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(out)(input_ids=x).logits, model(x), rtol=1e-5, atol=1e-5
        )


def test_export_cli_wrong_base_is_one_line(base_dir, tmp_path):

    model = checkpoint.load_model(save_random_hf_llama(tmp_path / "other", hidden=32))
    multilora.adapt_model(model, n_loras=2, lora_rank=4)
    adapter = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, adapter)
    root = os.path.join(os.path.dirname(__file__), "..")
    p = python(
        [
            sys.executable,
            os.path.join(root, "export.py"),
            f"--ckpt_dir={base_dir}",
            f"--adapter={adapter}",
            f"--out_dir={tmp_path / 'out'}",
            "--format=peft",
        ],
        cwd=root,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "base_fingerprint" in p.stderr, (
        p.stderr
    )


def test_bench_smoke(monkeypatch):
    """tools/bench.py's MultiLoRA part runs end to end on a tiny model (figures are not checked: no
    timing asserts)."""
    import bench

    for k, v in dict(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=48,
        vocab_size=64,
        batch_size=2,
        seq_len=8,
        steps=1,
        warmup=1,
        rounds=2,
        memory_ns=[1, 2],
        train_max_len=8,
        device="cpu",
        dtype="float32",
    ).items():
        monkeypatch.setattr(bench, k, v)
    base = bench.random_base(64)
    r = bench.bench_throughput(base)
    assert r["ratio vs lora r=32"] > 0 and r["multilora n=4 r=8"]["trainable"] == 4 * (
        4 * 8 * 64 + 4 * 32
    )
    m = bench.bench_memory(base)
    assert m["n=2"]["peak_bytes"] > m["n=1"]["peak_bytes"] > 0
    assert m["n=2"]["param_and_adamw_growth_bytes"] == 12 * (
        m["n=2"]["adapter_params"] - m["n=1"]["adapter_params"]
    )
