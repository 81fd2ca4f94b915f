"""
train.py's checkpoints: ckpt.pt read and checked for a resume, and under FSDP2 checkpoints that
scale: each process writes and reads only its own shard, and a small common file, written last by
rank 0, commits them (docs/training.md).

    out_dir/ckpt.pt                      the common file: step, data position, RNG states of every
                                         rank, settings, base identity, and the shard files' names
    out_dir/ckpt.step{N}.rank{r}-of-{W}.pt
                                         rank r's local part of the trainable weights (LoRA: the
                                         adapters only; the frozen base is read from ckpt_dir again)
                                         and of their optimizer state

Every file holds plain tensors (a DTensor's local part, never the DTensor) and plain containers, is
torch.save'd and loaded with torch.load(weights_only=True): no pickled code runs, and a resume needs
the same number of processes. A save: every rank writes its shard file, all agree that they did,
the exports are written, rank 0 replaces ckpt.pt (one rename: the commit), then each rank removes
its shard files of other steps. A crash before the commit leaves the previous ckpt.pt and its shards
whole; the newer shard files are not named by it and go at the next commit.

Here too: a resume's settings (the run's, with what RESUME_MAY_CHANGE lets argv change), out_dir's
policy, ckpt.pt read and checked, the resume itself, and the exports (the adapter, or hf/).
"""

import glob
import os
import re
import warnings

import torch
import torch.distributed as dist

import checkpoint
import multilora
from configurator import S, check_type, configure, resolve
import util
from util import UserError, atomic_write, write_text

CHECKPOINT, ADAPTER, METRICS = "ckpt.pt", "adapter.safetensors", "metrics.jsonl"
STATE = ("iter_num", "data_position", "metrics_lines", "exact_match_base")  # and "settings"

# A resume takes the run's settings from its checkpoint. These may be given anew: where the files
# are (ckpt_dir too: a base of other weights is refused by the sample the run recorded), the run's
# length, learning-rate schedule and clipping, evaluation and logging, and where and how it
# computes (the same math). Any other setting given with another value than the run's is refused.
RESUME_MAY_CHANGE = (
    "out_dir hf_dir resume overwrite ckpt_dir max_iters learning_rate min_lr warmup_iters "
    "lr_decay_iters grad_clip eval_interval log_interval eval_examples exact_match_examples "
    "exact_match_max_new_tokens wandb_log wandb_project wandb_run_name device compile "
    "activation_checkpointing fsdp_units loss_chunk threads peak_flops"
).split()


def processes():
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# -----------------------------------------------------------------------------
# the run: its settings on a resume, out_dir's policy, ckpt.pt checked, the resume, save, exports


def configure_run(settings, argv):
    """train.py's settings: argv's, or for --resume=True the checkpoint's, which argv may change
    only in RESUME_MAY_CHANGE (one line names any other that differs). -> {name: value}"""
    if "-h" in argv or "--help" in argv:
        return configure(settings, argv, "train.py")
    # first the types only, to find the checkpoint
    given = configure({k: S(s.default) for k, s in settings.items()}, argv, "train.py")
    path = os.path.join(given["out_dir"], CHECKPOINT)
    if not given["resume"] or not os.path.isfile(path):
        return configure(settings, argv, "train.py")  # no checkpoint: check_out_dir says so
    saved = read(path, mmap=True)["settings"]
    # this command's, never the checkpoint's: a path read from a received file is no place to write
    own = ("out_dir", "hf_dir", "resume", "overwrite")
    typed = resolve(settings, {k: s.default for k, s in settings.items()})  # rules' types
    run = {
        k: S(
            check_type(f"{path}: settings", k, saved[k], typed[k])
            if k in saved and k not in own
            else s.default,
            s.allowed,
            s.help,
        )
        for k, s in settings.items()
    }
    try:
        config = configure(run, argv, "train.py")
    except UserError as e:
        raise UserError(str(e).replace(" (its default)", f" (the run's, in {path})")) from None
    refused = [k for k in settings if k not in RESUME_MAY_CHANGE and config[k] != run[k].default]
    if refused:
        raise UserError(
            f"{path}: resume: cannot change "
            + ", ".join(
                f"{k} (the run has {run[k].default!r}, given {config[k]!r})" for k in refused
            )
            + "; leave them out to take the run's, or start a new run in another out_dir"
        )
    return config


