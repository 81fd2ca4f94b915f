"""
Fine-tune a LLaMA with MultiLoRA, LoRA or all of its weights (the paper's three arms) on prepared
instruction datasets, in one process, with DDP or with FSDP2. Read it top to bottom: settings,
model, the training step, the loop. Checkpoints, resume and the exports are train_state.py's.

    python train.py                          # the embedded default (MultiLoRA on data/tasks)
    python train.py --help                   # every setting
    python train.py config/tasks_lora.py --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/llama7b_mixture_multilora.py

out_dir gets ckpt.pt (all a resume needs; tensors and plain types only), adapter.safetensors (or hf/
for finetune=full) and metrics.jsonl. A run there is never replaced without --resume or --overwrite;
every check runs before out_dir is touched, a lock keeps a second process out, and a non-finite loss
stops the run, keeping the last good checkpoint (docs/training.md).
"""

import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import checkpoint
import dataset
import llama
import multilora
import train_state
import util
from chunked_loss import token_loss_sum
from configurator import Rule, S, declared
from eval import evaluate, exact_match_report, score_exact_match
from tokenizer import check_tokenizer, find_tokenizer, load_tokenizer
from util import UserError

# -----------------------------------------------------------------------------
# settings: the defaults are the embedded default run; config/*.py files and --key=value override
# I/O
out_dir = S("out/tasks-multilora", None, "where the run's files go")
hf_dir = S("", None, "finetune=full: where the HF-layout weights go (default out_dir/hf)")
ckpt_dir = S("data/tiny_base", None, "base model: Hugging Face (config.json) or Meta (params.json)")
init_from = S("pretrained", ("pretrained", "scratch"), "ckpt_dir's weights, or random (scratch)")
resume = S(False, None, "continue the run saved in out_dir/ckpt.pt")
overwrite = S(False, None, "replace the run in out_dir (a run is never replaced without it)")
eval_interval = S(
    250, "[1, inf)", "evaluate, then checkpoint, every this many steps and at the end"
)
log_interval = S(10, "[1, inf)", "log the training loss every this many steps")
eval_examples = S(50, "[0, inf)", "validation examples per task at each eval (0 = all of them)")
exact_match_examples = S(50, "[0, inf)", "test examples per task scored before and after (0: skip)")
exact_match_max_new_tokens = S(24, "[1, inf)", "tokens generated per exact-match answer")
wandb_log = S(False, None, "log to Weights & Biases (pip install wandb)")
wandb_project = S("multilora", None, "wandb project")
wandb_run_name = S("", None, "wandb run name")
# data
datasets = S(["data/tasks"], None, "prepared datasets (dataset.py's format)")
mixture = S("proportional", ("proportional", "equal", "temperature"), "how tasks are sampled")
mixture_temperature = S(2.0, "(0, inf)", "'temperature': p_t ∝ n_t^(1/T) (T5, §3.5.2)")
batch_size = S(32, "[1, inf)", "examples per micro-step per process")
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's process count
gradient_accumulation_steps = S(
    Rule("the number of processes, WORLD_SIZE", lambda s: WORLD_SIZE),
    None,
    "micro-steps per optimizer step, whole job (each process does 1/N)",
)
pack = S(True, None, "pack each micro-batch's examples into fewer rows (same loss, less padding)")
# fine-tuning
finetune = S("multilora", (*multilora.ARMS, "full"), "multilora.ARMS's adapters, or every weight")
lora_targets = S(["q", "k", "v", "o"], tuple(multilora.TARGET_MODULES), "projections to adapt")
n_loras = S(4, "[1, inf)", "parallel LoRA modules (MultiLoRA; LoRA is n_loras = 1)")
lora_rank = S(8, "[1, inf)", "rank r of each module")
lora_alpha = S(16.0, "(0, inf)", "the update is scaled by α/r")
lora_dropout = S(0.0, "[0, 1)", "dropout on the adapters' input")
lora_scaling = S("channel", ("channel", "scalar"), "MultiLoRA's s_i: per output channel, or one")
lora_init = S("", ("", "lora", "multilora"), "'' = the arm's; lora: B = 0, no s; multilora: s = 0")
# model shape for init_from='scratch' (vocabulary and special ids come from the tokenizer)
tokenizer = S("", None, "tokenizer file (default: ckpt_dir's, or for scratch the dataset's)")
dim = S(128, "[1, inf)", "model width")
n_layers = S(4, "[1, inf)", "blocks")
n_heads = S(4, "[1, inf)", "query heads")
n_kv_heads = S(
    Rule("2 if n_heads is even, else 1", lambda s: 2 if s["n_heads"] % 2 == 0 else 1),
    "[1, n_heads]",
    "key/value heads (fewer than n_heads: grouped-query attention)",
)
tie_embeddings = S(True, None, "lm_head shares the embedding matrix")
hidden_dim = S(352, "[1, inf)", "SwiGLU feed-forward width")
max_seq_len = S(256, "[1, inf)", "context length")
rope_theta = S(10000.0, "(0, inf)", "RoPE base")
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = S(3e-3, "(0, inf)", "peak learning rate")
# (a tenth as written in decimal: 3e-3 gives 3e-4, not 3.0000000000000003e-4)
min_lr = S(
    Rule("learning_rate / 10", lambda s: float(f"{s['learning_rate'] / 10:.12g}")),
    "[0, learning_rate]",
    "learning rate at the end of the decay",
)
warmup_iters = S(
    Rule(
        "min(20, max_iters, lr_decay_iters - 1 when it is set)",
        lambda s: min(20, s["max_iters"], (s["lr_decay_iters"] or 21) - 1),
    ),
    "[0, max_iters]",
    "linear warmup steps",
)
lr_decay_iters = S(0, None, "cosine decay ends here (0 = max_iters)")
max_iters = S(1000, "[0, inf)", "optimizer steps")
weight_decay = S(0.0, "[0, inf)", "AdamW weight decay, on 2-D weights only (nanoGPT's rule)")
beta1 = S(0.9, "[0, 1)", "AdamW β1")
beta2 = S(0.999, "[0, 1)", "AdamW β2")
grad_clip = S(1.0, "[0, inf)", "clip the gradient norm to this (0 = off)")
# system
device = S(util.default_device(), util.check_device, "cpu | cuda | cuda:N | mps")
on_cuda = lambda s: s["device"].startswith("cuda")
dtype = S(
    Rule("bfloat16 on cuda, else float32", lambda s: "bfloat16" if on_cuda(s) else "float32"),
    ("float32", "bfloat16", "float16"),
    "autocast dtype (float16 uses a gradient scaler)",
)
fsdp = S(False, None, "shard base and adapters with FSDP2 (needs torchrun)")
fsdp_units = S("block", ("block", "linear"), "FSDP2 groups: each block, or each projection too")
activation_checkpointing = S(False, None, "recompute each block's activations in the backward pass")
loss_chunk = S(256, "[1, inf)", "targets per lm_head + loss chunk (fp32 logits: loss_chunk·V·4 B)")
compile = S(False, None, "torch.compile the model")
seed = S(1337, util.check_seed, "seed of the initialization and the data order")
threads = S(
    1, util.check_threads, "CPU threads for torch (0: torch's default; the default runs best on 1)"
)
peak_flops = S(
    Rule("989e12 on cuda, else 1e12", lambda s: 989e12 if on_cuda(s) else 1e12),
    "(0, inf)",
    "per process, for MFU (989e12: H100 bf16 dense)",
)
# -----------------------------------------------------------------------------
SETTINGS = declared(globals())


