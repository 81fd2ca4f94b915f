"""
The checks only a GPU can answer, in one run sized for well under 5 minutes on one H100/H200
(an estimate from the FLOPs: it has not run on one yet; its code paths were exercised on CPU), with
random weights in Llama 3.2 1B's shape (dim 2048, 16 layers, 32 heads, 8 key/value heads, hidden
8192, Llama 3's vocabulary of 128,256, tied embeddings):

    python tools/gpu_check.py
    python tools/gpu_check.py --steps=20 --peak_flops=312e12  # longer timing; an A100's bf16 peak

1. precision: our model's bf16 logits (autocast, fp32 and bf16 base weights) against fp32
2. attention: which scaled_dot_product_attention kernel packed and unpacked batches get
3. speed: LoRA r=32 and MultiLoRA n=4 r=8 training tokens/s (train.py's train_step, bf16 base
   weights under autocast, packed Alpaca-length examples) and MFU against the stated peak
4. memory: peak of a LoRA step at vocab 128,256 with the loss in chunks (train.py) and without
5. DDP: a 1-process NCCL process group (localhost) and DDP steps of train.train_step, next to the
   same steps without DDP

Without CUDA it prints one line and exits 0. A check that fails prints its error and the others
still run (device time is scarce); the exit status is then 1.
"""

import math
import os
import socket
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

# the repository's modules, from wherever this script is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llama
import multilora
import dataset
import util
import train
from configurator import S, configure, declared

# -----------------------------------------------------------------------------
# the model: Llama 3.2 1B's shape (1.24B parameters with the tied 128k embedding)
dim = S(2048, "[1, inf)")
n_layers = S(16, "[1, inf)")
n_heads = S(32, "[1, inf)")
n_kv_heads = S(8, "[1, n_heads]")
hidden_dim = S(8192, "[1, inf)")
vocab_size = S(128256, "[8, inf)")
step_tokens = S(16384, "[1, inf)", "tokens per training step: our LLaMA recipe's 8 × 2,048")
steps = S(10, "[1, inf)", "timed steps per arm (after warmup)")
warmup = S(3, "[0, inf)")
loss_chunk = S(256, "[1, inf)", "train.py's default")
peak_flops = S(989e12, "(0, inf)", "stated dense bf16 peak of an H100/H200 SXM, for MFU")
seed = S(0, None)

SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


def build(config, dtype=torch.float32, finetune=None, **lora):
    """A random model on the GPU in `dtype`, adapted by train.adapt (trainable weights in fp32)."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = llama.Llama(config)
    model.init_weights()
    model.to(dtype)
    model.loss_chunk = loss_chunk
    if finetune:
        lora |= dict(targets=["q", "k", "v", "o"], lora_alpha=16.0, lora_dropout=0.0)
        train.adapt(model, finetune, dict(lora, scaling="channel"))
    return model


def examples(n_tokens, seed):
    """Alpaca-length examples (tools/bench.py's log-normal fit: median 81 tokens) of about
    n_tokens in all, the last two thirds of each the response."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n_tokens:
        n = int(np.clip(np.exp(rng.normal(math.log(81), 0.57)), 8, 513))
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 3 :] = 1
        out.append((rng.integers(3, vocab_size, n), mask))
        total += n - 1
    return out


