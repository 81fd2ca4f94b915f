"""
MultiLoRA (Wang et al. 2023, arXiv 2311.11501) and plain LoRA (Hu et al. 2021) on a llama.py model.

One adapted linear layer with frozen W0 (d_out, d_in), n modules of rank r:
    h = W0·x + (α/r) · Σ_{i=1..n} s_i ⊙ (B_i · A_i · dropout(x))
      = W0·x + [ (α/r)·[diag(s_1)B_1 … diag(s_n)B_n] ] · [A_1; …; A_n] · dropout(x)
The second line is how it is computed: the n modules are ONE rank-(n·r) LoRA whose B has s folded in
(a (d_out, n·r) elementwise product), so MultiLoRA costs what a LoRA of rank n·r costs.
Plain LoRA is the same layer with init="lora": n = 1, B = 0, no s. docs/method.md walks through it;
export.py turns an adapter file into a PEFT one. ARMS, below the layer, is the one place that
declares the kinds of adapter (train.py's finetune): a new kind is its layer class plus one entry.
"""

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
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

    def delta_factors(self):
        """(B, A) with ΔW = B·A: (folded_B, lora_A) (analyze.py decomposes ΔW from them)."""
        return self.folded_B(), self.lora_A

    def delta_weight(self):
        """ΔW = folded_B · lora_A, (d_out, d_in) in fp32."""
        return self.folded_B().float() @ self.lora_A.float()

    def peft_form(self):
        """(lora_A, lora_B, r, lora_alpha) of the PEFT LoRA that computes exactly this ΔW: plain
        LoRA (n = 1, no s) as it is; otherwise the rank-(n·r) identity, the scale folded into B
        and α' = r' = n·r, so that PEFT's α'/r' is 1 (docs/method.md)."""
        if self.lora_s is None and self.n_loras == 1:
            return self.lora_A, self.lora_B, self.lora_rank, self.lora_alpha
        nr = self.n_loras * self.lora_rank
        return self.lora_A, self.folded_B(), nr, nr

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
# the arms: every kind of adapter, declared here once (finetune=full, every weight trained, is no
# adapter); train.py, generate.py, eval.py, export.py, analyze.py, compare.py and tools/ read them


@dataclass(frozen=True)
class Arm:
    """A kind of adapter.
    layer:    its module class, built as layer(base, **settings, device=device) around a frozen
              bias-free nn.Linear `base`, whose weight it keeps as `weight` (so base checkpoints
              load unchanged); it has delta_weight() -> ΔW (d_out, d_in) if it can merge, and may
              have delta_factors() -> (B, A) with ΔW = B·A (analyze.py's exact SVD)
    params:   its trainable tensors, by attribute name: what adapter files and ckpt.pt hold (one
              that is None in a layer is left out: MultiLoRA's lora_s under LoRA's init)
    settings: the settings its layer takes, from adapt_model's (train.py's lora_settings), each
              stored in adapter files and checked on reading by CHECKS
    merge:    whether ΔW is a fixed matrix that merge()/unmerge() add into W0 (export --format=hf,
              merged inference, analyze.py's spectra)
    peft:     layer -> (lora_A, lora_B, r, lora_alpha), the PEFT LoRA that computes exactly its
              ΔW; None: export --format=peft refuses the arm
    fixed:    settings the arm pins, whatever is asked (LoRA: n_loras = 1)
    optional: settings stored only when they differ from these defaults (older files lack them)"""

    layer: type
    params: tuple
    settings: tuple
    merge: bool
    peft: object = None
    fixed: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)


_COMMON = ("n_loras", "lora_rank", "lora_alpha", "lora_dropout", "scaling")
_PARAMS = ("lora_A", "lora_B", "lora_s")
_PEFT = MultiLoRALinear.peft_form
ARMS = {
    "multilora": Arm(
        MultiLoRALinear, _PARAMS, _COMMON, merge=True, peft=_PEFT, optional={"init": "multilora"}
    ),
    "lora": Arm(
        MultiLoRALinear,
        _PARAMS,
        _COMMON,
        merge=True,
        peft=_PEFT,
        fixed={"n_loras": 1},
        optional={"init": "lora"},
    ),
}


def _is_count(v):
    return type(v) is int and v >= 1


