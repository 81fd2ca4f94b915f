"""
LLaMA checkpoints as they ship, read into llama.py's model and written back (docs/formats.md):

    Hugging Face layout   config.json + model.safetensors, or shards listed in model.safetensors.index.json
    Meta layout           params.json + consolidated.NN.pth (one per model-parallel rank) or
                          consolidated[.NN].safetensors

    read_config(ckpt_dir)        -> LlamaConfig, reading headers only (no weights)
    load_model(ckpt_dir, dtype)  -> Llama, one tensor at a time straight into its dtype and device
    save_hf_checkpoint(...)      -> config.json + model.safetensors (+ tokenizer files)
    write_tokenizer_files(...)   -> tokenizer.model + what transformers' AutoTokenizer reads

Every file is checked at the boundary: JSON value types, safetensors headers (dtypes, shapes against
the stored bytes, offsets inside the file), names and shapes against the config. A problem is one
UserError naming the file. .pth files load with weights_only=True: no pickled code runs.
"""
import json
import os
import re
import shutil
import struct

import torch
import torch.nn as nn

from llama import Llama, LlamaConfig
from util import UserError, atomic_write, write_text

# -----------------------------------------------------------------------------
# config files

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _getter(cfg, path):
    """get(key, type, default) for a JSON dict: the value, or a UserError naming the file and key."""
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    def get(key, kind, default=KeyError):
        value = cfg.get(key)
        if value is None:
            if default is KeyError:
                raise UserError(f"{path}: {key}: missing (expected {kind.__name__})")
            return default
        if kind is float and type(value) is int:
            return float(value)
        positive = default is KeyError  # required ints are sizes: > 0; optional ones (ids, 0 = unset) >= 0
        if type(value) is not kind or (kind is int and value < positive):
            raise UserError(f"{path}: {key}: expected a{' positive' * positive * (kind is int)} {kind.__name__}, "
                            f"got {value!r}")
        return value
    return get


