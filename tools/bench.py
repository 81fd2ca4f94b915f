"""
Benchmarks (figures for the README and docs/benchmarks.md, not tests), on random weights: speed and
memory do not depend on them. Every mode trains with train.py's own arm (train.adapt), AdamW and
train_step. The arms take turns, round by round (take_turns), and a ratio is the median of
same-round pairs, so a machine that slows down mid-run slows all arms alike.

    python tools/bench.py --threads=1 [--json_lines]  # --mode=train: ours vs transformers + PEFT
    # 3 times over: the median and range of each ratio
    python tools/bench.py --threads=1 --repeats=3
    python tools/bench.py --vocab_size=32000 --layouts=packed,padded \\
        --train_arms=multilora,lora,full
    python tools/bench.py --lengths=fixed --train_batch=4 --train_max_len=128   # nothing to pack
    # MultiLoRA vs LoRA: speed, memory
    python tools/bench.py --mode=multilora --threads=1 --rounds=30
    python tools/bench.py --mode=throughput --dim=1024 --n_layers=8 --device=cuda
    python tools/bench.py --mode=memory
    python tools/bench.py --mode=generate  # llama.generate (KV cache) vs transformers' generate
    python tools/bench.py --mode=load  # peak memory and time of loading a ~1 GB checkpoint

train: each arm next to transformers' LlamaForCausalLM + PEFT LoRA (r = n·r; full: transformers)
with the same weights, examples, AdamW, clipping, autocast and token-normalized loss, at each
vocabulary in turn; tokens/s counts real (non-padding) tokens. multilora = throughput (MultiLoRA
n=4 r=8 against LoRA r=32 and r=8) + memory (peak bytes against n, next to the adapter's parts).
Peak bytes: torch.cuda.max_memory_allocated on CUDA; on CPU torch.profiler's running total.
"""

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

# the repository's modules, from wherever this script is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint
import dataset
import llama
import multilora
import train
import util
from configurator import Rule, S, configure, declared
from util import UserError

