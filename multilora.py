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

import hashlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from checkpoint import iter_safetensors, read_safetensors_header, shard_rows, write_safetensors
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
ADAPTER_FORMAT = "multilora-adapter-v1"

# -----------------------------------------------------------------------------
# the layer


class MultiLoRALinear(nn.Module):
    """A frozen bias-free nn.Linear plus n parallel LoRA modules, computed as one rank-(n·r) product.

    Parameters (the frozen weight keeps the base layer's key, so base checkpoints load unchanged):
      weight  (d_out, d_in)   frozen W0, any dtype (e.g. bf16)
      lora_A  (n·r, d_in)     [A_1; …; A_n], fp32
      lora_B  (d_out, n·r)    [B_1 … B_n], fp32
      lora_s  (n, d_out) for scaling="channel", (n, 1) for "scalar"; fp32, zero-init; absent for LoRA
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
        if n_loras * lora_rank > min(d_in, d_out):
            raise UserError(
                f"MultiLoRALinear: n_loras*lora_rank: expected <= min(d_in, d_out) = "
                f"{min(d_in, d_out)}, got {n_loras}*{lora_rank} = {n_loras * lora_rank}"
            )
        self.in_features, self.out_features = d_in, d_out
        self.n_loras, self.lora_rank, self.lora_alpha = n_loras, lora_rank, lora_alpha
        self.lora_dropout, self.scaling, self.init = lora_dropout, scaling, init
        self.scale = lora_alpha / lora_rank  # α/r, per module (as PEFT and MTL-LoRA's MultiLoRA)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device, nr = (
            device or base.weight.device,
            n_loras * lora_rank,
        )  # FSDP: a meta base, real adapters
        self.lora_A = nn.Parameter(torch.empty(nr, d_in, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(d_out, nr, device=device, dtype=torch.float32))
        if init == "multilora":
            self.lora_s = nn.Parameter(
                torch.empty(
                    n_loras,
                    d_out if scaling == "channel" else 1,
                    device=device,
                    dtype=torch.float32,
                )
            )
        else:
            self.lora_s = None
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        r = self.lora_rank
        with torch.no_grad():
            # Kaiming-uniform with a=√5 (nn.Linear's default, LoRA's and PEFT's A init): bound = 1/√fan_in.
            # Each module gets its own draw; for B_i the fan-in is r, not n·r, so init block by block.
            for i in range(self.n_loras):
                nn.init.kaiming_uniform_(self.lora_A[i * r : (i + 1) * r], a=math.sqrt(5))
            if self.init == "multilora":
                for i in range(self.n_loras):  # paper: B random too; s = 0 keeps ΔW = 0 at step 0
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
            # bf16 activations into the fp32 adapter, as PEFT does. Under autocast F.linear picks the
            # dtype itself, and this would only add a (..., d_in) copy per adapted layer.
            x = x.to(self.lora_A.dtype)
        if self.lora_dropout > 0:
            x = F.dropout(x, self.lora_dropout, self.training)
        # (..., d_in) -> (..., n·r) -> (..., d_out): one down- and one up-projection for all n modules
        return out + F.linear(F.linear(x, self.lora_A), self.folded_B()).to(out.dtype)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + ΔW (fp32 arithmetic, then cast to W0's dtype). Merging twice is a no-op."""
        if self.merged:
            return
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():  # PEFT's safe_merge check: never write NaN/inf into W0
            raise UserError("MultiLoRALinear.merge: lora weights: merged weight is not finite")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - ΔW. Exact up to round-off in fp32; in bf16 it loses the bits the merge rounded."""
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


def is_lora_key(name):
    return name.rsplit(".", 1)[-1].startswith("lora_")


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
    dict that goes into adapter files (also kept as model.adapter_settings). init: '' = the finetune's
    own; 'lora' (B = 0, no s) or 'multilora' (random B, s = 0) with any n_loras, for ablations.
    device: where the adapters go (default: their base weight's; train.py under FSDP draws them in
    full on a weightless meta-device base, so they get the values a single process gives them)."""
    if finetune not in ("multilora", "lora"):
        raise UserError(f"adapt_model: finetune: expected 'multilora' or 'lora', got {finetune!r}")
    if getattr(model, "adapter_settings", None) is not None:
        raise UserError(f"adapt_model: model: already adapted with {model.adapter_settings}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown or not targets:
        raise UserError(
            f"adapt_model: targets: expected names from {','.join(TARGET_MODULES)}, got {list(targets)}"
        )
    targets = [t for t in TARGET_MODULES if t in targets]  # canonical order, no duplicates
    if finetune == "lora":
        n_loras = 1
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
    for p in model.parameters():
        p.requires_grad_(False)
    for name in to_wrap:
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = MultiLoRALinear(
            getattr(parent, child_name),
            n_loras,
            lora_rank,
            lora_alpha,
            lora_dropout,
            scaling,
            init=settings.get("init", finetune),
            device=device,
        )
        setattr(parent, child_name, layer)
    model.adapter_settings = settings
    model.base_sample = base_sample(model)  # the base as it is now, for the adapter file
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
# adapter files: safetensors with only the lora_ tensors, settings + base fingerprint in the metadata


def base_fingerprint(model):
    """Hash of the base model's parameter names and shapes (the adapter's lora_ keys excluded)."""
    lines = [
        f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters() if not is_lora_key(name)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@torch.no_grad()
def base_sample(model, n=8):
    """A few of the base's weight values (n evenly spaced entries of the embedding, the first layer's
    q_proj and the final norm): two bases of the same shapes but other weights differ here, while the
    same base loaded in fp32 or bf16 agrees to bf16 precision. Of a model that FSDP2 has sharded,
    each rank gives the entries in its rows (a collective: every rank calls)."""
    params = dict(model.named_parameters())
    sample = []
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"):
        p = params.get(name)
        mesh = getattr(p, "device_mesh", None)
        local = None if p is None else (p.to_local() if mesh else p).detach()
        if local is None or local.is_meta:
            continue
        # integer positions: a float32 linspace rounds past 2^24 entries (LLaMA-7B's embedding has 131M)
        index = torch.arange(n, dtype=torch.int64) * (p.numel() - 1) // max(n - 1, 1)
        if mesh is None:
            sample += local.reshape(-1)[index.to(local.device)].float().tolist()
            continue
        row = p.numel() // p.shape[0]
        first = shard_rows(p.shape[0], mesh.get_local_rank(), mesh.size())[0] * row
        mine = (index >= first) & (index < first + local.numel())
        values = torch.zeros(n, dtype=torch.float64, device=local.device)
        values[mine.to(local.device)] = local.reshape(-1)[
            (index[mine] - first).to(local.device)
        ].double()
        torch.distributed.all_reduce(values, group=mesh.get_group())  # one rank holds each entry
        sample += values.float().tolist()
    return sample


def same_base_sample(recorded, here):
    """Whether two base samples are of the same weights: equal to bf16 precision (1%)."""
    return (
        isinstance(recorded, list)
        and len(recorded) == len(here)
        and all(
            isinstance(a, (int, float)) and abs(a - b) <= 1e-2 * abs(b) + 1e-6
            for a, b in zip(recorded, here)
        )
    )


def base_summary(model):
    c = model.config
    return f"dim={c.dim} n_layers={c.n_layers} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} hidden_dim={c.hidden_dim} vocab_size={c.vocab_size}"


def adapter_state_dict(model):
    """{model key: fp32 tensor} for the lora_ parameters only, e.g. layers.0.self_attn.q_proj.lora_A."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_key(name)}


def save_adapter(model, path, settings=None, state=None, step=None):
    """state: the adapter tensors when they are not the model's own (train.py under FSDP passes the
    all-gathered ones); default adapter_state_dict(model). step: the training step, kept in the metadata."""
    settings = settings or model.adapter_settings
    state = adapter_state_dict(model) if state is None else state
    tensors = {k: v.float().contiguous().cpu() for k, v in state.items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "settings": json.dumps(settings, sort_keys=True),
        "base_fingerprint": base_fingerprint(model),
        "base_summary": base_summary(model),
        "base_sample": json.dumps(getattr(model, "base_sample", None) or base_sample(model)),
        **({"step": str(step)} if step is not None else {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:  # sorted keys: the same adapter gives the same bytes
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        write_safetensors(tmp, specs, tensors.get, metadata)


SETTINGS_THAT_MUST_MATCH = ("finetune", "targets", "n_loras", "lora_rank", "lora_alpha", "scaling")
ADAPTER_SETTINGS = {  # what an adapter file's metadata.settings must hold: key -> (expected, test)
    "finetune": ("'multilora' or 'lora'", lambda v: v in ("multilora", "lora")),
    "targets": (
        "a list of names from q,k,v,o,gate,up,down",
        lambda v: isinstance(v, list) and set(v) <= set(TARGET_MODULES),
    ),
    "n_loras": ("an int >= 1", lambda v: type(v) is int and v >= 1),
    "lora_rank": ("an int >= 1", lambda v: type(v) is int and v >= 1),
    "lora_alpha": ("a number", lambda v: type(v) in (int, float) and math.isfinite(v)),
    "lora_dropout": ("a number in [0, 1)", lambda v: type(v) in (int, float) and 0 <= v < 1),
    "scaling": ("'channel' or 'scalar'", lambda v: v in ("channel", "scalar")),
}


def load_adapter(path, model=None, any_base=False):
    """Read an adapter file -> (state {key: tensor}, settings), checked: a safetensors file of finite
    floating-point tensors, metadata of the right types. With a model, refuse (UserError, one line) a
    file made for another base (names and shapes; and weights, unless any_base) or for other settings
    than the model is adapted with."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: adapter file not found")
    _, metadata, _ = read_safetensors_header(path)
    state = dict(iter_safetensors(path))
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise UserError(f"{path}: {k}: not finite (NaN or inf): the run that wrote it diverged")
    if metadata.get("format") != ADAPTER_FORMAT:
        raise UserError(
            f"{path}: metadata.format: expected {ADAPTER_FORMAT!r}, got {metadata.get('format')!r}"
        )
    try:
        settings = json.loads(metadata["settings"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{path}: metadata.settings: expected a JSON object of adapter settings"
        ) from None
    for k, (expected, ok) in ADAPTER_SETTINGS.items():
        value = settings.get(k) if isinstance(settings, dict) else None
        if not ok(value):
            raise UserError(f"{path}: metadata.settings.{k}: expected {expected}, got {value!r}")
    if model is not None:
        check_adapter(path, state, settings, metadata, model, any_base)
    return state, settings


def check_adapter(path, state, settings, metadata, model, any_base=False):
    want, have = metadata.get("base_fingerprint"), base_fingerprint(model)
    if want != have:
        raise UserError(
            f"{path}: base_fingerprint: adapter was made for a base with "
            f"{metadata.get('base_summary', '?')} (fingerprint {want}), this model has "
            f"{base_summary(model)} (fingerprint {have})"
        )
    try:
        sample = json.loads(metadata.get("base_sample") or "null")
    except ValueError:
        sample = None
    here = getattr(model, "base_sample", None) or base_sample(model)
    # files without a sample (older ones) are checked by shape only
    if not any_base and sample is not None and not same_base_sample(sample, here):
        raise UserError(
            f"{path}: base_sample: the adapter was trained on a base of the same "
            f"shapes but other weights; pass any_base=True (--adapter_any_base=True) "
            f"if you mean to apply it anyway"
        )
    current = getattr(model, "adapter_settings", None)
    if current is not None:
        for k in SETTINGS_THAT_MUST_MATCH:
            if settings.get(k) != current.get(k):
                raise UserError(
                    f"{path}: settings.{k}: model is adapted with {k}={current.get(k)!r}, "
                    f"adapter file has {k}={settings.get(k)!r}"
                )
        expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        for k in sorted(set(expected) | set(got)):
            if expected.get(k) != got.get(k):
                raise UserError(f"{path}: {k}: expected shape {expected.get(k)}, got {got.get(k)}")


def apply_adapter(model, path, merge=False, any_base=False):
    """Adapt a base model with the file's settings (unless already adapted with the same ones), load
    the adapter into it, and merge it into the frozen weights if merge (zero inference overhead).
    Returns the settings."""
    state, settings = load_adapter(
        path, model, any_base
    )  # checks the base before the model is touched
    if getattr(model, "adapter_settings", None) is None:
        adapt_model(
            model,
            **{k: settings[k] for k in SETTINGS_THAT_MUST_MATCH + ("lora_dropout",)},
            init=settings.get("init", ""),
        )
        check_adapter(path, state, settings, {"base_fingerprint": base_fingerprint(model)}, model)
    unmerge_adapters(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if merge:
        merge_adapters(model)
    return settings
