"""
The memory a training run needs on each process, before anything is loaded: the settings are
train.py's (config files and --key=value, read the same way), the shape comes from the
checkpoint's config and headers (or a named preset), the adapters are built on the meta device.

    python tools/plan.py config/llama2_70b_mixture_multilora.py --model=llama2-70b --nproc=8 \\
        --seq_len=1024
    python tools/plan.py --model=llama3-8b --finetune=lora --lora_rank=160 --dtype=bfloat16 \\
        --seq_len=1024
    python tools/plan.py --ckpt_dir=/tmp/llama2-7b --finetune=multilora --n_loras=5 \\
        --lora_rank=32 \\
        --batch_size=1 --dtype=bfloat16

Per process (docs/scaling.md explains each line):
  base weights       frozen parameters in the base dtype (the dtype setting; fp32 for full)
  trainable weights  fp32 (train.adapt casts them)
  gradients          fp32, one per trainable weight (DDP: twice, its buckets copy them)
  AdamW              two fp32 moments per trainable weight
  FSDP unsharded     train.shard's groups (torchtitan's), frozen or trained, gathered in the
                     all-gather dtype: each block (or with fsdp_units='linear' each projection),
                     and the largest counts twice (FSDP2 gathers a group into one buffer and
                     copies it out to the parameters; or the group computing and the one
                     prefetched); an untied embedding and the final norm with lm_head are groups
                     of their own, a tied embedding and the final norm the root group, gathered
                     from the forward to the end of the backward, next to two groups; a trained
                     group's gradients before its reduce-scatter
  activations        what autograd keeps for the backward pass, counted from llama.py's forward
                     (tests/test_scale.py checks the count against autograd's saved tensors),
                     plus the peak on top: the recomputed block (activation checkpointing), the
                     chunked loss's (loss_chunk, V) buffers, the MLP's backward temporaries
With FSDP each parameter is split on dim 0 as fully_shard splits it: ceil(rows / N) rows a rank.
The micro-batch is batch_size rows of seq_len tokens, every token a target (the worst case); with
pack=True and more than one row, the block-diagonal mask (B, 1, T, T) counts too.
"""

import dataclasses
import math
import os
import sys

import torch

# the repository's modules, from wherever this script is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint
import llama
import multilora
import random_llama
import train
import util
from configurator import S, configure
from multilora import MultiLoRALinear
from util import UserError

GiB = 2**30


def parse_bytes(text):
    """'80GiB', '80GB', '141e9' -> bytes, or None."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 1e12, "gb": 1e9, "mb": 1e6, "b": 1}
    t = text.strip().lower()
    for unit, size in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)], size
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value > 0 else None


OWN = {  # tools/plan.py's own settings, next to train.py's
    "nproc": S(1, "[1, inf)", "processes (GPUs) of the run: torchrun's --nproc_per_node x nodes"),
    "device_memory": S(
        "80GiB",
        lambda v, s: parse_bytes(v) is None and "a size like 80GiB, 80GB, 24e9",
        "memory of one device (GPU), to say whether the run fits",
    ),
    "headroom": S(
        0.1,
        "[0, 1)",
        "share of device_memory kept free: CUDA context, NCCL buffers, the "
        "caching allocator's fragmentation",
    ),
    "model": S(
        "",
        ("",) + tuple(random_llama.PRESETS),
        "a published shape instead of ckpt_dir's config (no checkpoint needed)",
    ),
    "seq_len": S(
        0,
        "[0, inf)",
        "tokens per row (0 = the longest example of the datasets, else the model's max_seq_len)",
    ),
}


def plan_settings():
    """train.py's settings with the checks that need this machine relaxed (a CUDA device here;
    main runs train.check_settings without torchrun's): a plan for 8 GPUs is made anywhere."""
    settings = dict(train.SETTINGS)
    settings["device"] = S(settings["device"].default, None, settings["device"].help)
    return {**settings, **OWN}


def model_config(s):
    if s["model"]:
        return random_llama.preset_config(s["model"]), f"preset {s['model']}"
    if s["init_from"] == "scratch":
        meta = dataset_meta(s["datasets"][0])
        return llama.LlamaConfig(
            dim=s["dim"],
            n_layers=s["n_layers"],
            n_heads=s["n_heads"],
            n_kv_heads=s["n_kv_heads"],
            hidden_dim=s["hidden_dim"],
            vocab_size=meta["vocab_size"],
            max_seq_len=s["max_seq_len"],
            tie_embeddings=s["tie_embeddings"],
        ), "init_from=scratch"
    if not os.path.isdir(s["ckpt_dir"]):
        raise UserError(
            f"{s['ckpt_dir']}: checkpoint directory not found (ckpt_dir); to plan for a "
            f"published shape without it, give --model=one of {','.join(random_llama.PRESETS)}"
        )
    return checkpoint.read_config(s["ckpt_dir"]), s["ckpt_dir"]