def hf_path(config):
    """Where finetune=full writes its HF-layout weights: --hf_dir, or out_dir/hf."""
    return config["hf_dir"] or os.path.join(config["out_dir"], "hf")


# what train.py writes in out_dir (and hf/): the only files its --overwrite removes and the only
# temporaries its cleanup removes
RUN_FILES = (CHECKPOINT, ADAPTER, METRICS, "ckpt.step*.rank*-of-*.pt")
HF_FILES = ("model.safetensors", "config.json", "model.safetensors.index.json")


def check_out_dir(config):
    """Refuse an out_dir that holds a run unless resume or overwrite, and an hf_dir that holds a
    checkpoint other than this run's unless overwrite; neither may be the base (util.check_output).
    Runs before anything is written and again under out_dir's lock (train.py's take_out_dir).
    -> the run's files found, each (path, inode, mtime, size): a second call that differs means
    another process wrote there meanwhile."""
    out_dir, resume, overwrite = config["out_dir"], config["resume"], config["overwrite"]
    base = config["ckpt_dir"] if config["init_from"] == "pretrained" else None
    full, hf = config["finetune"] == "full", hf_path(config)
    util.check_output(out_dir, "out_dir", folder=True)
    if full:
        util.check_output(hf, "hf_dir", base, folder=True)
    found = sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt.step*.rank*-of-*.pt")))
    found += [os.path.join(out_dir, f) for f in RUN_FILES[:3]]
    held = [os.path.join(hf, f) for f in HF_FILES] if full else []
    found, held = [f for f in found if os.path.exists(f)], [f for f in held if os.path.exists(f)]
    path = os.path.join(out_dir, CHECKPOINT)
    if resume and path not in found:
        raise UserError(f"{path}: resume=True but there is no checkpoint to resume from")
    if (found or held) and not resume and not overwrite:
        raise UserError(
            f"{out_dir}: holds a run ({', '.join(found + held)}); continue it with --resume=True "
            f"or replace it with --overwrite=True"
        )
    if held and resume and not overwrite:
        # the run's own hf/: inside out_dir, or the hf_dir its checkpoint records, given again
        recorded = read(path, mmap=True)["settings"].get("hf_dir") or os.path.join(out_dir, "hf")
        own = (os.path.join(out_dir, "hf"), recorded)
        if os.path.realpath(hf) not in [os.path.realpath(p) for p in own]:
            raise UserError(
                f"--hf_dir={hf}: holds a checkpoint that is not this run's ({', '.join(held)}; "
                f"the run wrote to {recorded}); choose another hf_dir, or replace it with "
                f"--overwrite=True"
            )
    return [(f, *stat(f)) for f in found + held]


def stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def base_identity(model, finetune):
    """What a checkpoint records of the frozen base (adapters only): its fingerprint, sample."""
    if finetune == "full":
        return {}
    return {
        "base_fingerprint": checkpoint.base_fingerprint(model),
        "base_sample": list(getattr(model, "base_sample", None) or []),
    }


