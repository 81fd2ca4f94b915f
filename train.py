"""
Fine-tune a LLaMA with MultiLoRA, LoRA or all of its weights (the paper's three arms) on prepared
instruction datasets, in one process, with DDP or with FSDP2. Read it top to bottom: settings, model,
the training step, evaluation, checkpoints, the loop.

    python train.py                     # the embedded default (MultiLoRA on data/tasks); --help: every setting
    python train.py config/tasks_lora.py --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/llama7b_mixture_multilora.py

out_dir gets ckpt.pt (all a resume needs; tensors and plain types only), adapter.safetensors (or hf/
for finetune=full) and metrics.jsonl. A run there is never replaced without --resume or --overwrite;
every check runs before out_dir is touched, a lock keeps a second process out, and a non-finite loss
stops the run, keeping the last good checkpoint (docs/training.md).
"""

import glob
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
from configurator import Rule, S, check_type, configure, declared, resolve
from tokenizer import check_tokenizer, load_tokenizer
from util import UserError

# -----------------------------------------------------------------------------
# settings: the defaults are the embedded default run; override with config/*.py files and --key=value
# I/O
out_dir = S("out/tasks-multilora", None, "where the run's files go")
hf_dir = S("", None, "finetune=full: where the HF-layout weights go (default out_dir/hf)")
ckpt_dir = S(
    "data/tiny_base", None, "base model: Hugging Face (config.json) or Meta (params.json) layout"
)
init_from = S(
    "pretrained",
    lambda v, s: (
        v == "scratch"
        and s["finetune"] != "full"
        and "pretrained, or scratch with finetune=full (an adapter needs a base that is saved somewhere)"
    ),
    "'pretrained' (ckpt_dir) | 'scratch' (random weights, shape from the settings below)",
)
resume = S(False, None, "continue the run saved in out_dir/ckpt.pt")
overwrite = S(False, None, "replace the run in out_dir (a run is never replaced without it)")
eval_interval = S(
    250, "[1, inf)", "evaluate, then checkpoint, every this many steps and at the end"
)
log_interval = S(10, "[1, inf)", "log the training loss every this many steps")
eval_examples = S(50, "[0, inf)", "validation examples per task at each eval (0 = all of them)")
exact_match_examples = S(
    50, "[0, inf)", "test examples per task scored by exact match before and after (0 = skip)"
)
exact_match_max_new_tokens = S(24, "[1, inf)", "tokens generated per exact-match answer")
wandb_log = S(
    False,
    lambda v, s: v and not util.importable("wandb") and "False (wandb is not installed)",
    "log to Weights & Biases (pip install wandb)",
)
wandb_project, wandb_run_name = S("multilora", None, "wandb project"), S("", None, "wandb run name")
# data
datasets = S(
    ["data/tasks"],
    lambda v, s: not v and "at least one directory",
    "prepared datasets (dataset.py's format)",
)
mixture = S("proportional", ("proportional", "equal", "temperature"), "how tasks are sampled")
mixture_temperature = S(
    2.0, "(0, inf)", "'temperature': p_t ∝ n_t^(1/T) (T5, Raffel et al. 2020, §3.5.2)"
)
batch_size = S(32, "[1, inf)", "examples per micro-step per process")
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's process count
gradient_accumulation_steps = S(
    Rule("the number of processes, WORLD_SIZE", lambda s: WORLD_SIZE),
    lambda v, s: (v < 1 or v % WORLD_SIZE) and f"a positive multiple of the {WORLD_SIZE} processes",
    "micro-steps per optimizer step, whole job (each process does 1/N)",
)
pack = S(True, None, "pack each micro-batch's examples into fewer rows (same loss, less padding)")
# fine-tuning
finetune = S("multilora", ("multilora", "lora", "full"), "the paper's three arms")
lora_targets = S(["q", "k", "v", "o"], tuple(multilora.TARGET_MODULES), "projections to adapt")
n_loras = S(4, "[1, inf)", "parallel LoRA modules (MultiLoRA; LoRA is n_loras = 1)")
lora_rank = S(8, "[1, inf)", "rank r of each module")
lora_alpha = S(16.0, "(0, inf)", "the update is scaled by α/r")
lora_dropout = S(0.0, "[0, 1)", "dropout on the adapters' input")
lora_scaling = S(
    "channel", ("channel", "scalar"), "MultiLoRA's s_i: one per output channel, or one per module"
)
lora_init = S(
    "",
    ("", "lora", "multilora"),
    "'' = the arm's own; 'lora' (B = 0, no s) or 'multilora' (random B, s = 0) for the ablations",
)
# model shape for init_from='scratch' (vocabulary and special ids come from the tokenizer)
tokenizer = S("", None, "tokenizer.model (default: ckpt_dir's, or for scratch the dataset's)")
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
lr_decay_iters = S(
    0,
    lambda v, s: not (v == 0 or v > s["warmup_iters"]) and "0 or more than warmup_iters",
    "cosine decay ends here (0 = max_iters)",
)
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
    lambda v, s: (
        v not in ("float32", "bfloat16", "float16")
        and "float32, bfloat16 or float16"
        or v == "float16"
        and not s["device"].startswith("cuda")
        and "float32 or bfloat16 (float16 needs cuda)"
    ),
    "autocast dtype (float16 uses a gradient scaler)",
)
fsdp = S(
    False,
    lambda v, s: (
        v and "RANK" not in os.environ and "False outside torchrun (FSDP shards over processes)"
    ),
    "shard base and adapters with FSDP2 (needs torchrun)",
)
activation_checkpointing = S(False, None, "recompute each block's activations in the backward pass")
loss_chunk = S(
    256,
    "[1, inf)",
    "target tokens per chunk of lm_head + cross-entropy: a chunk's fp32 logits take "
    "loss_chunk·V·4 bytes (131 MB at Llama 3's V = 128,256) instead of N·V·4 for all N targets; "
    "256 rows still make one large matmul",
)
compile = S(False, None, "torch.compile the model")
seed = S(1337, "[0, inf)", "seed of the initialization and the data order")
threads = S(
    1, "[0, inf)", "CPU threads for torch (0 = torch's default); the tiny default is fastest on 1"
)
peak_flops = S(
    Rule("989e12 on cuda, else 1e12", lambda s: 989e12 if on_cuda(s) else 1e12),
    "(0, inf)",
    "per process, for MFU (989e12: H100 bf16 dense)",
)
# -----------------------------------------------------------------------------
SETTINGS = declared(globals())
CHECKPOINT, ADAPTER, METRICS = "ckpt.pt", "adapter.safetensors", "metrics.jsonl"

