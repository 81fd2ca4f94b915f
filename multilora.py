"""
MultiLoRA (Wang et al. 2023, arXiv 2311.11501) and plain LoRA (Hu et al. 2021) on a llama.py model.

One adapted linear layer with frozen W0 (d_out, d_in), n modules of rank r:
    h = W0·x + (α/r) · Σ_{i=1..n} s_i ⊙ (B_i · A_i · dropout(x))
      = W0·x + [ (α/r)·[diag(s_1)B_1 … diag(s_n)B_n] ] · [A_1; …; A_n] · dropout(x)
The second line is how it is computed: the n modules are ONE rank-(n·r) LoRA whose B has s folded in
(a (d_out, n·r) elementwise product), so MultiLoRA costs what a LoRA of rank n·r costs.
Plain LoRA is the same layer with init="lora": n = 1, B = 0, no s. docs/method.md walks through it;
export.py turns an adapter file into a PEFT one.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import is_lora_key
from util import UserError, atomic_write

# short target names -> module paths inside one llama.py layer (HF names without "model.")
TARGET_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# -----------------------------------------------------------------------------
# the layer


class MultiLoRALinear(nn.Module):
    """A frozen bias-free nn.Linear plus n parallel LoRA modules, computed as one rank-(n·r) LoRA.

    Parameters (the frozen weight keeps the base layer's key, so base checkpoints load unchanged):
      weight  (d_out, d_in)   frozen W0, any dtype (e.g. bf16)
      lora_A  (n·r, d_in)     [A_1; …; A_n], fp32
      lora_B  (d_out, n·r)    [B_1 … B_n], fp32
      lora_s  (n, d_out), or (n, 1) with scaling="scalar"; fp32, zero-init; absent for LoRA
    """

    def __init__(
        self,
        base,
        n_loras=4,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        scaling="channel",
        init="multilora",
        device=None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear) or base.bias is not None:
            raise UserError(f"MultiLoRALinear: base: expected a bias-free nn.Linear, got {base!r}")
        if init not in ("multilora", "lora"):
            raise UserError(f"MultiLoRALinear: init: expected 'multilora' or 'lora', got {init!r}")
        if scaling not in ("channel", "scalar"):
            raise UserError(
                f"MultiLoRALinear: scaling: expected 'channel' or 'scalar', got {scaling!r}"
            )
        if n_loras < 1 or lora_rank < 1:
            raise UserError(
                f"MultiLoRALinear: n_loras, lora_rank: expected >= 1, got {n_loras}, {lora_rank}"
            )
        d_out, d_in = base.weight.shape
        nr = n_loras * lora_rank
        if nr > min(d_in, d_out):
            raise UserError(
                f"MultiLoRALinear: n_loras*lora_rank: expected <= min(d_in, d_out) = "
                f"{min(d_in, d_out)}, got {n_loras}*{lora_rank} = {nr}"
            )
        self.in_features, self.out_features = d_in, d_out
        self.n_loras, self.lora_rank, self.lora_alpha = n_loras, lora_rank, lora_alpha
        self.lora_dropout, self.scaling, self.init = lora_dropout, scaling, init
        self.scale = lora_alpha / lora_rank  # α/r, per module (as PEFT and MTL-LoRA's MultiLoRA)
        self.weight = base.weight.requires_grad_(False)
        device = device or base.weight.device  # FSDP: real adapters on a meta-device base

        def fp32_parameter(*shape):
            return nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32))

        self.lora_A = fp32_parameter(nr, d_in)
        self.lora_B = fp32_parameter(d_out, nr)
        s_rows = d_out if scaling == "channel" else 1  # a scale per output channel, or one
        self.lora_s = fp32_parameter(n_loras, s_rows) if init == "multilora" else None
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        r = self.lora_rank
        with torch.no_grad():
            # Kaiming-uniform, a=√5 (nn.Linear's default, LoRA's and PEFT's A init): bound 1/√fan_in
            # Each module its own draw: for B_i the fan-in is r, not n·r, so block by block.
            for i in range(self.n_loras):
                nn.init.kaiming_uniform_(self.lora_A[i * r : (i + 1) * r], a=math.sqrt(5))
            if self.init == "multilora":
                for i in range(self.n_loras):  # B random too; s = 0 keeps ΔW = 0 at step 0
                    nn.init.kaiming_uniform_(self.lora_B[:, i * r : (i + 1) * r], a=math.sqrt(5))
                self.lora_s.zero_()
            else:
                self.lora_B.zero_()  # LoRA: B = 0 keeps ΔW = 0 at step 0

    def folded_B(self):
        """(α/r)·[diag(s_1)B_1 … diag(s_n)B_n], shape (d_out, n·r): one elementwise product."""
        if self.lora_s is None:
            return self.lora_B * self.scale
        d_out, n, r = self.out_features, self.n_loras, self.lora_rank
        s = (self.lora_s * self.scale).t().unsqueeze(2)  # (d_out or 1, n, 1)
        return (self.lora_B.view(d_out, n, r) * s).view(d_out, n * r)

    def delta_weight(self):
        """ΔW = folded_B · lora_A, (d_out, d_in) in fp32."""
        return self.folded_B().float() @ self.lora_A.float()

    def forward(self, x):
        out = F.linear(x, self.weight)  # (..., d_out) in the base dtype
        if self.merged:
            return out
        if not torch.is_autocast_enabled(x.device.type):
            # bf16 activations into the fp32 adapter, as PEFT does. Under autocast F.linear picks
            # the dtype itself, and this would only add a (..., d_in) copy per adapted layer.
            x = x.to(self.lora_A.dtype)
        if self.lora_dropout > 0:
            x = F.dropout(x, self.lora_dropout, self.training)
        # (..., d_in) -> (..., n·r) -> (..., d_out): one down- and one up-projection for all n
        return out + F.linear(F.linear(x, self.lora_A), self.folded_B()).to(out.dtype)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + ΔW (fp32 arithmetic, then cast to W0's dtype). Merging twice is a no-op."""
        if self.merged:
            return
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():  # PEFT's safe_merge: never write NaN/inf into W0
            raise UserError("MultiLoRALinear.merge: lora weights: merged weight is not finite")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - ΔW: exact up to round-off in fp32; bf16 loses the bits the merge rounded."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, init={self.init}, "
            f"n_loras={self.n_loras}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, "
            f"scaling={self.scaling if self.lora_s is not None else None}, merged={self.merged}"
        )