def read_checkpoint(config, model, n_tasks):
    """out_dir's ckpt.pt (read: weights_only=True, every key checked), checked against this run: the
    process layout, the tasks, the base (the sample the run recorded); a whole checkpoint's weights
    loaded into model (under FSDP each rank reads its shard in resume).
    -> (ckpt, the settings that differ from the run's)"""
    path = os.path.join(config["out_dir"], CHECKPOINT)
    ckpt = read(path)
    saved, fsdp, ckpt_dir = ckpt["settings"], config["fsdp"], config["ckpt_dir"]
    if saved.get("fsdp") != fsdp or ckpt["world_size"] != processes()[1] and fsdp:
        raise UserError(
            f"{path}: saved with fsdp={saved.get('fsdp')} on {ckpt['world_size']} processes; "
            "resume it the same way"
        )
    if len(ckpt["data_position"]) != n_tasks:
        raise UserError(
            f"{path}: data_position: expected {n_tasks} counts (one per task), "
            f"got {len(ckpt['data_position'])}"
        )
    here = base_identity(model, config["finetune"])
    if here and ckpt.get("base_fingerprint") not in (None, here["base_fingerprint"]):
        raise UserError(
            f"{path}: base_fingerprint: the run was trained on a base of other shapes "
            f"than {ckpt_dir}'s ({checkpoint.base_summary(model)}); resume with the "
            f"run's ckpt_dir"
        )
    if (
        here
        and ckpt.get("base_sample")
        and here["base_sample"]
        and not checkpoint.same_base_sample(ckpt["base_sample"], here["base_sample"])
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
        if unexpected or (config["finetune"] == "full" and missing):
            raise UserError(
                f"{path}: model state does not fit this model "
                f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
            )
    own = ("resume", "overwrite", "out_dir")
    changed = sorted(k for k in config if k not in own and saved.get(k) != config[k])
    return ckpt, changed


def resume(ckpt, config, model, optimizer, scaler, tokenizer_path):
    """The run of ckpt (read_checkpoint's) continued: the optimizer (and scaler) state, under FSDP
    with this rank's shard of the weights; this rank's RNG stream (when the process count is the
    same); metrics.jsonl and the exports as of the checkpoint (a crash may have left either ahead).
    Every rank calls. -> the training state"""
    rank, world_size = processes()
    if config["fsdp"]:
        reshard(model)  # each rank fills, then exports, its own part only
    if "shards" in ckpt:
        load(config["out_dir"], ckpt, model, optimizer)
    elif config["fsdp"]:  # a checkpoint written whole under FSDP (before sharded checkpoints)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(
            model, optimizer, optim_state_dict=ckpt["optimizer"], options=options
        )
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    for key in ("model", "optimizer"):  # in the model and optimizer now: not kept twice
        ckpt.pop(key, None)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if ckpt["rng"][rank]["cuda"] is not None and config["device"].startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    state = {k: ckpt[k] for k in STATE} | {"settings": config}
    metrics = os.path.join(config["out_dir"], METRICS)
    if rank == 0:
        lines = open(metrics).readlines() if os.path.exists(metrics) else []
        write_text(metrics, "".join(lines[: state["metrics_lines"]]))
    write_weights(state["iter_num"], model, config, tokenizer_path, only_if_stale=True)
    return state


def save(state, model, optimizer, tokenizer_path):
    """The checkpoint of state (the run's settings among it), then the adapter (or hf/) from the
    same weights: every rank calls (collectives inside). Under FSDP each rank writes its own shard
    and rank 0 commits (save_shards); otherwise rank 0 writes ckpt.pt whole. The exports are written
    before the commit: a failure (disk full) changes neither, and a resume rewrites them."""
    config = state["settings"]
    rank, world_size = processes()
    cuda = torch.cuda.is_available() and config["device"].startswith("cuda")
    rngs = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}]
    rngs *= world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, rngs[0])
    common = {
        **state,
        "rng": rngs,
        "world_size": world_size,
        "adapter_settings": getattr(model, "adapter_settings", None),
        "model_config": checkpoint.config_to_hf(model.config),
        **base_identity(model, config["finetune"]),
    }

    def exports():
        write_weights(state["iter_num"], model, config, tokenizer_path)

    if config["fsdp"]:
        reshard(model)  # after evaluate: each rank saves, and exports, its own part only
        return save_shards(config["out_dir"], common, model, optimizer, exports)
    full = config["finetune"] == "full"
    weights = model.state_dict() if full else multilora.adapter_state_dict(model)
    if rank == 0:
        with atomic_write(os.path.join(config["out_dir"], CHECKPOINT)) as tmp:
            save_file(
                {
                    **common,
                    "model": {k: v.detach().cpu() for k, v in weights.items()},
                    "optimizer": optimizer.state_dict(),
                },
                tmp,
            )
            exports()
    if dist.is_initialized():
        dist.barrier()