# -----------------------------------------------------------------------------
# model: base, adapters, precision


def build_model(config, model_config, run_device):
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
    adapter_settings = adapt(model, finetune, dict(lora_settings(), device=run_device))
    model.checkpoint_blocks, model.loss_chunk = activation_checkpointing, loss_chunk
    if fsdp:
        shard(model, torch.device(run_device).type, dist.get_world_size())
    if fsdp and init_from == "pretrained":
        checkpoint.load_into(model, ckpt_dir, run_device)
        if finetune != "full":  # for the adapter file: each rank gives the entries in its rows
            model.base_sample = multilora.base_sample(model)
    return model, adapter_settings


def adapt(model, finetune, lora):
    """finetune='full': every weight trains; otherwise wrap the targets with (Multi)LoRA and freeze
    the rest. Trainable weights in fp32 (bench.py builds its arms with this too). -> adapter settings or None."""
    settings = None if finetune == "full" else multilora.adapt_model(model, finetune, **lora)
    for p in model.parameters():
        if finetune == "full":
            p.requires_grad_(True)
        if p.requires_grad:
            p.data = p.data.float()
    return settings


def autocast_context(device_type, dtype_name):  # bf16/fp16 matmuls; float32: none
    return (
        nullcontext()
        if dtype_name == "float32"
        else torch.autocast(device_type, dtype=getattr(torch, dtype_name))
    )


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


def make_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW over the trainable parameters; weight decay on 2-D weights only (nanoGPT); the fused
    kernel where this torch has one for the device (CUDA, and CPU in recent torch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        g
        for g in (
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        )
        if g["params"]
    ]
    try:
        return torch.optim.AdamW(
            groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu")
        )
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def init_distributed():
    """torchrun sets RANK: one process per GPU (NCCL) or per CPU share (gloo); otherwise one process."""
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
    return ddp, rank, local_rank, world_size, run_device, device_type