# what an adapter file's value of each setting must be: (test, what is expected)
CHECKS = {
    "n_loras": (_is_count, "an int >= 1"),
    "lora_rank": (_is_count, "an int >= 1"),
    "lora_alpha": (lambda v: type(v) in (int, float) and math.isfinite(v), "a number"),
    "lora_dropout": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
    "scaling": (lambda v: v in ("channel", "scalar"), "'channel' or 'scalar'"),
    # MultiLoRALinear's two initializations (named after the arms that use them)
    "init": (lambda v: v in ("multilora", "lora"), "'multilora' or 'lora'"),
}
# settings that shape only the training, not what a trained adapter computes: a file may differ
TRAINING_ONLY = ("lora_dropout", "init")


def arm(finetune, where="finetune"):
    """ARMS[finetune], or one line naming `where` and the registered arms."""
    if not isinstance(finetune, str) or finetune not in ARMS:
        raise UserError(f"{where}: expected {' or '.join(map(repr, ARMS))}, got {finetune!r}")
    return ARMS[finetune]


def adapter_modules(model):
    """[(module_name, adapter layer)] in model order: the modules of the arms' layer classes."""
    layers = tuple({a.layer for a in ARMS.values()})
    return [(name, m) for name, m in model.named_modules() if isinstance(m, layers)]