def save_file(obj, path):
    """torch.save through a Python file: a full disk is an OSError (ENOSPC) that atomic_write names,
    not torch's "[enforce fail at inline_container.cc]"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_weights(step, model, config, tokenizer_path, only_if_stale=False):
    """The adapter, or the HF-layout weights for finetune=full, tagged with their step. Under FSDP
    every rank calls (on a resharded model) and rank 0 writes, gathering one tensor at a time
    (gather_to_rank0). only_if_stale: unless the file there is of this step already."""
    rank, fsdp, full = processes()[0], config["fsdp"], config["finetune"] == "full"
    if not fsdp and rank != 0:
        return
    out_dir, hf = config["out_dir"], hf_path(config)
    path = os.path.join(hf, "model.safetensors") if full else os.path.join(out_dir, ADAPTER)
    if only_if_stale:  # rank 0 decides, for every rank
        stale = [int(rank == 0 and checkpoint.saved_step(path) != step)]
        stale = torch.tensor(stale, device=next(model.parameters()).device)
        if fsdp:
            dist.all_reduce(stale)
        if not stale.item():
            return
    gather = gather_to_rank0 if fsdp else None
    if full:
        checkpoint.save_hf_checkpoint(
            model.state_dict(),
            hf,
            config=model.config,
            tokenizer_path=tokenizer_path,
            step=step,
            gather=gather,
            writer=rank == 0,
        )
        return
    adapter = multilora.adapter_state_dict(model)
    if gather:  # small: the whole adapter, on rank 0 only
        adapter = {k: gather(v) for k, v in adapter.items()}
    if rank == 0:
        multilora.save_adapter(model, path, model.adapter_settings, state=adapter, step=step)


# -----------------------------------------------------------------------------
# FSDP2: each rank's shard file


def shard_name(step, rank, world_size):
    return f"ckpt.step{step}.rank{rank}-of-{world_size}.pt"


# (the functions below import torch.distributed.tensor themselves: 1.3 s a process that needs none)


def local(t):
    """A DTensor's local part (a view, no copy), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach()


