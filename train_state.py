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
"""

import glob
import os
import re
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from util import UserError, atomic_write


def shard_name(step, rank, world_size):
    return f"ckpt.step{step}.rank{rank}-of-{world_size}.pt"


def local(t):
    """A DTensor's local part (a view, no copy), or the tensor itself."""
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


def save(out_dir, name, common, model, optimizer, write_exports):
    """Write this rank's shard, then (all ranks written) the exports, then rank 0 commits `name` in
    out_dir holding `common` and the shards' names. Every rank calls (collectives inside)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    step = common["iter_num"]
    own = os.path.join(out_dir, shard_name(step, rank, world_size))
    reshard(model)
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
            torch.save(
                {"model": {k: local(v) for k, v in weights.items()}, "optimizer": optim}, tmp
            )
    except OSError as e:  # disk full on one rank: every rank stops, the previous checkpoint stays
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
        with atomic_write(os.path.join(out_dir, name)) as tmp:
            torch.save(
                {**common, "shards": [shard_name(step, r, world_size) for r in range(world_size)]},
                tmp,
            )
    dist.barrier()
    for f in glob.glob(os.path.join(glob.escape(out_dir), f"ckpt.step*.rank{rank}-of-*.pt")):
        if f != own:
            os.remove(f)


def load(out_dir, ckpt, model, optimizer):
    """Fill this rank's shards of the trainable weights and the optimizer state from its own file
    (read through a memory map: the file is not copied into memory as a whole)."""
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
    reshard(model)
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
        with (
            warnings.catch_warnings()
        ):  # torch warns about old pickle protocols: the error below says it all
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