# -----------------------------------------------------------------------------
# adapting a model


def adapter_modules(model):
    """[(module_name, MultiLoRALinear)] in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def adapt_model(
    model,
    finetune="multilora",
    targets=("q", "k", "v", "o"),
    n_loras=4,
    lora_rank=8,
    lora_alpha=16,
    lora_dropout=0.0,
    scaling="channel",
    init="",
    device=None,
):
    """Wrap the chosen projections of every layer in MultiLoRALinear, freeze everything else.
    targets: names from q,k,v,o,gate,up,down (a list or a "q,k,v,o" string). finetune="lora" means
    plain LoRA (n_loras is then 1). The adapters draw from torch's global RNG. Returns the settings
    dict that goes into adapter files (also kept as model.adapter_settings). init: '' = the
    finetune's own; 'lora' (B = 0, no s) or 'multilora' (random B, s = 0) with any n_loras.
    device: where the adapters go (default: their base weight's; train.py under FSDP draws them in
    full on a weightless meta-device base, so they get the values a single process gives them)."""
    if finetune not in ("multilora", "lora"):
        raise UserError(f"adapt_model: finetune: expected 'multilora' or 'lora', got {finetune!r}")
    if getattr(model, "adapter_settings", None) is not None:
        raise UserError(f"adapt_model: model: already adapted with {model.adapter_settings}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets or any(t not in TARGET_MODULES for t in targets):
        names = ",".join(TARGET_MODULES)
        raise UserError(f"adapt_model: targets: expected names from {names}, got {list(targets)}")
    targets = [t for t in TARGET_MODULES if t in targets]  # canonical order, no duplicates
    n_loras = 1 if finetune == "lora" else n_loras
    settings = dict(
        finetune=finetune,
        targets=targets,
        n_loras=int(n_loras),
        lora_rank=int(lora_rank),
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        scaling=scaling,
    )
    if init and init != finetune:
        settings["init"] = init  # only when it is not the finetune's own: files stay as they were
    suffixes = tuple("." + TARGET_MODULES[t] for t in targets)
    to_wrap = [name for name, m in model.named_modules() if name.endswith(suffixes)]
    if not to_wrap:
        raise UserError(f"adapt_model: targets: no module of the model matches {targets}")
    model.requires_grad_(False)
    layer_args = (n_loras, lora_rank, lora_alpha, lora_dropout, scaling, init or finetune, device)
    for name in to_wrap:
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, MultiLoRALinear(getattr(parent, child_name), *layer_args))
    model.adapter_settings = settings
    model.base_sample = checkpoint.base_sample(model)  # the base as it is now, for adapter files
    return settings


def count_trainable(model):
    """(trainable parameter count, base model parameter count); tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_total = sum(p.numel() for name, p in model.named_parameters() if not is_lora_key(name))
    return trainable, base_total