# -----------------------------------------------------------------------------
MODES = ("train", "multilora", "throughput", "memory", "generate", "load")
mode = S("train", MODES, "multilora = throughput + memory")
device = S(util.default_device(), util.check_device, "cpu | cuda | cuda:N | mps")
on_cuda = lambda s: s["device"].startswith("cuda")  # noqa: E731
dtype = S(
    Rule("bfloat16 on cuda, else float32", lambda s: "bfloat16" if on_cuda(s) else "float32"),
    ("float32", "bfloat16", "float16"),
    "the frozen base's dtype and autocast's (train.py's rule); adapters are float32",
)
# the benchmark model: a LLaMA shape with random weights
dim = S(512, "[1, inf)")
n_layers = S(4, "[1, inf)")
n_heads = S(8, "[1, inf)")
hidden_dim = S(1376, "[1, inf)")
vocab_size = S([4096, 32000, 128256], "[8, inf)", "mode=train: each in turn; others: the first")
targets = S(["q", "k", "v", "o"], tuple(multilora.TARGET_MODULES), "projections to adapt")
lora_alpha = S(16, None)
# timing
steps = S(1, "[1, inf)", "timed steps per arm per turn (the arms take turns)")
warmup = S(2, "[0, inf)", "untimed steps per arm before the first round")
rounds = S(10, "[1, inf)")
threads = S(0, util.check_threads, "CPU threads for torch (0 = torch's default; 1 is steadier)")
seed = S(0, util.check_seed)
out_file = S(
    "",
    lambda v, s: v and util.check_output(v, "out_file", ours=util.json_with("settings")),
    "also write the results as JSON here (a new file, or an earlier one of this script's)",
)
# mode=throughput and mode=memory
batch_size = S(4, "[1, inf)")
seq_len = S(128, "[1, inf)")
memory_ns = S([1, 2, 4, 8], "[1, inf)")
memory_rank = S(8, "[1, inf)")
# mode=train: train.py's step for each arm, next to transformers + PEFT on the same model
train_arms = S(["multilora", "lora"], (*multilora.ARMS, "full"), "add full")
n_loras = S(4, "[1, inf)", "MultiLoRA: n modules of rank lora_rank; LoRA: rank n_loras·lora_rank")
lora_rank = S(8, "[1, inf)")
compare_peft = S(True, None, "also transformers + PEFT LoRA (full: transformers), if installed")
peak_flops = S(
    Rule("989e12 on cuda, else 1e12", lambda s: 989e12 if on_cuda(s) else 1e12),
    "(0, inf)",
    "stated peak FLOP/s for MFU (train.py's default)",
)
response_fraction = S(0.66, "(0, 1]", "the share of each example that is response; Alpaca: 0.66")
# alpaca: a log-normal fitted to Alpaca's 2,000-record sample tokenized with the 32k LLaMA
# vocabulary (median 81 tokens, std of log-length 0.57, 5%-95% = 35-205 tokens)
lengths = S("alpaca", ("alpaca", "fixed"), "example lengths: Alpaca's, or all train_max_len")
train_batch = S(16, "[1, inf)", "examples per step")
train_max_len = S(512, "[1, inf)", "tokens per example at most (Alpaca's prepare.py max_len)")
# packed: train.py's default; padded: one example per row (transformers' DataCollatorForSeq2Seq)
layouts = S(["packed"], ("packed", "padded"), "packed = train.py's; add padded")
json_lines = S(False, None, "print one JSON object per measured configuration")
repeats = S(1, "[1, inf)", "measure this many times; ratios: median and range")
# mode=generate (the model shape above, with n_kv_heads) and mode=load
half_or_all = lambda s: s["n_heads"] // (2 - s["n_heads"] % 2)  # noqa: E731
n_kv_heads = S(Rule("n_heads / 2 if n_heads is even, else n_heads", half_or_all), "[1, n_heads]")
gen_batch = S(1, "[1, inf)")
gen_prompt_len = S(16, "[1, inf)")
gen_tokens = S(64, "[1, inf)")
load_gb = S(1.0, "(0, inf)", "size of the random fp32 checkpoint that mode=load writes and reads")
load_dim = S(2048, "[1, inf)")

SETTINGS = declared(globals())
# -----------------------------------------------------------------------------
# the arms, the timer and the memory probe (every mode)


def model_shape(vocab, max_len):  # the benchmark model's LlamaConfig fields
    size = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim)
    return dict(size, vocab_size=vocab, max_seq_len=max_len)


def random_base(vocab):  # fp32, on CPU; every arm is a copy of it
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(**model_shape(vocab, max(seq_len, train_max_len + 1))))
    model.init_weights()
    return model


def base_dtype(finetune):  # train.py's: the frozen base in the autocast dtype, full in fp32
    return torch.float32 if finetune == "full" else getattr(torch, dtype)


def adamw(model):
    return train.make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), torch.device(device).type)


def make_arm(base, finetune, n, rank):
    """A copy of base adapted as train.py does (train.adapt), with its AdamW: (model, optimizer)."""
    model = copy.deepcopy(base).to(device=device, dtype=base_dtype(finetune))
    torch.manual_seed(seed)
    lora = dict(n_loras=n, lora_rank=rank, lora_alpha=lora_alpha, lora_dropout=0.0)
    train.adapt(model, finetune, dict(lora, targets=targets, scaling="channel"))
    return model, adamw(model)


def ours_step(model, optimizer, batches, n_targets, grad_clip):
    """train.py's step under its autocast, as a function of no arguments returning the mean loss."""
    ctx = train.autocast_context(torch.device(device).type, dtype)
    run = train.train_step
    return lambda: (
        run(model, optimizer, batches, n_targets, ctx=ctx, grad_clip=grad_clip) / n_targets
    )


