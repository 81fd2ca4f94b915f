"""
Benchmarks (figures for the README, not tests). Random weights: speed and memory do not depend on them.

    python bench.py --threads=1 [--json_lines]  # --mode=train: our step vs transformers + PEFT
                                             # at vocab 4096, 32000 and 128256, packed rows on both sides
    python bench.py --threads=1 --repeats=3  # 3 times over: the median and range of each ratio
    python bench.py --vocab_size=32000 --layouts=packed,padded --train_arms=multilora,lora,full
    python bench.py --lengths=fixed --train_batch=4 --train_max_len=128   # equal lengths: nothing to pack
    python bench.py --mode=multilora --threads=1 --rounds=30  # MultiLoRA vs LoRA: speed, memory
    python bench.py --mode=throughput --dim=1024 --n_layers=8 --device=cuda
    python bench.py --mode=memory
    python bench.py --mode=generate          # llama.generate (KV cache) vs transformers' generate
    python bench.py --mode=load              # peak memory and time of loading a ~1 GB checkpoint

train:      train.py's own train_step for each arm, next to transformers' LlamaForCausalLM + PEFT LoRA
            (r = n·r) with the same fp32 weights, examples, AdamW, clipping and token-normalized loss,
            at each vocabulary in turn. tokens/s: real (non-padding) tokens over the median step
            time; ratios: medians of same-round pairs. Peak memory: the model's weight bytes plus
            the peak of what two training steps allocate on top (step_memory: on CPU the allocator's
            running total recorded by torch.profiler, on CUDA torch.cuda.max_memory_allocated).
multilora  = throughput + memory.
throughput: training steps (forward + backward + AdamW) per second of MultiLoRA (n=4, r=8), LoRA r=32
            (the same rank n·r) and LoRA r=8 on the same model, measured side by side in one run:
            the arms take turns step by step, and the ratios are medians of same-round pairs, so a
            machine that slows down mid-run slows all arms alike.
memory:     peak bytes allocated during training steps of MultiLoRA with n = 1, 2, 4, 8 (r fixed),
            next to what the adapter can add: its fp32 parameters and AdamW's two moments (12 bytes
            per parameter), gradients (4), and what each adapted layer saves for backward: the folded
            B (d_out, n·r) and the rank-(n·r) activation x·Aᵀ (B, T, n·r). Which parts count depends on
            where the peak falls (with a large vocabulary: the loss's backward, before any adapter
            gradient exists). On CUDA: torch.cuda.max_memory_allocated; on CPU: the allocator's running
            total recorded by torch.profiler(profile_memory=True).
"""

import copy
import math
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import llama
import multilora
import dataset
import train
from configurator import Rule, S, configure, declared
from util import UserError
import util
import checkpoint