# -----------------------------------------------------------------------------
# adapting a model


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
    """Wrap the chosen projections of every layer in the arm's layer (ARMS[finetune]), freeze
    everything else. targets: names from q,k,v,o,gate,up,down (a list or a "q,k,v,o" string); the
    arm takes the settings its entry names (finetune="lora": plain LoRA, n_loras pinned to 1). The
    adapters draw from torch's global RNG. Returns the settings dict that goes into adapter files
    (also kept as model.adapter_settings). init: '' = the finetune's own; 'lora' (B = 0, no s) or
    'multilora' (random B, s = 0) with any n_loras. device: where the adapters go (default: their
    base weight's; train.py under FSDP draws them in full on a weightless meta-device base, so they
    get the values a single process gives them)."""
    kind = arm(finetune, "adapt_model: finetune")
    if getattr(model, "adapter_settings", None) is not None:
        raise UserError(f"adapt_model: model: already adapted with {model.adapter_settings}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets or any(t not in TARGET_MODULES for t in targets):
        names = ",".join(TARGET_MODULES)
        raise UserError(f"adapt_model: targets: expected names from {names}, got {list(targets)}")
    targets = [t for t in TARGET_MODULES if t in targets]  # canonical order, no duplicates
    asked = dict(
        n_loras=int(n_loras),
        lora_rank=int(lora_rank),
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        scaling=scaling,
        init=init,
    )
    asked |= kind.fixed
    settings = dict(finetune=finetune, targets=targets, **{k: asked[k] for k in kind.settings})
    # an optional setting only when it is not the arm's own: files stay as they were
    settings |= {k: asked[k] for k, own in kind.optional.items() if asked[k] not in ("", own)}
    suffixes = tuple("." + TARGET_MODULES[t] for t in targets)
    to_wrap = [name for name, m in model.named_modules() if name.endswith(suffixes)]
    if not to_wrap:
        raise UserError(f"adapt_model: targets: no module of the model matches {targets}")
    model.requires_grad_(False)
    # the base as it is now, for adapter files: its names and shapes before any adapter is added
    model.base_fingerprint = checkpoint.base_fingerprint(model)
    for name in to_wrap:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        child = name.rsplit(".", 1)[1]
        layer = kind.layer(getattr(parent, child), **layer_settings(kind, settings), device=device)
        setattr(parent, child, layer.train(model.training))  # an eval-mode model: no dropout
    model.adapter_settings = settings
    model.base_sample = checkpoint.base_sample(model)
    return settings


def layer_settings(kind, settings):
    """The arguments of an arm's layer, from an adapter's settings."""
    return {k: settings.get(k, own) for k, own in kind.optional.items()} | {
        k: settings[k] for k in kind.settings
    }


def count_trainable(model):
    """(trainable parameter count, base model parameter count); tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = adapter_state_dict(model)
    base_total = sum(p.numel() for k, p in model.named_parameters() if k not in adapters)
    return trainable, base_total


def merge_adapters(model):
    """Add ΔW into W0 where the model's arm can merge (ARMS[...].merge); else leave it unmerged."""
    settings = getattr(model, "adapter_settings", None)
    for _, m in adapter_modules(model) if settings and ARMS[settings["finetune"]].merge else []:
        m.merge()


def unmerge_adapters(model):
    for _, m in adapter_modules(model):
        if getattr(m, "merged", False):
            m.unmerge()


@torch.no_grad()
def delta_weights(model):
    """{module_name: ΔW (d_out, d_in) fp32} for every adapted projection (for the SVD analysis)."""
    return {name: m.delta_weight().detach() for name, m in adapter_modules(model)}


# -----------------------------------------------------------------------------
# adapter files: the arm's tensors in safetensors, the settings and the base's identity in the
# metadata (checkpoint.py's adapter section writes and reads them; the checks of the settings are
# here, with the arms)


def adapter_state_dict(model):
    """{model key: tensor} of the adapters' parameters only (their arm's params), in model order,
    e.g. layers.0.self_attn.q_proj.lora_A. Of a model without adapters: {}."""
    settings = getattr(model, "adapter_settings", None)
    params = ARMS[settings["finetune"]].params if settings else ()
    return {
        f"{name}.{p}": getattr(m, p).detach()
        for name, m in adapter_modules(model)
        for p in params
        if getattr(m, p, None) is not None
    }


def check_settings(path, settings):
    """An adapter file's settings, checked: a registered arm, targets, and each of the arm's
    settings (CHECKS); the first bad one is one line naming the file and the key."""

    def refuse(key, expected):
        got = settings.get(key)
        return UserError(f"{path}: metadata.settings.{key}: expected {expected}, got {got!r}")

    kind = arm(settings.get("finetune"), f"{path}: metadata.settings.finetune")
    targets = settings.get("targets")
    if not isinstance(targets, list) or not all(
        isinstance(t, str) and t in TARGET_MODULES for t in targets
    ):
        raise refuse("targets", f"a list of names from {','.join(TARGET_MODULES)}")
    given = [k for k in kind.optional if k in settings]
    for key in list(kind.settings) + given:
        test, expected = CHECKS[key]
        if not test(settings.get(key)):
            raise refuse(key, expected)


def check_fits(path, settings, model):
    """Refuse an adapter file whose settings differ from those the model is adapted with (settings
    in TRAINING_ONLY may differ); its tensors' shapes are check_shapes'."""
    adapted = model.adapter_settings
    keys = ("finetune", "targets", *ARMS[adapted["finetune"]].settings)
    for k in (k for k in keys if k not in TRAINING_ONLY):
        if settings.get(k) != adapted.get(k):
            raise UserError(
                f"{path}: settings.{k}: model is adapted with {k}={adapted.get(k)!r}, "
                f"adapter file has {k}={settings.get(k)!r}"
            )


def check_shapes(path, got, model, settings):
    """Refuse an adapter whose tensors ({key: shape}) are not those that settings give this model's
    targets: each arm layer built on the meta device, so nothing is allocated or drawn."""
    kind = ARMS[settings["finetune"]]
    suffixes = tuple("." + TARGET_MODULES[t] for t in settings["targets"])
    expected = {}
    for name, m in model.named_modules():
        if name.endswith(suffixes):
            base = nn.Linear(*reversed(m.weight.shape), bias=False, device="meta")
            layer = kind.layer(base, **layer_settings(kind, settings), device="meta")
            for p in kind.params:
                if getattr(layer, p, None) is not None:
                    expected[f"{name}.{p}"] = tuple(getattr(layer, p).shape)
    for k in sorted(set(expected) | set(got)):
        if expected.get(k) != got.get(k):
            raise UserError(
                f"{path}: tensor {k[:200]}: expected shape {expected.get(k)}, got {got.get(k)}"
            )


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

    def check(path, settings, header, metadata):
        check_settings(path, settings)
        if model is not None:
            checkpoint.check_adapter_base(path, metadata, model, any_base)
            if getattr(model, "adapter_settings", None) is not None:
                check_fits(path, settings, model)
            check_shapes(path, {k: tuple(t["shape"]) for k, t in header.items()}, model, settings)

    state, settings, _ = checkpoint.read_adapter(path, check)
    return state, settings


def apply_adapter(model, path, merge=False, any_base=False):
    """Adapt a base model with the file's settings (unless already adapted with the same ones), load
    the adapter, and if merge, merge it into W0 where its arm can (zero inference overhead).
    Returns the settings."""
    state, settings = load_adapter(path, model, any_base)  # checks before the model is touched
    if getattr(model, "adapter_settings", None) is None:
        kind = ARMS[settings["finetune"]]
        keys = ("targets", *kind.settings, *kind.optional)
        adapt_model(model, settings["finetune"], **{k: settings[k] for k in keys if k in settings})
    unmerge_adapters(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if merge:
        merge_adapters(model)
    return settings