def check_settings(s, machine=True):
    """The rules between settings (configure checked each one's type and range). machine: also what
    this machine must allow, torchrun for FSDP and the process count (tools/plan.py plans for
    others)."""
    if s["init_from"] == "scratch" and s["finetune"] != "full":
        raise UserError(
            "init_from: expected pretrained, or scratch with finetune=full (an adapter needs a "
            "base that is saved somewhere), got 'scratch'"
        )
    if not s["datasets"]:
        raise UserError("datasets: expected at least one directory, got []")
    if s["lr_decay_iters"] != 0 and s["lr_decay_iters"] <= s["warmup_iters"]:
        raise UserError(
            f"lr_decay_iters: expected 0 or more than warmup_iters, got {s['lr_decay_iters']}"
        )
    if s["dtype"] == "float16" and not s["device"].startswith("cuda"):
        raise UserError("dtype: expected float32 or bfloat16 (float16 needs cuda), got 'float16'")
    if s["wandb_log"] and not util.importable("wandb"):
        raise UserError("wandb_log: expected False (wandb is not installed), got True")
    if machine and s["fsdp"] and "RANK" not in os.environ:
        raise UserError(
            "fsdp: expected False outside torchrun (FSDP shards over processes), got True"
        )
    steps = s["gradient_accumulation_steps"]
    if machine and (steps < 1 or steps % WORLD_SIZE):
        raise UserError(
            f"gradient_accumulation_steps: expected a positive multiple of the {WORLD_SIZE} "
            f"processes, got {steps}"
        )