def _config(path, **fields):
    try:
        return LlamaConfig(**fields)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def config_from_hf(cfg, path="config.json"):
    """LlamaConfig from a Hugging Face config.json dict."""
    get = _getter(cfg, path)
    rope = get("rope_scaling", dict, None) or get("rope_parameters", dict, None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{path}: rope_scaling: rope type {rope_type!r} is not supported (default or llama3)")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(rope.get(key), (int, float)) or isinstance(rope.get(key), bool):
                raise UserError(f"{path}: rope_scaling.{key}: expected a number, got {rope.get(key)!r}")
    eos = cfg.get("eos_token_id", 2)
    eos = eos if isinstance(eos, list) else [eos if eos is not None else 2]
    if not all(type(e) is int for e in eos):
        raise UserError(f"{path}: eos_token_id: expected an int or a list of ints, got {cfg.get('eos_token_id')!r}")
    return _config(path,
        dim=get("hidden_size", int), n_layers=get("num_hidden_layers", int), n_heads=get("num_attention_heads", int),
        n_kv_heads=get("num_key_value_heads", int, 0), head_dim=get("head_dim", int, 0),
        hidden_dim=get("intermediate_size", int), vocab_size=get("vocab_size", int),
        norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=get("rope_theta", float, None) or rope.get("rope_theta") or 10000.0,
        rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
        max_seq_len=get("max_position_embeddings", int, 4096), tie_embeddings=get("tie_word_embeddings", bool, False),
        bos_id=get("bos_token_id", int, 1), eos_id=eos)


def config_from_meta(params, vocab_size, path="params.json"):
    """LlamaConfig from Meta's params.json. vocab_size comes from the weights (params.json often says -1)."""
    get = _getter(params, path)
    dim = get("dim", int)
    # FFN width as in Meta's model.py: 2/3 of 4·dim, times an optional multiplier, rounded up.
    hidden = int(2 * 4 * dim / 3)
    if get("ffn_dim_multiplier", float, None):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = get("multiple_of", int, 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    rope_scaling = None
    if get("use_scaled_rope", bool, False):  # Llama 3.1 / 3.2
        rope_scaling = {"rope_type": "llama3", "factor": get("rope_scaling_factor", float, 8.0),
                        "low_freq_factor": 1.0, "high_freq_factor": get("high_freq_factor", float, 4.0),
                        "original_max_position_embeddings": 8192}
    llama3 = vocab_size >= 128000
    return _config(path,
        dim=dim, n_layers=get("n_layers", int), n_heads=get("n_heads", int), n_kv_heads=get("n_kv_heads", int, 0),
        hidden_dim=hidden, vocab_size=vocab_size, norm_eps=get("norm_eps", float, 1e-5),
        rope_theta=get("rope_theta", float, 10000.0), rope_scaling=rope_scaling,
        max_seq_len=get("max_seq_len", int, 8192 if llama3 else 4096), tie_embeddings=False,  # Meta: output.weight
        bos_id=128000 if llama3 else 1, eos_id=[128001, 128008, 128009] if llama3 else [2])


def config_to_hf(c, torch_dtype="float32"):
    """The config.json that transformers' LlamaForCausalLM reads."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id[0] if len(c.eos_id) == 1 else c.eos_id,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype,
    }

# -----------------------------------------------------------------------------
# safetensors: 8 bytes little-endian header length, then a JSON header {name: {"dtype", "shape",
# "data_offsets": [begin, end]}, "__metadata__": {...}}, then the bytes (github.com/huggingface/safetensors)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")  # model and adapter weights are floating point


def read_safetensors_header(path, dtypes=WEIGHT_DTYPES):
    """-> (tensors, metadata, data_start), checked: each tensor's dtype is one of dtypes, its shape
    matches its byte count, its bytes lie inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                raise UserError(f"{path}: truncated or corrupt safetensors file (no complete header)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, t in header.items():
        ok = isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list) \
            and len(t["data_offsets"]) == 2 and all(type(x) is int and x >= 0 for x in t["shape"] + t["data_offsets"])
        if not ok:
            raise UserError(f"{path}: tensor {name}: corrupt header entry {t!r}")
        if t.get("dtype") not in dtypes:
            raise UserError(f"{path}: tensor {name}: dtype {t.get('dtype')!r}, expected one of {', '.join(dtypes)}")
        begin, end = t["data_offsets"]
        numel = 1
        for d in t["shape"]:
            numel *= d
        if end - begin != numel * DTYPES[t["dtype"]].itemsize:
            raise UserError(f"{path}: tensor {name}: {t['dtype']} {t['shape']} needs "
                            f"{numel * DTYPES[t['dtype']].itemsize} bytes, the header gives it {end - begin}")
        if 8 + n + end > size:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, tensor {name} ends at {8 + n + end})")
    return header, metadata, 8 + n


def iter_safetensors(path, dtypes=WEIGHT_DTYPES):
    """Yield (name, tensor) one at a time, read straight from the file into a fresh CPU tensor.
    Plain reads rather than a memory map keep resident memory at the model plus one tensor."""
    header, _, start = read_safetensors_header(path, dtypes)
    with open(path, "rb") as f:
        for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            out = torch.empty(t["shape"], dtype=DTYPES[t["dtype"]])
            f.seek(start + t["data_offsets"][0])
            if out.numel():
                f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            yield name, out


def saved_step(path):
    """The training step in a safetensors file's metadata (train.py writes it), or None."""
    try:
        return int(read_safetensors_header(path)[1].get("step"))
    except (UserError, OSError, TypeError, ValueError):
        return None


def _torch_load(path):
    try:  # weights_only: tensors and plain containers only, never pickled code
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a torch pickle fails in many ways; report the file, not the internals
        raise UserError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None

# -----------------------------------------------------------------------------
# the two layouts: each gives (config, tensors) where tensors() yields (HF key, tensor, file)

def _hf_source(ckpt_dir):
    cfg_path = os.path.join(ckpt_dir, "config.json")
    config = config_from_hf(_read_json(cfg_path), cfg_path)
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path}: weight_map: expected an object of file names")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(ckpt_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(f"{ckpt_dir}: config.json but no model.safetensors or model.safetensors.index.json")
    paths = [os.path.join(ckpt_dir, f) for f in files]
    for p in paths:  # fail before reading anything
        if not os.path.exists(p):
            raise UserError(f"{p}: missing shard listed in {index_path}")
        read_safetensors_header(p)

    def tensors():
        for p in paths:
            for key, t in iter_safetensors(p):
                if not key.endswith("rotary_emb.inv_freq"):  # old files carry RoPE buffers: recomputed
                    yield key.removeprefix("model."), t, p
    return config, tensors