def shard(raw_model, device_type, world_size):
    """FSDP2 shards the input embedding, each block, the final norm with lm_head and the root on
    dim 0 over the ranks."""
    import ctypes

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    # all-gather in the compute dtype (one dtype per group, base and adapters), gradients in fp32
    mp = (
        MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        if dtype != "float32"
        else MixedPrecisionPolicy()
    )
    # units as torchtitan's: the input embedding, each block, and the final norm with lm_head, each
    # gathered for its own forward and backward only (the root group, gathered from the forward to
    # the end of the backward, then holds nothing). The loss reads lm_head's weight without calling
    # lm_head: norm's forward gathers the pair, and the root's post-forward reshards a group whose
    # modules did not all run (torch's provision for a chunked loss, in 2.13; a release without it
    # keeps the pair gathered until its backward). A tied embedding is used at both ends of the
    # model, so it stays in the root group with the final norm.
    tied = raw_model.config.tie_embeddings
    units = [raw_model.embed_tokens] if not tied else []
    units += list(raw_model.layers) + ([[raw_model.norm, raw_model.lm_head]] if not tied else [])
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    if device_type == "cpu" and hasattr(ctypes.CDLL(None), "mallopt"):
        # glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
        # the weights each group gathers and frees land in its heap and stay resident; a fixed
        # threshold (M_MMAP_THRESHOLD = -3) gives every buffer of 1 MiB or more back when freed
        ctypes.CDLL(None).mallopt(-3, 1 << 20)
    fully_shard(raw_model, mesh=mesh, mp_policy=mp)


def wrap(raw_model, device_type, world_size, local_rank, ddp):
    """DDP replicates (FSDP2 sharded the model in build_model); torch.compile last."""
    model = raw_model
    if ddp and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
    return torch.compile(model, dynamic=True) if compile else model


# -----------------------------------------------------------------------------
# the training step (bench.py times this same function) and the loss over a split (eval.py's too)


def token_loss_sum(model, x, y, positions=None, segments=None):
    """Σ cross-entropy over the target tokens of one micro-batch (collate's x, y, positions, segments);
    lm_head and the softmax run only where there is a loss, loss_chunk targets at a time."""
    is_target = y != dataset.IGNORE  # (B, T)
    # lm_head and the loss in chunks of loss_chunk targets (llama.chunked_cross_entropy): no (N, V) logits
    return model(
        x, positions=positions, segments=segments, logits_at=is_target, targets=y[is_target]
    ).sum()


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

    loss = Σ (token losses of all micro-steps on all ranks) / n_targets, n_targets being the number of
    target tokens of the whole step, so the result does not depend on how the batch is split into
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
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], grad_clip
        )
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