# the processes: one, or torchrun's (init_distributed sets them); read as globals, as the settings
ddp, rank, local_rank, world_size, run_device, device_type = False, 0, 0, 1, "cpu", "cpu"


def init_distributed():
    """torchrun sets RANK: one process per GPU (NCCL) or per CPU share (gloo); otherwise one."""
    global ddp, rank, local_rank, world_size, run_device, device_type
    ddp = "RANK" in os.environ
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rank, local_rank, world_size = (
        (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    )
    run_device = f"cuda:{local_rank}" if ddp and device_type == "cuda" else device
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(run_device)
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            device_id=torch.device(run_device) if device_type == "cuda" else None,
        )


# -----------------------------------------------------------------------------
# model: base, adapters, precision, processes


def build_model(model_config):
    """The base (loaded, or random for init_from='scratch'), adapted for the arm: a frozen base in
    the autocast dtype (bf16 halves its memory on GPU), trainable weights in fp32. Under FSDP it is
    sharded here, and a pretrained base is never whole anywhere: built weightless (meta device),
    adapted, sharded, then each rank reads its own rows of each tensor from the files."""
    base_dtype = getattr(torch, dtype) if finetune != "full" else torch.float32
    torch.manual_seed(seed)  # the same initialization on every rank (FSDP keeps each rank's rows)
    if init_from == "scratch":
        with torch.device(run_device):
            model = llama.Llama(model_config)
        model.init_weights()
        model.to(base_dtype)
    elif fsdp:
        with torch.device("meta"):
            model = llama.Llama(model_config).to(base_dtype)
    else:
        model = checkpoint.load_model(ckpt_dir, dtype=base_dtype, device=run_device)
    # the adapters are drawn in full on run_device (on a meta base too): one process's values
    adapt(model, finetune, dict(lora_settings(), device=run_device))
    model.checkpoint_blocks, model.loss_chunk = activation_checkpointing, loss_chunk
    if fsdp:
        shard(model, torch.device(run_device).type, dtype, fsdp_units)
    if fsdp and init_from == "pretrained":
        checkpoint.load_into(model, ckpt_dir, run_device)
        if finetune != "full":  # for the adapter file: each rank gives the entries in its rows
            model.base_sample = checkpoint.base_sample(model)
    return model


def shard(model, device_type, dtype="float32", units="block"):
    """FSDP2 shards every weight on dim 0 over the ranks, frozen or trained, in torchtitan's groups,
    each gathered only for its own forward and backward: the input embedding, each block
    (units='linear': each of its projections too), the final norm with lm_head, and the root. A
    tied embedding is used at both ends of the model, so it stays in the root group with the norm.
    The loss reads lm_head's weight without calling lm_head: norm's forward gathers the pair, and
    the root's post-forward reshards a group whose modules did not all run (torch 2.13's provision
    for a chunked loss; a release without it keeps the pair gathered until its backward)."""
    import ctypes

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # all-gather in the compute dtype (one dtype per group, base and adapters), gradients in fp32
    mp = (
        MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        if dtype != "float32"
        else MixedPrecisionPolicy()
    )
    tied = model.config.tie_embeddings
    groups = [model.embed_tokens] if not tied else []
    adapters = {m for _, m in multilora.adapter_modules(model)}
    for block in model.layers:
        for m in block.modules() if units == "linear" else []:
            if isinstance(m, torch.nn.Linear) or m in adapters:
                groups.append(m)
        groups.append(block)
    for group in groups + ([[model.norm, model.lm_head]] if not tied else []):
        fully_shard(group, mesh=mesh, mp_policy=mp)
    if device_type == "cpu" and hasattr(ctypes.CDLL(None), "mallopt"):
        # glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
        # the weights each group gathers and frees land in its heap and stay resident; a fixed
        # threshold (M_MMAP_THRESHOLD = -3) gives every buffer of 1 MiB or more back when freed
        ctypes.CDLL(None).mallopt(-3, 1 << 20)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def adapt(model, finetune, lora):
    """finetune='full': every weight trains; otherwise wrap the targets with the arm's adapter
    (multilora.ARMS) and freeze the rest. Trainable weights in fp32 (tools/bench.py builds its
    arms with this too). -> adapter settings (also model.adapter_settings), or None."""
    settings = None if finetune == "full" else multilora.adapt_model(model, finetune, **lora)
    for p in model.parameters():
        if finetune == "full":
            p.requires_grad_(True)
        if p.requires_grad:
            p.data = p.data.float()
    return settings


