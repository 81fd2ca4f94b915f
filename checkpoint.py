"""
LLaMA checkpoints as they ship, read into llama.py's model and written back (docs/formats.md):

    Hugging Face layout   config.json + model.safetensors, or shards listed in
                          model.safetensors.index.json
    Meta layout           params.json + consolidated.NN.pth (one per model-parallel rank) or
                          consolidated[.NN].safetensors

    read_config(ckpt_dir)        -> LlamaConfig, reading headers only (no weights)
    load_model(ckpt_dir, dtype)  -> Llama, one tensor at a time straight into its dtype and device
    load_into(model, ckpt_dir)   -> fill a meta-device model, or under FSDP2 this rank's rows only
    read_adapter(path, check)    -> an adapter file, checked (check_adapter_base checks it against
                                    a model; multilora.py checks its settings, writes, applies)
    save_hf_checkpoint(...)      -> config.json + model.safetensors (+ tokenizer files)
    write_tokenizer_files(...)   -> tokenizer.model + what transformers' AutoTokenizer reads

Every file is checked at the boundary: JSON value types, safetensors headers (dtypes, shapes against
the stored bytes, offsets inside the file), names and shapes against the config. A problem is one
UserError naming the file. .pth files load with weights_only=True: no pickled code runs.
"""

import base64
import hashlib
import json
import math
import os
import re
import struct

import torch
import torch.nn as nn

from llama import Llama, LlamaConfig
import util
from util import UserError, atomic_write, write_text

# -----------------------------------------------------------------------------
# config files


MAX_JSON = 100_000_000  # a config or index file larger than this is not one