def check_precision(config):
    model = build(config)
    x = torch.randint(
        3, vocab_size, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
    )
    with torch.no_grad():
        ref = model(x).float()  # fp32 weights, fp32 matmuls (TF32 is off by default for matmuls)
        heads = f"{'max |Δ|':>8s} {'‖Δ‖/‖ref‖':>10s} {'top-1 same':>10s} {'Δ loss':>9s}"
        print(f"  {'bf16 run':36s} {heads}")
        for label, dtype in (
            ("autocast, fp32 weights (full)", torch.float32),
            ("autocast, bf16 weights (LoRA arms)", torch.bfloat16),
        ):
            model.to(dtype)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                z = model(x).float()
            d = z - ref
            loss_gap = (
                F.cross_entropy(z[:, :-1].flatten(0, 1), x[:, 1:].flatten())
                - F.cross_entropy(ref[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            ).item()
            print(
                f"  {label:36s} {d.abs().max().item():8.4f} {(d.norm() / ref.norm()).item():10.2e} "
                f"{(z.argmax(-1) == ref.argmax(-1)).float().mean().item():10.1%} {loss_gap:+9.2e}"
            )


def sdpa_kernels(fn):
    """Names of the scaled_dot_product_attention kernels that fn() ran, forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(
        {
            e.key.removeprefix("aten::_scaled_dot_product_")
            for e in prof.key_averages()
            if e.key.startswith("aten::_scaled_dot_product_")
        }
    )


def check_attention(config):
    model = build(config, torch.bfloat16, "lora", n_loras=1, lora_rank=32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    ex = examples(4096, seed)
    for label, pack in (
        ("unpacked (right-padded, causal)", False),
        ("packed (block-diagonal mask)", True),
    ):
        x, y, positions, segments = dataset.collate(ex, 0, "cuda", pack=pack)

        def step():
            with autocast:
                loss = model(
                    x,
                    positions=positions,
                    segments=segments,
                    logits_at=y != dataset.IGNORE,
                    targets=y[y != dataset.IGNORE],
                ).sum()
            loss.backward()
            torch.cuda.synchronize()

        print(f"  {label:32s} rows {tuple(x.shape)}: {', '.join(sdpa_kernels(step))}")


def check_speed(config):
    ex = examples(step_tokens, seed)
    batches = [dataset.collate(ex, 0, "cuda", pack=True)]
    n_targets = sum(int(m[1:].sum()) for _, m in ex)
    n_tokens = sum(len(ids) - 1 for ids, _ in ex)
    row_len = batches[0][0].shape[1]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    print(
        f"  {n_tokens:,} tokens per step in {batches[0][0].shape[0]} packed rows of {row_len}; "
        f"MFU against {peak_flops:.3g} FLOP/s"
    )
    for label, finetune, lora in (
        ("LoRA r=32", "lora", dict(n_loras=1, lora_rank=32)),
        ("MultiLoRA n=4 r=8", "multilora", dict(n_loras=4, lora_rank=8)),
    ):
        model = build(config, torch.bfloat16, finetune, **lora)
        optimizer = train.make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), "cuda")
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            train.train_step(model, optimizer, batches, n_targets, 1, autocast, None, grad_clip=1.0)
        torch.cuda.synchronize()
        tokens_per_s = n_tokens * steps / (time.perf_counter() - t0)
        trainable, _ = multilora.count_trainable(model)
        mfu = util.flops_per_token(config, trainable, finetune, row_len) * tokens_per_s / peak_flops
        print(f"  {label:20s} {tokens_per_s:10,.0f} tokens/s   MFU {100 * mfu:5.1f}%")
        del model, optimizer


def check_memory(config):
    ex = examples(step_tokens, seed)
    x, y, positions, segments = dataset.collate(ex, 0, "cuda", pack=True)
    at = y != dataset.IGNORE
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    model = build(config, torch.bfloat16, "lora", n_loras=1, lora_rank=32)

    def chunked():  # train.py's loss: lm_head + cross-entropy loss_chunk targets at a time
        with autocast:
            loss = model(
                x, positions=positions, segments=segments, logits_at=at, targets=y[at]
            ).sum()
        loss.backward()

    def whole():  # the (N, V) logits at once, kept by autograd with their softmax
        with autocast:
            logits = model(x, positions=positions, segments=segments, logits_at=at)
        F.cross_entropy(logits.float(), y[at], reduction="sum").backward()

    print(
        f"  LoRA r=32, {int(at.sum()):,} targets, vocab {vocab_size:,}: (N, V) fp32 logits = "
        f"{int(at.sum()) * vocab_size * 4 / 2**30:.1f} GiB"
    )
    for label, fn in (
        (f"chunked (loss_chunk={loss_chunk})", chunked),
        ("unchunked (whole logits)", whole),
    ):
        fn()  # once untimed: lazily allocated state
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        print(f"  {label:28s} peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB allocated")


def check_ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    with socket.socket() as s:  # a free port on localhost for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda:0"),
    )
    try:
        config = llama.LlamaConfig(
            dim=256,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            hidden_dim=512,
            vocab_size=vocab_size,
            max_seq_len=1024,
            tie_embeddings=True,
        )
        ex = examples(2048, seed + 1)
        # two micro-steps
        batches = [dataset.collate(ex[i::2], 0, "cuda", pack=True) for i in range(2)]
        n_targets = sum(int(m[1:].sum()) for _, m in ex)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        losses = {}
        for label in ("ddp", "plain"):
            raw = build(config, torch.bfloat16, "multilora", n_loras=4, lora_rank=8)
            model = DDP(raw, device_ids=[0]) if label == "ddp" else raw
            optimizer = train.make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), "cuda")
            losses[label] = [
                train.train_step(
                    model, optimizer, batches, n_targets, 1, autocast, None, 1.0, ddp=label == "ddp"
                ).item()
                / n_targets
                for _ in range(3)
            ]
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t)
        gap = max(abs(a - b) for a, b in zip(losses["ddp"], losses["plain"]))
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        ddp_losses = ", ".join(f"{v:.4f}" for v in losses["ddp"])
        print(
            f"  NCCL {nccl}, all_reduce ok ({t.item():.0f}); DDP losses {ddp_losses}; "
            f"max gap to no DDP {gap:.1e}"
        )
    finally:
        dist.destroy_process_group()


def main(argv=None):
    globals().update(
        configure(SETTINGS, sys.argv[1:] if argv is None else argv, "tools/gpu_check.py")
    )
    if not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device")
        return 0
    t_start = time.perf_counter()
    config = llama.LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        vocab_size=vocab_size,
        rope_theta=500000.0,
        max_seq_len=2048,
        tie_embeddings=True,
    )
    with torch.device("meta"):  # counted without allocating
        n_params = llama.Llama(config).num_params()
    print(
        f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}); random weights, {n_params / 1e9:.2f}B parameters: dim {dim}, "
        f"{n_layers} layers, {n_heads} heads, {n_kv_heads} kv heads, hidden {hidden_dim}, vocab "
        f"{vocab_size:,}; stated peak {peak_flops:.3g} FLOP/s"
    )
    failed = []
    for name, check in (
        ("1. precision: bf16 logits against fp32", lambda: check_precision(config)),
        ("2. attention kernels", lambda: check_attention(config)),
        ("3. training speed", lambda: check_speed(config)),
        ("4. peak memory of a training step", lambda: check_memory(config)),
        ("5. DDP, 1 process, NCCL", check_ddp),
    ):
        print(name, flush=True)
        t0 = time.perf_counter()
        try:
            check()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        torch.cuda.empty_cache()
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(
        f"gpu_check: {time.perf_counter() - t_start:.0f} s, "
        + (f"FAILED: {'; '.join(failed)}" if failed else "all ran")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    util.run_cli(lambda argv: sys.exit(main(argv)))