def lora_settings():
    return dict(
        targets=lora_targets,
        n_loras=n_loras,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        scaling=lora_scaling,
        init=lora_init,
    )


def autocast_context(device_type, dtype_name):  # bf16/fp16 matmuls; float32: none
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype_name))


def make_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW over the trainable parameters; weight decay on 2-D weights only (nanoGPT); the fused
    kernel where this torch has one for the device (CUDA, and CPU in recent torch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device_type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def wrap(raw_model):
    """DDP replicates (FSDP2 sharded the model in build_model); torch.compile last."""
    model = raw_model
    if ddp and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
    if not compile:
        return model
    # the chunked loss stays eager (its loop over chunks would compile once per count); marked here
    # since torch.compiler.disable imports torch._dynamo: 3 s and 70 MiB in every process
    llama.chunked_cross_entropy = torch.compiler.disable(llama.chunked_cross_entropy)
    return torch.compile(model, dynamic=True)


# -----------------------------------------------------------------------------
# the training step (tools/bench.py times this same function) and the learning rate


def train_step(
    model,
    optimizer,
    batches,
    n_targets,
    world_size=1,
    ctx=nullcontext(),
    scaler=None,
    grad_clip=0.0,
    ddp=False,
    fsdp=False,
):
    """One optimizer step over this process's micro-batches [(x, y, positions, segments)].

    loss = Σ (token losses of all micro-steps on all ranks) / n_targets, n_targets being the number
    of target tokens of the whole step, so the result does not depend on how the batch is split into
    micro-steps or processes (a mean of per-batch means would). DDP and FSDP average gradients over
    ranks, hence the factor world_size; they synchronize only on the last micro-step.
    Returns this process's summed token loss (a detached tensor)."""
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, (x, y, positions, segments) in enumerate(batches):
        last = i == len(batches) - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
        with model.no_sync() if ddp and not last else nullcontext():
            with ctx:
                token_loss = token_loss_sum(model, x, y, positions, segments)
            loss = token_loss * (world_size / max(n_targets, 1))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += token_loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# the run: its inputs, what it logs, the loop


def scratch_config(tok):
    """init_from=scratch: the model config of the shape settings, checked as a config file's values
    are (an odd head dimension, ...), with the tokenizer's vocabulary."""
    shape = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim)
    keys = dict({k: k for k in shape}, head_dim="dim", rope_theta="rope_theta")
    values = dict(shape, rope_theta=rope_theta, norm_eps=1e-5, rope_scaling=None)
    checkpoint.check_config_values("init_from=scratch", keys, values)
    return llama.LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        vocab_size=tok.vocab_size,
        rope_theta=rope_theta,
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
        bos_id=tok.bos_id,
        eos_id=[tok.eos_id],
    )