def reshard(model):
    """FSDP2 leaves the root's parameters gathered after a forward without a backward (evaluate):
    shard every group again, so that each rank sees, saves and fills its own part only."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def trainable(model):
    """{name: parameter} of what trains (tied weights once): what a shard file holds."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_shards(out_dir, common, model, optimizer, write_exports):
    """Write this rank's shard (of a resharded model), then (all ranks written) the exports, then
    rank 0 commits ckpt.pt in out_dir holding `common` and the shards' names. Every rank calls."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    step = common["iter_num"]
    own = os.path.join(out_dir, shard_name(step, rank, world_size))
    weights = trainable(model)
    device = next(iter(weights.values())).device
    optim = optimizer.state_dict()  # references: local parts below, nothing copied
    optim = {
        "state": {i: {k: local(v) for k, v in s.items()} for i, s in optim["state"].items()},
        "param_groups": optim["param_groups"],
    }
    error = None
    try:
        with atomic_write(own) as tmp:
            save_file({"model": {k: local(v) for k, v in weights.items()}, "optimizer": optim}, tmp)
    except UserError as e:  # disk full on one rank: every rank stops, the previous checkpoint stays
        error = e
    ok = torch.tensor([int(error is None)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not ok.item():
        raise UserError(
            f"{out_dir}: another process could not write its checkpoint shard; "
            f"the checkpoint before step {step} is kept"
        )
    write_exports()
    if rank == 0:
        with atomic_write(os.path.join(out_dir, CHECKPOINT)) as tmp:
            save_file(
                {**common, "shards": [shard_name(step, r, world_size) for r in range(world_size)]},
                tmp,
            )
    dist.barrier()
    for f in glob.glob(os.path.join(glob.escape(out_dir), f"ckpt.step*.rank{rank}-of-*.pt")):
        if f != own:
            os.remove(f)


def load(out_dir, ckpt, model, optimizer):
    """Fill this rank's shards of the trainable weights (of a resharded model) and the optimizer
    state from its own file (through a memory map: the file is not copied into memory whole)."""
    rank = dist.get_rank()
    path = os.path.join(out_dir, ckpt["shards"][rank])
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        saved, optim = shard["model"], shard["optimizer"]
        states, groups = optim["state"], optim["param_groups"]
    except Exception as e:  # missing, truncated or crafted: name the file
        raise UserError(
            f"{path}: cannot read the checkpoint shard ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    weights = trainable(model)
    if not isinstance(saved, dict) or set(saved) != set(weights):
        raise UserError(
            f"{path}: model: expected this rank's part of the {len(weights)} trainable tensors "
            f"of this model, got {len(saved) if isinstance(saved, dict) else type(saved).__name__}"
        )
    with torch.no_grad():
        for k, p in weights.items():
            dst, src = local(p), saved[k]
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
                raise UserError(
                    f"{path}: model.{k}: expected a tensor of shape {list(dst.shape)}, got "
                    f"{list(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__}"
                )
            dst.copy_(src)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if (
        not isinstance(states, dict)
        or not isinstance(groups, list)
        or len(groups) != len(optimizer.param_groups)
    ):
        raise UserError(
            f"{path}: optimizer: expected the state of {len(params)} parameters in "
            f"{len(optimizer.param_groups)} groups"
        )
    restored = {}
    for i, state in states.items():
        p = params[i] if type(i) is int and 0 <= i < len(params) else None
        if p is None or not isinstance(state, dict):
            raise UserError(
                f"{path}: optimizer.state.{i}: expected the state of one of "
                f"{len(params)} parameters"
            )
        restored[i] = {
            k: as_shard_of(p, v, path, f"optimizer.state.{i}.{k}") for k, v in state.items()
        }
    optimizer.load_state_dict({"state": restored, "param_groups": groups})


def as_shard_of(p, v, path, key):
    """v (this rank's saved local part) as a tensor optimizer.load_state_dict takes for parameter p:
    a DTensor of p's layout, copied out of the file's memory map; scalars (Adam's step) as they
    are."""
    from torch.distributed.tensor import DTensor

    if not isinstance(v, torch.Tensor):
        raise UserError(f"{path}: {key}: expected a tensor, got {type(v).__name__}")
    if v.dim() == 0 or not isinstance(p, DTensor):
        return v.clone()
    if v.shape != p.to_local().shape:
        raise UserError(
            f"{path}: {key}: expected shape {list(p.to_local().shape)}, got {list(v.shape)}"
        )
    return DTensor.from_local(
        v.to(p.device, copy=True),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def gather_to_rank0(t):
    """A DTensor sharded on dim 0 (FSDP2's layout) as one whole CPU tensor on rank 0, None on the
    others: rank 0 receives each rank's rows straight into their place (point to point), so it holds
    one tensor more and the others nothing more (full_tensor() would build it on every rank)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t.detach().cpu()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if tuple(t.placements) != (Shard(0),):
        whole = t.full_tensor()
        return whole.cpu() if rank == 0 else None
    part = local(t)
    n, c = t.shape[0], -(-t.shape[0] // world_size)  # torch.chunk's split, as FSDP2's

    def rows(r):
        return slice(min(r * c, n), min(r * c + c, n))

    if part.shape[0] != rows(rank).stop - rows(rank).start:
        raise RuntimeError(
            f"unexpected shard of {list(part.shape)} rows on rank {rank} for {list(t.shape)}"
        )
    if rank != 0:
        if part.numel():
            dist.send(part.contiguous(), dst=0)
        return None
    whole = torch.empty(t.shape, dtype=t.dtype, device=part.device)
    whole[rows(0)].copy_(part)
    for r in range(1, world_size):
        if whole[rows(r)].numel():
            dist.recv(whole[rows(r)], src=r)
    return whole.cpu()


# -----------------------------------------------------------------------------
# ckpt.pt, read and checked: one UserError naming the file and the key, before anything is changed


def read(path, mmap=False):
    """ckpt.pt loaded with weights_only=True (tensors and plain types: no pickled code runs), then
    checked (`check`). mmap: map the file instead of reading it (reading the settings costs
    nothing)."""
    try:
        # torch warns about old pickle protocols: the error below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except (
        Exception
    ) as e:  # a corrupt or crafted file fails in many ways; name it, not the internals
        raise UserError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    check(path, ckpt)
    return ckpt


def _is_rng(r):
    def byte_tensor(t):
        return (
            isinstance(t, torch.Tensor)
            and t.dtype == torch.uint8
            and t.dim() == 1
            and t.numel() > 0
        )

    return (
        isinstance(r, dict)
        and byte_tensor(r.get("cpu"))
        and (r.get("cuda") is None or byte_tensor(r["cuda"]))
    )


def _is_int(v, least=0):
    return type(v) is int and v >= least


CHECKS = {  # key -> (what is expected, test); every checkpoint has these
    "settings": (
        "a dict of settings",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    ),
    "iter_num": ("an int >= 0", _is_int),
    "data_position": (
        "a list of ints >= 0",
        lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    ),
    "metrics_lines": ("an int >= 0", _is_int),
    "exact_match_base": ("a dict or None", lambda v: v is None or isinstance(v, dict)),
    "world_size": ("an int >= 1", lambda v: _is_int(v, 1)),
    "rng": (
        "a non-empty list of RNG states ({'cpu': uint8 tensor, 'cuda': uint8 tensor or None})",
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_rng(r) for r in v),
    ),
}
WHOLE = {  # a one-file checkpoint (one process, DDP)
    "model": (
        "a dict of tensors",
        lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    ),
    "optimizer": (
        "an optimizer state ({'state': dict, 'param_groups': list})",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("state"), dict)
            and isinstance(v.get("param_groups"), list)
        ),
    ),
}
SHARD_NAME = re.compile(r"ckpt\.step\d+\.rank\d+-of-\d+\.pt")


