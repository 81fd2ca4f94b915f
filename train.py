"""
Fine-tune a LLaMA with MultiLoRA, LoRA or all of its weights (the paper's three arms) on prepared
instruction datasets, in one process, with DDP or with FSDP2. Read it top to bottom: settings, data,
model, the training step, the loop.

    python train.py                                     # the embedded default (MultiLoRA on data/tasks)
    python train.py config/tasks_lora.py --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/llama7b_mixture_multilora.py
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py ...

What it writes to out_dir:
    ckpt.pt              everything a resume needs (settings, adapter or all weights, optimizer, RNG
                         states, step, data position), written atomically at every eval and at the end
    adapter.safetensors  the adapter (LoRA/MultiLoRA), multilora.py's file format, at every checkpoint
    hf/                  finetune=full: a Hugging Face-layout checkpoint usable as ckpt_dir (or hf_dir)
    metrics.jsonl        one JSON object per log line and per eval
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dataset
import llama
import multilora
from configurator import configure

# -----------------------------------------------------------------------------
# settings: the defaults are the embedded default run; override with a config/*.py file and --key=value
# I/O
out_dir = "out/tasks-multilora"
hf_dir = ""                       # finetune=full: where the HF-layout weights go (default out_dir/hf)
ckpt_dir = "data/tiny_base"       # base model, Hugging Face (config.json) or Meta (params.json) layout
init_from = "pretrained"          # 'pretrained' (ckpt_dir) | 'scratch' (random, shape from the settings below)
resume = False                    # continue the run saved in out_dir/ckpt.pt (all other settings the same)
eval_interval = 250               # evaluate, then checkpoint, every this many steps and at the end
log_interval = 10
eval_examples = 50                # validation examples per task at each eval (0 = all of them)
exact_match_examples = 50         # test examples per task scored by exact match before and after (0 = skip)
exact_match_max_new_tokens = 24
wandb_log = False                 # needs `pip install wandb`
wandb_project = "multilora"
wandb_run_name = ""
# data
datasets = ["data/tasks"]         # prepared dataset directories (dataset.py's format)
mixture = "proportional"          # task sampling weights: 'proportional' | 'equal' | 'temperature'
mixture_temperature = 2.0         # 'temperature': p_t ∝ n_t^(1/T) (T5, Raffel et al. 2020, §3.5.2)
batch_size = 32                   # examples per micro-step per process
gradient_accumulation_steps = 1   # micro-steps per optimizer step for the WHOLE job, split over processes
pack = True                       # pack each micro-batch's examples into fewer rows (same loss, less padding)
# fine-tuning
finetune = "multilora"            # 'multilora' | 'lora' | 'full'
lora_targets = ["q", "k", "v", "o"]  # from q,k,v,o,gate,up,down
n_loras = 4                       # parallel LoRA modules (MultiLoRA; LoRA is n_loras = 1)
lora_rank = 8                     # rank r of each module
lora_alpha = 16.0                 # scale α/r
lora_dropout = 0.0
lora_scaling = "channel"          # MultiLoRA's s_i: 'channel' (one per output) | 'scalar' (one per module)
lora_init = ""                    # '' = the finetune's own | 'lora' (B = 0, no s) | 'multilora' (random B, s = 0): ablations
# model shape for init_from='scratch' (vocabulary and special ids come from the tokenizer)
tokenizer = ""                    # tokenizer.model for init_from='scratch' (default: the dataset's)
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
hidden_dim = 352
max_seq_len = 256
rope_theta = 10000.0
tie_embeddings = True
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 3e-3
max_iters = 1000
weight_decay = 0.0                # applied to 2-D weights only (nanoGPT's rule)
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0                   # 0 = off
warmup_iters = 20
lr_decay_iters = 0                # 0 = max_iters
min_lr = 3e-4
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast: 'bfloat16' | 'float16' (GradScaler) | 'float32'
fsdp = False                      # shard base and adapters with FSDP2 (needs torchrun)
activation_checkpointing = False  # recompute each block's activations in the backward pass
compile = False                   # torch.compile the model
seed = 1337
threads = 1                       # CPU threads for torch (0 = torch's default); the tiny default is fastest on 1
peak_flops = 989e12 if torch.cuda.is_available() else 1e12  # per process, for MFU (989e12: H100 bf16 dense)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))}

CHECKPOINT = "ckpt.pt"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
IGNORE = -100  # target id of positions without loss (prompt, padding): F.cross_entropy's ignore_index


# -----------------------------------------------------------------------------
# data: prepared splits, a task mixture, micro-batches

def load_splits(dataset_dirs, split):
    """One dataset.PreparedSplit per directory; a missing or empty one is a UserError."""
    if not dataset_dirs:
        raise llama.UserError("datasets: expected at least one prepared dataset directory")
    splits = []
    for d in dataset_dirs:
        if not os.path.isdir(d):
            raise llama.UserError(f"{d}: dataset directory not found (datasets setting)")
        s = dataset.load_dataset(d, split)
        if len(s) == 0:
            raise llama.UserError(f"{d}: {split} split is empty")
        splits.append(s)
    return splits


def task_pools(splits):
    """Group the examples of all splits by task name -> (names, pools); pools[t] is an (n_t, 2) int64
    array of (dataset index, example index). A task present in two datasets is one task."""
    names, parts = [], []
    for d, s in enumerate(splits):
        task_of = np.asarray(s.task)
        for j, name in enumerate(s.tasks):
            idx = np.flatnonzero(task_of == j)
            if len(idx) == 0:
                continue
            if name not in names:
                names.append(name)
                parts.append([])
            parts[names.index(name)].append(np.stack([np.full(len(idx), d), idx], axis=1))
    return names, [np.concatenate(p).astype(np.int64) for p in parts]


def mixture_weights(sizes, mixture, temperature):
    """Sampling probability of each task from its number of training examples."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if mixture == "proportional":
        w = sizes
    elif mixture == "equal":
        w = np.ones_like(sizes)
    else:  # 'temperature': T = 1 is proportional, T -> infinity is equal
        w = sizes ** (1.0 / temperature)
    return w / w.sum()