# -----------------------------------------------------------------------------
mode = S(
    "train",
    ("train", "multilora", "throughput", "memory", "generate", "load"),
    "train | multilora | throughput | memory | generate | load",
)
device = S(
    "auto",
    lambda v, s: None if v == "auto" else util.check_device(v, s),
    "auto = cuda if available, else cpu",
)
dtype = S(
    "auto",
    ("auto", "float32", "bfloat16", "float16"),
    "base weights: auto = bfloat16 on cuda, float32 on cpu; adapters are float32",
)
dim = S(512, "[1, inf)", "the benchmark model (a LLaMA shape, random weights)")
n_layers = S(4, "[1, inf)")
n_heads = S(8, "[1, inf)")
hidden_dim = S(1376, "[1, inf)")
vocab_size = S(
    [4096, 32000, 128256],
    "[8, inf)",
    "mode=train: each in turn (Llama 2's 32k, Llama 3's 128k); other modes: the first",
)
batch_size = S(4, "[1, inf)")
seq_len = S(128, "[1, inf)")
targets = S("q,k,v,o", None)
lora_alpha = S(16, None)
steps = S(1, "[1, inf)", "timed steps per arm per turn (the arms take turns)")
warmup = S(2, "[0, inf)", "untimed steps per arm before the first round")
rounds = S(10, "[1, inf)")
memory_ns = S([1, 2, 4, 8], "[1, inf)")
memory_rank = S(8, "[1, inf)")
threads = S(
    0, "[0, inf)", "CPU threads for torch (0 = torch's default; 1 is steadier on a busy machine)"
)
seed = S(0, None)
out_file = S("", None, "also write the results as JSON here")
# mode=train: train.py's training step for each finetune arm, next to transformers + PEFT on the same config
train_arms = S(
    "multilora,lora", None, "add ',full' for full fine-tuning next to plain transformers"
)
n_loras = S(
    4,
    "[1, inf)",
    "the MultiLoRA arm: n modules of rank lora_rank; the LoRA arm: rank n_loras·lora_rank",
)
lora_rank = S(8, "[1, inf)")
compare_peft = S(
    True, None, "also transformers + PEFT LoRA (and plain transformers for full), when installed"
)
peak_flops = S(
    989e12 if torch.cuda.is_available() else 1e12,
    "(0, inf)",
    "stated peak FLOP/s for MFU (train.py's default)",
)
response_fraction = S(
    0.66,
    "(0, 1]",
    "mode=train: share of each example that is response (loss targets); Alpaca: 0.66",
)
lengths = S(
    "alpaca",
    ("alpaca", "fixed"),
    "mode=train: example lengths: 'alpaca' (a log-normal fitted to Alpaca's "
    "2,000-record sample with a 32k LLaMA vocabulary: median 81 tokens, std of log-length 0.57, 5%-95% = "
    "35-205 tokens) or 'fixed' (all train_max_len)",
)
train_batch = S(16, "[1, inf)", "mode=train: examples per step")
train_max_len = S(
    512, "[1, inf)", "mode=train: tokens per example at most (Alpaca's prepare.py max_len)"
)
layouts = S(
    "packed",
    None,
    "mode=train: packed = train.py's default (pack=True); add ',padded' for one example "
    "per row, as transformers' DataCollatorForSeq2Seq lays out a batch",
)
json_lines = S(False, None, "mode=train: print one JSON object per measured configuration")
repeats = S(1, "[1, inf)", "mode=train: measure this many times; ratios: median and range")
# mode=generate (the model shape above, with n_kv_heads) and mode=load
n_kv_heads = S(
    Rule(
        "n_heads / 2 if n_heads is even, else n_heads",
        lambda s: s["n_heads"] // (2 - s["n_heads"] % 2),
    ),
    "[1, n_heads]",
)
gen_batch = S(1, "[1, inf)")
gen_prompt_len = S(16, "[1, inf)")
gen_tokens = S(64, "[1, inf)")
load_gb = S(
    1.0, "(0, inf)", "size of the random fp32 checkpoint that mode=load writes and reads back"
)
load_dim = S(2048, "[1, inf)")

SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


def make_base(vocab):
    config = llama.LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        hidden_dim=hidden_dim,
        vocab_size=vocab,
        max_seq_len=max(seq_len, train_max_len + 1),
    )
    torch.manual_seed(seed)
    model = llama.Llama(config)
    model.init_weights()
    return model


def make_arm(base, finetune, n, rank, device, dtype):
    """A copy of the base in `dtype`, adapted as train.py adapts it (train.adapt: trainable weights
    in fp32), with train.py's AdamW. finetune 'lora' takes n = 1. -> (model, optimizer)."""
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    train.adapt(
        model,
        finetune,
        dict(
            targets=targets.split(","),
            n_loras=n,
            lora_rank=rank,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            scaling="channel",
        ),
    )
    optimizer = train.make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), device.type)
    return model, optimizer


def take_turns(fns, device):
    """Time {name: fn} round-robin: `rounds` rounds, each fn called `steps` times per round, a
    different one first in each round, so that a machine that slows down slows all alike.
    -> ({name: wall seconds per call, one per round}, {name: process CPU seconds per call})."""
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fns[name]()
            sync(device)
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    return wall, cpu