def check(path, ckpt):
    """Every key a resume reads, with its type: an incomplete or damaged ckpt.pt is one
    UserError."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a dict of training state, got {type(ckpt).__name__}")
    sharded = "shards" in ckpt
    checks = dict(CHECKS, **({} if sharded else WHOLE))
    if sharded:
        n = ckpt.get("world_size")
        checks["shards"] = (
            f"a list of {n} shard file names (ckpt.stepN.rankR-of-W.pt)",
            lambda v: (
                isinstance(v, list)
                and len(v) == n
                and all(isinstance(f, str) and SHARD_NAME.fullmatch(f) for f in v)
            ),
        )
    for key, (expected, ok) in checks.items():
        if key not in ckpt:
            raise UserError(f"{path}: {key}: missing (expected {expected})")
        if not ok(ckpt[key]):
            got = (
                repr(ckpt[key])
                if not isinstance(ckpt[key], (dict, list))
                else f"{type(ckpt[key]).__name__} of {len(ckpt[key])}"
            )
            raise UserError(f"{path}: {key}: expected {expected}, got {got[:80]}")
    sample = ckpt.get("base_sample")
    if sample is not None and not (
        isinstance(sample, list) and all(type(x) in (int, float) for x in sample)
    ):
        raise UserError(
            f"{path}: base_sample: expected a list of numbers, got {type(sample).__name__}"
        )