@lru_cache(maxsize=64)
def epoch_order(seed, task, epoch, n):
    return np.random.default_rng([seed, 1, task, epoch]).permutation(n)


def sample_examples(pools, weights, position, n, seed, iter_num):
    """The n examples of one optimizer step of the whole job, as (dataset index, example index) rows.
    Each slot's task is drawn with the mixture weights from an RNG seeded by (seed, iter_num); within
    a task, examples come in the order of a per-epoch permutation, so the data position is just the
    number taken from each task so far: `position` (updated in place) goes into the checkpoint."""
    tasks = np.random.default_rng([seed, 0, iter_num]).choice(len(pools), size=n, p=weights)
    rows = []
    for t in tasks:
        epoch, k = divmod(position[t], len(pools[t]))
        rows.append(pools[t][epoch_order(seed, int(t), epoch, len(pools[t]))[k]])
        position[t] += 1
    return rows


def first_fit(lengths, capacity):
    """Bin packing, first-fit decreasing: -> rows, each a list of indices into lengths whose sum
    is at most capacity (no single length may exceed it). Few rows, not always the fewest (that is
    NP-hard); deterministic: ties keep their order."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(examples, pad_id, device, pack=False):
    """[(ids, mask)] -> (x, y, positions, segments): x (R, T) inputs, y (R, T) targets.
    Token j is predicted from tokens < j: x = ids[:-1], y = ids[1:] where mask[1:] = 1 (response
    and EOS), IGNORE elsewhere (prompt, padding), so prompt tokens contribute nothing to the loss.

    Unpacked (positions, segments None): one example per row, right-padded to the longest; right
    padding needs no attention mask, as a causal model never looks at later positions.
    Packed: the examples go end to end into fewer rows of that same length T (first_fit; no
    example is split), each with RoPE positions 0..n-1 and its own segment id, so
    that the model's block-diagonal mask gives every example exactly the logits it gets alone.
    Same loss, same gradients, far fewer padded positions when lengths vary (Alpaca: 63% of a
    padded batch of 32 is padding). When nothing shares a row, the plain padded batch is returned."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    T = max(lengths)
    rows = [[i] for i in range(len(examples))]  # one example per row
    if pack:
        rows = first_fit(lengths, T)
    packed = len(rows) < len(examples)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), T), dtype=np.int64)
    segments = np.full((len(rows), T), -1, dtype=np.int64)  # padding: a segment of its own
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            (ids, mask), end = examples[i], start + lengths[i]
            x[r, start:end] = ids[:-1]
            y[r, start:end] = np.where(mask[1:] == 1, ids[1:], IGNORE)
            positions[r, start:end] = np.arange(lengths[i])
            segments[r, start:end] = k
            start = end
    arrays = (x, y, positions, segments) if packed else (x, y)
    if str(device).startswith("cuda"):
        tensors = [torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays]
    else:
        tensors = [torch.from_numpy(a).to(device) for a in arrays]
    return tuple(tensors) if packed else (*tensors, None, None)