def load_data_and_config():
    """Every input read and checked, nothing written.
    -> (train splits, val splits, model config, tokenizer or None, its path or None)"""
    train_splits = dataset.load_splits(datasets, "train")
    val_splits = dataset.load_splits(datasets, "val")
    meta = train_splits[0].meta
    if init_from == "scratch":
        tokenizer_path = tokenizer or meta.get("tokenizer", "")
        tok = load_tokenizer(tokenizer_path)
        model_config = scratch_config(tok)
    else:
        model_config = checkpoint.read_config(ckpt_dir)
        tokenizer_path = tokenizer or find_tokenizer(ckpt_dir, required=False)
        tok = None
        if tokenizer_path:
            tok = load_tokenizer(tokenizer_path)
            check_tokenizer(tok, model_config, ckpt_dir)
    # a tokenizer.json may have fewer tokens than the embedding has rows (checkpoints pad it)
    json_fits = tok and tok.kind == "json" and meta.get("vocab_size") == tok.vocab_size
    if meta.get("vocab_size") != model_config.vocab_size and not json_fits:
        raise UserError(
            f"{datasets[0]}: meta.json: vocab_size {meta.get('vocab_size')} does not match the "
            f"model's {model_config.vocab_size}; prepare the data with the model's tokenizer"
        )
    pairs = zip(train_splits + val_splits, datasets * 2)
    longest, where = max((int(s.lengths.max()), d) for s, d in pairs)
    ctx = model_config.max_seq_len
    if longest - 1 > ctx:  # an example's last token is only a target
        longer = "use a base with a longer context"
        if init_from == "scratch":
            longer = f"train with --max_seq_len={longest - 1}"
        raise UserError(
            f"{where}: examples of up to {longest} tokens exceed the model's context of {ctx} "
            f"(max_seq_len): prepare the data with --max_len={ctx}, or {longer}"
        )
    check_sizes(train_splits, model_config)
    if finetune != "full":  # n·r larger than a layer, an unknown target: on a weightless copy
        with torch.device("meta"):
            try:
                multilora.adapt_model(llama.Llama(model_config), finetune, **lora_settings())
            except UserError as e:
                base = ckpt_dir if init_from == "pretrained" else "init_from=scratch"
                raise UserError(f"{base}: {e}") from None
    return train_splits, val_splits, model_config, tok, tokenizer_path if tok else None


def check_sizes(train_splits, model_config):
    """Settings that size an allocation, bounded by what they feed, before out_dir is touched: a
    step of more examples than the data holds, exact-match answers past the context, a scratch
    model (its weights, gradients and AdamW moments) larger than this machine's memory."""
    n = sum(len(s.lengths) for s in train_splits)
    rows = batch_size * gradient_accumulation_steps
    if rows > n:
        raise UserError(
            f"batch_size x gradient_accumulation_steps: {batch_size} x "
            f"{gradient_accumulation_steps} = {rows} examples a step, more than the {n} "
            f"training examples of {','.join(datasets)}"
        )
    ctx = model_config.max_seq_len
    if exact_match_examples and exact_match_max_new_tokens >= ctx:
        raise UserError(
            f"exact_match_max_new_tokens: expected less than the model's context of {ctx} "
            f"tokens, got {exact_match_max_new_tokens}"
        )
    if init_from == "scratch":
        shape = f"dim={dim} n_layers={n_layers} hidden_dim={hidden_dim}"
        need = checkpoint.config_numel(model_config) * 16
        util.check_memory(need, f"init_from=scratch: the model of {shape}", device)


def log_model(model):
    """One line: the model's size and what of it trains. -> the trainable parameter count"""
    trainable, base_total = multilora.count_trainable(model)
    scale = f", α/r = {lora_alpha:g}/{lora_rank} = {lora_alpha / lora_rank:g}"
    log(
        f"model: {base_total / 1e6:.2f}M parameters, {finetune}: {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / base_total:.2f}%){scale if finetune != 'full' else ''}"
    )
    return trainable


def take_out_dir(found, config):
    """out_dir is this run's now: locked (until the process ends: keep the returned file), checked
    again under the lock (another process may have written there since), leftovers of killed writes
    gone, what --overwrite replaces removed, the wandb run started."""
    lock = None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        lock = util.lock_folder(out_dir)
        if train_state.check_out_dir(config) != found:
            raise UserError(
                f"{out_dir}: another process wrote there while this run was starting; "
                f"run the command again"
            )
        util.remove_stale_tmp(out_dir, train_state.RUN_FILES)
        hf = train_state.hf_path(config)
        if finetune == "full" and os.path.isdir(hf) and not hf_dir:  # out_dir/hf: under the lock
            util.remove_stale_tmp(hf, checkpoint.HF_EXPORT_FILES)
        for f, *_ in found if overwrite else []:
            # a resume keeps the run's files: only a checkpoint in hf_dir goes
            if not resume or os.path.split(f) in [(hf, n) for n in train_state.HF_FILES]:
                os.remove(f)
        if wandb_log:
            import wandb

            wandb.init(
                project=wandb_project, name=wandb_run_name or None, config=config, resume="allow"
            )
    if ddp:
        dist.barrier()
    return lock