def dataset_meta(folder):
    import dataset

    return dataset.read_meta(folder)


def longest_example(datasets):
    """The longest training example (tokens) of the prepared datasets, or None if one is missing."""
    import dataset

    try:
        return max(int(d.lengths.max()) - 1 for d in dataset.load_splits(datasets, "train"))
    except UserError:
        return None


def adapted_model(c, s):
    """A weightless Llama of config c, adapted as train.py adapts it. The activations are counted
    for MultiLoRALinear: an arm of another layer is refused."""
    with torch.device("meta"):
        model = llama.Llama(c)
    if s["finetune"] == "full":
        return model
    if multilora.ARMS[s["finetune"]].layer is not MultiLoRALinear:
        raise UserError(
            f"finetune: expected an arm whose layer plan.py counts (MultiLoRALinear's), got "
            f"{s['finetune']!r}"
        )
    multilora.adapt_model(
        model,
        s["finetune"],
        **{
            "targets": s["lora_targets"],
            "n_loras": s["n_loras"],
            "lora_rank": s["lora_rank"],
            "lora_alpha": s["lora_alpha"],
            "lora_dropout": s["lora_dropout"],
            "scaling": s["lora_scaling"],
            "init": s["lora_init"],
        },
    )
    return model


def adapter_widths(c, s):
    """{target: (n·r, entries of s)} of the adapters that settings s build, as the arm builds them
    (on a one-layer model); {} for finetune=full."""
    model = adapted_model(dataclasses.replace(c, n_layers=1), s)
    return {
        name.rsplit(".", 1)[1].split("_")[0]: (
            m.lora_A.shape[0],
            0 if m.lora_s is None else m.lora_s.numel(),
        )
        for name, m in multilora.adapter_modules(model)
    }


