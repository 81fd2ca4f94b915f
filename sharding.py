"""
FSDP2 for train.py: shard(model) puts fully_shard's groups on a model whose weights may still be on
the meta device (train.build_model then fills each rank's rows from the files). A frozen embedding
and lm_head stay out of FSDP (GatheredOnUse: read a block of rows at a time); on CPU the all-gather
is done by broadcasts (BroadcastAllGather). docs/scaling.md has the measurements.
"""

import torch
import torch.distributed as dist

import checkpoint
import multilora


def shard(raw_model, device_type, dtype="float32", units="block"):
    """FSDP2 shards the model on dim 0 over the ranks, in groups gathered only for their own forward
    and backward: each block (units='linear': each of its projections too), a trained input
    embedding, the final norm with a trained lm_head; the root group holds the rest. A frozen
    embedding or lm_head (LoRA, MultiLoRA) is no FSDP group: see GatheredOnUse."""
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
    frozen = [m for m in (raw_model.embed_tokens, raw_model.lm_head) if not m.weight.requires_grad]
    rows = {}  # a tied weight: one parameter at both ends
    for m in frozen:
        w = m._parameters["weight"]
        GatheredOnUse.mix_into(m, rows.setdefault(w, GatheredOnUse.rows(w, mesh)))
    adapters = {m for _, m in multilora.adapter_modules(raw_model)}
    for block in raw_model.layers:
        for m in block.modules() if units == "linear" else []:
            if isinstance(m, torch.nn.Linear) or m in adapters:
                fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # a trained untied embedding or lm_head: a group of its own (torchtitan's units). The loss reads
    # lm_head's weight without calling lm_head, so norm's forward gathers the pair and the root's
    # post-forward reshards it (torch 2.13's provision for a chunked loss; a release without it
    # keeps the pair gathered until its backward). A trained tied embedding is used at both ends
    # of the model, so it stays in the root group.
    if not raw_model.config.tie_embeddings and not frozen:
        fully_shard(raw_model.embed_tokens, mesh=mesh, mp_policy=mp)
        fully_shard([raw_model.norm, raw_model.lm_head], mesh=mesh, mp_policy=mp)
    if device_type == "cpu" and hasattr(ctypes.CDLL(None), "mallopt"):
        # glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
        # the weights each group gathers and frees land in its heap and stay resident; a fixed
        # threshold (M_MMAP_THRESHOLD = -3) gives every buffer of 1 MiB or more back when freed
        ctypes.CDLL(None).mallopt(-3, 1 << 20)
    fully_shard(raw_model, mesh=mesh, mp_policy=mp, ignored_params=set(rows.values()))
    for m in raw_model.modules() if device_type == "cpu" else []:
        if hasattr(m, "set_custom_all_gather"):  # an FSDP2 group
            m.set_custom_all_gather(BroadcastAllGather())


class BroadcastAllGather:
    """FSDP2's all-gather (torch.distributed.fsdp's AllGather interface) on CPU, as one broadcast
    per rank into the output buffer, where FSDP2 has put this rank's part: gloo's all-gather
    copies the whole output once more."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        parts = output_tensor.view(group.size(), -1)
        works = [
            dist.broadcast(parts[r], src=dist.get_global_rank(group, r), group=group, async_op=True)
            for r in range(group.size())
        ]
        for work in works[:-1]:
            work.wait()
        # FSDP2 waits on the last: given a Work, it frees the buffer after this group's copy-out
        # (it keeps a synchronous all-gather's buffer until the next group's, for GPU overlap)
        return works[-1]


class GatheredOnUse:
    """A frozen (V, D) embedding or lm_head under FSDP: its weight parameter holds this rank's rows
    (a DTensor sharded on dim 0 as fully_shard shards, which checkpoint.load_into fills the same
    way). The lookup and the loss (chunked_loss.BlockedCrossEntropy) read it a block of rows at
    a time, row_blocks(); reading module.weight gathers the whole matrix (lm_head in generation).
    As an FSDP2 group it would take twice its size at once (the gathered buffer, copied out to
    the parameter): 0.5 GB at vocabulary 32,000 and width 2,048 in fp32, against a block of
    rows here. Mixed into the module's class."""

    def forward(self, x):
        if not isinstance(self, torch.nn.Embedding):
            return super().forward(x)  # lm_head outside the loss (generation): the whole weight
        rows = self._parameters["weight"]
        out = torch.empty((*x.shape, rows.shape[1]), dtype=rows.dtype, device=x.device)
        for a, b, w in self.row_blocks():  # the lookup, one rank's rows at a time
            mine = (x >= a) & (x < b)
            out[mine] = w[x[mine] - a]
        return out

    @property
    def weight(self):
        rows = self._parameters["weight"]
        whole = torch.empty(rows.shape, dtype=rows.dtype, device=rows.to_local().device)
        for _ in self.row_blocks(into=whole):  # each block broadcast in place
            pass
        return whole

    def row_blocks(self, into=None, entries=1 << 22):
        """(a, b, weight[a:b]) for blocks of at most `entries` entries (16 MiB in fp32), each
        broadcast by the rank whose rows they are (in place into `into`[a:b] when given: gloo's
        all-gather would copy the whole matrix once more)."""
        rows = self._parameters["weight"]
        local, mesh = rows.to_local(), rows.device_mesh
        group, n, step = mesh.get_group(), mesh.size(), max(1, entries // rows.shape[1])
        for r in range(n):
            first, end = checkpoint.shard_rows(len(rows), r, n)
            mine = r == mesh.get_local_rank()
            for a in range(first, end, step):
                b = min(a + step, end)
                own = local[a - first : b - first] if mine else None
                block = into[a:b] if into is not None else own
                if block is None:
                    block = local.new_empty((b - a, *local.shape[1:]))
                elif own is not None and into is not None:
                    block.copy_(own)
                dist.broadcast(block, src=dist.get_global_rank(group, r), group=group)
                yield a, b, block
                del block

    @staticmethod
    def rows(w, mesh):
        """This rank's rows of w (meta before a load) as a frozen DTensor parameter."""
        from torch.distributed.tensor import DTensor, Shard

        a, b = checkpoint.shard_rows(len(w), mesh.get_local_rank(), mesh.size())
        local = w.detach()[a:b].clone()
        rows = DTensor.from_local(local, mesh, [Shard(0)], shape=w.shape, stride=w.stride())
        return torch.nn.Parameter(rows, requires_grad=False)

    @staticmethod
    def mix_into(module, rows):
        module._parameters["weight"] = rows
        module.__class__ = type(module.__class__.__name__, (GatheredOnUse, type(module)), {})