def merge_adapters(model):
    for _, m in adapter_modules(model):
        m.merge()


def unmerge_adapters(model):
    for _, m in adapter_modules(model):
        m.unmerge()


@torch.no_grad()
def delta_weights(model):
    """{module_name: ΔW (d_out, d_in) fp32} for every adapted projection (for the SVD analysis)."""
    return {name: m.delta_weight().detach() for name, m in adapter_modules(model)}


# -----------------------------------------------------------------------------
# adapter files: the lora_ tensors in safetensors, the settings and the base's identity in the
# metadata (checkpoint.py's adapter section checks them)


def adapter_state_dict(model):
    """{model key: tensor} of the lora_ parameters only, e.g. layers.0.self_attn.q_proj.lora_A."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_key(name)}


def save_adapter(model, path, settings=None, state=None, step=None):
    """Write the adapter as fp32 tensors. state: the adapter tensors when they are not the model's
    own (train.py under FSDP passes the all-gathered ones). step: the training step, kept too."""
    state = adapter_state_dict(model) if state is None else state
    tensors = {k: v.float().contiguous().cpu() for k, v in state.items()}
    metadata = checkpoint.adapter_metadata(model, settings or model.adapter_settings, step)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:  # sorted keys: the same adapter gives the same bytes
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        checkpoint.write_safetensors(tmp, specs, tensors.get, metadata)


def load_adapter(path, model=None, any_base=False):
    """Read an adapter file -> (state {key: tensor}, settings), checked (checkpoint.read_adapter).
    With a model, refuse a file made for another base (names and shapes; and weights, unless
    any_base) or for other settings than the model is adapted with."""
    state, settings, _ = checkpoint.read_adapter(path, TARGET_MODULES, model, any_base)
    if model is not None and getattr(model, "adapter_settings", None) is not None:
        checkpoint.check_adapter_fits(path, state, settings, model)
    return state, settings


def apply_adapter(model, path, merge=False, any_base=False):
    """Adapt a base model with the file's settings (unless already adapted with the same ones), load
    the adapter, and merge it into W0 if merge (zero inference overhead). Returns the settings."""
    state, settings = load_adapter(path, model, any_base)  # checks before the model is touched
    if getattr(model, "adapter_settings", None) is None:
        keys = checkpoint.SETTINGS_THAT_MUST_MATCH + ("lora_dropout",)
        adapt_model(model, **{k: settings[k] for k in keys}, init=settings.get("init", ""))
        checkpoint.check_adapter_fits(path, state, settings, model)
    unmerge_adapters(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if merge:
        merge_adapters(model)
    return settings
