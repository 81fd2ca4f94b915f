"""
Write a random-weight LLaMA checkpoint of a real shape, so that anyone can measure loading, memory
and speed at 7B-70B without downloading weights (docs/scaling.md). Files are written one shard at a
time and each tensor is drawn in slices, so memory stays at one shard whatever the model's size.

    python tools/random_llama.py --preset=llama2-7b --dtype=bfloat16 --out_dir=out/llama2-7b
    # a flag overrides
    python tools/random_llama.py --preset=llama3-8b --n_layers=2 --out_dir=out/l3-2
    python tools/random_llama.py --dim=2048 --n_layers=8 --vocab_size=32000 --out_dir=out/l2g
    # + data for it
    python tools/random_llama.py --dim=2048 --n_layers=8 --tasks=True --out_dir=out/l2g
    python tools/random_llama.py --preset=llama2-7b --layout=meta --meta_shards=2 \\
        --out_dir=out/l7-meta

layout=hf: config.json + model.safetensors, or model-0000k-of-0000n.safetensors shards of about
shard_gib each + model.safetensors.index.json. layout=meta: params.json + consolidated.NN.pth, one
per model-parallel rank, split as Meta splits them (docs/formats.md). The same seed gives the
same model in both layouts. Weights are N(0, 0.02), residual outputs scaled by 1/sqrt(2L), norms at
one (llama.Llama.init_weights' rule), drawn per tensor from its own seed: the values do not depend
on the shard size. config.json and the index are written last: an interrupted run leaves no
loadable folder. --tasks=True adds tasks/, the embedded suite with its meta.json's vocab_size set to
the model's (its ids are below 768), so that `train.py --datasets=<out_dir>/tasks` trains on it.
"""

import json
import math
import os
import shutil
import sys

import torch

# the repository's modules, from wherever this script is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint
import util
from configurator import S, configure, declared
from llama import LlamaConfig
from util import UserError

# published shapes (Meta's params.json / the HF config.json of each release); hidden_dim as Meta's
# model.py computes it: int(2·4·dim/3), times ffn_dim_multiplier, rounded up to multiple_of
PRESETS = {
    "llama-7b": dict(
        dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-6, max_seq_len=2048
    ),
    "llama-13b": dict(
        dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-6, max_seq_len=2048
    ),
    "llama-30b": dict(
        dim=6656, n_layers=60, n_heads=52, hidden_dim=17920, norm_eps=1e-6, max_seq_len=2048
    ),
    "llama-65b": dict(
        dim=8192, n_layers=80, n_heads=64, hidden_dim=22016, norm_eps=1e-5, max_seq_len=2048
    ),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "llama3-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "llama3-70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        hidden_dim=28672,
        vocab_size=128256,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}
DEFAULTS = dict(n_kv_heads=0, vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)

# -----------------------------------------------------------------------------
out_dir = S("", util.required, "where the checkpoint goes (a new or empty folder)")
preset = S("", ("",) + tuple(PRESETS), "a published shape; the shape flags below override it")
dim = S(0, "[0, inf)", "model width (0 = the preset's; without a preset: required)")
n_layers = S(0, "[0, inf)", "blocks (0 = the preset's)")
n_heads = S(0, "[0, inf)", "query heads (0 = the preset's, else dim // 128)")
n_kv_heads = S(0, "[0, inf)", "key/value heads (0 = the preset's, else n_heads)")
hidden_dim = S(
    0, "[0, inf)", "SwiGLU width (0 = the preset's, else from multiple_of and ffn_dim_multiplier)"
)
multiple_of = S(256, "[1, inf)", "hidden_dim rounds up to this (when computed)")
ffn_dim_multiplier = S(1.0, "(0, inf)", "hidden_dim multiplier (when computed; 70B: 1.3)")
vocab_size = S(0, "[0, inf)", "vocabulary (0 = the preset's, else 32000)")
rope_theta = S(0.0, "[0, inf)", "RoPE base (0 = the preset's, else 10000)")
max_seq_len = S(0, "[0, inf)", "context length (0 = the preset's, else 4096)")
tie_embeddings = S(False, None, "lm_head shares the embedding (no lm_head.weight in the files)")
dtype = S("bfloat16", ("bfloat16", "float32", "float16"), "weights dtype")
layout = S(
    "hf",
    ("hf", "meta"),
    "hf: config.json + safetensors shards; meta: params.json + consolidated.NN.pth",
)
shard_gib = S(4.0, "(0, inf)", "layout=hf: start a new shard file past this many GiB")
meta_shards = S(1, "[1, inf)", "layout=meta: model-parallel files (Meta's 7B 1, 13B 2, 70B 8)")
tokenizer = S("", None, "a tokenizer.model to copy into out_dir (its size must be vocab_size)")
seed = S(0, util.check_seed, "seed of the weights")
tasks = S(False, None, "also write tasks/: data/tasks, its meta.json saying this vocab_size")
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


