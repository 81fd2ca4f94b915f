"""Hostile and absurd inputs (issue 28), in test_bad_inputs.py's style: every case runs `python
SCRIPT ARGS...` from the repository root and must exit non-zero with one line on stderr starting
"error:" (no traceback), leave every file byte-identical with no new ones, and stay small: each
command runs under an address-space limit (RLIMIT_AS) a few GiB above an imported torch, so an
attempt to allocate what a file or a setting claims fails the case, and its peak resident memory
must stay within PEAK_MB of where it started.

Also here: our safetensors reader against the `safetensors` library on the same hostile files
(both refuse, both accept the valid ones), and Meta params.json values that divide by zero or
overflow.
"""

import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors import safe_open

import checkpoint
from conftest import ROOT, python
from test_bad_inputs import copy_base
from test_bad_inputs import edit_config as config
from util import UserError

PEAK_MB = 300  # resident memory a refusal may add to an imported torch
HEADROOM = 3 << 30  # RLIMIT_AS: the address space at start plus this

# runs the script as `python SCRIPT ARGS` does, under the limit, and prints the peak on stdout
CAPPED = f"""
import atexit, os, resource, runpy, sys
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
limit = status("VmSize") + {HEADROOM}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = status("VmRSS")
atexit.register(lambda: print("PEAK_GROWTH", status("VmHWM") - start, flush=True))
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# -----------------------------------------------------------------------------
# hostile safetensors files: (name, header (an object, or raw bytes), data size, valid)


def entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


A = '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
DEEP = b'{"__metadata__": {"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}, " + A.encode() + b"}"
SAFETENSORS = [
    ("valid", {"a": entry(0, 8), "b": entry(8, 16)}, 16, True),
    ("valid-metadata", {"__metadata__": {"k": "v"}, "a": entry(0, 8)}, 8, True),
    ("valid-empty-tensor", {"a": entry(0, 0, (0, 3)), "b": entry(0, 8)}, 8, True),
    ("overlap", {"a": entry(0, 8), "b": entry(4, 12)}, 12, False),
    ("same-offsets", {"a": entry(0, 8), "b": entry(0, 8)}, 8, False),
    ("gap", {"a": entry(0, 8), "b": entry(12, 20)}, 20, False),
    ("not-from-0", {"a": entry(4, 12)}, 12, False),
    ("trailing-bytes", {"a": entry(0, 8)}, 12, False),
    ("past-the-end", {"a": entry(0, 8), "b": entry(8, 16)}, 12, False),
    ("end-before-begin", {"a": entry(8, 0)}, 8, False),
    ("bytes-not-the-shape", {"a": entry(0, 8, (3,))}, 8, False),
    ("shape-overflows", {"a": entry(0, 8, (2**62, 2**62))}, 8, False),
    ("entry-an-int", {"a": 5}, 0, False),
    ("entry-a-string", {"a": "x"}, 0, False),
    ("dtype-an-int", {"a": dict(entry(0, 8), dtype=5)}, 8, False),
    ("dtype-unknown", {"a": entry(0, 8, dtype="F33")}, 8, False),
    ("shape-a-string", {"a": dict(entry(0, 8), shape="2")}, 8, False),
    ("shape-float", {"a": dict(entry(0, 8), shape=[2.0])}, 8, False),
    ("shape-bool", {"a": dict(entry(0, 4), shape=[True])}, 4, False),
    ("shape-negative", {"a": dict(entry(0, 8), shape=[-2])}, 8, False),
    ("three-offsets", {"a": dict(entry(0, 8), data_offsets=[0, 8, 8])}, 8, False),
    ("offsets-missing", {"a": {"dtype": "F32", "shape": [2]}}, 8, False),
    ("metadata-an-int", {"__metadata__": {"k": 1}, "a": entry(0, 8)}, 8, False),
    ("metadata-a-list", {"__metadata__": ["k"], "a": entry(0, 8)}, 8, False),
    ("metadata-nested-200000", DEEP, 8, False),
    ("header-a-list", b"[1, 2]", 0, False),
    ("header-nan", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', 8, False),
    ("header-not-utf8", b'{"\xff": ' + json.dumps(entry(0, 8)).encode() + b"}", 8, False),
]


def safetensors_bytes(header, data_size):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + bytes(data_size)


def library_reads(path):
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                f.get_slice(k)
        return True
    except Exception:
        return False


def ours_reads(path):
    """True if our reader accepts the file; a refusal must be one UserError line naming it."""
    try:
        checkpoint.read_safetensors_header(path)
        return True
    except UserError as e:
        assert str(e).startswith(path) and "\n" not in str(e), str(e)
        return False


@pytest.mark.parametrize("case", SAFETENSORS, ids=[c[0] for c in SAFETENSORS])
def test_safetensors_reader_agrees_with_the_library(case, tmp_path):
    name, header, data_size, valid = case
    path = str(tmp_path / f"{name}.safetensors")
    with open(path, "wb") as f:
        f.write(safetensors_bytes(header, data_size))
    assert library_reads(path) is valid, "the case is not what it says"
    assert ours_reads(path) is valid


def test_safetensors_header_past_100_mb_is_refused_unread(tmp_path):
    """The format's limit: a header length of 100 MB + 1, in a sparse file of that size."""
    path = str(tmp_path / "big.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(8 + 100_000_001)
    assert not library_reads(path)
    with pytest.raises(UserError, match="header of 100000001 bytes, more than the format's"):
        checkpoint.read_safetensors_header(path)


@pytest.mark.parametrize(
    "params, key",
    [
        (dict(multiple_of=0), "multiple_of"),
        (dict(ffn_dim_multiplier=float("inf")), "ffn_dim_multiplier"),
        (dict(ffn_dim_multiplier=-1.3), "ffn_dim_multiplier"),
        (dict(n_heads=3), "n_heads"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(norm_eps=float("nan")), "norm_eps"),
        (dict(use_scaled_rope=True, rope_scaling_factor=0), "rope_scaling_factor"),
        (dict(dim=10**30), "dim"),
        (dict(dim=60, n_heads=4), "dim"),
    ],
)
def test_meta_params_that_divide_by_zero_or_overflow(params, key):
    good = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5)
    checkpoint.config_from_meta(good, 100)
    with pytest.raises(UserError, match=rf"^params\.json: {key}: "):
        checkpoint.config_from_meta(dict(good, **params), 100)


