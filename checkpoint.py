"""
LLaMA checkpoints as they ship, read into llama.py's model and written back (docs/formats.md):

    Hugging Face layout   config.json + model.safetensors, or shards listed in
                          model.safetensors.index.json
    Meta layout           params.json + consolidated.NN.pth (one per model-parallel rank) or
                          consolidated[.NN].safetensors

    read_config(ckpt_dir)        -> LlamaConfig, reading headers only (no weights)
    load_model(ckpt_dir, dtype)  -> Llama, one tensor at a time straight into its dtype and device
    load_into(model, ckpt_dir)   -> fill a meta-device model, or under FSDP2 this rank's rows only
    read_adapter(path, names)    -> an adapter file, checked (check_adapter_base and _fits check
                                    it against a model; multilora.py writes and applies them)
    save_hf_checkpoint(...)      -> config.json + model.safetensors (+ tokenizer files)
    write_tokenizer_files(...)   -> tokenizer.model + what transformers' AutoTokenizer reads

Every file is checked at the boundary: JSON value types, safetensors headers (dtypes, shapes against
the stored bytes, offsets inside the file), names and shapes against the config. A problem is one
UserError naming the file. .pth files load with weights_only=True: no pickled code runs.
"""

import hashlib
import json
import math
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
    """get(key, type, default) for a JSON dict: the value, or a UserError naming file and key."""
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
        # required ints are sizes: > 0; optional ones (ids, 0 = unset) >= 0
        positive = default is KeyError
        if type(value) is not kind or (kind is int and value < positive):
            what = f"a{' positive' * positive * (kind is int)} {kind.__name__}"
            raise UserError(f"{path}: {key}: expected {what}, got {value!r}")
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
        raise UserError(
            f"{path}: rope_scaling: rope type {rope_type!r} is not supported (default or llama3)"
        )
    if rope_type == "llama3":
        for key in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ):
            if not isinstance(rope.get(key), (int, float)) or isinstance(rope.get(key), bool):
                raise UserError(
                    f"{path}: rope_scaling.{key}: expected a number, got {rope.get(key)!r}"
                )
    eos = cfg.get("eos_token_id", 2)
    eos = eos if isinstance(eos, list) else [eos if eos is not None else 2]
    if not all(type(e) is int for e in eos):
        raise UserError(
            f"{path}: eos_token_id: expected an int or a list of ints, "
            f"got {cfg.get('eos_token_id')!r}"
        )
    return _config(
        path,
        dim=get("hidden_size", int),
        n_layers=get("num_hidden_layers", int),
        n_heads=get("num_attention_heads", int),
        n_kv_heads=get("num_key_value_heads", int, 0),
        head_dim=get("head_dim", int, 0),
        hidden_dim=get("intermediate_size", int),
        vocab_size=get("vocab_size", int),
        norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=get("rope_theta", float, None) or rope.get("rope_theta") or 10000.0,
        rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
        max_seq_len=get("max_position_embeddings", int, 4096),
        tie_embeddings=get("tie_word_embeddings", bool, False),
        bos_id=get("bos_token_id", int, 1),
        eos_id=eos,
    )


