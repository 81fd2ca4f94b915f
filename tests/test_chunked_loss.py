"""llama.chunked_cross_entropy (lm_head + cross-entropy chunk by chunk of target tokens, logits
recomputed in the backward pass) gives the loss and every gradient of the plain computation,
F.cross_entropy(lm_head(h)), to 1e-6 relative in fp32: with tied and untied embeddings, with
LoRA / MultiLoRA adapters (lm_head frozen) and with full fine-tuning (lm_head trained)."""

import pytest
import torch
import torch.nn.functional as F

import llama
import dataset
import train

V = 1000  # large enough that a chunk is many rows of a real matmul, small enough to be quick


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_model(tie, finetune):
    torch.manual_seed(0)
    config = llama.LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=V,
        max_seq_len=64,
        tie_embeddings=tie,
    )
    model = llama.Llama(config)
    model.init_weights()
    train.adapt(
        model,
        finetune,
        dict(
            targets=["q", "v", "up"],
            n_loras=3 if finetune == "multilora" else 1,
            lora_rank=4,
            lora_alpha=8.0,
            lora_dropout=0.0,
            scaling="channel",
        ),
    )
    # LoRA's B starts at zero: move it, so that every gradient is non-trivial
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.02 * torch.randn_like(p))
    return model


def batch(B=3, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    at = torch.rand(B, T, generator=g) < 0.6  # the target positions (response tokens)
    return x, y, at


def grads(model, x, y, at, chunk):
    """Summed token loss and {name: gradient} of every trained parameter; chunk None = unchunked."""
    model.zero_grad(set_to_none=True)
    if chunk is None:
        loss = F.cross_entropy(model(x, logits_at=at).float(), y[at], reduction="sum")
    else:
        model.loss_chunk = chunk
        loss = model(x, logits_at=at, targets=y[at]).sum()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("finetune", ["lora", "multilora", "full"])
def test_loss_and_every_gradient_equal_unchunked(tie, finetune):
    model = make_model(tie, finetune)
    x, y, at = batch()
    n = int(at.sum())
    loss_ref, grads_ref = grads(model, x, y, at, None)
    assert ("lm_head.weight" in grads_ref or "embed_tokens.weight" in grads_ref) == (
        finetune == "full"
    )
    # chunks dividing N or not, one chunk, more rows than N. (Chunks of one or two rows differ by up
    # to ~1e-6 here: a matrix-vector kernel rounds differently from the matrix-matrix one.)
    for chunk in (7, n // 2, n, n + 5):
        loss, g = grads(model, x, y, at, chunk)
        assert relative_error(loss, loss_ref) < 1e-6, chunk
        assert g.keys() == grads_ref.keys()
        for name in g:
            assert relative_error(g[name], grads_ref[name]) < 1e-6, (chunk, name)


def test_per_token_losses_and_a_weighted_backward():
    """The function returns per-token losses (eval.py sums them per example): any weighting of them
    backpropagates as the plain computation's does."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    t = torch.randint(0, V, (37,))
    weights = torch.rand(37)
    ref = F.cross_entropy(h @ w.t(), t, reduction="none")
    (ref * weights).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    for chunk in (1, 10, 37):
        out = llama.chunked_cross_entropy(h, w, t, chunk_size=chunk)
        assert out.shape == (37,) and out.dtype == torch.float32
        assert relative_error(out, ref) < 1e-6
        (out * weights).sum().backward()
        assert relative_error(h.grad, gh) < 1e-6 and relative_error(w.grad, gw) < 1e-6
        h.grad = w.grad = None


def test_no_targets():
    """N = 0 (a micro-batch without response tokens): loss 0, zero gradients, no error."""
    model = make_model(False, "full")
    x, y, _ = batch()
    at = torch.zeros_like(x, dtype=torch.bool)
    loss = model(x, logits_at=at, targets=y[at])
    assert loss.shape == (0,)
    loss.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() == 0


def test_bf16_autocast_close_to_unchunked():
    """Under bf16 autocast both paths round the logits to bf16; they agree to bf16 precision, and
    the lm_head gradient comes back in the weight's fp32."""
    model = make_model(True, "full")
    x, y, at = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = grads(model, x, y, at, None)
        loss, g = grads(model, x, y, at, 8)
    assert relative_error(loss, loss_ref) < 1e-2
    for name in g:
        assert g[name].dtype == torch.float32
        assert relative_error(g[name], grads_ref[name]) < 5e-2, name


def test_train_step_uses_it():
    """train.py's step gives the loss of the plain computation whatever the chunk size."""
    model = make_model(False, "lora")
    x, y, at = batch()
    y = torch.where(at, y, dataset.IGNORE)
    with torch.no_grad():
        ref = F.cross_entropy(
            model(x).flatten(0, 1), y.flatten(), ignore_index=dataset.IGNORE, reduction="sum"
        )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for chunk in (3, 1000):
        model.loss_chunk = chunk
        loss = train.train_step(model, opt, [(x, y, None, None)], n_targets=int(at.sum()))
        assert relative_error(loss, ref) < 1e-6


def peak_allocated(fn):
    """Peak of the bytes torch allocates on the CPU while fn() runs: tools/bench.py's measure."""
    import bench

    device, bench.device = bench.device, "cpu"
    try:
        return bench.peak_bytes(fn)
    finally:
        bench.device = device


def test_no_whole_logits():
    """The point of it all: forward and backward never hold the (N, V) logits, which the plain
    computation does (several times over: logits, log-softmax, their gradients)."""
    torch.manual_seed(0)
    N, D, V_big = 512, 64, 8192
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V_big, D, requires_grad=True)  # a trained lm_head: both gradients
    t = torch.randint(0, V_big, (N,))
    whole = N * V_big * 4
    chunked = peak_allocated(
        lambda: llama.chunked_cross_entropy(h, w, t, chunk_size=64).sum().backward()
    )
    plain = peak_allocated(lambda: F.cross_entropy(h @ w.t(), t, reduction="sum").backward())
    assert plain > 2 * whole
    # the weight's gradient (V·D) and a few (64, V) blocks, far below one (N, V) tensor
    assert chunked < w.numel() * 4 + 4 * 64 * V_big * 4 < whole