def micro_batches(splits, rows, batch_size, rank, world_size, pad_id, device, pack=False):
    """Cut one step's examples into micro-batches of batch_size; this process takes its contiguous
    share (micro-step g of the job is on rank g // (steps / world_size)), so 1 or N processes see the
    same global batch in the same micro-batches. -> ([collate's (x, y, positions, segments)], target
    tokens, input tokens without padding), the counts taken on the host so that they cost no device
    synchronization."""
    groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    per_rank = len(groups) // world_size
    examples = [[splits[d].example(i)[:2] for d, i in g] for g in groups[rank * per_rank:(rank + 1) * per_rank]]
    n_targets = sum(int(mask[1:].sum()) for g in examples for _, mask in g)
    n_tokens = sum(len(ids) - 1 for g in examples for ids, _ in g)
    return [collate(g, pad_id, device, pack) for g in examples], n_targets, n_tokens


# -----------------------------------------------------------------------------
# model: base, adapters, precision

def read_base_config(ckpt_dir):
    """The LlamaConfig of a checkpoint directory, and whether its weights are there, without loading them."""
    layout = llama.checkpoint_layout(ckpt_dir)
    config, _ = (llama._hf_source if layout == "hf" else llama._meta_source)(ckpt_dir)
    return config


def check_adapter_fits(config, finetune, lora_settings, where):
    """Raise the adapter's UserError (n·r larger than a layer, unknown target) before any weight is
    loaded, by adapting a weightless copy of the model on the meta device."""
    if finetune == "full":
        return
    with torch.device("meta"):
        try:
            multilora.adapt_model(llama.Llama(config), finetune, **lora_settings)
        except llama.UserError as e:
            raise llama.UserError(f"{where}: {e}") from None


def adapt(model, finetune, lora_settings):
    """finetune='full': every weight trains, returns None. Otherwise wrap the targets with (Multi)LoRA,
    freeze the rest, and return the adapter settings (what goes into adapter files)."""
    if finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    return multilora.adapt_model(model, finetune, **lora_settings)


def make_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW over the trainable parameters; weight decay on 2-D weights only (nanoGPT); the fused
    kernel where this torch has one for the device (CUDA, and CPU in recent torch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def autocast_context(device_type, dtype_name):
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name))