def config_from_meta(params, vocab_size, path="params.json"):
    """LlamaConfig from Meta's params.json. vocab_size comes from the weights (params.json often
    says -1)."""
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
        rope_scaling = {
            "rope_type": "llama3",
            "factor": get("rope_scaling_factor", float, 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": get("high_freq_factor", float, 4.0),
            "original_max_position_embeddings": 8192,
        }
    llama3 = vocab_size >= 128000
    return _config(
        path,
        dim=dim,
        n_layers=get("n_layers", int),
        n_heads=get("n_heads", int),
        n_kv_heads=get("n_kv_heads", int, 0),
        hidden_dim=hidden,
        vocab_size=vocab_size,
        norm_eps=get("norm_eps", float, 1e-5),
        rope_theta=get("rope_theta", float, 10000.0),
        rope_scaling=rope_scaling,
        max_seq_len=get("max_seq_len", int, 8192 if llama3 else 4096),
        tie_embeddings=False,  # Meta: output.weight
        bos_id=128000 if llama3 else 1,
        eos_id=[128001, 128008, 128009] if llama3 else [2],
    )


def config_to_hf(c, torch_dtype="float32"):
    """The config.json that transformers' LlamaForCausalLM reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id[0] if len(c.eos_id) == 1 else c.eos_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }


# -----------------------------------------------------------------------------
# safetensors: 8 bytes little-endian header length, then a JSON header {name: {"dtype", "shape",
# "data_offsets": [begin, end]}, "__metadata__": {...}}, then the bytes
# (github.com/huggingface/safetensors)

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
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
                raise UserError(
                    f"{path}: truncated or corrupt safetensors file (no complete header)"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, t in header.items():
        ok = (
            isinstance(t, dict)
            and isinstance(t.get("shape"), list)
            and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2
            and all(type(x) is int and x >= 0 for x in t["shape"] + t["data_offsets"])
        )
        if not ok:
            raise UserError(f"{path}: tensor {name}: corrupt header entry {t!r}")
        if t.get("dtype") not in dtypes:
            raise UserError(
                f"{path}: tensor {name}: dtype {t.get('dtype')!r}, "
                f"expected one of {', '.join(dtypes)}"
            )
        begin, end = t["data_offsets"]
        numel = 1
        for d in t["shape"]:
            numel *= d
        if end - begin != numel * DTYPES[t["dtype"]].itemsize:
            raise UserError(
                f"{path}: tensor {name}: {t['dtype']} {t['shape']} needs "
                f"{numel * DTYPES[t['dtype']].itemsize} bytes, the header gives it {end - begin}"
            )
        if 8 + n + end > size:
            raise UserError(
                f"{path}: truncated safetensors file ({size} bytes, "
                f"tensor {name} ends at {8 + n + end})"
            )
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


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path, specs, take, metadata=None):
    """Write a safetensors file tensor by tensor: specs {name: (dtype, shape)} make the header, then
    take(name) gives each tensor (a CPU tensor of that dtype and shape), in sorted name order, and
    it is written and dropped: memory holds one tensor, not the file (older safetensors' save_file
    serializes the whole file to bytes first). The header's keys are sorted and its JSON compact, so
    the same tensors and metadata always give the same bytes (save_file orders the metadata
    differently from one process to the next)."""
    header, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(specs):
            t = take(name)
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise ValueError(
                    f"{path}: {name}: got {t.dtype} {list(t.shape)}, the header says {specs[name]}"
                )
            if t.numel():
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
            del t


def _torch_load(path):
    try:  # weights_only: tensors and plain containers only, never pickled code
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a torch pickle fails in many ways; report the file, not the internals
        first_line = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(
            f"{path}: cannot read torch checkpoint ({type(e).__name__}: {first_line})"
        ) from None


# -----------------------------------------------------------------------------
# the two layouts: each gives (config, tensors), where tensors() yields (HF key, Stored) in file
# order.
# A Stored tensor is read on demand, rows [a, b) at a time: FSDP ranks read only the rows they hold.


class Stored:
    """One tensor of a checkpoint in llama.py's names and layout: shape, dtype, file (for messages)
    and read(a, b) -> its rows [a, b) as a CPU tensor in the stored dtype, read from the file(s)."""

    def __init__(self, shape, dtype, file, read):
        self.shape, self.dtype, self.file, self.read = tuple(shape), dtype, file, read


def _safetensors_tensor(path, entry, data_start):
    """A tensor of a safetensors file: rows are contiguous, so rows [a, b) are one read of exactly
    (b - a) rows' bytes, unbuffered, into the tensor (plain reads, no memory map: resident memory
    is what we keep)."""
    shape, dtype = entry["shape"], DTYPES[entry["dtype"]]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def read(a, b):
        out = torch.empty([b - a, *shape[1:]], dtype=dtype)
        buf, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + entry["data_offsets"][0] + a * row_bytes)
            while done < len(buf):  # one read(2) returns at most 2 GiB
                n = f.readinto(buf[done:])
                if not n:
                    raise UserError(
                        f"{path}: file ends inside tensor data (it changed while being read)"
                    )
                done += n
        return out

    return Stored(shape, dtype, path, read)


def _safetensors_tensors(path):
    """{name: Stored} of one safetensors file, in the order of the bytes."""
    header, _, start = read_safetensors_header(path)
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: _safetensors_tensor(path, entry, start) for name, entry in order}


def _torch_tensor(
    path, t
):  # a memory-mapped tensor of a .pth file: a row slice touches those rows only
    return Stored(t.shape, t.dtype, path, lambda a, b: t[a:b])


def _concat(parts, dim, file):
    """Meta's model-parallel parts of one tensor as the whole: dim 1 (each part holds every row,
    some columns: a row range is that range of every part), or dim 0 (parts hold consecutive rows:
    a row range reads only the parts that hold some of it)."""
    first, other = parts[0].shape, 1 - dim
    for p in parts:
        if len(p.shape) != 2 or p.shape[other] != first[other] or p.dtype != parts[0].dtype:
            raise UserError(
                f"{p.file}: tensor of shape {list(p.shape)} {p.dtype} does not fit "
                f"{parts[0].file}'s {list(first)} {parts[0].dtype}"
            )
    shape = list(first)
    shape[dim] = sum(p.shape[dim] for p in parts)
    if dim == 1:
        return Stored(
            shape, parts[0].dtype, file, lambda a, b: torch.cat([p.read(a, b) for p in parts], 1)
        )
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.shape[0])

    def read(a, b):
        pieces = [
            p.read(max(a, lo) - lo, min(b, hi) - lo)
            for p, lo, hi in zip(parts, offsets, offsets[1:])
            if max(a, lo) < min(b, hi)
        ]
        return (
            pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else parts[0].read(0, 0)
        )

    return Stored(shape, parts[0].dtype, file, read)


def _permuted(stored, rows):
    """stored with its rows reordered: row i is stored row rows[i]. A range of rows is read as the
    runs of consecutive stored rows it needs (whole heads: one run), so no row is read twice."""

    def read(a, b):
        out = torch.empty((max(b - a, 0), *stored.shape[1:]), dtype=stored.dtype)
        wanted = rows[a:b]
        order = wanted.argsort()
        src = wanted[order].tolist()
        if src:
            starts = [0] + [i for i in range(1, len(src)) if src[i] != src[i - 1] + 1]
            pieces = [
                stored.read(src[i], src[j - 1] + 1) for i, j in zip(starts, starts[1:] + [len(src)])
            ]
            out[order] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out

    return Stored(stored.shape, stored.dtype, stored.file, read)


def _hf_source(ckpt_dir):
    cfg_path = os.path.join(ckpt_dir, "config.json")
    config = config_from_hf(_read_json(cfg_path), cfg_path)
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise UserError(f"{index_path}: weight_map: expected an object of file names")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(ckpt_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(
            f"{ckpt_dir}: config.json but no model.safetensors or model.safetensors.index.json"
        )
    paths = [os.path.join(ckpt_dir, f) for f in files]
    for p in paths:  # fail before reading anything
        if not os.path.exists(p):
            raise UserError(f"{p}: missing shard listed in {index_path}")
        read_safetensors_header(p)

    def tensors():
        for p in paths:
            for key, stored in _safetensors_tensors(p).items():
                # old files carry RoPE buffers: recomputed
                if not key.endswith("rotary_emb.inv_freq"):
                    yield key.removeprefix("model."), stored

    return config, tensors


# Meta key -> HF key (without "model."); docs/formats.md
META_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
ROW_PARALLEL = (
    "attention.wo.weight",
    "feed_forward.w2.weight",
)  # split on dim 1; the others on dim 0


def meta_to_hf(key, stored, config):
    """Rename a Meta key and permute wq/wk rows from interleaved RoPE pairs (2j, 2j+1) to HF's
    rotate_half pairs (j, j + hd/2)."""
    if key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        return {
            "tok_embeddings.weight": "embed_tokens.weight",
            "norm.weight": "norm.weight",
            "output.weight": "lm_head.weight",
        }[key], stored
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if not m or m.group(2) not in META_NAMES:
        return key, stored  # reported as unexpected by the caller
    name = f"layers.{m.group(1)}.{META_NAMES[m.group(2)]}.weight"
    if m.group(2) in ("attention.wq", "attention.wk") and len(stored.shape) == 2:
        heads = config.n_heads if m.group(2) == "attention.wq" else config.n_kv_heads
        hd = config.head_dim
        if stored.shape[0] == heads * hd:  # HF row k is Meta row rows[k]
            rows = torch.arange(heads * hd).view(heads, hd // 2, 2).transpose(1, 2).reshape(-1)
            stored = _permuted(stored, rows)
    return name, stored


def _meta_source(ckpt_dir):
    params_path = os.path.join(ckpt_dir, "params.json")
    params = _read_json(params_path)
    names = sorted(os.listdir(ckpt_dir))
    pths = [n for n in names if re.fullmatch(r"consolidated\.\d+\.pth", n)]
    sts = [n for n in names if re.fullmatch(r"consolidated(\.\d+)?\.safetensors", n)]
    files = [os.path.join(ckpt_dir, n) for n in pths or sts]
    if not files:
        raise UserError(
            f"{ckpt_dir}: params.json but no consolidated.NN.pth or consolidated.safetensors"
        )
    for i in range(len(files)):
        if pths and f"consolidated.{i:02d}.pth" not in pths:
            raise UserError(f"{ckpt_dir}: missing shard consolidated.{i:02d}.pth")
    if pths:  # memory-mapped: nothing is read until used
        shards = [{k: _torch_tensor(f, t) for k, t in _torch_load(f).items()} for f in files]
    else:  # headers only
        shards = [_safetensors_tensors(f) for f in files]
    for f, s in zip(files, shards):
        if "tok_embeddings.weight" not in s:
            raise UserError(f"{f}: no tok_embeddings.weight")
    shapes = [s["tok_embeddings.weight"].shape for s in shards]
    # LLaMA 1/2 split the embedding on dim 1 (each shard holds every row), Llama 3 on dim 0
    split_rows = len(shapes) > 1 and shapes[0][1] == params.get("dim")
    config = config_from_meta(
        params, sum(s[0] for s in shapes) if split_rows else shapes[0][0], params_path
    )
    where = files[0] if len(files) == 1 else f"{ckpt_dir}/consolidated.*"

    def tensors():
        for key in shards[0]:
            if key == "rope.freqs":
                continue
            missing = [f for f, s in zip(files, shards) if key not in s]
            if missing:
                raise UserError(f"{missing[0]}: no tensor {key} (it is in {files[0]})")
            parts = [s[key] for s in shards]
            if len(parts) == 1 or len(parts[0].shape) == 1:
                stored = parts[0]  # norms are replicated on every shard
            else:
                dim = (
                    1
                    if key.endswith(ROW_PARALLEL)
                    or (key == "tok_embeddings.weight" and not split_rows)
                    else 0
                )
                stored = _concat(parts, dim, where)
            yield meta_to_hf(key, stored, config)

    return config, tensors


def checkpoint_layout(ckpt_dir):
    """'hf' or 'meta', by what the directory holds."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: checkpoint directory not found")
    if os.path.exists(os.path.join(ckpt_dir, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(ckpt_dir, "params.json")):
        return "meta"
    raise UserError(
        f"{ckpt_dir}: neither a Hugging Face checkpoint (config.json + *.safetensors) "
        f"nor a Meta one (params.json + consolidated.*)"
    )


def _source(ckpt_dir):
    return (_hf_source if checkpoint_layout(ckpt_dir) == "hf" else _meta_source)(ckpt_dir)


def read_config(ckpt_dir):
    """The LlamaConfig of a checkpoint directory, from its config and headers only."""
    return _source(ckpt_dir)[0]


# -----------------------------------------------------------------------------
# adapter files (multilora.save_adapter and load_adapter): a safetensors file of the adapter's
# tensors; its metadata holds the adapter settings and what identifies the base it was made for

ADAPTER_FORMAT = "multilora-adapter-v1"
SETTINGS_THAT_MUST_MATCH = ("finetune", "targets", "n_loras", "lora_rank", "lora_alpha", "scaling")


def is_lora_key(name):
    """Whether a parameter is an adapter's (MultiLoRALinear's lora_A, lora_B, lora_s)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


def base_fingerprint(model):
    """Hash of the base model's parameter names and shapes (the adapter's lora_ keys excluded)."""
    lines = [
        f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters() if not is_lora_key(name)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@torch.no_grad()
def base_sample(model, n=8):
    """A few of the base's weight values (n evenly spaced entries of the embedding, the first
    layer's q_proj and the final norm): two bases of the same shapes but other weights differ here,
    while the same base loaded in fp32 or bf16 agrees to bf16 precision. Of a model that FSDP2 has
    sharded, each rank gives the entries in its rows (a collective: every rank calls)."""
    params = dict(model.named_parameters())
    sample = []
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"):
        p = params.get(name)
        mesh = getattr(p, "device_mesh", None)
        local = None if p is None else (p.to_local() if mesh else p).detach()
        if local is None or local.is_meta:
            continue
        # integer positions: a float32 linspace rounds past 2^24 entries (LLaMA-7B's embedding
        # has 131M)
        index = torch.arange(n, dtype=torch.int64) * (p.numel() - 1) // max(n - 1, 1)
        if mesh is None:
            sample += local.reshape(-1)[index.to(local.device)].float().tolist()
            continue
        row = p.numel() // p.shape[0]
        first = shard_rows(p.shape[0], mesh.get_local_rank(), mesh.size())[0] * row
        mine = (index >= first) & (index < first + local.numel())
        values = torch.zeros(n, dtype=torch.float64, device=local.device)
        offsets = (index[mine] - first).to(local.device)
        values[mine.to(local.device)] = local.reshape(-1)[offsets].double()
        torch.distributed.all_reduce(values, group=mesh.get_group())  # one rank holds each entry
        sample += values.float().tolist()
    return sample


def same_base_sample(recorded, here):
    """Whether two base samples are of the same weights: equal to bf16 precision (1%)."""
    if not isinstance(recorded, list) or len(recorded) != len(here):
        return False
    return all(
        isinstance(a, (int, float)) and abs(a - b) <= 1e-2 * abs(b) + 1e-6
        for a, b in zip(recorded, here)
    )


def base_summary(model):
    c = model.config
    return (
        f"dim={c.dim} n_layers={c.n_layers} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} "
        f"hidden_dim={c.hidden_dim} vocab_size={c.vocab_size}"
    )


def adapter_metadata(model, settings, step=None):
    """An adapter file's metadata: its settings, the base's identity, the training step if given."""
    metadata = {
        "format": ADAPTER_FORMAT,
        "settings": json.dumps(settings, sort_keys=True),
        "base_fingerprint": base_fingerprint(model),
        "base_summary": base_summary(model),
        "base_sample": json.dumps(getattr(model, "base_sample", None) or base_sample(model)),
    }
    if step is not None:
        metadata["step"] = str(step)
    return metadata


def read_adapter(path, target_names):
    """An adapter file -> (state {key: tensor}, settings, metadata), checked: a safetensors file of
    finite floating-point tensors, the format's name, settings of the right types and values
    (target_names: the names settings.targets may hold)."""
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
    check_adapter_settings(path, settings if isinstance(settings, dict) else {}, target_names)
    return state, settings, metadata


def check_adapter_settings(path, settings, target_names):
    def refuse(key, expected):
        got = settings.get(key)
        return UserError(f"{path}: metadata.settings.{key}: expected {expected}, got {got!r}")

    if settings.get("finetune") not in ("multilora", "lora"):
        raise refuse("finetune", "'multilora' or 'lora'")
    targets = settings.get("targets")
    if not isinstance(targets, list) or not set(targets) <= set(target_names):
        raise refuse("targets", f"a list of names from {','.join(target_names)}")
    for key in ("n_loras", "lora_rank"):
        if type(settings.get(key)) is not int or settings[key] < 1:
            raise refuse(key, "an int >= 1")
    alpha, dropout = settings.get("lora_alpha"), settings.get("lora_dropout")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise refuse("lora_alpha", "a number")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise refuse("lora_dropout", "a number in [0, 1)")
    if settings.get("scaling") not in ("channel", "scalar"):
        raise refuse("scaling", "'channel' or 'scalar'")


def check_adapter_base(path, metadata, model, any_base=False):
    """Refuse an adapter file made for another base: other names or shapes (the fingerprint), or,
    unless any_base, the same shapes with other weights (the sample; older files have none)."""
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
    if not any_base and sample is not None and not same_base_sample(sample, here):
        raise UserError(
            f"{path}: base_sample: the adapter was trained on a base of the same "
            f"shapes but other weights; pass any_base=True (--adapter_any_base=True) "
            f"if you mean to apply it anyway"
        )


def check_adapter_fits(path, state, settings, model):
    """Refuse an adapter file whose settings or tensor shapes differ from the model's adapters."""
    adapted = model.adapter_settings
    for k in SETTINGS_THAT_MUST_MATCH:
        if settings.get(k) != adapted.get(k):
            raise UserError(
                f"{path}: settings.{k}: model is adapted with {k}={adapted.get(k)!r}, "
                f"adapter file has {k}={settings.get(k)!r}"
            )
    expected = {k: tuple(p.shape) for k, p in model.named_parameters() if is_lora_key(k)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    for k in sorted(set(expected) | set(got)):
        if expected.get(k) != got.get(k):
            raise UserError(f"{path}: {k}: expected shape {expected.get(k)}, got {got.get(k)}")


# -----------------------------------------------------------------------------
# loading and saving


def load_model(ckpt_dir, dtype=torch.float32, device="cpu"):
    """Build the model on the meta device (no memory), then fill it one tensor at a time from the
    checkpoint, each converted straight to `dtype` on `device`: never two copies of the weights."""
    config, tensors = _source(ckpt_dir)
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    _fill(model, config, tensors, ckpt_dir, device)
    return model


def shard_rows(n, rank, world_size):
    """The rows [a, b) of an n-row tensor that FSDP2 leaves on rank: dim 0 cut as torch.chunk cuts
    it, ceil(n / world_size) rows per rank, the last ranks fewer or none."""
    c = -(-n // world_size)
    return min(rank * c, n), min(rank * c + c, n)


def load_into(model, ckpt_dir, device="cpu"):
    """Fill every parameter of `model` that is still on the meta device from the checkpoint, one
    tensor at a time, in the parameter's dtype on `device` (adapters that hold values are left as
    they are). A parameter that FSDP2's fully_shard has sharded gets only this rank's rows
    (shard_rows), and only those rows are read from the files: no rank holds the whole model.
    Each tensor is checked finite as it is filled. -> the bytes read from the files."""
    return _fill(model, *_source(ckpt_dir), ckpt_dir, device)


def _fill(model, config, tensors, ckpt_dir, device):
    names = {}  # parameter -> every name it has (a tied lm_head shares the embedding's)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    expected = {ns[0]: p for p, ns in names.items() if _local(p).is_meta}
    seen, unexpected, n_bytes = set(), [], 0
    for key, stored in tensors():
        if key not in expected:
            if not (key == "lm_head.weight" and config.tie_embeddings):
                unexpected.append(key)
            continue
        p = expected[key]
        if stored.shape != tuple(p.shape):
            raise UserError(
                f"{stored.file}: tensor {key} has shape {list(stored.shape)}, expected "
                f"{list(p.shape)} from the config in {ckpt_dir}"
            )
        mesh = getattr(p, "device_mesh", None)
        a, b = (
            shard_rows(p.shape[0], mesh.get_local_rank(), mesh.size()) if mesh else (0, p.shape[0])
        )
        rows = stored.read(a, b)
        n_bytes += rows.numel() * rows.element_size()
        value = rows.to(device=device, dtype=p.dtype)
        _check_finite(value, rows, key, stored.file)
        if mesh:
            if value.shape != _local(p).shape:
                raise RuntimeError(
                    f"{key}: FSDP's shard has shape {list(_local(p).shape)}, not rows [{a}, {b})"
                )
            value = type(p).from_local(
                value, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        filled = nn.Parameter(value, requires_grad=p.requires_grad)
        for name in names[p]:
            module_name, _, param_name = name.rpartition(".")
            model.get_submodule(module_name)._parameters[param_name] = filled
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if unexpected or missing:

        def some(keys):
            return ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")

        problem = "; ".join(
            p
            for p in (
                missing and f"missing keys {some(missing)}",
                unexpected and f"unexpected keys {some(unexpected)}",
            )
            if p
        )
        raise UserError(f"{ckpt_dir}: {problem}")
    return n_bytes


def _local(p):  # this rank's part of a parameter (FSDP2 shards are DTensors) or the parameter
    return p.to_local() if hasattr(p, "to_local") else p


def _check_finite(value, rows, key, file):
    """One pass: NaN or inf anywhere makes the sum non-finite (the exact test, 50x slower on CPU,
    runs only then: a finite tensor can sum past fp16's range)."""
    if math.isfinite(value.sum()) or torch.isfinite(value).all():
        return
    if torch.isfinite(rows).all():
        raise UserError(
            f"{file}: tensor {key}: values beyond {value.dtype}'s range; "
            f"load it in float32 or bfloat16"
        )
    raise UserError(
        f"{file}: tensor {key} holds NaN or inf: the checkpoint is damaged (or was saved "
        f"from a run that diverged)"
    )


def save_hf_checkpoint(
    model,
    out_dir,
    tokenizer_path=None,
    dtype=None,
    config=None,
    step=None,
    gather=None,
    writer=True,
):
    """Write config.json + model.safetensors (+ tokenizer.model), the layout transformers reads.
    `model` is a Llama or a state dict with this model's keys (then pass `config`); step: the
    training step, kept in model.safetensors' metadata. The file is written one tensor at a time
    (each is taken, converted, written and dropped), so at most one extra tensor is in memory.
    gather(t) -> t as a whole CPU tensor; under FSDP every process calls this with its shards (a
    collective per tensor, in file order) and only the writer (rank 0) gets tensors and writes."""
    config = config or model.config
    state = model if isinstance(model, dict) else model.state_dict()
    state = {
        "model." + k if k != "lm_head.weight" else k: v
        for k, v in state.items()
        if not (config.tie_embeddings and k == "lm_head.weight")
    }
    gather = gather or (lambda t: t.detach().cpu())

    def take(name):
        t = gather(state[name])
        return None if t is None else (t.to(dtype) if dtype else t).contiguous()

    if not writer:
        for name in sorted(state):
            take(name)
        return
    specs = {k: (dtype or v.dtype, tuple(v.shape)) for k, v in state.items()}
    dtype_name = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as tmp:
        metadata = {"format": "pt", **({"step": str(step)} if step is not None else {})}
        write_safetensors(tmp, specs, take, metadata)
    write_text(
        os.path.join(out_dir, "config.json"), json.dumps(config_to_hf(config, dtype_name), indent=2)
    )
    if tokenizer_path:
        write_tokenizer_files(out_dir, tokenizer_path, config.max_seq_len)


# tokenizer files of a HF checkpoint, carried along wherever its tokenizer goes (the chat template
# too: in tokenizer_config.json, or in a file of its own)
TOKENIZER_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def write_tokenizer_files(out_dir, tokenizer_path, max_seq_len=None):
    """The tokenizer (a tokenizer.model or tokenizer.json file, or the folder holding them) into
    out_dir, with what transformers' AutoTokenizer needs to tokenize as tokenizer.py does: the
    folder's own TOKENIZER_SIDE_FILES where it has them; else, for a SentencePiece model, a
    tokenizer_config.json (LlamaTokenizer, add_bos_token) and a special_tokens_map.json written
    here. A Llama 3 tiktoken file without them gets none: write its tokenizer.json with
    transformers. Files already in out_dir are left as they are."""
    from tokenizer import load_tokenizer

    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    model_file = os.path.join(folder, "tokenizer.model")
    copies = [(os.path.join(folder, n), n) for n in TOKENIZER_SIDE_FILES]
    if os.path.isfile(tokenizer_path) and tokenizer_path.endswith(".json"):
        copies.append((tokenizer_path, "tokenizer.json"))
    elif os.path.isfile(tokenizer_path):
        model_file = tokenizer_path
    copies.append((model_file, "tokenizer.model"))
    os.makedirs(out_dir, exist_ok=True)
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
    special = dict(
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=sp.id_to_piece(sp.unk_id()),
    )
    config = dict(
        tokenizer_class="LlamaTokenizer",
        **special,
        add_bos_token=True,
        add_eos_token=False,
        **({"model_max_length": max_seq_len} if max_seq_len else {}),
    )
    write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    if "special_tokens_map.json" not in written:
        path = os.path.join(out_dir, "special_tokens_map.json")
        write_text(path, json.dumps(special, indent=2) + "\n")