def take_turns(fns):
    """Time {name: fn}: `rounds` rounds, each fn called `steps` times per round, a different one
    first in each round. -> ({name: wall s per call, by round}, {name: process CPU s per call})."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fns[name]()
            sync()
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    return wall, cpu


def paired(a, b):
    """How many times faster a ran than b: the median of b's seconds / a's over the same rounds."""
    return statistics.median(tb / ta for ta, tb in zip(a, b))


def peak_bytes(fn):
    """Peak bytes allocated while fn() runs, counting only what fn allocates."""
    if torch.device(device).type == "cuda":
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
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak


# -----------------------------------------------------------------------------
# mode=throughput and mode=memory: MultiLoRA against LoRA on full rows (every next token a target)


def full_rows(vocab):
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(device)
    return [(batch[:, :-1], batch[:, 1:], None, None)], batch_size * seq_len


def bench_throughput(base):
    """Steps per second of each arm; the ratios of MultiLoRA's speed to each LoRA's, by wall time
    and by process CPU time (all threads: less sensitive to other processes on a shared CPU)."""
    arms = {"multilora n=4 r=8": ("multilora", 4, 8), "lora r=32": ("lora", 1, 32)}
    arms["lora r=8"] = ("lora", 1, 8)
    batches, n_targets = full_rows(base.config.vocab_size)
    built = {name: make_arm(base, *arm) for name, arm in arms.items()}
    fns = {name: ours_step(*arm, batches, n_targets, 0.0) for name, arm in built.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = take_turns(fns)
    result = {}
    for name, (model, _) in built.items():
        trainable, base_total = multilora.count_trainable(model)
        pct, speed = 100 * trainable / base_total, 1 / statistics.median(wall[name])
        result[name] = dict(steps_per_s=speed, wall_s_per_step=wall[name])
        result[name] |= dict(cpu_s_per_step=cpu[name], trainable=trainable, trainable_pct=pct)
        print(f"{name:18s} {speed:8.3f} steps/s  ({trainable} trainable, {pct:.2f}% of base)")
    for other in ("lora r=32", "lora r=8"):
        result[f"ratio vs {other}"] = paired(wall["multilora n=4 r=8"], wall[other])
        result[f"cpu ratio vs {other}"] = paired(cpu["multilora n=4 r=8"], cpu[other])
    print(
        f"throughput multilora / lora r=32: {result['ratio vs lora r=32']:.3f}   multilora / lora "
        f"r=8: {result['ratio vs lora r=8']:.3f}   (median of paired rounds; by process CPU time: "
        f"{result['cpu ratio vs lora r=32']:.3f}, {result['cpu ratio vs lora r=8']:.3f})"
    )
    return result


def bench_memory(base):
    """Peak bytes of two training steps (the second has AdamW's state: the steady state) for each
    n, and its growth over the smallest n next to what the adapter can add, all fp32: parameters
    + AdamW's two moments, gradients, and what each adapted layer saves for backward: the folded B
    (d_out, n·r) with its s·α/r factor (n, d_out), and x·Aᵀ (B, T, n·r)."""
    batches, n_targets = full_rows(base.config.vocab_size)
    result = {}
    for n in memory_ns:

        def run():
            model, optimizer = make_arm(base, "multilora", n, memory_rank)
            step = ours_step(model, optimizer, batches, n_targets, 0.0)
            for _ in range(2):
                step()
            run.modules = [m for _, m in multilora.adapter_modules(model)]

        peak, ms = peak_bytes(run), run.modules
        params = sum(
            p.numel() for m in ms for k, p in m.named_parameters() if k.startswith("lora_")
        )
        folded = sum(4 * (m.lora_B.numel() + m.lora_s.numel()) for m in ms)
        rank_activation = sum(4 * n_targets * m.lora_A.shape[0] for m in ms)
        result[f"n={n}"] = dict(peak_bytes=peak, adapter_params=params)
        result[f"n={n}"] |= dict(param_and_adamw_bytes=12 * params, grad_bytes=4 * params)
        result[f"n={n}"] |= dict(folded_B_bytes=folded, rank_activation_bytes=rank_activation)
    print(
        f"memory: peak bytes allocated in training steps of MultiLoRA r={memory_rank}; growth over "
        f"n={memory_ns[0]} next to the adapter's parts (param+AdamW 12 B/param, grad 4 B/param, "
        "folded B and x·Aᵀ saved for backward)"
    )
    parts = ("peak", "param_and_adamw", "grad", "folded_B", "rank_activation")
    for name, m in result.items():
        for k in parts:
            m[f"{k}_growth_bytes"] = m[f"{k}_bytes"] - result[f"n={memory_ns[0]}"][f"{k}_bytes"]
        g = [m[f"{k}_growth_bytes"] for k in parts]
        print(
            f"  {name:4s} peak {m['peak_bytes']:>13,d} B  growth {g[0]:>11,d} B | param+AdamW "
            f"{g[1]:>11,d}  grad {g[2]:>10,d}  folded B {g[3]:>9,d}  x·Aᵀ {g[4]:>9,d}"
        )
    return result


# -----------------------------------------------------------------------------
# mode=train: train.py's own step for each arm, next to transformers + PEFT on the same model,
# examples and optimizer


def train_examples(vocab):
    """train_batch examples [(ids, mask)], the last response_fraction of each the response."""
    rng = np.random.default_rng(seed)
    if lengths == "fixed":
        sizes = np.full(train_batch, train_max_len + 1)
    else:
        draws = np.round(np.exp(rng.normal(math.log(81), 0.57, train_batch)))
        sizes = np.clip(draws, 8, train_max_len + 1)
    examples = []
    for n in sizes.astype(int):
        mask = np.zeros(n, dtype=np.uint8)
        mask[round(n * (1 - response_fraction)) :] = 1
        examples.append((rng.integers(3, vocab, n), mask))
    return examples


def arm_shape(finetune):  # (n, r) as the tables show them; LoRA has MultiLoRA's rank n·r
    if finetune == "full":
        return 0, 0
    return (1, n_loras * lora_rank) if finetune == "lora" else (n_loras, lora_rank)


def build(impl, finetune, layout, base, examples):
    """-> (step returning the mean loss, model, positions per step). 'ours': make_arm + train.py's
    step on the examples collated as train.py does (packed: pack=True); 'peft'/'transformers':
    LlamaForCausalLM with base's weights (+ PEFT LoRA) and the same AdamW, autocast, loss and
    clipping, fed the same rows: padded ones with their attention_mask, packed ones with
    position_ids restarting at each example (transformers then builds the block-diagonal mask)."""
    batches = [dataset.collate(examples, 0, device, pack=layout == "packed")]
    (x, y, positions, _), n_targets = batches[0], sum(int(m[1:].sum()) for _, m in examples)
    n, rank = arm_shape(finetune)
    if impl == "ours":
        model, optimizer = make_arm(base, finetune, n, rank)
        return ours_step(model, optimizer, batches, n_targets, 1.0), model, x.numel()
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_config = dict(checkpoint.config_to_hf(base.config), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    weights = base.state_dict()
    hf.load_state_dict({k if k == "lm_head.weight" else "model." + k: weights[k] for k in weights})
    hf.to(device=device, dtype=base_dtype(finetune))
    if finetune != "full":
        torch.manual_seed(seed)
        modules = [multilora.TARGET_MODULES[t].split(".")[-1] for t in targets]
        lora = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=modules)
        hf = get_peft_model(hf, lora)
    optimizer = adamw(hf)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    inputs = dict(input_ids=x, use_cache=False)  # with a cache, transformers ignores the packing
    if positions is not None:
        inputs["position_ids"] = positions
    else:
        n_real = torch.tensor([len(ids) - 1 for ids, _ in examples], device=device)
        inputs["attention_mask"] = (
            torch.arange(x.shape[1], device=device) < n_real[:, None]
        ).long()
    ctx = train.autocast_context(torch.device(device).type, dtype)

    def step():
        with ctx:
            logits = hf(**inputs).logits
        flat = logits.float().flatten(0, 1)
        loss = F.cross_entropy(flat, y.flatten(), ignore_index=dataset.IGNORE, reduction="sum")
        loss = loss / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, hf, x.numel()


def step_memory(step, model):
    """The bytes of the model's weights (each storage once: a tied embedding counts once) plus the
    peak of what two steps allocate on top: activations, logits, gradients, AdamW's state. The
    build is left out (transformers briefly holds our copy of the weights too, loading from it)."""
    tensors = list(model.parameters()) + list(model.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) + peak_bytes(lambda: (step(), step()))


def bench_train(vocab, repeat, peaks):
    """One row per configuration (impl, finetune, layout) at vocabulary vocab: tokens/s (median
    over rounds; each round's seconds kept for paired ratios), MFU, the first loss, and peak memory
    (step_memory, an untimed pass, measured once into peaks: it does not depend on the load)."""
    examples = train_examples(vocab)
    n_tokens = sum(len(ids) - 1 for ids, _ in examples)
    wanted = layouts
    if dataset.collate(examples, 0, "cpu", pack=True)[2] is None:  # every example fills a row
        note = "note: no two examples fit one row, so packed = padded: measuring 'padded' only"
        print(note, file=sys.stderr)
        wanted = ["padded"]
    configs = [("ours", f, wanted[0]) for f in train_arms]
    configs += [("ours", "lora", lay) for lay in wanted[1:] if "lora" in train_arms]
    have_peft = util.importable("peft") and util.importable("transformers")
    if compare_peft and not have_peft:
        print("transformers/peft not installed: measuring ours only", file=sys.stderr)
    if compare_peft and have_peft:
        configs += [("peft", "lora", lay) for lay in wanted if "lora" in train_arms]
        configs += [("transformers", "full", lay) for lay in wanted if "full" in train_arms]
    base, built, first_loss = random_base(vocab), {}, {}
    for c in configs:
        built[c] = build(*c, base, examples)
        first_loss[c] = float(built[c][0]())  # the same weights and examples: the same first loss
        for _ in range(warmup - 1):
            built[c][0]()
    seconds, _ = take_turns({c: fn for c, (fn, _, _) in built.items()})
    row_len = max(len(ids) for ids, _ in examples) - 1  # the attention span, as train.py counts it
    run = dict(tokens=n_tokens, device=device, dtype=dtype, threads=torch.get_num_threads())
    run |= dict(dim=dim, n_layers=n_layers, vocab_size=vocab, examples=len(examples))
    rows = []
    for c, (_, model, positions) in built.items():
        impl, finetune, layout = c
        n, r = arm_shape(finetune)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tokens_per_s = n_tokens / statistics.median(seconds[c])
        flops = util.flops_per_token(base.config, trainable, finetune, row_len) * tokens_per_s
        row = dict(impl=impl, finetune=finetune, layout=layout, n_loras=n, lora_rank=r)
        row |= dict(tokens_per_s=tokens_per_s, mfu=flops / peak_flops, trainable=trainable)
        row |= dict(first_loss=first_loss[c], positions=positions, lengths=lengths, **run)
        rows.append(row | dict(max_len=train_max_len, seconds_per_round=seconds[c], repeat=repeat))
    built.clear()
    for row in rows:
        key = (vocab, row["impl"], row["finetune"], row["layout"])
        if key not in peaks:
            step, model, _ = build(*key[1:], base, examples)
            peaks[key] = step_memory(step, model)
        row["peak_mem_bytes"] = peaks[key]
    return rows


def ratio(rows, a, b):
    """paired() of configurations a and b (impl, finetune, layout), or None if one was not run."""
    by = {(r["impl"], r["finetune"], r["layout"]): r["seconds_per_round"] for r in rows}
    return paired(by[a], by[b]) if a in by and b in by else None


def print_vocab_results(rows):
    """One vocabulary's configurations as a table (or JSON lines), printed as soon as measured."""
    if json_lines:
        print("\n".join(json.dumps(r) for r in rows), flush=True)
        return
    r = rows[0]
    print(
        f"train step on {r['device']} ({r['dtype']}, {r['threads']} threads): dim={dim} "
        f"n_layers={n_layers} vocab={r['vocab_size']}, targets {','.join(targets)}; "
        f"{r['examples']} examples of {lengths} lengths ({r['tokens']} tokens, response "
        f"{response_fraction:.0%}); tokens/s counts real tokens; MFU against {peak_flops:.3g} "
        "FLOP/s"
    )
    print(
        f"  {'impl':12s} {'finetune':9s} {'layout':7s} {'n':>2s} {'r':>4s} {'trainable':>11s} "
        f"{'positions':>9s} {'tokens/s':>10s} {'MFU':>7s} {'peak MiB':>9s}  first loss"
    )
    for r in rows:
        print(
            f"  {r['impl']:12s} {r['finetune']:9s} {r['layout']:7s} {r['n_loras']:2d} "
            f"{r['lora_rank']:4d} {r['trainable']:11,d} {r['positions']:9,d} "
            f"{r['tokens_per_s']:10,.0f} {100 * r['mfu']:6.2f}% "
            f"{r['peak_mem_bytes'] / 2**20:9,.1f}  {r['first_loss']:.5f}"
        )
    for ref, f in (("peft", "lora"), ("transformers", "full")):
        what = f"LoRA r={n_loras * lora_rank}" if f == "lora" else "full fine-tuning"
        for ours_lay, ref_lay in (("packed", "packed"), ("padded", "padded"), ("packed", "padded")):
            speed = ratio(rows, ("ours", f, ours_lay), (ref, f, ref_lay))
            if speed is not None:
                print(f"  ours ({ours_lay}) / {ref} ({ref_lay}), {what}: {speed:.2f}x tokens/s")
    print(flush=True)


def show(cell, width):
    """A value's median over the repeats, and its [min, max] where they differ; '-' if none."""
    fmt = (lambda x: f"{x:,.0f}") if cell and cell[0] > 10 else (lambda x: f"{x:.3f}")
    text = fmt(statistics.median(cell)) if cell else "-"
    if cell and min(cell) != max(cell):
        text += f" [{fmt(min(cell))}, {fmt(max(cell))}]"
    return f"{text:>{width}s}"


def print_ratios(results):
    """The ratios of every vocabulary side by side, in train.py's layout on both sides; with
    --repeats > 1, each ratio's median over the repeats and its range [min, max]."""
    lay = "packed" if any(r["layout"] == "packed" for r in results) else "padded"
    n_rep = 1 + max(r["repeat"] for r in results)
    print(
        f"ratios by vocabulary ({lay} rows on both sides; speed: median of same-round pairs; "
        f"memory: step_memory)" + (f"; median [min, max] of {n_rep} repeats:" if n_rep > 1 else ":")
    )
    heads = ("ours LoRA tokens/s", "PEFT LoRA tokens/s", "ours/PEFT tokens/s")
    heads += ("ours/PEFT peak memory", "MultiLoRA/LoRA tokens/s")
    widths = [max(29 if n_rep > 1 else 12, len(h)) for h in heads]
    print(f"  {'vocab':>7s} " + " ".join(f"{h:>{w}s}" for h, w in zip(heads, widths)))
    for v in sorted({r["vocab_size"] for r in results}):
        cells = [[] for _ in heads]
        for rep in range(n_rep):
            rows = [
                r for r in results if (r["vocab_size"], r["layout"], r["repeat"]) == (v, lay, rep)
            ]
            by = {(r["impl"], r["finetune"]): r for r in rows}
            ours, peft = by.get(("ours", "lora")), by.get(("peft", "lora"))
            values = [
                ours and ours["tokens_per_s"],
                peft and peft["tokens_per_s"],
                ratio(rows, ("ours", "lora", lay), ("peft", "lora", lay)),
                ours and peft and ours["peak_mem_bytes"] / peft["peak_mem_bytes"],
                ratio(rows, ("ours", "multilora", lay), ("ours", "lora", lay)),
            ]
            for cell, value in zip(cells, values):
                if value is not None:
                    cell.append(value)
        print(f"  {v:7d} " + " ".join(show(c, w) for c, w in zip(cells, widths)))


# -----------------------------------------------------------------------------
# mode=generate: llama.generate (KV cache) next to transformers' generate, same weights and prompts
# mode=load: peak resident memory and time of checkpoint.load_model on a ~load_gb GB checkpoint, in
# a fresh process, and the time to the first generated token


def save_random_checkpoint(out_dir, config):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = llama.Llama(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    checkpoint.save_hf_checkpoint(model, out_dir)


class IdsOnly:  # generate() needs these ids only: prompts are given as token ids
    bos_id, eos_id, pad_id, stop_ids = 1, 2, 0, {2}


def bench_generate(workdir):
    from transformers import LlamaForCausalLM

    shape = model_shape(vocab_size[0], gen_prompt_len + gen_tokens)
    save_random_checkpoint(workdir, llama.LlamaConfig(**shape, n_kv_heads=n_kv_heads))
    ours = checkpoint.load_model(workdir).eval()
    hf = LlamaForCausalLM.from_pretrained(workdir, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab_size[0], (gen_batch, gen_prompt_len), generator=g)
    mask, n, out = torch.ones_like(prompts), gen_tokens, {}
    hf_args = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def run_ours():
        out["ours"] = llama.generate(ours, IdsOnly(), prompts.tolist(), n, stop_at_eos=False)

    @torch.no_grad()
    def run_hf():
        out["hf"] = hf.generate(prompts, attention_mask=mask, **hf_args)[
            :, gen_prompt_len:
        ].tolist()

    wall, _ = take_turns({"ours": run_ours, "transformers": run_hf})
    result = {k: gen_batch * n / statistics.median(v) for k, v in wall.items()}
    result["same_tokens"] = same = out["ours"] == out["hf"]
    print(
        f"generate: {ours.num_params() / 1e6:.1f}M params, batch {gen_batch}, prompt "
        f"{gen_prompt_len}, {n} new tokens, greedy, {torch.get_num_threads()} threads, "
        f"median of {rounds} rounds"
    )
    print(f"  ours (llama.generate)  {result['ours']:9.1f} tokens/s")
    print(f"  transformers generate  {result['transformers']:9.1f} tokens/s")
    speed = result["ours"] / result["transformers"]
    print(f"  ratio ours / transformers: {speed:.2f}x   same tokens: {same}")
    return result


LOAD_CHILD = """import json, resource, sys, time, llama, checkpoint
rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
before = rss(); t0 = time.perf_counter()
model = checkpoint.load_model(sys.argv[1])
loaded = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
class T: bos_id, eos_id, pad_id, stop_ids = 1, 2, 0, {2}
llama.generate(model, T(), [[1, 5, 6, 7]], 1, stop_at_eos=False)
first = time.perf_counter() - t0
print(json.dumps(dict(before=before, peak=peak, load_s=loaded, first_token_s=first)))
"""


def bench_load(workdir):
    # a LLaMA shape of about load_gb GB in fp32: width load_dim (2048: a 1B-class layer), layers
    # added until the size is reached
    d, hidden, vocab = load_dim, 256 * math.ceil(8 * load_dim / 3 / 256), 32000
    per_layer = 4 * (2 * d * d + 2 * d * (d // 4) + 3 * d * hidden)
    layers = max(1, round((load_gb * 1e9 - 4 * 2 * vocab * d) / per_layer))
    shape = dict(dim=d, n_layers=layers, n_heads=16, n_kv_heads=4, hidden_dim=hidden)
    save_random_checkpoint(workdir, llama.LlamaConfig(**shape, vocab_size=vocab, max_seq_len=256))
    size = os.path.getsize(os.path.join(workdir, "model.safetensors"))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    child = [sys.executable, "-c", LOAD_CHILD, workdir]
    out = subprocess.run(child, capture_output=True, text=True, check=True, cwd=here)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(checkpoint_bytes=size, peak_over_size=(r["peak"] - r["before"]) / size)
    before, peak, added = r["before"] / 1e9, r["peak"] / 1e9, (r["peak"] - r["before"]) / 1e9
    print(
        f"load: {size / 1e9:.2f} GB checkpoint (fp32 safetensors, {layers} layers of width "
        f"{load_dim}), fresh process"
    )
    print(
        f"  resident memory: {before:.2f} GB before loading (python + torch), peak {peak:.2f} GB; "
        f"loading added {added:.2f} GB = {r['peak_over_size']:.2f}x the checkpoint"
    )
    print(
        f"  load {r['load_s']:.1f} s, first generated token {r['first_token_s']:.1f} s after the "
        "load began"
    )
    return r


def check_sizes():
    """The batch each mode runs, refused in one line when this machine cannot hold it: a rough
    lower bound of a training step's memory (the weights and AdamW's state in fp32, each layer's
    kept activations, the fp32 logits of one row), checked before anything is built."""
    V = max(vocab_size)
    weights = 16 * (n_layers * (4 * dim * dim + 3 * dim * hidden_dim) + 2 * V * dim)
    for what, B, T in (
        ("batch_size x seq_len", batch_size, seq_len),
        ("train_batch x train_max_len", train_batch, train_max_len),
        ("gen_batch x (gen_prompt_len + gen_tokens)", gen_batch, gen_prompt_len + gen_tokens),
    ):
        need = weights + 4 * B * T * (n_layers * (8 * dim + 3 * hidden_dim)) + 8 * T * V
        util.check_memory(need, f"{what} = {B} x {T}", device)


def main(argv=None):
    globals().update(configure(SETTINGS, sys.argv[1:] if argv is None else argv, "tools/bench.py"))
    for key in ("vocab_size", "train_arms", "layouts"):
        if not globals()[key]:
            raise UserError(f"--{key}: expected at least one value")
    check_sizes()
    if threads:
        torch.set_num_threads(threads)
    if mode in ("generate", "load"):
        with tempfile.TemporaryDirectory() as workdir:
            return (bench_generate if mode == "generate" else bench_load)(workdir)
    if mode == "train":
        results, peaks = [], {}
        for rep in range(repeats):
            for v in vocab_size:
                if repeats > 1 and not json_lines:
                    print(f"repeat {rep + 1} of {repeats}, vocab {v}")
                rows = bench_train(v, rep, peaks)
                print_vocab_results(rows)
                results += rows
        if not json_lines:
            print_ratios(results)
    else:
        base = random_base(vocab_size[0])  # the other modes measure the first vocabulary
        print(
            f"device {device}, base dtype {dtype}, model dim={dim} n_layers={n_layers} "
            f"hidden_dim={hidden_dim} vocab={vocab_size[0]} ({base.num_params() / 1e6:.1f}M "
            f"params), batch {batch_size}x{seq_len}, targets {','.join(targets)}, torch threads "
            f"{torch.get_num_threads()}"
        )
        results = {"settings": {k: globals()[k] for k in SETTINGS}}
        if mode in ("multilora", "throughput"):
            results["throughput"] = bench_throughput(base)
        if mode in ("multilora", "memory"):
            results["memory"] = bench_memory(base)
    if out_file:
        util.write_text(out_file, json.dumps(results, indent=2))


if __name__ == "__main__":
    util.run_cli(main)