def train_step(model, optimizer, batch):
    """train.py's own step on one micro-batch of full rows (B, T+1): every next token is a target."""
    x, y = batch[:, :-1], batch[:, 1:]
    train.train_step(model, optimizer, [(x, y, None, None)], n_targets=y.numel())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_throughput(base, device, dtype):
    arms = {
        "multilora n=4 r=8": ("multilora", 4, 8),
        "lora r=32": ("lora", 1, 32),
        "lora r=8": ("lora", 1, 8),
    }
    g = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(device)
    built = {name: make_arm(base, *arm, device, dtype) for name, arm in arms.items()}
    for model, optimizer in built.values():
        for _ in range(warmup):
            train_step(model, optimizer, batch)
    # process CPU time (all threads) is less sensitive than wall time to other processes on a
    # shared CPU machine
    wall, cpu = take_turns(
        {name: (lambda m=m, o=o: train_step(m, o, batch)) for name, (m, o) in built.items()}, device
    )
    result = {}
    for name, (model, _) in built.items():
        trainable, base_total = multilora.count_trainable(model)
        result[name] = {
            "steps_per_s": 1 / statistics.median(wall[name]),
            "wall_s_per_step": wall[name],
            "cpu_s_per_step": cpu[name],
            "trainable": trainable,
            "trainable_pct": 100 * trainable / base_total,
        }
    # throughput ratio of MultiLoRA to each LoRA: median over rounds of the paired ratios (same round,
    # same machine conditions) of that LoRA's time per step to MultiLoRA's
    ours = "multilora n=4 r=8"
    for other in ("lora r=32", "lora r=8"):
        result[f"ratio vs {other}"] = statistics.median(
            b / a for a, b in zip(wall[ours], wall[other])
        )
        result[f"cpu ratio vs {other}"] = statistics.median(
            b / a for a, b in zip(cpu[ours], cpu[other])
        )
    return result


def peak_bytes(fn, device):
    """Peak bytes allocated while fn() runs, counting only what fn allocates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # each allocation (+bytes) and free (-bytes) is a "[memory]" event: the peak of the running sum
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def bench_memory(base, device, dtype):
    batch = torch.randint(0, base.config.vocab_size, (batch_size, seq_len + 1), device=device)
    result = {}
    for n in memory_ns:

        def run():
            model, optimizer = make_arm(base, "multilora", n, memory_rank, device, dtype)
            for _ in range(2):  # the second step has AdamW's state allocated: the steady-state peak
                train_step(model, optimizer, batch)
            run.modules = [m for _, m in multilora.adapter_modules(model)]

        peak = peak_bytes(run, device)
        params = sum(
            p.numel()
            for m in run.modules
            for name, p in m.named_parameters()
            if name.startswith("lora_")
        )
        result[f"n={n}"] = {
            "peak_bytes": peak,
            "adapter_params": params,
            # what the adapter can add, all fp32: parameters + AdamW's two moments, gradients,
            # and what each adapted layer saves for backward: the folded B (d_out, n·r) with its s·α/r
            # factor (n, d_out), and x·Aᵀ (B, T, n·r)
            "param_and_adamw_bytes": 12 * params,
            "grad_bytes": 4 * params,
            "folded_B_bytes": sum(4 * (m.lora_B.numel() + m.lora_s.numel()) for m in run.modules),
            "rank_activation_bytes": sum(
                4 * batch_size * seq_len * m.lora_A.shape[0] for m in run.modules
            ),
        }
    first = result[f"n={memory_ns[0]}"]
    for r in result.values():  # growth over the smallest n, measured and per part
        for k in ("peak", "param_and_adamw", "grad", "folded_B", "rank_activation"):
            r[f"{k}_growth_bytes"] = r[f"{k}_bytes"] - first[f"{k}_bytes"]
    return result


# -----------------------------------------------------------------------------
# mode=train: train.py's own training step (train.adapt, make_optimizer, autocast, train_step) for each
# finetune arm, next to transformers + PEFT LoRA on the identical model, batch and optimizer


def train_examples(vocab):
    """train_batch synthetic examples [(ids, mask)], the last response_fraction of each the response."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if lengths == "fixed":
        sizes = np.full(train_batch, train_max_len + 1)
    elif lengths == "alpaca":
        sizes = np.clip(
            np.round(np.exp(rng.normal(math.log(81), 0.57, train_batch))), 8, train_max_len + 1
        )
    else:
        raise UserError(f"--lengths: expected 'alpaca' or 'fixed', got {lengths!r}")
    examples = []
    for n in sizes.astype(int):
        ids = rng.integers(3, vocab, n)
        mask = np.zeros(n, dtype=np.uint8)
        mask[round(n * (1 - response_fraction)) :] = 1
        examples.append((ids, mask))
    return examples