def _read_json(path):
    """A config or index file: a regular file of at most MAX_JSON bytes, parsed as JSON."""
    raw = util.read_regular(path, MAX_JSON, "JSON config or index file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None


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
        if kind is float and type(value) is int and abs(value) < 2**63:
            return float(value)
        # required ints are sizes: > 0; optional ones (ids, 0 = unset) >= 0; none past 2^31
        positive = default is KeyError
        if type(value) is not kind or (kind is int and not positive <= value < 2**31):
            what = f"a{' positive' * positive * (kind is int)} {kind.__name__}"
            below = " below 2^31" * (kind is int)
            raise UserError(f"{path}: {key}: expected {what}{below}, got {value!r:.80}")
        return value

    return get


# the key in config.json / params.json that sets each LlamaConfig field, for messages
HF_KEYS = dict(
    dim="hidden_size",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    head_dim="head_dim",
    hidden_dim="intermediate_size",
    norm_eps="rms_norm_eps",
    rope_theta="rope_theta",
    rope_scaling="rope_scaling",
)
META_KEYS = dict(HF_KEYS, hidden_dim="ffn_dim_multiplier", rope_scaling="rope_scaling_factor")
META_KEYS.update((k, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps"))
META_KEYS.update(head_dim="dim", rope_theta="rope_theta")


def _number(x, low=0.0, strict=True):
    """Whether x is a finite real number above low (at least low if not strict)."""
    ok = type(x) in (int, float) and math.isfinite(x)
    return ok and (x > low if strict else x >= low)


def check_config_values(path, keys, f):
    """Refuse the values llama.py cannot compute with, in one line naming the file and key (keys:
    field -> the file's key): sizes that do not divide as attention needs, an odd head dimension
    (RoPE pairs dims), and what makes the model compute NaN or inf (rope_theta <= 0, rms_norm_eps
    < 0, NaN, inf, a llama3 rope_scaling factor of 0 or equal low and high frequency factors)."""

    def refuse(field, expected, got):
        return UserError(f"{path}: {keys[field]}: expected {expected}, got {got!r:.80}")

    if f["hidden_dim"] < 1:
        raise refuse("hidden_dim", "a positive FFN width", f["hidden_dim"])
    if not _number(f["rope_theta"]):
        raise refuse("rope_theta", "a finite number > 0", f["rope_theta"])
    if not _number(f["norm_eps"], strict=False):
        raise refuse("norm_eps", "a finite number >= 0", f["norm_eps"])
    rs = f["rope_scaling"] or {}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if rs and not _number(rs.get(k)):
            raise refuse("rope_scaling", f"{k}: a finite number > 0", rs.get(k))
    if rs and rs["low_freq_factor"] == rs["high_freq_factor"]:
        raise refuse("rope_scaling", "high_freq_factor != low_freq_factor", rs["low_freq_factor"])
    n_kv = f["n_kv_heads"] or f["n_heads"]
    if f["n_heads"] % n_kv:
        raise refuse("n_kv_heads", f"a divisor of n_heads {f['n_heads']}", n_kv)
    if not f.get("head_dim", 0) and f["dim"] % f["n_heads"]:
        raise refuse("n_heads", f"a divisor of dim {f['dim']}", f["n_heads"])
    if (f.get("head_dim", 0) or f["dim"] // f["n_heads"]) % 2:
        what = "head_dim" if f.get("head_dim", 0) else "dim"
        raise UserError(
            f"{path}: {keys[what]}: the head dimension must be even (RoPE rotates pairs), got "
            f"{f.get('head_dim', 0) or f['dim'] // f['n_heads']}"
        )


def _config(path, keys, **fields):
    check_config_values(path, keys, fields)
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
    theta = get("rope_theta", float, None)
    return _config(
        path,
        HF_KEYS,
        dim=get("hidden_size", int),
        n_layers=get("num_hidden_layers", int),
        n_heads=get("num_attention_heads", int),
        n_kv_heads=get("num_key_value_heads", int, 0),
        head_dim=get("head_dim", int, 0),
        hidden_dim=get("intermediate_size", int),
        vocab_size=get("vocab_size", int),
        norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=rope.get("rope_theta", 10000.0) if theta is None else theta,
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
    multiplier = get("ffn_dim_multiplier", float, None)
    if multiplier is not None and not 0 < multiplier < 2**31:
        raise UserError(f"{path}: ffn_dim_multiplier: expected a number > 0, got {multiplier!r}")
    if multiplier:
        hidden = int(multiplier * hidden)
    multiple_of = get("multiple_of", int, 256)
    if multiple_of < 1:
        raise UserError(f"{path}: multiple_of: expected a positive int, got {multiple_of}")
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
        META_KEYS,
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
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header, in bytes


def _strict_json(raw, path, what):
    """JSON bytes -> value, as strict as the safetensors library: UTF-8, no NaN or Infinity, and
    a nesting too deep for Python is refused, not a RecursionError."""

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise UserError(f"{path}: corrupt {what} (header is not JSON: {why})") from None


def read_safetensors_header(path, dtypes=WEIGHT_DTYPES, f=None):
    """-> (tensors, metadata, data_start), checked as the safetensors format requires (only the
    8 + header bytes are read): check_safetensors_header. f: the file already open (open_regular),
    read from its start; else path is opened for this."""
    if f is None:
        with util.open_regular(path, "safetensors file") as f:
            return read_safetensors_header(path, dtypes, f)
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or n > size - 8:
        raise UserError(f"{path}: truncated or corrupt safetensors file (no complete header)")
    if n > MAX_HEADER:
        raise UserError(
            f"{path}: safetensors header of {n} bytes, more than the format's {MAX_HEADER}"
        )
    header = _strict_json(f.read(n), path, "safetensors file")
    metadata = check_safetensors_header(path, header, size - 8 - n, dtypes)
    return header, metadata, 8 + n


def _shown(name):
    """A tensor name from a file, for a one-line message: as it is if printable and short."""
    return name if name.isprintable() and len(name) <= 200 else repr(name)[:200]


def check_safetensors_header(path, header, data_size, dtypes=WEIGHT_DTYPES):
    """The format in full (github.com/huggingface/safetensors): a JSON object of tensors, each
    {"dtype": one of dtypes, "shape": [ints >= 0], "data_offsets": [begin, end]} whose byte count
    is its shape's, the tensors' bytes one after the other from 0 to the end of the file, no gap
    and no overlap; "__metadata__" an object of strings. Pops __metadata__ -> it (or {})."""
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: __metadata__: expected an object of strings")
    for name, t in header.items():
        ok = (
            isinstance(t, dict)
            and isinstance(t.get("shape"), list)
            and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2
            and all(type(x) is int and x >= 0 for x in t["shape"] + t["data_offsets"])
        )
        if not ok:
            raise UserError(
                f"{path}: tensor {_shown(name)}: corrupt header entry (expected dtype, shape: a "
                f"list of ints >= 0, data_offsets: [begin, end])"
            )
        if not isinstance(t.get("dtype"), str) or t["dtype"] not in dtypes:
            raise UserError(
                f"{path}: tensor {_shown(name)}: dtype {t.get('dtype')!r:.40}, "
                f"expected one of {', '.join(dtypes)}"
            )
        begin, end = t["data_offsets"]
        nbytes = math.prod(t["shape"]) * DTYPES[t["dtype"]].itemsize
        if end - begin != nbytes:
            raise UserError(
                f"{path}: tensor {_shown(name)}: {t['dtype']} {t['shape']} needs {nbytes} bytes, "
                f"the header gives it {end - begin}"
            )
    done = 0
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = t["data_offsets"]
        if begin != done:
            how = (
                "overlap the tensor before" if begin < done else "leave a gap after the one before"
            )
            raise UserError(
                f"{path}: tensor {_shown(name)}: data_offsets [{begin}, {end}] {how} (which "
                f"ends at {done}): invalid offsets"
            )
        done = end
    if done != data_size:
        raise UserError(
            f"{path}: tensor data ends at {done} but the file holds {data_size} bytes after the "
            f"header: " + ("truncated safetensors file" if done > data_size else "trailing bytes")
        )
    return metadata


def iter_safetensors(path, dtypes=WEIGHT_DTYPES):
    """Yield (name, tensor) one at a time, read straight from the file into a fresh CPU tensor.
    Plain reads rather than a memory map keep resident memory at the model plus one tensor."""
    header, _, start = read_safetensors_header(path, dtypes)
    with util.open_regular(path, "safetensors file") as f:
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


def _safetensors_tensor(path, entry, data_start, f):
    """A tensor of a safetensors file, read from its open file f: rows are contiguous, so rows
    [a, b) are one read of exactly (b - a) rows' bytes, unbuffered, into the tensor (plain reads, no
    memory map: resident memory is what we keep)."""
    shape, dtype = entry["shape"], DTYPES[entry["dtype"]]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def read(a, b):
        out = torch.empty([b - a, *shape[1:]], dtype=dtype)
        buf, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
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
    """{name: Stored} of one safetensors file, in the order of the bytes. The file is opened once,
    its header and every tensor read from that open file: a writer that replaces it meanwhile (one
    rename, as train.py rewrites hf/ at each evaluation) never mixes two versions into one model.
    The file closes when the last Stored goes."""
    f = util.open_regular(path, "safetensors file", buffering=0)
    header, _, start = read_safetensors_header(path, f=f)
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: _safetensors_tensor(path, entry, start, f) for name, entry in order}


def _torch_state(path):
    """A Meta .pth shard: a regular file holding {name: tensor}."""
    util.open_regular(path, ".pth file").close()
    state = _torch_load(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()
    ):
        raise UserError(f"{path}: expected a dict of named tensors, got {type(state).__name__}")
    return state


# a memory-mapped tensor of a .pth file: a row slice touches those rows only
def _torch_tensor(path, t):
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
        for name in files:
            if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
                raise UserError(
                    f"{index_path}: weight_map: {_shown(name)}: expected a file name in "
                    f"{ckpt_dir}, not a path"
                )
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
# split on dim 1; the others on dim 0
ROW_PARALLEL = (
    "attention.wo.weight",
    "feed_forward.w2.weight",
)


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
    _getter(params, params_path)  # an object, before its fields are read
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
        shards = [{k: _torch_tensor(f, t) for k, t in _torch_state(f).items()} for f in files]
    else:  # headers only
        shards = [_safetensors_tensors(f) for f in files]
    for f, s in zip(files, shards):
        if "tok_embeddings.weight" not in s or len(s["tok_embeddings.weight"].shape) != 2:
            raise UserError(f"{f}: no tok_embeddings.weight of two dimensions")
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
    """(config, tensors) of a checkpoint, the config checked against the files' shapes first."""
    hf = checkpoint_layout(ckpt_dir) == "hf"
    config, tensors = (_hf_source if hf else _meta_source)(ckpt_dir)
    where = os.path.join(ckpt_dir, "config.json" if hf else "params.json")
    check_config_against_files(config, tensors, ckpt_dir, where, HF_KEYS if hf else META_KEYS)
    return config, tensors


def expected_shapes(c):
    """{HF key without "model.": shape} of the base a LlamaConfig describes (llama.py's)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    layer = {
        "self_attn.q_proj": (q, c.dim),
        "self_attn.k_proj": (kv, c.dim),
        "self_attn.v_proj": (kv, c.dim),
        "self_attn.o_proj": (c.dim, q),
        "mlp.gate_proj": (c.hidden_dim, c.dim),
        "mlp.up_proj": (c.hidden_dim, c.dim),
        "mlp.down_proj": (c.dim, c.hidden_dim),
        "input_layernorm": (c.dim,),
        "post_attention_layernorm": (c.dim,),
    }
    for i in range(c.n_layers):
        shapes.update((f"layers.{i}.{k}.weight", s) for k, s in layer.items())
    return shapes


def config_numel(c):
    """The parameter count of the base a LlamaConfig describes, by formula (expected_shapes')."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layer = 2 * c.dim * (q + kv) + 3 * c.dim * c.hidden_dim + 2 * c.dim
    return c.n_layers * layer + c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim


def check_config_against_files(config, tensors, ckpt_dir, where, keys):
    """The model the config describes must be the one the files hold, checked from the headers
    before anything is built or allocated: as many layers, every tensor there with its shape, none
    other (a config claiming a 1 TiB embedding beside a 1 MB file, or 10^6 layers, stops here)."""
    stored = dict(tensors())
    n_layers = len({k.split(".")[1] for k in stored if k.startswith("layers.")})
    if config.n_layers != n_layers:
        raise UserError(
            f"{where}: {keys['n_layers']}: {config.n_layers} layers, but the files in {ckpt_dir} "
            f"hold {n_layers}"
        )
    expected = expected_shapes(config)
    for key in sorted(set(expected) & set(stored)):
        if tuple(stored[key].shape) != expected[key]:
            raise UserError(
                f"{stored[key].file}: tensor {key} has shape {list(stored[key].shape)}, expected "
                f"{list(expected[key])} from the config in {ckpt_dir}"
            )
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    unexpected = [k for k in unexpected if k not in tied]
    if missing or unexpected:
        raise UserError(f"{ckpt_dir}: {_key_problem(missing, unexpected)}")


def _key_problem(missing, unexpected):
    def some(keys):
        return ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")

    return "; ".join(
        p
        for p in (
            missing and f"missing keys {some(missing)}",
            unexpected and f"unexpected keys {some(unexpected)}",
        )
        if p
    )


def read_config(ckpt_dir):
    """The LlamaConfig of a checkpoint directory, from its config and headers only."""
    return _source(ckpt_dir)[0]


# -----------------------------------------------------------------------------
# adapter files (multilora.save_adapter and load_adapter): a safetensors file of the adapter's
# tensors; its metadata holds the adapter settings and what identifies the base it was made for

ADAPTER_FORMAT = "multilora-adapter-v1"


def base_fingerprint(model):
    """Hash of the base model's parameter names and shapes: of an adapted model, as
    multilora.adapt_model recorded them before it added the adapters."""
    if getattr(model, "base_fingerprint", None):
        return model.base_fingerprint
    lines = [f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters()]
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


def read_adapter(path, check):
    """An adapter file -> (state {key: tensor}, settings, metadata), checked: a safetensors file of
    finite floating-point tensors, the format's name, and check(path, settings, header, metadata)
    (multilora.header_check: the arm's settings, the base, each tensor's shape), all from the
    header before the body is read, so that no more is read than the model's adapters hold."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: adapter file not found")
    header, metadata, _ = read_safetensors_header(path)
    settings = _adapter_settings(path, metadata)
    check(path, settings, header, metadata)
    state = dict(iter_safetensors(path))
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise UserError(f"{path}: {k}: not finite (NaN or inf): the run that wrote it diverged")
    return state, settings, metadata


def _adapter_settings(path, metadata):
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
    if not isinstance(settings, dict):
        raise UserError(f"{path}: metadata.settings: expected a JSON object of adapter settings")
    return settings


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
        raise UserError(f"{ckpt_dir}: {_key_problem(missing, unexpected)}")
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
# every file an HF-layout folder we write holds (train.py's hf/, export.py --format=hf)
HF_EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.model",
    *TOKENIZER_SIDE_FILES,
    "generation_config.json",
)
SIDE_FILE_LIMIT = 1 << 28  # 256 MiB: far above any tokenizer or generation config


# a JSON side file holds at least one key of its kind (special_tokens_map.json: only such keys)
SPECIAL_TOKENS = "bos_token eos_token unk_token pad_token sep_token cls_token mask_token"
SIDE_FILE_KEYS = {
    "tokenizer.json": {"model"},
    "tokenizer_config.json": set(
        f"tokenizer_class added_tokens_decoder model_max_length {SPECIAL_TOKENS}".split()
    ),
    "special_tokens_map.json": set(f"additional_special_tokens {SPECIAL_TOKENS}".split()),
    "generation_config.json": set(
        "bos_token_id eos_token_id pad_token_id do_sample temperature top_p top_k max_length "
        "max_new_tokens _from_model_config transformers_version".split()
    ),
}


def side_file(path):
    """The bytes of a file copied beside the weights (tokenizer.model, tokenizer.json, ...,
    generation_config.json), read once, or None unless it is a regular file (symlinks followed: the
    Hugging Face cache is made of them) that parses as what its name says: a symlink to a private
    file never lands in an export. tokenizer.model: SentencePiece's protobuf or tiktoken's
    'base64 rank' lines; chat_template.jinja: UTF-8 text with a Jinja tag; the others: a JSON
    object with a key of its kind (SIDE_FILE_KEYS)."""
    try:
        data = util.read_regular(path, SIDE_FILE_LIMIT)
    except (UserError, OSError):
        return None
    name = os.path.basename(path)
    try:
        if name == "tokenizer.model":
            return data if _is_tokenizer_model(data) else None
        if name == "chat_template.jinja":
            text = data.decode("utf-8")
            return data if "{{" in text or "{%" in text else None
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not set(value) & SIDE_FILE_KEYS[name]:
        return None
    if name == "special_tokens_map.json" and not set(value) <= SIDE_FILE_KEYS[name]:
        return None
    return data if name != "tokenizer.json" or isinstance(value["model"], dict) else None


def _is_tokenizer_model(data):
    import sentencepiece

    try:
        return len(sentencepiece.SentencePieceProcessor(model_proto=data)) > 0
    except Exception:  # not SentencePiece's protobuf: tiktoken's lines?
        lines = [line.split() for line in data.decode("utf-8").splitlines() if line]
        ok = lines and all(len(w) == 2 and w[1].isdigit() for w in lines)
        return bool(ok) and all(base64.b64decode(w[0], validate=True) for w in lines)


def copy_side_file(src, dst):
    """src's bytes to dst (atomically) when side_file accepts src. -> whether it was copied"""
    data = side_file(src)
    if data is not None:
        with atomic_write(dst) as tmp, open(tmp, "wb") as f:
            f.write(data)
    return data is not None


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
        if os.path.abspath(src) != os.path.abspath(dst):
            copy_side_file(src, dst)
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