def log_exact_match(model, tok, examples, base, ctx, it):
    """After training: the tuned model's exact match on the test examples next to the base's
    (rank 0 scores; not under FSDP, where the model is only in shards)."""
    if exact_match_examples > 0 and fsdp:
        log("exact match: skipped under FSDP (score the result with eval.py --task=exact_match)")
    if not examples or fsdp or tok is None or rank != 0:
        return
    record = exact_match_report(
        base or {}, exact_match(model, tok, examples, ctx), exact_match_examples
    )
    write_metrics({"iter": it, **record})
    adapter = os.path.join(out_dir, train_state.ADAPTER)
    print(
        f"adapter: {adapter}"
        if finetune != "full"
        else f"weights: {hf_dir or os.path.join(out_dir, 'hf')}"
    )
    base, tuned = record["exact_match_base"], record["exact_match"]
    print(f"exact match: base {100 * base:.1f}% -> tuned {100 * tuned:.1f}%")


def exact_match(model, tok, examples, ctx):  # eval.py's exact match of the test examples
    chat_fmt = dataset.data_format(datasets)  # the prompts in the format the data was prepared in
    with ctx:
        return score_exact_match(
            model, tok, examples, exact_match_max_new_tokens, batch_size, chat_fmt
        )


def log(*args):  # rank 0 prints
    if rank == 0:
        print(*args, flush=True)


def write_metrics(record):
    """One line of out_dir/metrics.jsonl, and a wandb point: rank 0's."""
    if rank == 0:
        with open(os.path.join(out_dir, train_state.METRICS), "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_log:
            import wandb

            wandb.log(record, step=record["iter"])


def stop_if_diverged(what, value, it, saved):
    """A non-finite loss ends the run, naming what is kept (the checkpoint of step `saved`)."""
    if not math.isfinite(value):
        kept = f"{out_dir} keeps the checkpoint of step {saved}" if saved else "nothing was saved"
        raise UserError(
            f"step {it}: {what} is {value}: the run diverged (try a lower learning_rate); {kept}"
        )


def log_eval(it, model, val, pad_id, ctx, meter):
    """The validation loss at step `it`, overall and per task (val: splits, names, pools), logged.
    Every rank calls."""
    splits, names, pools = val
    loss, per_task = evaluate(
        model, splits, pools, eval_examples, batch_size, pad_id, ctx, rank, world_size, pack
    )
    stop_if_diverged("the validation loss", loss, it, meter["saved"])
    log(
        f"step {it}: val loss {loss:.4f} ("
        + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, per_task))
        + ")"
    )
    write_metrics(
        {"iter": it, "val_loss": loss} | {f"val_loss/{n}": v for n, v in zip(names, per_task)}
    )


def log_step(it, lr, loss_sum, n_targets, batches, meter):
    """The training log of step `it`: its loss (all ranks'), and since the last log (meter: its
    time, tokens, steps), tokens/s, MFU, peak memory and the time left. Every rank calls."""
    if ddp:
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / max(n_targets, 1)
    stop_if_diverged("the training loss", train_loss, it, meter["saved"])
    now = time.time()
    tokens_per_s = meter["tokens"] / (now - meter["t"])
    seq_len = max(b[0].shape[1] for b in batches)  # attention span of a row (x is first)
    mfu = meter["flops"](seq_len) * tokens_per_s / (peak_flops * world_size)
    eta = (now - meter["t"]) / meter["steps"] * (max_iters - it - 1)
    mem = util.peak_memory_bytes(device_type)
    log(
        f"iter {it}: loss {train_loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s, "
        f"mfu {100 * mfu:.2f}%, mem {mem / 2**20:,.0f} MiB, eta {eta / 60:.1f} min"
    )
    record = dict(iter=it, train_loss=train_loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu)
    write_metrics(record | {"peak_mem_bytes": mem})
    meter.update(t=now, tokens=0, steps=0)