def preset_config(name):
    """The LlamaConfig of a preset (tools/plan.py reads shapes from here too)."""
    fields = dict(DEFAULTS, **PRESETS[name])
    if fields["vocab_size"] >= 128000:
        fields.update(bos_id=128000, eos_id=[128001])
    return LlamaConfig(**fields)


def model_config(settings):
    """The LlamaConfig of the settings: a preset's shape with explicit flags on top."""
    s = settings
    fields = dict(DEFAULTS, **PRESETS.get(s["preset"], {}))
    for key in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "hidden_dim",
        "vocab_size",
        "rope_theta",
        "max_seq_len",
    ):
        if s[key]:
            fields[key] = s[key]
    if "dim" not in fields or "n_layers" not in fields:
        raise UserError("give --preset or at least --dim and --n_layers")
    # each flag replaces the preset's value alone; without a preset, heads and width follow dim
    fields.setdefault("n_heads", max(1, fields["dim"] // 128))
    if "hidden_dim" not in fields:
        h = int(s["ffn_dim_multiplier"] * int(2 * 4 * fields["dim"] / 3))
        fields["hidden_dim"] = s["multiple_of"] * math.ceil(h / s["multiple_of"])
    fields["tie_embeddings"] = s["tie_embeddings"]
    if fields["vocab_size"] >= 128000 and "bos_id" not in fields:
        fields.update(bos_id=128000, eos_id=[128001])
    return LlamaConfig(**fields)


def tensor_shapes(c):
    """[(HF key without "model.", shape)] in the order a HF checkpoint stores them."""
    hd = c.head_dim
    shapes = [("embed_tokens.weight", (c.vocab_size, c.dim))]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (c.dim,)),
            (p + "self_attn.q_proj.weight", (c.n_heads * hd, c.dim)),
            (p + "self_attn.k_proj.weight", (c.n_kv_heads * hd, c.dim)),
            (p + "self_attn.v_proj.weight", (c.n_kv_heads * hd, c.dim)),
            (p + "self_attn.o_proj.weight", (c.dim, c.n_heads * hd)),
            (p + "post_attention_layernorm.weight", (c.dim,)),
            (p + "mlp.gate_proj.weight", (c.hidden_dim, c.dim)),
            (p + "mlp.up_proj.weight", (c.hidden_dim, c.dim)),
            (p + "mlp.down_proj.weight", (c.dim, c.hidden_dim)),
        ]
    shapes.append(("norm.weight", (c.dim,)))
    if not c.tie_embeddings:
        shapes.append(("lm_head.weight", (c.vocab_size, c.dim)))
    return shapes


def random_tensor(c, index, key, shape, dtype, seed):
    """Tensor number `index` of the model: its own generator, drawn in slices of ~16M entries into
    `dtype` (no full fp32 copy of a 70B embedding)."""
    out = torch.empty(shape, dtype=dtype)
    if key.endswith("norm.weight"):
        return out.fill_(1.0)
    residual = key.endswith(("o_proj.weight", "down_proj.weight"))
    std = 0.02 / math.sqrt(2 * c.n_layers) if residual else 0.02
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    rows = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], rows):
        out[r : r + rows] = torch.randn(out[r : r + rows].shape, generator=g).mul_(std)
    return out