# Meta key -> HF key (without "model."); docs/formats.md
META_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
              "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # split on dim 1; the others on dim 0


def meta_to_hf(key, w, config):
    """Rename a Meta key and permute wq/wk rows from interleaved RoPE pairs (2j, 2j+1) to HF's
    rotate_half pairs (j, j + hd/2)."""
    if key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        return {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}[key], w
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if not m or m.group(2) not in META_NAMES:
        return key, w  # reported as unexpected by the caller
    name = f"layers.{m.group(1)}.{META_NAMES[m.group(2)]}.weight"
    if m.group(2) in ("attention.wq", "attention.wk") and w.dim() == 2:
        heads = config.n_heads if m.group(2) == "attention.wq" else config.n_kv_heads
        hd = config.head_dim
        if w.shape[0] == heads * hd:
            w = w.view(heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(heads * hd, w.shape[1])
    return name, w


def _meta_source(ckpt_dir):
    params_path = os.path.join(ckpt_dir, "params.json")
    params = _read_json(params_path)
    names = sorted(os.listdir(ckpt_dir))
    pths = [n for n in names if re.fullmatch(r"consolidated\.\d+\.pth", n)]
    sts = [n for n in names if re.fullmatch(r"consolidated(\.\d+)?\.safetensors", n)]
    files = [os.path.join(ckpt_dir, n) for n in pths or sts]
    if not files:
        raise UserError(f"{ckpt_dir}: params.json but no consolidated.NN.pth or consolidated.safetensors")
    for i in range(len(files)):
        if pths and f"consolidated.{i:02d}.pth" not in pths:
            raise UserError(f"{ckpt_dir}: missing shard consolidated.{i:02d}.pth")
    if pths:
        shards = [_torch_load(f) for f in files]  # memory-mapped: nothing is read until used
        shapes = [tuple(s["tok_embeddings.weight"].shape) if "tok_embeddings.weight" in s else None for s in shards]
    else:
        headers = [read_safetensors_header(f)[0] for f in files]
        shapes = [tuple(h["tok_embeddings.weight"]["shape"]) if "tok_embeddings.weight" in h else None for h in headers]
    if None in shapes:
        raise UserError(f"{files[shapes.index(None)]}: no tok_embeddings.weight")
    # LLaMA 1/2 split the embedding on dim 1 (each shard holds every row), Llama 3 on dim 0
    split_rows = len(shapes) > 1 and shapes[0][1] == params.get("dim")
    config = config_from_meta(params, sum(s[0] for s in shapes) if split_rows else shapes[0][0], params_path)
    where = files[0] if len(files) == 1 else f"{ckpt_dir}/consolidated.*"

    def tensors():
        parts_of = shards if pths else [dict(iter_safetensors(f)) for f in files] if len(files) > 1 else None
        if parts_of is None:  # one consolidated.safetensors, read lazily
            items = ((k, [t]) for k, t in iter_safetensors(files[0]))
        else:
            items = ((k, [s[k] for s in parts_of]) for k in parts_of[0])
        for key, parts in items:
            if key == "rope.freqs":
                continue
            if len(parts) == 1 or parts[0].dim() == 1:
                t = parts[0]  # norms are replicated on every shard
            elif key.endswith(ROW_PARALLEL) or (key == "tok_embeddings.weight" and not split_rows):
                t = torch.cat(parts, dim=1)
            else:
                t = torch.cat(parts, dim=0)
            name, t = meta_to_hf(key, t, config)
            yield name, t, where
    return config, tensors


def checkpoint_layout(ckpt_dir):
    """'hf' or 'meta', by what the directory holds."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: checkpoint directory not found")
    if os.path.exists(os.path.join(ckpt_dir, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(ckpt_dir, "params.json")):
        return "meta"
    raise UserError(f"{ckpt_dir}: neither a Hugging Face checkpoint (config.json + *.safetensors) "
                    f"nor a Meta one (params.json + consolidated.*)")


def _source(ckpt_dir):
    return (_hf_source if checkpoint_layout(ckpt_dir) == "hf" else _meta_source)(ckpt_dir)


def read_config(ckpt_dir):
    """The LlamaConfig of a checkpoint directory, from its config and headers only."""
    return _source(ckpt_dir)[0]

# -----------------------------------------------------------------------------
# loading and saving

def load_model(ckpt_dir, dtype=torch.float32, device="cpu"):
    """Build the model on the meta device (no memory), then fill it one tensor at a time from the
    checkpoint, each converted straight to `dtype` on `device`: never two copies of the weights."""
    config, tensors = _source(ckpt_dir)
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    seen, unexpected = set(), []
    for key, t, file in tensors():
        if key not in expected:
            if not (key == "lm_head.weight" and config.tie_embeddings):
                unexpected.append(key)
            continue
        if tuple(t.shape) != expected[key]:
            raise UserError(f"{file}: tensor {key} has shape {list(t.shape)}, expected {list(expected[key])} "
                            f"from the config in {ckpt_dir}")
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[param_name] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=True)
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if unexpected or missing:
        def some(keys):
            return ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")
        problem = "; ".join(p for p in (missing and f"missing keys {some(missing)}",
                                        unexpected and f"unexpected keys {some(unexpected)}") if p)
        raise UserError(f"{ckpt_dir}: {problem}")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_hf_checkpoint(model, out_dir, tokenizer_path=None, dtype=None, config=None, step=None):
    """Write config.json + model.safetensors (+ tokenizer.model), the layout transformers reads.
    `model` is a Llama or a state dict with this model's keys (then pass `config`); step: the training
    step, kept in model.safetensors' metadata."""
    from safetensors.torch import save_file
    config = config or model.config
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    tensors = {"model." + k if k != "lm_head.weight" else k:
               (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", **({"step": str(step)} if step is not None else {})})
    write_text(os.path.join(out_dir, "config.json"), json.dumps(config_to_hf(config, dtype_name), indent=2))
    if tokenizer_path:
        write_tokenizer_files(out_dir, tokenizer_path, config.max_seq_len)


# tokenizer files of a HF checkpoint, carried along wherever its tokenizer.model goes
TOKENIZER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer_files(out_dir, tokenizer_path, max_seq_len=None):
    """tokenizer.model (a file, or the one in a folder) into out_dir, with what transformers'
    AutoTokenizer needs to tokenize as tokenizer.py does, BOS first: the folder's own
    tokenizer.json / tokenizer_config.json / special_tokens_map.json where it has them; else, for a
    SentencePiece model, a tokenizer_config.json (LlamaTokenizer, add_bos_token) and a
    special_tokens_map.json written here. A Llama 3 tiktoken file without them gets none: write its
    tokenizer.json with transformers. Files already in out_dir are left as they are."""
    from tokenizer import load_tokenizer
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    model_file = tokenizer_path
    if os.path.isdir(tokenizer_path):
        model_file = os.path.join(tokenizer_path, "tokenizer.model")
    os.makedirs(out_dir, exist_ok=True)
    copies = [(model_file, "tokenizer.model")]
    copies += [(os.path.join(folder, n), n) for n in TOKENIZER_SIDE_FILES]
    for src, name in copies:
        dst = os.path.join(out_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
            with atomic_write(dst) as tmp:
                shutil.copyfile(src, tmp)
    written = {n for n in TOKENIZER_SIDE_FILES if os.path.isfile(os.path.join(out_dir, n))}
    if not os.path.isfile(model_file) or written & {"tokenizer.json", "tokenizer_config.json"}:
        return
    tok = load_tokenizer(model_file)
    if tok.kind != "sentencepiece":
        return
    sp = tok.sp
    special = dict(bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()),
                   unk_token=sp.id_to_piece(sp.unk_id()))
    config = dict(tokenizer_class="LlamaTokenizer", **special, add_bos_token=True,
                  add_eos_token=False, **({"model_max_length": max_seq_len} if max_seq_len else {}))
    write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    if "special_tokens_map.json" not in written:
        path = os.path.join(out_dir, "special_tokens_map.json")
        write_text(path, json.dumps(special, indent=2) + "\n")