def local_numel(p, nproc, fsdp):
    """Entries of p on one process: FSDP2 gives each rank ceil(rows / N) rows (padded)."""
    if not fsdp or nproc == 1:
        return p.numel()
    rows = p.shape[0]
    return math.ceil(rows / nproc) * (p.numel() // rows if rows else 0)


def activation_bytes(c, s, B, T, act, resid):
    """(kept, per_layer, loss_part) bytes that autograd keeps for one micro-batch of B rows of T
    tokens, counted op by op from llama.py and multilora.py; act: bytes of the activation dtype
    (2 under bf16 autocast, 4 without), resid: of the residual stream (the embedding's dtype)."""
    full = s["finetune"] == "full"
    M, D, hd = B * T, c.dim, c.head_dim
    mask = s["pack"] and B > 1  # packed rows: a block-diagonal (B, 1, T, T) mask in the act dtype
    rope_rows = B if s["pack"] else 1  # packed rows carry their own positions: (B, 1, T, hd)
    N = M  # every token a target, the worst case
    loss = M + N * 8 + norm_bytes(N, D, full) + N * D * (4 if full else resid)
    if full:
        loss += N * D * 4 + M * 8  # the normed hidden states (lm_head trains); the embedding's ids
    rope = act == 4 or s["activation_checkpointing"]  # fp32 cos, sin: kept once (block inputs)
    shared = (B * T * T * act if mask else 0) + (2 * rope_rows * T * hd * 4 if rope else 0)
    if s["activation_checkpointing"]:
        kept = c.n_layers * M * D * resid + shared + loss  # each block keeps only its input
    else:
        kept = layer_bytes(c, s, B, T, act, True)
        kept += (c.n_layers - 1) * layer_bytes(c, s, B, T, act, False) + shared + loss
    return kept, layer_bytes(c, s, B, T, act, False), loss


def norm_bytes(n, D, full):
    """RMSNorm of n tokens: the fp32 input (pow, mul) and rsqrt; + the normalized x if weight
    trains."""
    return n * D * 4 + n * 4 + (n * D * 4 if full else 0)


def layer_bytes(c, s, B, T, act, first):
    """What autograd keeps for one block (activation_bytes). What needs a gradient decides what is
    kept: in layer 0 of an adapted model (first) the input (the frozen embedding's output) needs
    none, nor what only frozen weights computed from it."""
    full = s["finetune"] == "full"
    adapted = set() if full else set(s["lora_targets"])
    M, D, I, hd = B * T, c.dim, c.hidden_dim, c.head_dim
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    mask = s["pack"] and B > 1
    kv_saved = q if mask and c.n_heads != c.n_kv_heads else kv  # GQA with a mask: full-width k, v
    rope_rows = B if s["pack"] else 1
    trains = lambda *names: full or bool(adapted & set(names))  # noqa: E731
    g_in = not first or full
    qkv_g = g_in or trains("q", "k", "v")
    y_g = qkv_g  # SDPA's output
    mid_g = g_in or y_g or trains("o")  # the residual stream after attention
    gate_g, up_g = mid_g or trains("gate"), mid_g or trains("up")
    needs_grad = {
        "q": g_in,
        "k": g_in,
        "v": g_in,
        "o": y_g,
        "gate": mid_g,
        "up": mid_g,
        "down": gate_g or up_g,
    }
    b = norm_bytes(M, D, full) if g_in else 0
    # the normed x, input of q, k, v: one copy, or under autocast with fp32 weights (full) one
    # cast per projection (autocast caches the casts of weights, not of activations)
    casts = full and act != 4
    b += M * D * act * (3 if casts else 1) if trains("q", "k", "v") else 0
    if qkv_g:  # SDPA's q, k, v (after RoPE), output and logsumexp
        b += M * (q + 2 * kv_saved) * act + M * q * act + B * c.n_heads * T * 4
        if act != 4 and (g_in or trains("q", "k")):  # cos, sin cast to the act dtype
            b += 2 * rope_rows * T * hd * act
    elif trains("o"):
        b += M * q * act  # o's input only
    b += norm_bytes(M, D, full) if mid_g else 0
    b += M * D * act * (2 if casts else 1) if trains("gate", "up") else 0
    # SwiGLU: silu's input; silu(gate) and up for their product; the product for down
    b += M * I * act * (gate_g + up_g + gate_g) + (M * I * act if trains("down") else 0)
    b += adapter_bytes(c, s, M, act, needs_grad)
    if casts and not (s["fsdp"] and s["nproc"] > 1):  # autocast's weight copies
        b += (2 * q * D + 2 * kv * D + 3 * D * I) * act
    return b


def adapter_bytes(c, s, M, act, needs_grad):
    """What the adapters of one block keep for M tokens (layer_bytes); needs_grad: projection ->
    whether its input needs a gradient."""
    if s["finetune"] == "full":
        return 0
    q, kv, D, I = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.hidden_dim
    widths = {
        "q": (D, q),
        "k": (D, kv),
        "v": (D, kv),
        "o": (q, D),
        "gate": (D, I),
        "up": (D, I),
        "down": (I, D),
    }
    b = 0
    for t, (nr, s_entries) in adapter_widths(c, s).items():
        d_in, d_out = widths[t]
        b += M * nr * act + nr * d_out * act  # x·Aᵀ; the folded B (cast under autocast)
        b += s_entries * 4  # s·α/r
        if act != 4 and needs_grad[t]:
            b += nr * d_in * act  # A cast, kept where the input needs a gradient
    return b


def plan(s, c, nproc=None, seq_len=None):
    """{line: bytes per process} for settings s (train.py's + plan.py's) and model config c."""
    nproc = nproc or s["nproc"]
    fsdp = s["fsdp"] and nproc > 1
    full = s["finetune"] == "full"
    base_bytes = 4 if full else getattr(torch, s["dtype"]).itemsize
    act = 4 if s["dtype"] == "float32" else 2
    resid = base_bytes  # the embedding's output dtype
    param_bytes = act if s["dtype"] != "float32" else None  # FSDP's all-gather dtype
    model = adapted_model(c, s)
    frozen = trainable = 0
    for p in model.parameters():  # a tied embedding is one parameter
        n = local_numel(p, nproc, fsdp)
        if full or p.requires_grad:
            trainable += n
        else:
            frozen += n
    out = {
        "base weights": frozen * base_bytes,
        "trainable weights (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4 * (2 if nproc > 1 and not fsdp else 1),
        "AdamW moments (2 x fp32)": trainable * 8,
    }
    if fsdp:  # gathered parameters (in the all-gather dtype) on top of the shards
        out.update(fsdp_gathered(model, s, param_bytes, base_bytes))
    B = s["batch_size"]
    T = seq_len or s["seq_len"] or c.max_seq_len
    kept, one_layer, _ = activation_bytes(c, s, B, T, act, resid)
    chunk = min(s["loss_chunk"], B * T)
    loss_buffers = chunk * c.vocab_size * (8 + (2 if act == 2 else 0))  # fp32 logits, exp, casts
    if full and act == 2 and not fsdp:
        loss_buffers += c.vocab_size * c.dim * 2  # lm_head's weight cast for the loss
    backward_temps = 3 * B * T * c.hidden_dim * act
    recompute = one_layer if s["activation_checkpointing"] else 0
    out["activations (kept)"] = kept
    out["activations (peak on top)"] = max(loss_buffers, recompute + backward_temps)
    return out, model


def fsdp_gathered(model, s, param_bytes, base_bytes):
    """{line: bytes} of the weights FSDP gathers on top of the shards, by train.shard's groups
    (torchtitan's), frozen or trained alike: each block (fsdp_units='linear': each projection, and
    the block's norms), and the largest group counts twice (FSDP2 gathers a group into one buffer
    and copies it out to the parameters; or the group computing and the one prefetched). Untied,
    the embedding and the final norm with lm_head are groups of their own; tied, the embedding
    and the final norm are the root group, gathered from the forward to the end of the backward,
    next to two groups. A trained group also holds its gradients before the reduce-scatter.
    param_bytes: the all-gather dtype's (None: each parameter's own)."""
    full = s["finetune"] == "full"

    def gathered(params):
        params = list(params)
        size = sum(
            p.numel() * (param_bytes or (4 if full or p.requires_grad else base_bytes))
            for p in params
        )
        grads = sum(p.numel() * ((param_bytes or 4) + 4) for p in params if full or p.requires_grad)
        return size, grads

    block = model.layers[0]
    units = [block.parameters()]
    if s["fsdp_units"] == "linear":
        linears = [m for m in block.modules() if hasattr(m, "weight") and m.weight.dim() == 2]
        units = [m.parameters() for m in linears] + [
            [p for m in block.modules() if m not in linears for p in m.parameters(False)]
        ]
    largest = max((gathered(u) for u in units), key=lambda g: 2 * g[0] + g[1])
    if model.config.tie_embeddings:  # the root group: the shared embedding and the final norm
        blocks = {id(p) for p in model.layers.parameters()}
        root_size, root_grads = gathered(p for p in model.parameters() if id(p) not in blocks)
        return {
            "FSDP unsharded (root + 2 groups)": root_size + 2 * largest[0] + largest[1] + root_grads
        }
    ends = [
        gathered(model.embed_tokens.parameters()),
        gathered([*model.norm.parameters(), *model.lm_head.parameters()]),
    ]
    return {"FSDP unsharded (2 x largest group)": max(2 * sz + g for sz, g in ends + [largest])}


def report(s, c, source, seq_note):
    nproc, fsdp = s["nproc"], s["fsdp"] and s["nproc"] > 1
    device_memory = parse_bytes(s["device_memory"])
    terms, model = plan(s, c)
    trainable, base_total = multilora.count_trainable(model)
    if s["finetune"] == "full":
        trainable = base_total
    how = "FSDP (sharded)" if fsdp else "DDP (replicated)" if nproc > 1 else "1 process"
    lines = [
        f"model: {source}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads "
        f"({c.n_kv_heads} kv), hidden {c.hidden_dim}, vocab {c.vocab_size}: "
        f"{base_total / 1e9:.2f}B parameters",
        f"finetune={s['finetune']}: {trainable / 1e6:,.1f}M trainable; base in "
        f"{s['dtype'] if s['finetune'] != 'full' else 'float32'}, autocast {s['dtype']}",
        f"per process: {nproc} x {how}, micro-batch {s['batch_size']} rows x "
        f"{s['seq_len'] or c.max_seq_len} tokens ({seq_note}), activation checkpointing "
        f"{'on' if s['activation_checkpointing'] else 'off'}",
    ]
    for k, v in terms.items():
        lines.append(f"  {k:<34} {v / GiB:9.2f} GiB")
    total = sum(terms.values())
    lines.append(f"  {'total':<34} {total / GiB:9.2f} GiB")
    other = dict(s, activation_checkpointing=not s["activation_checkpointing"])
    other_total = sum(plan(other, c)[0].values())
    lines.append(
        f"  (activation checkpointing {'off' if s['activation_checkpointing'] else 'on'}: "
        f"{other_total / GiB:.2f} GiB)"
    )
    usable = device_memory * (1 - s["headroom"])
    verdict = (
        f"fits in {s['device_memory']} ({100 * total / device_memory:.0f}% of it; "
        f"{100 * s['headroom']:.0f}% kept free)"
        if total <= usable
        else f"does not fit in {s['device_memory']}: {(total - usable) / GiB:.2f} GiB over "
        f"(with {100 * s['headroom']:.0f}% kept free)"
    )
    lines.append(verdict)
    return "\n".join(lines), total, total <= usable


def main(argv):
    s = configure(plan_settings(), argv, "tools/plan.py")
    train.check_settings(s, machine=False)
    if s["gradient_accumulation_steps"] % s["nproc"]:
        raise UserError(
            f"gradient_accumulation_steps: expected a multiple of the {s['nproc']} "
            f"processes (nproc), got {s['gradient_accumulation_steps']}"
        )
    c, source = model_config(s)
    note = "seq_len"
    if not s["seq_len"]:
        longest = longest_example(s["datasets"])
        s = dict(s, seq_len=min(longest, c.max_seq_len) if longest else c.max_seq_len)
        note = (
            "the longest example of the datasets"
            if longest
            else "the model's max_seq_len: datasets not found; give --seq_len"
        )
    text, _, _ = report(s, c, source, note)
    print(text)


if __name__ == "__main__":
    util.run_cli(main)