# -----------------------------------------------------------------------------
# the command-line cases: (id, script, argv, setup(c, w) or None); {w}: the shared world
# (w/base: data/tiny_base, w/data: data/tasks), {c}: the case's folder


def index(weight_map, fifo=None):
    """A copy whose weights are listed in model.safetensors.index.json: weight_map(keys) -> the
    index's weight_map; fifo: a FIFO made in the folder under that name."""

    def setup(c, w):
        ckpt = copy_base(c, w)
        keys = list(checkpoint.read_safetensors_header(str(ckpt / "model.safetensors"))[0])
        (ckpt / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map(keys)})
        )
        if fifo:
            os.mkfifo(ckpt / fifo)

    return setup


def replace_with(name, make):
    """A copy of the base whose file `name` is replaced by make(path)."""

    def setup(c, w):
        path = copy_base(c, w) / name
        path.unlink()
        make(path)

    return setup


def overlapping_offsets(c, w):
    """The second tensor's data_offsets moved back over the first's bytes (same file size)."""
    path = copy_base(c, w) / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first, second = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )[:2]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 4, end - 4]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    path.write_bytes(data[:8] + blob + data[8 + n :])


def adapter(metadata, tensors, size=None):
    """c/a.safetensors: an adapter file's header with these tensors ({name: shape}) and metadata;
    its data are zeros (a sparse file when size is large)."""

    def setup(c, w):
        header, offset = {"__metadata__": metadata(w) if callable(metadata) else metadata}, 0
        for name, shape in tensors.items():
            n = 4 * math.prod(shape)
            header[name] = entry(offset, offset + n, shape)
            offset += n
        blob = json.dumps(header).encode()
        with open(c / "a.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)

    return setup


SETTINGS = {
    "finetune": "multilora",
    "targets": ["q", "v"],
    "n_loras": 2,
    "lora_rank": 2,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "scaling": "channel",
}


def adapter_metadata(**changes):
    settings = json.dumps(dict(SETTINGS, **changes))
    return {"format": checkpoint.ADAPTER_FORMAT, "settings": settings}


def for_the_base(metadata):
    """metadata with the world's base fingerprint: the file passes the base check."""

    def complete(w):
        fingerprint = checkpoint.base_fingerprint(checkpoint.load_model(str(w / "base")))
        return dict(metadata, base_fingerprint=fingerprint)

    return complete


GEN, EVAL, TRAIN, BENCH, PLAN = (
    "generate.py",
    "eval.py",
    "train.py",
    "tools/bench.py",
    "tools/plan.py",
)
CKPT = "--ckpt_dir={c}/ckpt"
BASE = "--ckpt_dir={w}/base"
TRAIN_ARGS = [BASE, "--datasets={w}/data", "--out_dir={c}/out"]
NAN, INF = float("nan"), float("inf")
LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
CASES = [
    # configs whose sizes are absurd, do not divide, or overflow: refused before allocating
    (
        "config-heads-do-not-divide-dim",
        GEN,
        [CKPT],
        config(num_attention_heads=3, num_key_value_heads=None, head_dim=None),
    ),
    ("config-kv-heads-do-not-divide", GEN, [CKPT], config(num_key_value_heads=3)),
    ("config-head-dim-odd", GEN, [CKPT], config(head_dim=33)),
    ("config-head-dim-2^30", GEN, [CKPT], config(head_dim=2**30)),
    ("config-embedding-1-TiB", GEN, [CKPT], config(vocab_size=2**31 - 1, hidden_size=2**30)),
    ("config-vocab-2^40", GEN, [CKPT], config(vocab_size=2**40)),
    ("config-dims-past-int64", GEN, [CKPT], config(intermediate_size=10**30)),
    ("config-layers-10^6", GEN, [CKPT], config(num_hidden_layers=10**6)),
    ("config-layers-fewer", GEN, [CKPT], config(num_hidden_layers=3)),
    ("config-hidden-size-infinity", GEN, [CKPT], config(hidden_size=INF)),
    # values that make the model compute NaN
    ("config-rope_theta-0", GEN, [CKPT], config(rope_theta=0)),
    ("config-rope_theta-negative", GEN, [CKPT], config(rope_theta=-10000.0)),
    ("config-rope_theta-infinity", GEN, [CKPT], config(rope_theta=INF)),
    ("config-rms_norm_eps-negative", GEN, [CKPT], config(rms_norm_eps=-1e-5)),
    ("config-rms_norm_eps-nan", GEN, [CKPT], config(rms_norm_eps=NAN)),
    ("config-rope-factor-0", GEN, [CKPT], config(rope_scaling=dict(LLAMA3, factor=0))),
    (
        "config-rope-low-equals-high",
        GEN,
        [CKPT],
        config(rope_scaling=dict(LLAMA3, high_freq_factor=1.0)),
    ),
    # JSON of the wrong shape
    ("config-a-list", GEN, [CKPT], replace_with("config.json", lambda p: p.write_text("[1]"))),
    ("config-rope_scaling-a-list", GEN, [CKPT], config(rope_scaling=[8.0])),
    ("config-eos-an-object", GEN, [CKPT], config(eos_token_id={"id": 2})),
    ("index-weight_map-a-list", GEN, [CKPT], index(lambda keys: keys)),
    ("index-weight_map-ints", GEN, [CKPT], index(lambda keys: {k: 1 for k in keys})),
    # where files are read from
    (
        "index-absolute-path",
        GEN,
        [CKPT],
        index(
            lambda keys: {k: os.path.join(ROOT, "data/tiny_base/model.safetensors") for k in keys}
        ),
    ),
    ("index-dot-dot", GEN, [CKPT], index(lambda keys: {k: "../../etc/passwd" for k in keys})),
    ("index-names-a-fifo", GEN, [CKPT], index(lambda keys: {k: "fifo" for k in keys}, "fifo")),
    ("weights-a-fifo", GEN, [CKPT], replace_with("model.safetensors", os.mkfifo)),
    (
        "config-symlink-to-dev-zero",
        GEN,
        [CKPT],
        replace_with("config.json", lambda p: os.symlink("/dev/zero", p)),
    ),
    (
        "weights-symlink-to-dev-zero",
        GEN,
        [CKPT],
        replace_with("model.safetensors", lambda p: os.symlink("/dev/zero", p)),
    ),
    ("weights-overlapping-offsets", GEN, [CKPT], overlapping_offsets),
    # adapter files: checked from the header, before the body is read
    (
        "adapter-1-GiB-tensor",
        GEN,
        [BASE, "--adapter={c}/a.safetensors"],
        adapter(for_the_base(adapter_metadata()), {"layers.0.self_attn.q_proj.lora_A": (2**26, 4)}),
    ),
    (
        "adapter-metadata-nested",
        GEN,
        [BASE, "--adapter={c}/a.safetensors"],
        lambda c, w: (c / "a.safetensors").write_bytes(safetensors_bytes(DEEP, 8)),
    ),
    (
        "adapter-targets-of-lists",
        GEN,
        [BASE, "--adapter={c}/a.safetensors"],
        adapter(adapter_metadata(targets=[["q"]]), {}),
    ),
    (
        "adapter-settings-a-list",
        GEN,
        [BASE, "--adapter={c}/a.safetensors"],
        adapter({"format": checkpoint.ADAPTER_FORMAT, "settings": "[1, 2]"}, {}),
    ),
    # settings of absurd size, refused before out_dir is touched
    ("train-batch_size-10^9", TRAIN, [*TRAIN_ARGS, "--batch_size=1000000000"], None),
    (
        "train-accumulation-10^9",
        TRAIN,
        [*TRAIN_ARGS, "--gradient_accumulation_steps=1000000000"],
        None,
    ),
    ("train-seed-10^30", TRAIN, [*TRAIN_ARGS, f"--seed={10**30}"], None),
    ("train-threads-1000", TRAIN, [*TRAIN_ARGS, "--threads=1000"], None),
    (
        "train-exact_match_max_new_tokens-10^9",
        TRAIN,
        [*TRAIN_ARGS, "--exact_match_max_new_tokens=1000000000"],
        None,
    ),
    (
        "train-scratch-past-memory",
        TRAIN,
        [*TRAIN_ARGS, "--init_from=scratch", "--finetune=full", "--dim=65536", "--n_layers=512"],
        None,
    ),
    (
        "train-scratch-odd-head-dim",
        TRAIN,
        [*TRAIN_ARGS, "--init_from=scratch", "--finetune=full", "--dim=12", "--n_kv_heads=2"],
        None,
    ),
    ("train-config-layers-10^6", TRAIN, [*TRAIN_ARGS[1:], CKPT], config(num_hidden_layers=10**6)),
    ("gen-max_new_tokens-10^9", GEN, [BASE, "--max_new_tokens=1000000000"], None),
    ("gen-seed-10^30", GEN, [BASE, f"--seed={10**30}"], None),
    (
        "gen-kv-cache-past-memory",
        GEN,
        [CKPT, "--max_new_tokens=1000000000"],
        config(max_position_embeddings=2**31 - 1),
    ),
    ("gen-batch_size-0", GEN, [BASE, "--batch_size=0"], None),
    ("eval-max_new_tokens-10^9", EVAL, [BASE, "--max_new_tokens=1000000000"], None),
    ("bench-batch-10^6-x-10^5", BENCH, ["--batch_size=1000000", "--seq_len=100000"], None),
    ("bench-threads-1000", BENCH, ["--threads=1000"], None),
    ("bench-seed-negative", BENCH, ["--seed=-1"], None),
    ("plan-config-layers-10^6", PLAN, [CKPT], config(num_hidden_layers=10**6)),
    ("plan-config-rope_theta-0", PLAN, [CKPT], config(rope_theta=0)),
    ("plan-config-embedding-1-TiB", PLAN, [CKPT], config(vocab_size=2**31 - 1)),
]


def hash_tree(root):
    """{path: sha256 (or what it is: a link, a FIFO)} of everything under root."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                out[path] = "link to " + os.readlink(path)
            elif stat.S_ISFIFO(os.lstat(path).st_mode):
                out[path] = "fifo"
            elif name in files:
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(os.path.join(ROOT, "data", "tiny_base"), w / "base")
    shutil.copytree(
        os.path.join(ROOT, "data", "tasks"),
        w / "data",
        ignore=shutil.ignore_patterns("*.py", "__pycache__"),
    )
    return w


def run_case(case, w, c):
    _, script, argv, setup = case
    c.mkdir()
    if setup:
        setup(c, w)
    before = hash_tree(c)
    args = [a.format(w=w, c=c) for a in argv]
    p = python([sys.executable, "-c", CAPPED, script, *args], cwd=ROOT, timeout=120)
    return p, before, hash_tree(c)


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    before = hash_tree(world)
    with ThreadPoolExecutor(2) as pool:
        futures = {case[0]: pool.submit(run_case, case, world, root / case[0]) for case in CASES}
        out = {name: f.result() for name, f in futures.items()}
    return out, before, hash_tree(world)


def test_case_ids_are_unique():
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_hostile_input(results, case):
    p, before, after = results[0][case[0]]
    lines = p.stderr.strip("\n").split("\n")
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, (
        p.stderr
    )
    assert after == before, "the case's files changed or new files appeared"
    growth = re.search(r"PEAK_GROWTH (\d+)", p.stdout)
    assert growth and int(growth.group(1)) < PEAK_MB << 20, p.stdout[-300:]


def test_world_untouched(results):
    _, before, after = results
    assert after == before


# -----------------------------------------------------------------------------
# a prompt file is generated in batches of --batch_size


def test_prompt_file_in_batches_gives_the_same_answers(tmp_path):
    prompts = ["Once upon a time", "hello world", "Sort the list: 3 1 2.", "The quick", "abc"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    outs = [
        python(
            [
                sys.executable,
                GEN,
                f"--prompt_file={tmp_path}/p.txt",
                "--max_new_tokens=6",
                f"--batch_size={b}",
            ],
            cwd=ROOT,
            timeout=120,
        )
        for b in (16, 2)
    ]
    assert all(p.returncode == 0 for p in outs), [p.stderr for p in outs]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.count("-" * 40) == len(prompts)