def write_hf(c, out, torch_dtype, shard_bytes, seed):
    shapes = tensor_shapes(c)
    nbytes = [math.prod(shape) * torch_dtype.itemsize for _, shape in shapes]
    groups, size = [[]], 0  # tensor indices per shard, in order
    for i, n in enumerate(nbytes):
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    hf_key = lambda key: key if key == "lm_head.weight" else "model." + key
    weight_map = {}
    for name, group in zip(names, groups):
        at = {hf_key(shapes[i][0]): i for i in group}  # each tensor drawn as it is written
        specs = {k: (torch_dtype, shapes[i][1]) for k, i in at.items()}
        take = lambda k: random_tensor(c, at[k], *shapes[at[k]], torch_dtype, seed)  # noqa: E731
        with util.atomic_write(os.path.join(out, name)) as tmp:
            checkpoint.write_safetensors(tmp, specs, take, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(at, name))
        print(f"wrote {name} ({sum(nbytes[i] for i in group) / 2**30:.2f} GiB)", flush=True)
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}
        util.write_text(
            os.path.join(out, "model.safetensors.index.json"), json.dumps(index, indent=2)
        )
    config = checkpoint.config_to_hf(c, str(torch_dtype).removeprefix("torch."))
    util.write_text(os.path.join(out, "config.json"), json.dumps(config, indent=2))
    return sum(nbytes)


