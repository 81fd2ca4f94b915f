"""
The loss of llama.py's model in chunks: lm_head and cross-entropy over the target tokens, loss_chunk
rows at a time, forward and backward, so that no (N, V) logits tensor exists whole (Llama 3's V is
128,256: the fp32 logits of 8 × 2,048 tokens alone take 8 GB). Llama.forward(..., targets=) uses it;
docs/bench_vocab.md has the measurements.
"""

import torch


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of lm_head's logits, chunk by chunk of tokens, in the forward and the backward
    pass. The logits of N target tokens over a vocabulary of V are N·V floats (fp32: 4 GB for
    8,192 tokens at Llama 3's V = 128,256), and autograd would keep them, their softmax and their
    gradient; here only one (chunk, V) block lives at a time, and nothing N·V-sized is kept.
    Per token: loss = logsumexp(z) - z[target]; d loss / dz = softmax(z) - onehot(target).

    The gradient with respect to the hidden states is computed in the forward pass, while each
    chunk's logits are at hand: token i's row depends on token i alone, so the backward pass only
    scales row i by d(total)/d loss_i. Recomputing the logits in the backward pass instead would
    cost a third lm_head matmul next to the two the loss needs (tools/bench.py, vocab 128,256, a
    busy CPU: 1.16x transformers + PEFT's tokens/s with the recomputation, 1.56x without; see
    docs/bench_vocab.md). The weight's gradient sums over tokens with those factors, so when
    lm_head trains (full fine-tuning, or a trained tied embedding) the backward pass does recompute
    each chunk's logits for it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        # hidden (N, D): final-normed states; weight (V, D): lm_head's; targets (N,) -> losses (N,)
        # in fp32
        # autocast's cast, done once: a no-op when the weight is already in dtype
        w = weight.to(dtype)
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # d loss_i / d h_i
        for s in range(0, len(hidden), chunk):
            z = (hidden[s : s + chunk].to(dtype) @ w.t()).float()  # (C, V)
            t = targets[s : s + chunk]
            lse = z.logsumexp(-1, keepdim=True)
            losses[s : s + chunk] = (lse - z.gather(-1, t[:, None]))[:, 0]
            if grad_h is not None:
                grad_h[s : s + chunk] = grad_logits_(z, lse, t).to(dtype) @ w
        # hidden and weight only for the weight's gradient: a frozen lm_head is not kept (under FSDP
        # it is a gathered copy)
        kept = (hidden, weight) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(*kept, targets, grad_h)
        ctx.chunk, ctx.dtype = chunk, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, grad_h = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_losses[:, None].to(grad_h.dtype)
        grad_w = None
        # summed over the chunks in fp32, as autocast's matmul would give it
        if ctx.needs_input_grad[1]:
            w = weight.to(ctx.dtype)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            for s in range(0, len(hidden), ctx.chunk):
                h = hidden[s : s + ctx.chunk].to(ctx.dtype)
                z = (h @ w.t()).float()
                g = grad_logits_(z, z.logsumexp(-1, keepdim=True), targets[s : s + ctx.chunk])
                g = g.mul_(grad_losses[s : s + ctx.chunk, None]).to(ctx.dtype)
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


def chunked_cross_entropy(hidden, head, targets, chunk_size=256):
    """Per-token cross-entropy (N,) fp32 of the logits hidden @ weight.T without materializing them:
    hidden (N, D), head lm_head (or its weight (V, D)), targets (N,) ids. Equal to
    F.cross_entropy(hidden @ weight.T, targets, reduction="none") up to float rounding, gradients
    included. Under autocast the matmuls run in its dtype (bf16: the logits are rounded as
    F.linear's would be), the softmax in fp32."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    weight = head.weight if isinstance(head, torch.nn.Module) else head
    return ChunkedCrossEntropy.apply(hidden, weight, targets, max(1, int(chunk_size)), dtype)


# -----------------------------------------------------------------------------
# the loss of one micro-batch: train.py's training step and eval.py's validation loss


def token_loss_sum(model, x, y, positions=None, segments=None):
    """Σ cross-entropy over the target tokens of one micro-batch (dataset.collate's x, y, positions,
    segments): the model runs lm_head and the loss at the targets only, loss_chunk at a time
    (chunked_cross_entropy), so no (N, V) logits exist."""
    from dataset import IGNORE  # here: llama.py imports this file, and needs no dataset

    is_target = y != IGNORE  # (B, T)
    return model(
        x, positions=positions, segments=segments, logits_at=is_target, targets=y[is_target]
    ).sum()