def make_train_arm(impl, finetune, layout, vocab, device, dt):
    """-> (step function returning the loss, model, positions computed per step (rows × length)). impl 'ours':
    train.py's path on the examples collated as train.py does (layout 'packed': pack=True);
    'peft'/'transformers': transformers' LlamaForCausalLM with the same weights (+ peft LoRA of rank
    n_loras·lora_rank), the same AdamW, autocast, token-normalized loss and gradient clipping, fed
    the same rows: padded ones with their attention_mask, packed ones with position_ids restarting
    at each example (transformers then builds the same block-diagonal mask)."""
    examples = train_examples(vocab)
    batches = [dataset.collate(examples, 0, device, pack=layout == "packed")]
    n_targets = sum(int(m[1:].sum()) for _, m in examples)
    autocast_ctx = train.autocast_context(device.type, str(dt).removeprefix("torch."))
    base_dtype = (
        dt if finetune != "full" else torch.float32
    )  # train.py: frozen base in the autocast dtype
    rank = lora_rank if finetune == "multilora" else n_loras * lora_rank
    model = make_base(vocab)
    if impl == "ours":
        n = n_loras if finetune == "multilora" else 1
        model, optimizer = make_arm(model, finetune, n, rank, device, base_dtype)

        def step():
            return (
                train.train_step(
                    model, optimizer, batches, n_targets, 1, autocast_ctx, None, grad_clip=1.0
                )
                / n_targets
            )

        return step, model, batches[0][0].numel()  # x's rows × length
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(
        HFLlamaConfig(**checkpoint.config_to_hf(model.config), attn_implementation="sdpa")
    )
    hf.load_state_dict(
        {("model." + k if k != "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    )
    hf.to(device=device, dtype=base_dtype)
    if finetune != "full":
        torch.manual_seed(seed)
        hf = get_peft_model(
            hf,
            LoraConfig(
                r=rank,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,
                target_modules=[
                    multilora.TARGET_MODULES[t].split(".")[-1] for t in targets.split(",")
                ],
            ),
        )
    optimizer = train.make_optimizer(hf, 1e-4, 0.0, (0.9, 0.999), device.type)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ((x, y, positions, _),) = batches
    if positions is not None:
        inputs = dict(
            input_ids=x, position_ids=positions, use_cache=False
        )  # with a cache it ignores the packing
    else:
        n = torch.tensor([len(ids) - 1 for ids, _ in examples], device=device)
        inputs = dict(
            input_ids=x,
            attention_mask=(torch.arange(x.shape[1], device=device)[None] < n[:, None]).long(),
            use_cache=False,
        )

    def step():
        with autocast_ctx:
            logits = hf(**inputs).logits
        loss = (
            F.cross_entropy(
                logits.float().flatten(0, 1),
                y.flatten(),
                ignore_index=dataset.IGNORE,
                reduction="sum",
            )
            / n_targets
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, hf, x.numel()


def step_memory(step, model, device):
    """Peak memory of training: the bytes of the model's weights (each storage once: a tied
    embedding counts once) plus the peak of what two steps allocate on top of them: activations,
    logits, gradients and AdamW's state (the first step allocates it; the second is the steady
    state). Building the arm is left out: there transformers + PEFT briefly holds our copy of the
    weights too (it loads from it), which training itself never needs."""
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )
    return weights + peak_bytes(lambda: (step(), step()), device)


def bench_train(vocab, device, dt, memory=True):
    """One result per configuration (impl, finetune, layout) at the vocabulary vocab: tokens/s of
    real (non-padding) tokens, median over rounds, the configurations taking turns so that a machine
    that slows down slows all alike (the seconds of each round are kept for paired ratios); MFU; and
    peak memory (step_memory, a separate untimed pass; memory=False: not measured)."""
    examples = train_examples(vocab)
    n_tokens = sum(len(ids) - 1 for ids, _ in examples)
    packs = dataset.collate(examples, 0, "cpu", pack=True)[2] is not None
    wanted = [lay for lay in layouts.split(",") if lay]
    if not wanted or any(lay not in ("packed", "padded") for lay in wanted):
        raise UserError(f"--layouts: expected names from packed,padded, got {layouts!r}")
    if (
        not packs
    ):  # every example fills a row (lengths='fixed'): packed and padded are the same rows
        print(
            "note: no two examples fit one row, so packed = padded: measuring 'padded' only",
            file=sys.stderr,
        )
        wanted = ["padded"]
    arms = train_arms.split(",")
    for f in arms:
        if f not in ("multilora", "lora", "full"):
            raise UserError(f"--train_arms: expected names from multilora,lora,full, got {f!r}")
    configs = [("ours", f, wanted[0]) for f in arms] + [
        ("ours", "lora", lay) for lay in wanted[1:] if "lora" in arms
    ]
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        have_peft = compare_peft
    except ImportError:
        have_peft = False
        if compare_peft:
            print("transformers/peft not installed: measuring ours only", file=sys.stderr)
    if have_peft:
        configs += [("peft", "lora", lay) for lay in wanted if "lora" in arms]
        configs += [("transformers", "full", lay) for lay in wanted if "full" in arms]  # no adapter
    built, first_loss = {}, {}
    for c in configs:
        built[c] = make_train_arm(*c, vocab, device, dt)
        first_loss[c] = float(
            built[c][0]()
        )  # the same weights and examples: every arm starts at the same loss
        for _ in range(warmup - 1):
            built[c][0]()
    seconds, _ = take_turns({c: built[c][0] for c in configs}, device)
    config = built[configs[0]][1].config if configs[0][0] == "ours" else make_base(vocab).config
    row_len = max(len(ids) for ids, _ in examples) - 1  # the attention span, as train.py counts it
    results = []
    for impl, finetune, layout in configs:
        step, model, n_positions = built[(impl, finetune, layout)]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tokens_per_s = n_tokens / statistics.median(seconds[(impl, finetune, layout)])
        mfu = util.flops_per_token(config, trainable, finetune, row_len) * tokens_per_s / peak_flops
        results.append(
            dict(
                impl=impl,
                finetune=finetune,
                layout=layout,
                n_loras=n_loras if finetune == "multilora" else 1 if finetune == "lora" else 0,
                lora_rank=0
                if finetune == "full"
                else lora_rank
                if finetune == "multilora"
                else n_loras * lora_rank,
                tokens_per_s=tokens_per_s,
                mfu=mfu,
                trainable=trainable,
                first_loss=first_loss[(impl, finetune, layout)],
                tokens=n_tokens,
                positions=n_positions,
                device=str(device),
                dtype=str(dt).removeprefix("torch."),
                threads=torch.get_num_threads(),
                dim=dim,
                n_layers=n_layers,
                vocab_size=vocab,
                examples=len(examples),
                lengths=lengths,
                max_len=train_max_len,
                seconds_per_round=seconds[(impl, finetune, layout)],
            )
        )
    built.clear()
    for r in results if memory else ():
        arm = make_train_arm(r["impl"], r["finetune"], r["layout"], vocab, device, dt)
        r["peak_mem_bytes"] = step_memory(*arm[:2], device)
    return results


def paired(results, a, b):
    """How many times faster configuration a runs than b: the median over rounds of b's seconds / a's
    in the same round (same machine conditions), or None when one was not measured."""
    by = {(r["impl"], r["finetune"], r["layout"]): r["seconds_per_round"] for r in results}
    if a not in by or b not in by:
        return None
    return statistics.median(tb / ta for ta, tb in zip(by[a], by[b]))


def print_vocab_results(rows):
    """One vocabulary's configurations: a table (or JSON lines with --json_lines), printed as soon
    as measured."""
    if json_lines:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    r0 = rows[0]
    print(
        f"train step on {r0['device']} ({r0['dtype']}, {r0['threads']} threads): dim={dim} n_layers={n_layers} "
        f"vocab={r0['vocab_size']}, targets {targets}; {r0['examples']} examples of {lengths} lengths "
        f"({r0['tokens']} tokens, response {response_fraction:.0%}); tokens/s counts real tokens; "
        f"MFU against {peak_flops:.3g} FLOP/s"
    )
    print(
        f"  {'impl':12s} {'finetune':9s} {'layout':7s} {'n':>2s} {'r':>4s} {'trainable':>11s} {'positions':>9s} "
        f"{'tokens/s':>10s} {'MFU':>7s} {'peak MiB':>9s}  first loss"
    )
    for r in rows:
        print(
            f"  {r['impl']:12s} {r['finetune']:9s} {r['layout']:7s} {r['n_loras']:2d} {r['lora_rank']:4d} "
            f"{r['trainable']:11,d} {r['positions']:9,d} {r['tokens_per_s']:10,.0f} {100 * r['mfu']:6.2f}% "
            f"{r['peak_mem_bytes'] / 2**20:9,.1f}  {r['first_loss']:.5f}"
        )
    for ref_impl, f in (("peft", "lora"), ("transformers", "full")):
        what = f"LoRA r={n_loras * lora_rank}" if f == "lora" else "full fine-tuning"
        for ours_lay, ref_lay in (("packed", "packed"), ("padded", "padded"), ("packed", "padded")):
            speed = paired(rows, ("ours", f, ours_lay), (ref_impl, f, ref_lay))
            if speed is not None:
                print(
                    f"  ours ({ours_lay}) / {ref_impl} ({ref_lay}), {what}: {speed:.2f}x tokens/s"
                )
    print(flush=True)


def print_ratios(results):
    """The ratios of every vocabulary side by side, in train.py's layout on both sides; with
    --repeats > 1, each ratio's median over the repeats and its range [min, max]."""
    lay = "packed" if any(r["layout"] == "packed" for r in results) else "padded"
    n_rep = 1 + max(r.get("repeat", 0) for r in results)
    reps = f"; median [min, max] of {n_rep} repeats:" if n_rep > 1 else ":"
    print(
        f"ratios by vocabulary ({lay} rows on both sides; speed: median of same-round pairs; "
        f"memory: step_memory){reps}"
    )
    heads = (
        "ours LoRA tokens/s",
        "PEFT LoRA tokens/s",
        "ours/PEFT tokens/s",
        "ours/PEFT peak memory",
        "MultiLoRA/LoRA tokens/s",
    )
    width = 29 if n_rep > 1 else 12
    print(f"  {'vocab':>7s} " + " ".join(f"{h:>{max(width, len(h))}s}" for h in heads))
    for v in sorted({r["vocab_size"] for r in results}):
        cells = [[] for _ in heads]
        for rep in range(n_rep):
            rows = [
                r
                for r in results
                if r["vocab_size"] == v and r["layout"] == lay and r.get("repeat", 0) == rep
            ]
            by = {(r["impl"], r["finetune"]): r for r in rows}
            ours, peft = by.get(("ours", "lora")), by.get(("peft", "lora"))
            values = [
                ours and ours["tokens_per_s"],
                peft and peft["tokens_per_s"],
                paired(rows, ("ours", "lora", lay), ("peft", "lora", lay)),
                ours and peft and ours["peak_mem_bytes"] / peft["peak_mem_bytes"],
                paired(rows, ("ours", "multilora", lay), ("ours", "lora", lay)),
            ]
            for cell, value in zip(cells, values):
                if value is not None:
                    cell.append(value)

        def show(c, w):
            fmt = (lambda x: f"{x:,.0f}") if c and c[0] > 10 else (lambda x: f"{x:.3f}")
            if not c:
                text = "-"
            elif len(c) == 1 or min(c) == max(c):
                text = fmt(statistics.median(c))
            else:
                text = f"{fmt(statistics.median(c))} [{fmt(min(c))}, {fmt(max(c))}]"
            return f"{text:>{w}s}"

        print(f"  {v:7d} " + " ".join(show(c, max(width, len(h))) for c, h in zip(cells, heads)))


# -----------------------------------------------------------------------------
# mode=generate: llama.generate (KV cache) next to transformers' generate on the same weights and prompts
# mode=load: peak resident memory and time of checkpoint.load_model on a ~load_gb GB checkpoint, in a fresh
# process, and the time to the first generated token


def save_random_checkpoint(out_dir, config):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = llama.Llama(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    checkpoint.save_hf_checkpoint(model, out_dir)
    return model


class _IdsOnly:  # generate() needs these ids only: prompts are given as token ids
    bos_id, eos_id, pad_id, stop_ids = 1, 2, 0, {2}


def bench_generate(workdir):
    from transformers import LlamaForCausalLM

    config = llama.LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        vocab_size=vocab_size[0],
        max_seq_len=gen_prompt_len + gen_tokens,
    )
    save_random_checkpoint(workdir, config)
    ours = checkpoint.load_model(workdir).eval()
    hf = LlamaForCausalLM.from_pretrained(workdir, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab_size[0], (gen_batch, gen_prompt_len), generator=g)
    times = {"ours": [], "transformers": []}
    same = True
    for _ in range(rounds):  # taking turns: a machine that slows down slows both alike
        t0 = time.perf_counter()
        a = llama.generate(ours, _IdsOnly(), prompts.tolist(), gen_tokens, stop_at_eos=False)
        times["ours"].append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            b = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=gen_tokens,
                min_new_tokens=gen_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            times["transformers"].append(time.perf_counter() - t0)
        same &= a == b[:, gen_prompt_len:].tolist()
    n = gen_batch * gen_tokens
    result = {k: n / statistics.median(v) for k, v in times.items()}
    print(
        f"generate: {ours.num_params() / 1e6:.1f}M params, batch {gen_batch}, prompt {gen_prompt_len}, "
        f"{gen_tokens} new tokens, greedy, {torch.get_num_threads()} threads, median of {rounds} rounds"
    )
    print(f"  ours (llama.generate)  {result['ours']:9.1f} tokens/s")
    print(f"  transformers generate  {result['transformers']:9.1f} tokens/s")
    print(
        f"  ratio ours / transformers: {result['ours'] / result['transformers']:.2f}x   same tokens: {same}"
    )
    return dict(result, same_tokens=same)


def bench_load(workdir):
    import subprocess

    # a LLaMA shape of about load_gb GB in fp32: width load_dim (2048: a 1B-class layer), layers added
    # until the size is reached
    d, hidden, vocab = load_dim, 256 * math.ceil(8 * load_dim / 3 / 256), 32000
    per_layer = 4 * (2 * d * d + 2 * d * (d // 4) + 3 * d * hidden)
    layers = max(1, round((load_gb * 1e9 - 4 * 2 * vocab * d) / per_layer))
    config = llama.LlamaConfig(
        dim=d,
        n_layers=layers,
        n_heads=16,
        n_kv_heads=4,
        hidden_dim=hidden,
        vocab_size=vocab,
        max_seq_len=256,
    )
    save_random_checkpoint(workdir, config)
    size = os.path.getsize(os.path.join(workdir, "model.safetensors"))
    child = (
        "import json, resource, time, torch, llama, checkpoint\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024\n"
        "before = rss(); t0 = time.perf_counter()\n"
        f"model = checkpoint.load_model({workdir!r})\n"
        "loaded = time.perf_counter() - t0\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "class T: bos_id, eos_id, pad_id, stop_ids = 1, 2, 0, {2}\n"
        "llama.generate(model, T(), [[1, 5, 6, 7]], 1, stop_at_eos=False)\n"
        "first = time.perf_counter() - t0\n"
        "print(json.dumps(dict(before=before, peak=peak, load_s=loaded, first_token_s=first)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(checkpoint_bytes=size, peak_over_size=(r["peak"] - r["before"]) / size)
    print(
        f"load: {size / 1e9:.2f} GB checkpoint (fp32 safetensors, {layers} layers of width "
        f"{load_dim}), fresh process"
    )
    print(
        f"  resident memory: {r['before'] / 1e9:.2f} GB before loading (python + torch), peak {r['peak'] / 1e9:.2f} GB;"
        f" loading added {(r['peak'] - r['before']) / 1e9:.2f} GB = {r['peak_over_size']:.2f}x the checkpoint"
    )
    print(
        f"  load {r['load_s']:.1f} s, first generated token {r['first_token_s']:.1f} s after the load began"
    )
    return r


def main(argv=None):
    globals().update(configure(SETTINGS, sys.argv[1:] if argv is None else argv, "bench.py"))
    vocabs = list(vocab_size)
    if not vocabs:
        raise UserError("--vocab_size: expected at least one vocabulary size")
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else "cpu"
        if device == "auto"
        else device
    )
    dt = getattr(
        torch, dtype if dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    )
    if threads:
        torch.set_num_threads(threads)
    if mode == "train":
        results = []
        for rep in range(repeats):
            for v in vocabs:
                if repeats > 1 and not json_lines:
                    print(f"repeat {rep + 1} of {repeats}, vocab {v}")
                rows = bench_train(v, dev, dt, memory=rep == 0)  # peak memory: the same every time
                for r in rows:
                    r["repeat"] = rep
                    if rep:
                        first = next(
                            f
                            for f in results
                            if f["vocab_size"] == v
                            and f["repeat"] == 0
                            and all(f[k] == r[k] for k in ("impl", "finetune", "layout"))
                        )
                        r["peak_mem_bytes"] = first["peak_mem_bytes"]
                print_vocab_results(rows)
                results += rows
        if out_file:
            util.write_text(out_file, json.dumps(results, indent=2))
        if not json_lines:
            print_ratios(results)
        return
    if mode in ("generate", "load"):
        import tempfile

        with tempfile.TemporaryDirectory() as workdir:
            return (bench_generate if mode == "generate" else bench_load)(workdir)
    base = make_base(vocabs[0])  # the other modes measure the first vocabulary
    print(
        f"device {dev}, base dtype {dt}, model dim={dim} n_layers={n_layers} hidden_dim={hidden_dim} "
        f"vocab={vocabs[0]} ({base.num_params() / 1e6:.1f}M params), "
        f"batch {batch_size}x{seq_len}, "
        f"targets {targets}, torch threads {torch.get_num_threads()}"
    )
    settings = {k: globals()[k] for k in SETTINGS}
    results = {"settings": dict(settings, device=str(dev), dtype=str(dt))}
    if mode in ("multilora", "throughput"):
        r = results["throughput"] = bench_throughput(base, dev, dt)
        for name in ("multilora n=4 r=8", "lora r=32", "lora r=8"):
            print(
                f"{name:18s} {r[name]['steps_per_s']:8.3f} steps/s  "
                f"({r[name]['trainable']} trainable, {r[name]['trainable_pct']:.2f}% of base)"
            )
        print(
            f"throughput multilora / lora r=32: {r['ratio vs lora r=32']:.3f}   "
            f"multilora / lora r=8: {r['ratio vs lora r=8']:.3f}   (median of paired rounds; by process "
            f"CPU time: {r['cpu ratio vs lora r=32']:.3f}, {r['cpu ratio vs lora r=8']:.3f})"
        )
    if mode in ("multilora", "memory"):
        r = results["memory"] = bench_memory(base, dev, dt)
        print(
            f"memory: peak bytes allocated in training steps of MultiLoRA r={memory_rank}; growth over "
            f"n={memory_ns[0]} next to the adapter's parts (param+AdamW 12 B/param, grad 4 B/param, folded B "
            f"and x·Aᵀ saved for backward)"
        )
        for name, m in r.items():
            print(
                f"  {name:4s} peak {m['peak_bytes']:>13,d} B  growth {m['peak_growth_bytes']:>11,d} B | "
                f"param+AdamW {m['param_and_adamw_growth_bytes']:>11,d}  grad {m['grad_growth_bytes']:>10,d}  "
                f"folded B {m['folded_B_growth_bytes']:>9,d}  x·Aᵀ {m['rank_activation_growth_bytes']:>9,d}"
            )
    if out_file:
        util.write_text(out_file, json.dumps(results, indent=2))


if __name__ == "__main__":
    util.run_cli(main)