@torch.no_grad()
def evaluate(
    model,
    splits,
    pools,
    limit,
    batch_size,
    pad_id,
    ctx=nullcontext(),
    rank=0,
    world_size=1,
    pack=True,
):
    """Loss (token-normalized) of each task on its first `limit` examples (0 = all), and of all of
    them together -> (overall, [per task]). Batches are dealt out to the ranks; every rank runs the
    same number of forwards (FSDP needs all ranks in each), the padding ones counting nothing."""
    work = []  # (task index or -1, rows)
    for t, pool in enumerate(pools):
        rows = pool[:limit] if limit > 0 else pool
        work += [(t, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    while len(work) % world_size:
        work.append((-1, work[0][1]))
    device = next(model.parameters()).device
    sums = torch.zeros(
        len(pools), 2, dtype=torch.float64, device=device
    )  # (loss sum, target tokens)
    was_training = model.training
    model.eval()
    for t, rows in work[rank::world_size]:
        x, y, positions, segments = dataset.collate(
            [splits[d].example(i)[:2] for d, i in rows], pad_id, device, pack
        )
        with ctx:
            loss = token_loss_sum(model, x, y, positions, segments)
        if t >= 0:
            sums[t] += torch.stack([loss.double(), (y != dataset.IGNORE).sum().double()])
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    per_task = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    return (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item(), per_task


# -----------------------------------------------------------------------------
# checkpoints: out_dir's policy, the settings of a resume, save, resume

# A resume takes the run's settings from its checkpoint. These may be given anew: where the files
# are (ckpt_dir too: a base of other weights is refused by the sample the run recorded), the run's
# length, learning-rate schedule and clipping, evaluation and logging, and where and how it
# computes (the same math). Any other setting given with another value than the run's is refused.
RESUME_MAY_CHANGE = (
    "out_dir",
    "hf_dir",
    "resume",
    "overwrite",
    "ckpt_dir",
    "max_iters",
    "learning_rate",
    "min_lr",
    "warmup_iters",
    "lr_decay_iters",
    "grad_clip",
    "eval_interval",
    "log_interval",
    "eval_examples",
    "exact_match_examples",
    "exact_match_max_new_tokens",
    "wandb_log",
    "wandb_project",
    "wandb_run_name",
    "device",
    "compile",
    "activation_checkpointing",
    "loss_chunk",
    "threads",
    "peak_flops",
)


def configure_run(argv):
    """The settings: argv's, or for --resume=True the checkpoint's, which argv may change only in
    RESUME_MAY_CHANGE (one line names any other that differs). -> {name: value}"""
    if "-h" in argv or "--help" in argv:
        return configure(SETTINGS, argv, "train.py")
    # first the types only, to find the checkpoint
    given = configure({k: S(s.default) for k, s in SETTINGS.items()}, argv, "train.py")
    path = os.path.join(given["out_dir"], CHECKPOINT)
    if not given["resume"] or not os.path.isfile(path):
        return configure(SETTINGS, argv, "train.py")  # no checkpoint: check_out_dir says so
    saved = train_state.read(path, mmap=True)["settings"]
    own = ("out_dir", "resume", "overwrite")  # this command's, never the checkpoint's
    typed = resolve(SETTINGS, {k: s.default for k, s in SETTINGS.items()})  # rules' types
    run = {
        k: S(
            check_type(f"{path}: settings", k, saved[k], typed[k])
            if k in saved and k not in own
            else s.default,
            s.allowed,
            s.help,
        )
        for k, s in SETTINGS.items()
    }
    try:
        config = configure(run, argv, "train.py")
    except UserError as e:
        raise UserError(str(e).replace(" (its default)", f" (the run's, in {path})")) from None
    refused = [k for k in SETTINGS if k not in RESUME_MAY_CHANGE and config[k] != run[k].default]
    if refused:
        raise UserError(
            f"{path}: resume: cannot change "
            + ", ".join(
                f"{k} (the run has {run[k].default!r}, given {config[k]!r})" for k in refused
            )
            + "; leave them out to take the run's, or start a new run in another out_dir"
        )
    return config


def check_out_dir(hf_path):
    """Refuse an out_dir that holds a run unless resume or overwrite; -> the run's files found."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: out_dir is a file, expected a directory")
    found = [os.path.join(out_dir, f) for f in (CHECKPOINT, ADAPTER, METRICS)] + [
        os.path.join(hf_path, "model.safetensors")
    ]
    found = [f for f in found if os.path.exists(f)]
    found += sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt.step*.rank*-of-*.pt")))
    if resume and os.path.join(out_dir, CHECKPOINT) not in found:
        raise UserError(
            f"{os.path.join(out_dir, CHECKPOINT)}: resume=True but there is no checkpoint to resume from"
        )
    if found and not resume and not overwrite:
        raise UserError(
            f"{out_dir}: holds a run ({', '.join(found)}); continue it with --resume=True "
            f"or replace it with --overwrite=True"
        )
    return found


def base_identity(raw_model):
    """What a checkpoint records of the frozen base (adapters only): its fingerprint, sample."""
    if finetune == "full":
        return {}
    return {
        "base_fingerprint": multilora.base_fingerprint(raw_model),
        "base_sample": list(getattr(raw_model, "base_sample", None) or []),
    }


def read_checkpoint(config, model, world_size):
    """ckpt.pt (train_state.read: weights_only=True, every key checked), checked against this run:
    the process layout, the base (the sample the run recorded), its weights loaded into model (under
    FSDP each rank reads its own shard later, in restore). -> (ckpt, settings changed)."""
    path = os.path.join(out_dir, CHECKPOINT)
    ckpt = train_state.read(path)
    saved = ckpt["settings"]
    if saved.get("fsdp") != fsdp or ckpt["world_size"] != world_size and fsdp:
        raise UserError(
            f"{path}: saved with fsdp={saved.get('fsdp')} on {ckpt['world_size']} processes; resume it the same way"
        )
    here = base_identity(model)
    if here and ckpt.get("base_fingerprint") not in (None, here["base_fingerprint"]):
        raise UserError(
            f"{path}: base_fingerprint: the run was trained on a base of other shapes "
            f"than {ckpt_dir}'s ({multilora.base_summary(model)}); resume with the "
            f"run's ckpt_dir"
        )
    if (
        here
        and ckpt.get("base_sample")
        and here["base_sample"]
        and not multilora.same_base_sample(ckpt["base_sample"], here["base_sample"])
    ):
        raise UserError(
            f"{path}: base_sample: the run was trained on a base of the same shapes "
            f"but other weights than {ckpt_dir}'s; resume with the run's ckpt_dir"
        )
    if "model" in ckpt:
        try:
            missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as e:  # shapes differ: other adapter settings than the checkpoint's
            raise UserError(
                f"{path}: model state does not fit this model: {str(e).splitlines()[-1].strip()}"
            ) from None
        if unexpected or (finetune == "full" and missing):
            raise UserError(
                f"{path}: model state does not fit this model "
                f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
            )
    changed = sorted(
        k
        for k in config
        if k not in ("resume", "overwrite", "out_dir") and saved.get(k) != config[k]
    )
    return ckpt, changed


def restore(ckpt, raw_model, model, optimizer, scaler, rank, world_size):
    """The optimizer (and scaler) state, under FSDP with this rank's shard of the weights, and this
    rank's RNG stream (when the process count is the same)."""
    if "shards" in ckpt:
        train_state.load(out_dir, ckpt, raw_model, optimizer)
    elif fsdp:  # a checkpoint written whole under FSDP (before sharded checkpoints)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model,
            optimizer,
            optim_state_dict=ckpt["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if ckpt["rng"][rank]["cuda"] is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])


def save(
    state,
    raw_model,
    model,
    optimizer,
    model_config,
    tokenizer_path,
    adapter_settings,
    ddp,
    world_size,
):
    """The checkpoint, then the adapter (or hf/) from the same state: every rank calls (collectives
    inside). Under FSDP each rank writes its own shard and rank 0 commits (train_state.save);
    otherwise rank 0 writes ckpt.pt whole. The exports are written before the commit: a failure
    (disk full) changes neither, and a resume rewrites them from the checkpoint."""
    rngs = [
        {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state()
            if torch.cuda.is_available() and device.startswith("cuda")
            else None,
        }
    ] * world_size
    if ddp:
        dist.all_gather_object(rngs, rngs[0])
    master = not ddp or dist.get_rank() == 0
    common = {
        **state,
        "rng": rngs,
        "world_size": world_size,
        "adapter_settings": adapter_settings,
        "model_config": checkpoint.config_to_hf(model_config),
        **base_identity(raw_model),
    }

    def exports():
        write_weights(
            state["iter_num"], raw_model, model_config, tokenizer_path, adapter_settings, master
        )

    if fsdp:
        return train_state.save(out_dir, CHECKPOINT, common, raw_model, optimizer, exports)
    full = finetune == "full"
    weights = raw_model.state_dict() if full else multilora.adapter_state_dict(raw_model)
    if master:
        with util.atomic_write(os.path.join(out_dir, CHECKPOINT)) as tmp:
            torch.save(
                {
                    **common,
                    "model": {k: v.detach().cpu() for k, v in weights.items()},
                    "optimizer": optimizer.state_dict(),
                },
                tmp,
            )
            exports()
    if ddp:
        dist.barrier()


def write_weights(
    step, raw_model, model_config, tokenizer_path, adapter_settings, master, only_if_stale=False
):
    """The adapter, or the HF-layout weights for finetune=full, tagged with their step. Under FSDP
    every rank calls and rank 0 writes, gathering one tensor at a time (gather_to_rank0)."""
    if not fsdp and not master:
        return
    hf_path = hf_dir or os.path.join(out_dir, "hf")
    path = (
        os.path.join(hf_path, "model.safetensors")
        if finetune == "full"
        else os.path.join(out_dir, ADAPTER)
    )
    if only_if_stale:  # rank 0 decides, for every rank
        stale = torch.tensor(
            [int(master and checkpoint.saved_step(path) != step)],
            device=next(raw_model.parameters()).device,
        )
        if fsdp:
            dist.all_reduce(stale)
        if not stale.item():
            return
    if fsdp:
        train_state.reshard(raw_model)
    gather = train_state.gather_to_rank0 if fsdp else None
    if finetune == "full":
        checkpoint.save_hf_checkpoint(
            raw_model.state_dict(),
            hf_path,
            config=model_config,
            tokenizer_path=tokenizer_path,
            step=step,
            gather=gather,
            writer=master,
        )
    else:
        state = multilora.adapter_state_dict(raw_model)
        if gather:  # small: the whole adapter, on rank 0 only
            state = {k: gather(v) for k, v in state.items()}
        if master:
            multilora.save_adapter(raw_model, path, adapter_settings, state=state, step=step)


# -----------------------------------------------------------------------------


def load_data_and_config():
    """Every input read and checked, nothing written: -> (train splits, val splits, model config, tokenizer, its path)."""
    train_splits = dataset.load_splits(datasets, "train")
    val_splits = dataset.load_splits(datasets, "val")
    meta = train_splits[0].meta
    if init_from == "scratch":
        tokenizer_path = tokenizer or meta.get("tokenizer", "")
        tok = load_tokenizer(tokenizer_path)
        model_config = llama.LlamaConfig(
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
    else:
        model_config = checkpoint.read_config(ckpt_dir)
        tokenizer_path = tokenizer or os.path.join(ckpt_dir, "tokenizer.model")
        tok = (
            load_tokenizer(tokenizer_path) if tokenizer or os.path.exists(tokenizer_path) else None
        )
        if tok is not None:
            check_tokenizer(tok, model_config, ckpt_dir)
    if meta.get("vocab_size") != model_config.vocab_size:
        raise UserError(
            f"{datasets[0]}: meta.json: vocab_size {meta.get('vocab_size')} does not match the model's "
            f"{model_config.vocab_size}; prepare the data with the model's tokenizer"
        )
    longest, where = max(
        (int(s.lengths.max()), d) for s, d in zip(train_splits + val_splits, datasets * 2)
    )
    if longest - 1 > model_config.max_seq_len:  # an example's last token is only a target
        ctx = model_config.max_seq_len
        longer = (
            f"train with --max_seq_len={longest - 1}"
            if init_from == "scratch"
            else "use a base with a longer context"
        )
        raise UserError(
            f"{where}: examples of up to {longest} tokens exceed the model's context of {ctx} "
            f"(max_seq_len): prepare the data with --max_len={ctx}, or {longer}"
        )
    if (
        finetune != "full"
    ):  # n·r larger than a layer, an unknown target: on a weightless copy, before loading
        with torch.device("meta"):
            try:
                multilora.adapt_model(llama.Llama(model_config), finetune, **lora_settings())
            except UserError as e:
                raise UserError(
                    f"{ckpt_dir if init_from == 'pretrained' else 'init_from=scratch'}: {e}"
                ) from None
    return train_splits, val_splits, model_config, tok, tokenizer_path if tok is not None else None


def main(argv=None):
    config = configure_run(sys.argv[1:] if argv is None else argv)  # a resume: the run's settings
    globals().update(config)  # nanoGPT style: below, the settings are read as plain names
    if threads > 0:
        torch.set_num_threads(threads)
    ddp, rank, local_rank, world_size, run_device, device_type = init_distributed()
    master = rank == 0

    def log(*args):
        print(*args, flush=True) if master else None

    from eval import exact_match_report, score_exact_match  # here: eval.py imports this file

    # every check before out_dir is touched: settings (above), data, tokenizer, model, adapter, checkpoint
    hf_path = hf_dir or os.path.join(out_dir, "hf")
    found = check_out_dir(hf_path)
    train_splits, val_splits, model_config, tok, tokenizer_path = load_data_and_config()
    log("settings: " + json.dumps(config))
    raw_model, adapter_settings = build_model(config, model_config, run_device)
    trainable, base_total = multilora.count_trainable(raw_model)
    scale = (
        f", α/r = {lora_alpha:g}/{lora_rank} = {lora_alpha / lora_rank:g}"
        if finetune != "full"
        else ""
    )
    log(
        f"model: {base_total / 1e6:.2f}M parameters, {finetune}: {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / base_total:.2f}%){scale}"
    )
    ckpt, changed = read_checkpoint(config, raw_model, world_size) if resume else (None, [])
    if changed:
        log(f"resume: settings differ from the checkpoint's: {', '.join(changed)}")

    # now out_dir is ours: lock it (held until the process ends), clear what --overwrite replaces
    if master:
        os.makedirs(out_dir, exist_ok=True)
        lock = util.lock_folder(out_dir)  # noqa: F841
        util.remove_stale_tmp(out_dir)  # leftovers of killed writes
        for f in found if overwrite and not resume else []:
            os.remove(f)
    if ddp:
        dist.barrier()
    model = wrap(raw_model, device_type, world_size, local_rank, ddp)
    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    ctx = autocast_context(device_type, dtype)

    # data: the task mixture
    task_names, pools = dataset.task_pools(train_splits)
    weights = dataset.mixture_weights([len(p) for p in pools], mixture, mixture_temperature)
    val_names, val_pools = dataset.task_pools(val_splits)
    log(
        "tasks: "
        + ", ".join(
            f"{n} ({len(p)} examples, p={w:.3f})" for n, p, w in zip(task_names, pools, weights)
        )
    )
    pad_id = model_config.eos_id[0]  # any id: padding is never a target and never attended to

    # state: fresh, or from the checkpoint
    metrics_path = os.path.join(out_dir, METRICS)
    examples_em = (
        dataset.test_examples(datasets, exact_match_examples) if exact_match_examples > 0 else []
    )
    can_score = bool(examples_em) and not fsdp and tok is not None
    state = {
        "settings": config,
        "iter_num": 0,
        "data_position": [0] * len(pools),
        "metrics_lines": 0,
        "exact_match_base": None,
    }
    torch.manual_seed(seed + rank)  # dropout differs per rank
    if ckpt is not None:
        state = {k: ckpt[k] for k in state} | {"settings": config}
        if len(state["data_position"]) != len(pools):
            got = len(state["data_position"])
            raise UserError(
                f"{os.path.join(out_dir, CHECKPOINT)}: data_position: expected "
                f"{len(pools)} counts (one per task), got {got}"
            )
        restore(ckpt, raw_model, model, optimizer, scaler, rank, world_size)
        for key in ("model", "optimizer"):  # in the model and optimizer now: not kept twice
            ckpt.pop(key, None)
        if master:  # the metrics and the adapter (or hf/) as of the checkpoint: a crash may have left either ahead
            lines = (
                open(metrics_path).readlines()[: state["metrics_lines"]]
                if os.path.exists(metrics_path)
                else []
            )
            util.write_text(metrics_path, "".join(lines))
        write_weights(
            state["iter_num"],
            raw_model,
            model_config,
            tokenizer_path,
            adapter_settings,
            master,
            only_if_stale=True,
        )
        log(f"resumed from {os.path.join(out_dir, CHECKPOINT)} at step {state['iter_num']}")
    elif master and can_score:
        with ctx:
            state["exact_match_base"] = score_exact_match(
                raw_model, tok, examples_em, exact_match_max_new_tokens, batch_size
            )
    if wandb_log and master:
        import wandb

        wandb.init(
            project=wandb_project, name=wandb_run_name or None, config=config, resume="allow"
        )

    def write_metrics(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_log:
                wandb.log(record, step=record["iter"])

    def stop_if_diverged(what, value):
        if not math.isfinite(value):
            kept = (
                f"{out_dir} keeps the checkpoint of step {state['iter_num']}"
                if state["iter_num"]
                else "nothing was saved"
            )
            raise UserError(
                f"step {iter_num}: {what} is {value}: the run diverged (try a lower learning_rate); {kept}"
            )

    # the loop (as nanoGPT's): evaluate and checkpoint at step 0, every eval_interval and at the end
    iter_num = state["iter_num"]
    n_rows = gradient_accumulation_steps * batch_size
    t_last, tokens_since, steps_since, t_start = time.time(), 0, 0, time.time()
    just_resumed = ckpt is not None
    while True:
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not just_resumed:
            t_eval = time.time()
            val_loss, per_task = evaluate(
                model,
                val_splits,
                val_pools,
                eval_examples,
                batch_size,
                pad_id,
                ctx,
                rank,
                world_size,
                pack,
            )
            stop_if_diverged("the validation loss", val_loss)
            log(
                f"step {iter_num}: val loss {val_loss:.4f} ("
                + ", ".join(f"{n} {v:.3f}" for n, v in zip(val_names, per_task))
                + ")"
            )
            write_metrics(
                {
                    "iter": iter_num,
                    "val_loss": val_loss,
                    **{f"val_loss/{n}": v for n, v in zip(val_names, per_task)},
                }
            )
            if iter_num > 0:
                state.update(
                    iter_num=iter_num,
                    metrics_lines=sum(1 for _ in open(metrics_path)) if master else 0,
                )
                save(
                    state | {"scaler": scaler.state_dict() if scaler else None},
                    raw_model,
                    model,
                    optimizer,
                    model_config,
                    tokenizer_path,
                    adapter_settings,
                    ddp,
                    world_size,
                )
            t_last += time.time() - t_eval  # tokens/s counts training time only
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
        loss_sum = train_step(
            model,
            optimizer,
            batches,
            int(counts[0]),
            world_size,
            ctx,
            scaler,
            grad_clip,
            ddp=ddp and not fsdp,
            fsdp=fsdp,
        )
        tokens_since, steps_since = tokens_since + int(counts[1]), steps_since + 1
        if iter_num % log_interval == 0 or iter_num == max_iters - 1:
            if ddp:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / max(int(counts[0]), 1)
            stop_if_diverged("the training loss", train_loss)
            now = time.time()
            tokens_per_s = tokens_since / (now - t_last)
            seq_len = max(b[0].shape[1] for b in batches)  # attention span of a row (x is first)
            mfu = (
                util.flops_per_token(model_config, trainable, finetune, seq_len)
                * tokens_per_s
                / (peak_flops * world_size)
            )
            eta = (now - t_last) / steps_since * (max_iters - iter_num - 1)
            mem = util.peak_memory_bytes(device_type)
            log(
                f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s, mfu {100 * mfu:.2f}%, "
                f"mem {mem / 2**20:,.0f} MiB, eta {eta / 60:.1f} min"
            )
            write_metrics(
                {
                    "iter": iter_num,
                    "train_loss": train_loss,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                    "peak_mem_bytes": mem,
                }
            )
            t_last, tokens_since, steps_since = now, 0, 0
        iter_num += 1

    log(f"trained {max_iters} steps in {(time.time() - t_start) / 60:.1f} min; wrote {out_dir}")
    if can_score and master:
        with ctx:
            tuned = score_exact_match(
                raw_model, tok, examples_em, exact_match_max_new_tokens, batch_size
            )
        record = exact_match_report(state["exact_match_base"] or {}, tuned, exact_match_examples)
        write_metrics({"iter": iter_num, **record})
        print(
            f"adapter: {os.path.join(out_dir, ADAPTER)}"
            if finetune != "full"
            else f"weights: {hf_path}"
        )
        print(
            f"exact match: base {100 * record['exact_match_base']:.1f}% -> tuned {100 * record['exact_match']:.1f}%"
        )
    elif exact_match_examples > 0 and fsdp:
        log("exact match: skipped under FSDP (score the result with eval.py --task=exact_match)")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    util.run_cli(main)