def hf_to_meta(key, w, c):
    """HF key and tensor -> Meta's: the inverse of checkpoint.meta_to_hf (wq/wk rows back to
    interleaved RoPE pairs)."""
    if key in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        return {
            "embed_tokens.weight": "tok_embeddings.weight",
            "norm.weight": "norm.weight",
            "lm_head.weight": "output.weight",
        }[key], w
    layer, _, rest = key.removeprefix("layers.").partition(".")
    meta = {v: k for k, v in checkpoint.META_NAMES.items()}[rest.removesuffix(".weight")]
    if meta in ("attention.wq", "attention.wk"):
        heads = c.n_heads if meta == "attention.wq" else c.n_kv_heads
        hd = c.head_dim
        w = w.view(heads, 2, hd // 2, c.dim).transpose(1, 2).reshape(heads * hd, c.dim)
    return f"layers.{layer}.{meta}.weight", w


def meta_ffn_fields(c):
    """params.json's multiple_of (and ffn_dim_multiplier) that give hidden_dim back: the published
    ones where they do (LLaMA: 256; Llama 2/3 70B: 1.3 and 4096; Llama 3 8B: 1.3 and 1024)."""
    exact = c.hidden_dim / int(8 * c.dim / 3)
    for fields in (
        {"multiple_of": 256},
        {"ffn_dim_multiplier": 1.3, "multiple_of": 1024},
        {"ffn_dim_multiplier": 1.3, "multiple_of": 4096},
        {"multiple_of": c.hidden_dim},
        {"ffn_dim_multiplier": exact, "multiple_of": c.hidden_dim},
    ):
        if (
            checkpoint.config_from_meta(
                dict(fields, dim=c.dim, n_layers=1, n_heads=1), c.vocab_size
            ).hidden_dim
            == c.hidden_dim
        ):
            return fields
    raise UserError(f"hidden_dim {c.hidden_dim}: no multiple_of gives it back from dim {c.dim}")


def write_meta(c, out, torch_dtype, n_files, seed):
    """params.json + consolidated.NN.pth: column-parallel weights split on dim 0, wo/w2 on dim 1,
    norms whole in every file, the embedding on dim 1 (LLaMA 1/2) or dim 0 (Llama 3). Each file is
    built from freshly drawn tensors (the same values every time): one file in memory at a time."""
    if c.tie_embeddings:
        raise UserError("--layout=meta: Meta's files hold output.weight; drop --tie_embeddings")
    if c.n_kv_heads * c.head_dim % n_files or c.dim % n_files or c.hidden_dim % n_files:
        raise UserError(
            f"--meta_shards={n_files}: the kv width, dim and hidden_dim must divide by it"
        )
    llama3 = c.vocab_size >= 128000
    if llama3 and c.vocab_size % n_files:
        raise UserError(f"--meta_shards={n_files}: vocab_size {c.vocab_size} must divide by it")
    shapes, total = tensor_shapes(c), 0
    for k in range(n_files):
        state = {}
        for i, (key, shape) in enumerate(shapes):
            name, w = hf_to_meta(key, random_tensor(c, i, key, shape, torch_dtype, seed), c)
            if w.dim() == 2 and n_files > 1:
                rows_whole = name.endswith(checkpoint.ROW_PARALLEL) or (
                    name == "tok_embeddings.weight" and not llama3
                )
                w = w.chunk(n_files, dim=1 if rows_whole else 0)[k].clone()
            state[name] = w
        path = os.path.join(out, f"consolidated.{k:02d}.pth")
        with util.atomic_write(path) as tmp:
            torch.save(state, tmp)
        total += sum(t.numel() * t.element_size() for t in state.values())
        print(f"wrote consolidated.{k:02d}.pth", flush=True)
        del state
    params = {
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size,
        "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_seq_len": c.max_seq_len,
    }
    params.update(meta_ffn_fields(c))
    util.write_text(os.path.join(out, "params.json"), json.dumps(params, indent=2))
    return total


def main(argv):
    settings = configure(SETTINGS, argv, "tools/random_llama.py")
    c = model_config(settings)
    out = settings["out_dir"]
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out_dir={out}: exists and is not an empty folder; give a new one")
    torch_dtype = getattr(torch, settings["dtype"])
    if settings["tasks"]:  # the embedded suite for this shape (train.py checks the vocab_size)
        suite = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tasks")
        with open(os.path.join(suite, "meta.json")) as f:
            meta = json.load(f)
        if c.vocab_size < meta["vocab_size"]:
            raise UserError(
                f"--tasks=True: data/tasks needs vocab_size >= {meta['vocab_size']}, "
                f"the model has {c.vocab_size}"
            )
    if settings["tokenizer"]:
        from tokenizer import load_tokenizer

        n = load_tokenizer(settings["tokenizer"]).vocab_size
        if n != c.vocab_size:
            raise UserError(
                f"--tokenizer={settings['tokenizer']}: {n} tokens, the model has "
                f"vocab_size {c.vocab_size}"
            )
    os.makedirs(out, exist_ok=True)
    if settings["layout"] == "hf":
        total = write_hf(c, out, torch_dtype, int(settings["shard_gib"] * 2**30), settings["seed"])
    else:
        total = write_meta(c, out, torch_dtype, settings["meta_shards"], settings["seed"])
    if settings["tokenizer"]:
        with util.atomic_write(os.path.join(out, "tokenizer.model")) as tmp:
            shutil.copyfile(settings["tokenizer"], tmp)
    if settings["tasks"]:
        shutil.copytree(suite, os.path.join(out, "tasks"))
        meta["vocab_size"] = c.vocab_size
        util.write_text(os.path.join(out, "tasks", "meta.json"), json.dumps(meta, indent=1))
    params = sum(math.prod(shape) for _, shape in tensor_shapes(c))
    print(
        f"wrote {out}: {params / 1e9:.3f}B parameters, {total / 2**30:.2f} GiB "
        f"{settings['dtype']} (dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, "
        f"{c.n_kv_heads} kv heads, hidden {c.hidden_dim}, vocab {c.vocab_size})"
    )


if __name__ == "__main__":
    util.run_cli(main)