def main(argv=None):
    config = train_state.configure_run(SETTINGS, sys.argv[1:] if argv is None else argv)
    check_settings(config)  # a resume's: the run's settings, with what argv may change
    globals().update(config)  # nanoGPT style: below, the settings are read as plain names
    if threads > 0:
        torch.set_num_threads(threads)
    init_distributed()

    # every check before out_dir is touched: settings (above), data, tokenizer, model, checkpoint
    found = train_state.check_out_dir(config)
    train_splits, val_splits, model_config, tok, tokenizer_path = load_data_and_config()
    log("settings: " + json.dumps(config))
    raw_model = build_model(model_config)
    trainable = log_model(raw_model)
    task_names, pools = dataset.task_pools(train_splits)
    ckpt, changed = None, []
    if resume:
        ckpt, changed = train_state.read_checkpoint(config, raw_model, len(pools))
    if changed:
        log(f"resume: settings differ from the checkpoint's: {', '.join(changed)}")

    lock = take_out_dir(found, config)  # noqa: F841 (held until the process ends)
    model = wrap(raw_model)
    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    ctx = autocast_context(device_type, dtype)

    # data: the task mixture
    weights = dataset.mixture_weights([len(p) for p in pools], mixture, mixture_temperature)
    val_names, val_pools = dataset.task_pools(val_splits)
    tasks = zip(task_names, pools, weights)
    log("tasks: " + ", ".join(f"{n} ({len(p)} examples, p={w:.3f})" for n, p, w in tasks))
    pad_id = model_config.eos_id[0]  # any id: padding is never a target and never attended to

    # state: fresh, or the checkpoint's
    examples = dataset.test_examples(datasets, exact_match_examples) if exact_match_examples else []
    torch.manual_seed(seed + rank)  # dropout differs per rank
    if ckpt is not None:
        state = train_state.resume(ckpt, config, raw_model, optimizer, scaler, tokenizer_path)
        where = os.path.join(out_dir, train_state.CHECKPOINT)
        log(f"resumed from {where} at step {state['iter_num']}")
    else:
        state = dict(settings=config, iter_num=0, data_position=[0] * len(pools), metrics_lines=0)
        score = rank == 0 and examples and not fsdp and tok is not None
        state["exact_match_base"] = exact_match(raw_model, tok, examples, ctx) if score else None

    # the loop (as nanoGPT's): evaluate and checkpoint at step 0, every eval_interval and at the end
    iter_num, t_start, just_resumed = state["iter_num"], time.time(), ckpt is not None
    flops = functools.partial(util.flops_per_token, model_config, trainable, finetune)  # of T
    meter = dict(t=time.time(), tokens=0, steps=0, saved=iter_num, flops=flops)
    val, n_rows = (val_splits, val_names, val_pools), gradient_accumulation_steps * batch_size
    is_ddp = ddp and not fsdp  # model is DDP's (wrap): train_step syncs on the last micro-step
    while True:
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not just_resumed:
            t_eval = time.time()
            log_eval(iter_num, model, val, pad_id, ctx, meter)
            if iter_num > 0:
                metrics = os.path.join(out_dir, train_state.METRICS)
                lines = sum(1 for _ in open(metrics)) if rank == 0 else 0
                state.update(iter_num=iter_num, metrics_lines=lines)
                scaled = state | {"scaler": scaler.state_dict() if scaler else None}
                train_state.save(scaled, raw_model, optimizer, tokenizer_path)
                meter["saved"] = iter_num
            meter["t"] += time.time() - t_eval  # tokens/s counts training time only
        just_resumed = False
        if iter_num >= max_iters:
            break

        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters or max_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = dataset.sample_examples(
            pools, weights, state["data_position"], n_rows, seed, iter_num
        )
        batches, n_targets, n_tokens = dataset.micro_batches(
            train_splits, rows, batch_size, rank, world_size, pad_id, run_device, pack
        )
        counts = torch.tensor([n_targets, n_tokens], device=run_device)
        if ddp:
            dist.all_reduce(counts)  # target tokens of the whole step: the loss's denominator
        n_targets, n_tokens = int(counts[0]), int(counts[1])
        loss_sum = train_step(
            model, optimizer, batches, n_targets, world_size, ctx, scaler, grad_clip, is_ddp, fsdp
        )
        meter.update(tokens=meter["tokens"] + n_tokens, steps=meter["steps"] + 1)
        if iter_num % log_interval == 0 or iter_num == max_iters - 1:
            log_step(iter_num, lr, loss_sum, n_targets, batches, meter)
        iter_num += 1

    log(f"trained {max_iters} steps in {(time.time() - t_start) / 60:.1f} min; wrote {out_dir}")
    log_exact_match(raw_model, tok, examples, state["exact_match_base"], ctx, iter_num)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    util.run_cli(main)