def flops_per_token(config, trainable, finetune, seq_len):
    """Training FLOPs per token (PaLM appendix B / nanoGPT's estimate_mfu): the forward pass costs 2
    per weight and the backward pass 2 for the input gradients, +2 for the weight gradients only where
    weights train (all for 'full', the adapters otherwise); attention scores add 12·L·H·hd·T. lm_head
    is counted at every position, as model FLOPs are, though train_step runs it at the targets only."""
    c = config
    per_layer = (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)) + 3 * c.dim * c.hidden_dim
    base = c.n_layers * per_layer + c.dim * c.vocab_size  # matmul weights (lm_head included)
    weights = 6 * base if finetune == "full" else 4 * base + 6 * trainable
    return weights + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def peak_memory_bytes(device_type):
    """Peak GPU memory allocated by torch, or on CPU the peak resident set size of this process."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -----------------------------------------------------------------------------
# the training step (bench.py runs this same function)

def train_step(model, optimizer, batches, n_targets, world_size=1, autocast_ctx=nullcontext(), scaler=None,
               grad_clip=0.0, ddp=False, fsdp=False):
    """One optimizer step over this process's micro-batches [(x, y, positions, segments)] (collate's).

    loss = Σ (token losses of all micro-steps on all ranks) / n_targets, n_targets being the number of
    target tokens of the whole step (all-reduced before the step), so the result does not depend on
    how the batch is split into micro-steps or processes (a mean of per-batch means would). DDP and
    FSDP average gradients over ranks, hence the factor world_size. Gradients are synchronized only
    on the last micro-step. Returns this process's summed token loss (a detached tensor)."""
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, (x, y, positions, segments) in enumerate(batches):
        last = i == len(batches) - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
        with model.no_sync() if ddp and not last else nullcontext():
            is_target = y != IGNORE  # (B, T)
            with autocast_ctx:
                # (N, V): lm_head only where there is a loss
                logits = model(x, positions=positions, segments=segments, logits_at=is_target)
            token_loss = F.cross_entropy(logits.float(), y[is_target], reduction="sum")
            loss = token_loss * (world_size / max(n_targets, 1))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += token_loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
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
def evaluate(model, splits, pools, eval_examples, batch_size, pad_id, device, autocast_ctx, rank, world_size,
             pack=False):
    """Validation loss (token-normalized) of each task on its first eval_examples examples, and of all
    of them together -> (overall, [per task]). Batches are dealt out to the ranks; every rank runs
    the same number of forwards (FSDP needs all ranks in each), the padding ones counting nothing."""
    work = []  # (task index or -1, rows)
    for t, pool in enumerate(pools):
        rows = pool[:eval_examples] if eval_examples > 0 else pool
        work += [(t, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    while len(work) % world_size:
        work.append((-1, work[0][1]))
    sums = torch.zeros(len(pools), 2, dtype=torch.float64, device=device)  # (loss sum, target tokens)
    model.eval()
    for t, rows in work[rank::world_size]:
        x, y, positions, segments = collate([splits[d].example(i)[:2] for d, i in rows], pad_id, device, pack)
        is_target = y != IGNORE
        with autocast_ctx:
            logits = model(x, positions=positions, segments=segments, logits_at=is_target)  # (N, V)
        if t >= 0:
            sums[t, 0] += F.cross_entropy(logits.float(), y[is_target], reduction="sum").double()
            sums[t, 1] += is_target.sum()
    model.train()
    if world_size > 1:
        dist.all_reduce(sums)
    per_task = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    return (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item(), per_task


# -----------------------------------------------------------------------------
# checkpoints

def full_tensor(t):
    """A plain CPU tensor; an FSDP2 shard (DTensor) is all-gathered first (a collective: every rank calls)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu()


def trained_state(raw_model, finetune):
    """What the run has changed: all weights for 'full', the lora_ tensors otherwise."""
    state = raw_model.state_dict() if finetune == "full" else multilora.adapter_state_dict(raw_model)
    return {k: full_tensor(v) for k, v in state.items()}


def write_checkpoint(path, checkpoint):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the previous checkpoint whole.
    MULTILORA_TEST_KILL_IN_CHECKPOINT=<iter> (tests only) dies with SIGKILL half-way through that
    iteration's write, leaving a torn temporary file behind."""
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    if os.environ.get("MULTILORA_TEST_KILL_IN_CHECKPOINT") == str(checkpoint["iter_num"]):
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def keep_lines(path, n):
    """Truncate a JSON-lines file to its first n lines (atomically)."""
    lines = open(path).readlines()[:n] if os.path.exists(path) else []
    llama.write_text_atomic(path, "".join(lines))


# -----------------------------------------------------------------------------
# exact match on the test split (the embedded default's before/after figure)

def exact_match_examples_of(dataset_dirs, per_task):
    """The first per_task raw test examples of each task, from each dataset's test.jsonl (if any)."""
    chosen, counts = [], {}
    for d in dataset_dirs:
        if not os.path.exists(os.path.join(d, "test.jsonl")):
            continue
        for r in dataset.read_examples(d, "test"):
            if counts.get(r["task"], 0) < per_task:
                counts[r["task"]] = counts.get(r["task"], 0) + 1
                chosen.append(r)
    return chosen


def score(model, tokenizer, examples, max_new_tokens, autocast_ctx, batch_size):
    """{task: exact-match accuracy in [0, 1]}: eval.py's scoring (greedy, in eval mode, mode restored after)."""
    from eval import score_exact_match
    with autocast_ctx:
        return score_exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)


# -----------------------------------------------------------------------------

def main(argv=None):
    config = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv)
    globals().update(config)  # nanoGPT style: below, the settings are read as plain names
    if threads > 0:
        torch.set_num_threads(threads)

    # distributed: torchrun sets RANK; gloo on CPU, NCCL on GPUs
    ddp = int(os.environ.get("RANK", -1)) != -1
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        run_device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(run_device)
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=torch.device(run_device))
        else:
            dist.init_process_group(backend="gloo")
    else:
        rank, world_size, run_device = 0, 1, device
    master = rank == 0

    def log(*args):
        if master:
            print(*args, flush=True)

    # fail early: everything a user can get wrong is checked before the model is loaded
    choices = {"finetune": ("multilora", "lora", "full"), "init_from": ("pretrained", "scratch"),
               "mixture": ("proportional", "equal", "temperature"), "dtype": ("float32", "bfloat16", "float16"),
               "lora_scaling": ("channel", "scalar"), "lora_init": ("", "lora", "multilora")}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise llama.UserError(f"{key}: expected one of {', '.join(allowed)}, got {config[key]!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "log_interval"):
        if config[key] < (0 if key == "max_iters" else 1):
            raise llama.UserError(f"{key}: expected a positive number, got {config[key]}")
    if gradient_accumulation_steps % world_size:
        raise llama.UserError(f"gradient_accumulation_steps: {gradient_accumulation_steps} micro-steps cannot be "
                              f"split evenly over {world_size} processes")
    if fsdp and not ddp:
        raise llama.UserError("fsdp: FSDP shards over processes; launch with torchrun (RANK is not set)")
    if dtype == "float16" and device_type != "cuda":
        raise llama.UserError("dtype: float16 with a gradient scaler needs device=cuda; use bfloat16 or float32 on CPU")
    if wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise llama.UserError("wandb_log: True but wandb is not installed (pip install wandb)") from None
    if mixture == "temperature" and mixture_temperature <= 0:
        raise llama.UserError(f"mixture_temperature: expected > 0, got {mixture_temperature}")
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    hf_path = hf_dir or os.path.join(out_dir, "hf")
    if resume and not os.path.exists(ckpt_path):
        raise llama.UserError(f"{ckpt_path}: resume=True but there is no checkpoint to resume from")
    train_splits = load_splits(datasets, "train")
    val_splits = load_splits(datasets, "val")
    meta = train_splits[0].meta
    for s in train_splits[1:]:
        for key in ("vocab_size", "bos_id", "eos_id"):
            if s.meta.get(key) != meta.get(key):
                raise llama.UserError(f"{s.dir}: meta.json: {key} is {s.meta.get(key)!r} but {datasets[0]} has "
                                      f"{meta.get(key)!r}; all datasets must be made with one tokenizer")
    lora_settings = dict(targets=lora_targets, n_loras=n_loras, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, scaling=lora_scaling, init=lora_init)
    if init_from == "scratch":
        tokenizer_path = tokenizer or meta.get("tokenizer", "")
        tok = llama.load_tokenizer(tokenizer_path)
        model_config = llama.LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                         hidden_dim=hidden_dim, vocab_size=tok.vocab_size, rope_theta=rope_theta,
                                         max_seq_len=max_seq_len, tie_embeddings=tie_embeddings,
                                         bos_id=tok.bos_id, eos_id=[tok.eos_id])
    else:
        tokenizer_path = tokenizer or os.path.join(ckpt_dir, "tokenizer.model")
        model_config = read_base_config(ckpt_dir)
        tok = llama.load_tokenizer(tokenizer_path) if os.path.exists(tokenizer_path) else None
    if meta.get("vocab_size") not in (None, model_config.vocab_size):
        raise llama.UserError(f"{datasets[0]}: meta.json: vocab_size {meta['vocab_size']} does not match the "
                              f"model's {model_config.vocab_size}; prepare the data with the model's tokenizer")
    longest = max(int(s.lengths.max()) for s in train_splits + val_splits)
    if longest - 1 > model_config.max_seq_len:
        raise llama.UserError(f"{datasets[0]}: examples of up to {longest} tokens exceed the model's context of "
                              f"{model_config.max_seq_len}")
    check_adapter_fits(model_config, finetune, lora_settings, ckpt_dir if init_from == "pretrained" else "init_from=scratch")
    log("settings: " + json.dumps(config))

    # the model: frozen base in the autocast dtype on GPU (bf16 halves its memory), trainable weights in fp32
    ptdtype = getattr(torch, dtype)
    base_dtype = ptdtype if finetune != "full" else torch.float32
    torch.manual_seed(seed)  # the same initialization on every rank (FSDP shards each rank's own copy)
    if init_from == "scratch":
        with torch.device(run_device):
            raw_model = llama.Llama(model_config)
        raw_model.init_weights()
        raw_model.to(base_dtype)
    else:
        raw_model = llama.load_model(ckpt_dir, dtype=base_dtype, device=run_device)
    adapter_settings = adapt(raw_model, finetune, lora_settings)
    for p in raw_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    raw_model.checkpoint_blocks = activation_checkpointing
    trainable, base_total = multilora.count_trainable(raw_model)
    log(f"model: {base_total / 1e6:.2f}M parameters, {finetune}: {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / base_total:.2f}%)")

    checkpoint = None
    if resume:
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise llama.UserError(f"{ckpt_path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        changed = sorted(k for k in config if k != "resume" and checkpoint["settings"].get(k) != config[k])
        if "fsdp" in changed or checkpoint["world_size"] != world_size and fsdp:
            raise llama.UserError(f"{ckpt_path}: saved with fsdp={checkpoint['settings']['fsdp']} on "
                                  f"{checkpoint['world_size']} processes; resume it the same way")
        if changed:
            log(f"resume: settings differ from the checkpoint's: {', '.join(changed)}")
        try:
            missing, unexpected = raw_model.load_state_dict(checkpoint["model"], strict=False)
        except RuntimeError as e:  # shapes differ: other adapter settings than the checkpoint's
            raise llama.UserError(f"{ckpt_path}: model state does not fit this model: {str(e).splitlines()[-1].strip()}") from None
        if unexpected or (finetune == "full" and missing):
            raise llama.UserError(f"{ckpt_path}: model state does not fit this model (unexpected "
                                  f"{unexpected[:3]}, missing {missing[:3]})")

    # wrap: FSDP2 shards each block and the rest; DDP replicates; torch.compile last
    model = raw_model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device_type, (world_size,))
        # all-gather in the compute dtype (one dtype per group, base and adapters), reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) if dtype != "float32" \
            else MixedPrecisionPolicy()
        for block in raw_model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(raw_model, mesh=mesh, mp_policy=mp)
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
    if compile:
        model = torch.compile(model)

    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    autocast_ctx = autocast_context(device_type, dtype)

    # data: the task mixture
    task_names, pools = task_pools(train_splits)
    weights = mixture_weights([len(p) for p in pools], mixture, mixture_temperature)
    val_names, val_pools = task_pools(val_splits)
    log("tasks: " + ", ".join(f"{n} ({len(p)} examples, p={w:.3f})" for n, p, w in zip(task_names, pools, weights)))
    pad_id = model_config.eos_id[0]  # any id: padding is never a target and never attended to
    lr_decay_end = lr_decay_iters or max_iters

    # state: fresh, or from the checkpoint
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, METRICS)
    examples_em = exact_match_examples_of(datasets, exact_match_examples) if exact_match_examples > 0 else []
    can_score = bool(examples_em) and not fsdp and tok is not None
    if checkpoint is not None:
        iter_num = checkpoint["iter_num"]
        position = list(checkpoint["data_position"])
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, optim_state_dict=checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        base_scores = checkpoint.get("exact_match_base")
        if master:
            keep_lines(metrics_path, checkpoint["metrics_lines"])
        log(f"resumed from {ckpt_path} at step {iter_num}")
    else:
        iter_num, position = 0, [0] * len(pools)
        base_scores = None
        if master:
            keep_lines(metrics_path, 0)
            if can_score:
                base_scores = score(raw_model, tok, examples_em, exact_match_max_new_tokens, autocast_ctx, batch_size)
        if ddp:
            dist.barrier()
    # dropout differs per rank; after a resume every rank continues its own RNG stream
    torch.manual_seed(seed + rank)
    if checkpoint is not None and len(checkpoint["rng"]) == world_size:
        torch.set_rng_state(checkpoint["rng"][rank]["cpu"])
        if device_type == "cuda" and checkpoint["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"][rank]["cuda"])
    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config, resume="allow")

    def write_metrics(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_log:
                wandb.log(record, step=record["iter"])

    def save():
        """Adapter (or HF weights) and ckpt.pt; collectives inside, so every rank calls it."""
        state = trained_state(raw_model, finetune)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            optim_state = get_optimizer_state_dict(model, optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.state_dict()
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        rngs = [None] * world_size
        if ddp:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if master:
            if finetune == "full":
                llama.save_hf_checkpoint(state, hf_path, config=model_config,
                                         tokenizer_path=tokenizer_path if tok is not None else None)
            else:
                multilora.save_adapter(raw_model, os.path.join(out_dir, ADAPTER), adapter_settings, state=state)
            write_checkpoint(ckpt_path, {
                "settings": config, "model_config": model_config.to_hf(), "adapter_settings": adapter_settings,
                "model": state, "optimizer": optim_state, "scaler": scaler.state_dict() if scaler else None,
                "iter_num": iter_num, "data_position": list(position), "rng": rngs, "world_size": world_size,
                "metrics_lines": count_lines(metrics_path), "exact_match_base": base_scores})
        if ddp:
            dist.barrier()

    # the loop (as nanoGPT's): evaluate and checkpoint at step 0, every eval_interval and at the end
    n_rows = gradient_accumulation_steps * batch_size
    t_last, tokens_since, steps_since, t_start = time.time(), 0, 0, time.time()
    just_resumed = checkpoint is not None
    while True:
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and not just_resumed:
            t_eval = time.time()
            val_loss, per_task = evaluate(model, val_splits, val_pools, eval_examples, batch_size, pad_id, run_device,
                                          autocast_ctx, rank, world_size, pack)
            log(f"step {iter_num}: val loss {val_loss:.4f} (" +
                ", ".join(f"{n} {v:.3f}" for n, v in zip(val_names, per_task)) + ")")
            write_metrics({"iter": iter_num, "val_loss": val_loss,
                           **{f"val_loss/{n}": v for n, v in zip(val_names, per_task)}})
            if iter_num > 0:
                save()
            t_last += time.time() - t_eval  # tokens/s counts training time only
        just_resumed = False
        if iter_num >= max_iters:
            break

        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_end, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = sample_examples(pools, weights, position, n_rows, seed, iter_num)
        batches, n_targets, n_tokens = micro_batches(train_splits, rows, batch_size, rank, world_size, pad_id, run_device, pack)
        counts = torch.tensor([n_targets, n_tokens], device=run_device)
        if ddp:
            dist.all_reduce(counts)  # target tokens of the whole step: the loss's denominator
        loss_sum = train_step(model, optimizer, batches, int(counts[0]), world_size, autocast_ctx, scaler, grad_clip,
                              ddp=ddp and not fsdp, fsdp=fsdp)
        tokens_since += int(counts[1])
        steps_since += 1

        if iter_num % log_interval == 0 or iter_num == max_iters - 1:
            if ddp:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / max(int(counts[0]), 1)
            now = time.time()
            tokens_per_s = tokens_since / (now - t_last)
            seq_len = max(b[0].shape[1] for b in batches)  # attention span of a row (x is first)
            mfu = flops_per_token(model_config, trainable, finetune, seq_len) * tokens_per_s / (peak_flops * world_size)
            eta = (now - t_last) / steps_since * (max_iters - iter_num - 1)
            mem = peak_memory_bytes(device_type)
            log(f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s, mfu {100 * mfu:.2f}%, "
                f"mem {mem / 2**20:,.0f} MiB, eta {eta / 60:.1f} min")
            write_metrics({"iter": iter_num, "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_s,
                           "mfu": mfu, "peak_mem_bytes": mem})
            t_last, tokens_since, steps_since = now, 0, 0
        iter_num += 1
        if os.environ.get("MULTILORA_TEST_KILL_AFTER_ITER") == str(iter_num):
            os.kill(os.getpid(), signal.SIGKILL)  # tests only: a crash between checkpoints

    log(f"trained {max_iters} steps in {(time.time() - t_start) / 60:.1f} min; wrote {out_dir}")
    if can_score and master:
        tuned_scores = score(raw_model, tok, examples_em, exact_match_max_new_tokens, autocast_ctx, batch_size)
        base_scores = base_scores or {}
        print(f"exact match on the test split ({exact_match_examples} examples per task at most):")
        for name in tuned_scores:
            before = f"{100 * base_scores[name]:5.1f}%" if name in base_scores else "    ?"
            print(f"  {name:<24} base {before} -> tuned {100 * tuned_scores[name]:5.1f}%")
        if finetune != "full":
            print(f"adapter: {os.path.join(out_dir, ADAPTER)}")
        else:
            print(f"weights: {hf_path}")
        mean = lambda s: 100 * sum(s.values()) / max(len(s), 1)
        print(f"exact match: base {mean(base_scores):.1f}% -> tuned {mean(tuned_scores):.1f}%", flush=True)
        # the scores as the last metrics record, for scripts (compare.py) that read files, not stdout
        write_metrics({"iter": iter_num, "exact_match": mean(tuned_scores) / 100,
                       **{f"exact_match/{name}": v for name, v in tuned_scores.items()}})
    elif exact_match_examples > 0 and fsdp:
        log("exact match: skipped under FSDP (score the result with eval.py --task=exact_match)")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    llama.run_cli(main)
