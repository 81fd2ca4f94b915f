"""Bad inputs through the real command line: every case runs `python SCRIPT ARGS...` in a subprocess
from the repository root and must exit non-zero with exactly one line on stderr, starting "error:"
(no traceback), and leave every file it could have touched byte-identical, with no new files.

A case is (id, script, argv, setup). argv may name {w}, the shared fixture folder (a copy of
data/tiny_base in w/base, of data/tasks in w/data, adapters, a second tokenizer; see `world`), and
{c}, the case's own folder, which setup(c, w) fills with whatever the case needs damaged (a copied
checkpoint, a copied dataset, an out_dir holding a file). What is hashed: the case's folder, the
shared folder and the repository's data/ (a default out_dir points there). To add cases, append to
CASES. The commands run two at a time, each in a fork of a process that imported torch already
(tests/zygote.py: torch's import is most of a case's time).

Also here: what export.py writes when the inputs are good (AutoTokenizer loads the merged export).
"""

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import llama
import multilora
from conftest import ROOT, python, train_sentencepiece

# -----------------------------------------------------------------------------
# setup helpers: each damages a copy inside the case folder c


def copy_base(c, w):
    shutil.copytree(w / "base", c / "ckpt")
    return c / "ckpt"


def edit_config(**changes):
    def setup(c, w):
        path = copy_base(c, w) / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))

    return setup


def header_dtype_i32(c, w):
    """The first tensor's header says I32 over F32 bytes (same size: only the dtype is wrong)."""
    path = copy_base(c, w) / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + data[8 : 8 + n].replace(b'"F32"', b'"I32"', 1) + data[8 + n :])


def truncate(name, keep=-1000):
    def setup(c, w):
        path = copy_base(c, w) / name
        path.write_bytes(path.read_bytes()[:keep])

    return setup


def missing_shard(c, w):
    ckpt = copy_base(c, w)
    keys = list(checkpoint.read_safetensors_header(str(ckpt / "model.safetensors"))[0])
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map[keys[-1]] = "model-00002-of-00002.safetensors"  # listed, never written
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def copy_data(c, w):
    shutil.copytree(w / "data", c / "data")
    return c / "data"


def damage_data(name, damage):
    """damage(array) -> the array to save in place of data/val_{name}.npy (allow_pickle for the
    object case)."""

    def setup(c, w):
        path = copy_data(c, w) / f"val_{name}.npy"
        np.save(path, damage(np.load(path)), allow_pickle=True)

    return setup


def edit_meta(**changes):
    def setup(c, w):
        path = copy_data(c, w) / "meta.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))

    return setup


def write(name, text):
    def setup(c, w):
        (c / name).parent.mkdir(parents=True, exist_ok=True)
        (c / name).write_text(text)

    return setup


def both(*setups):
    def setup(c, w):
        for s in setups:
            s(c, w)

    return setup


def set_at(i, value):
    def damage(a):
        a = a.copy()
        a[i] = value
        return a

    return damage


def object_array(a):
    return np.array([{"code": "runs on load"}], dtype=object)


def edit_run(edit):
    """A copy of the world's finished 1-step run in c/out, its ckpt.pt edited by edit(ckpt)."""

    def setup(c, w):
        shutil.copytree(w / "run", c / "out")
        ckpt = torch.load(c / "out" / "ckpt.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, c / "out" / "ckpt.pt")

    return setup


def other_weights(c, w):
    """The world's run, and in c/other a base of the same shapes with other weights."""
    shutil.copytree(w / "run", c / "out")
    model = checkpoint.load_model(str(w / "base"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    checkpoint.save_hf_checkpoint(
        model, str(c / "other"), tokenizer_path=str(w / "base" / "tokenizer.model")
    )


MC_BAD = '{"question": "q", "choices": ["a", "b"], "answer": 2}\n'
ALPACA_BAD = '[\n {"instruction": "i", "input": "", "output": "o"},\n {"instruction": "j"\n]\n'
MMLU_ROW = "What is 2 + 2?,3,4,5,6,1\n"

# -----------------------------------------------------------------------------
# the table: (id, script, argv, setup or None)

GEN, EVAL, EXPORT, ANALYZE = "generate.py", "eval.py", "export.py", "analyze.py"
ALPACA, DOLLY, GSM8K, MMLU = (f"data/{n}/prepare.py" for n in ("alpaca", "dolly", "gsm8k", "mmlu"))
BASE = "--ckpt_dir={w}/base"
CASES = (
    [
        # generate.py: settings
        ("gen-device-no-such-cuda", GEN, [BASE, "--device=cuda:99"], None),
        ("gen-top_p-0", GEN, [BASE, "--top_p=0"], None),
        ("gen-temperature-negative", GEN, [BASE, "--temperature=-1"], None),
        ("gen-max_new_tokens-0", GEN, [BASE, "--max_new_tokens=0"], None),
        ("gen-dtype", GEN, [BASE, "--dtype=int8"], None),
        ("gen-prompt_file-missing", GEN, [BASE, "--prompt_file={c}/nope.txt"], None),
        ("gen-prompt_file-empty", GEN, [BASE, "--prompt_file={c}/p.txt"], write("p.txt", "\n  \n")),
        # checkpoints (read by generate.py; eval/export/analyze share checkpoint.load_model)
        ("ckpt-missing", GEN, ["--ckpt_dir={c}/nope"], None),
        ("ckpt-hidden_size-string", GEN, ["--ckpt_dir={c}/ckpt"], edit_config(hidden_size="128")),
        ("ckpt-heads-null", GEN, ["--ckpt_dir={c}/ckpt"], edit_config(num_attention_heads=None)),
        ("ckpt-layers-float", GEN, ["--ckpt_dir={c}/ckpt"], edit_config(num_hidden_layers=4.0)),
        ("ckpt-safetensors-I32-over-F32", GEN, ["--ckpt_dir={c}/ckpt"], header_dtype_i32),
        ("ckpt-safetensors-truncated", GEN, ["--ckpt_dir={c}/ckpt"], truncate("model.safetensors")),
        ("ckpt-missing-shard", GEN, ["--ckpt_dir={c}/ckpt"], missing_shard),
        ("ckpt-tokenizer-other-vocab", GEN, [BASE, "--tokenizer={w}/tok64/tokenizer.model"], None),
        # adapters
        ("gen-adapter-not-safetensors", GEN, [BASE, "--adapter={w}/junk.safetensors"], None),
        ("gen-adapter-nan", GEN, [BASE, "--adapter={w}/nan.safetensors"], None),
        ("gen-adapter-metadata-types", GEN, [BASE, "--adapter={w}/badmeta.safetensors"], None),
        ("gen-adapter-other-base", GEN, [BASE, "--adapter={w}/other.safetensors"], None),
        # export.py
        ("export-no-settings", EXPORT, [], None),
        (
            "export-format",
            EXPORT,
            [BASE, "--adapter={w}/adapter.safetensors", "--out_dir={c}/out", "--format=gguf"],
            None,
        ),
        (
            "export-into-ckpt_dir",
            EXPORT,
            ["--ckpt_dir={c}/ckpt", "--adapter={w}/adapter.safetensors", "--out_dir={c}/ckpt"],
            copy_base,
        ),
        (
            "export-inside-ckpt_dir",
            EXPORT,
            ["--ckpt_dir={c}/ckpt", "--adapter={w}/adapter.safetensors", "--out_dir={c}/ckpt/hf"],
            copy_base,
        ),
        (
            "export-symlink-to-ckpt_dir",
            EXPORT,
            ["--ckpt_dir={c}/ckpt", "--adapter={w}/adapter.safetensors", "--out_dir={c}/link"],
            both(copy_base, lambda c, w: os.symlink(c / "ckpt", c / "link")),
        ),
        (
            "export-out-not-empty",
            EXPORT,
            [BASE, "--adapter={w}/adapter.safetensors", "--out_dir={c}/out"],
            write("out/keep.txt", "mine"),
        ),
        (
            "export-out-is-a-file",
            EXPORT,
            [BASE, "--adapter={w}/adapter.safetensors", "--out_dir={c}/out"],
            write("out", "a file"),
        ),
        (
            "export-peft-adapter-other-base",
            EXPORT,
            [BASE, "--adapter={w}/other.safetensors", "--out_dir={c}/out", "--format=peft"],
            None,
        ),
        (
            "export-ckpt-truncated",
            EXPORT,
            ["--ckpt_dir={c}/ckpt", "--adapter={w}/adapter.safetensors", "--out_dir={c}/out"],
            truncate("model.safetensors"),
        ),
        # eval.py: settings and --out, checked before any model work
        ("eval-out-is-a-folder", EVAL, [BASE, "--out={c}"], None),
        ("eval-out-under-a-file", EVAL, [BASE, "--out={c}/f.txt/r.json"], write("f.txt", "a file")),
        ("eval-task", EVAL, [BASE, "--task=hellaswag"], None),
        ("eval-batch_size-0", EVAL, [BASE, "--batch_size=0"], None),
        (
            "eval-shots-for-mc",
            EVAL,
            [BASE, "--task=mc", "--data={c}/mc.jsonl", "--shots=2"],
            write("mc.jsonl", MC_BAD),
        ),
        ("eval-mmlu-without-data", EVAL, [BASE, "--task=mmlu"], None),
        ("eval-data-missing", EVAL, [BASE, "--task=loss", "--data={w}/data,{c}/nope"], None),
        (
            "eval-mc-answer-out-of-range",
            EVAL,
            [BASE, "--task=mc", "--data={c}/mc.jsonl", "--out={c}/r.json"],
            write("mc.jsonl", MC_BAD),
        ),
        # eval.py --task=loss on a damaged copy of a prepared dataset
        (
            "data-split-missing",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data", "--split=dev"],
            copy_data,
        ),
        (
            "data-tokens-truncated",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            both(
                copy_data,
                lambda c, w: (c / "data/val_tokens.npy").write_bytes(
                    (c / "data/val_tokens.npy").read_bytes()[:-7]
                ),
            ),
        ),
        (
            "data-pickled-array",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("task", object_array),
        ),
        (
            "data-token-id-over-vocab",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("tokens", set_at(5, 768)),
        ),
        (
            "data-mask-2",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("mask", set_at(3, 2)),
        ),
        (
            "data-offsets-not-from-0",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("offsets", set_at(0, 1)),
        ),
        (
            "data-offsets-decreasing",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("offsets", set_at(1, 10**6)),
        ),
        (
            "data-task-id-out-of-range",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            damage_data("task", set_at(0, 99)),
        ),
        (
            "data-meta-vocab_size-string",
            EVAL,
            [BASE, "--task=loss", "--data={c}/data"],
            edit_meta(vocab_size="768"),
        ),
        # analyze.py
        (
            "analyze-no-ckpt_dir",
            ANALYZE,
            ["--adapters={w}/adapter.safetensors", "--out_dir={c}/a"],
            None,
        ),
        ("analyze-nothing-to-analyze", ANALYZE, [BASE, "--out_dir={c}/a"], None),
        (
            "analyze-out_dir-is-a-file",
            ANALYZE,
            [BASE, "--adapters={w}/adapter.safetensors", "--out_dir={c}/a"],
            write("a", "x"),
        ),
        ("analyze-full-missing", ANALYZE, [BASE, "--full={c}/nope", "--out_dir={c}/a"], None),
        # the prepare scripts (a failed run writes no dataset)
        (
            "alpaca-no-tokenizer",
            ALPACA,
            ["--source={c}/a.json", "--out_dir={c}/out"],
            write("a.json", ALPACA_BAD),
        ),
        (
            "alpaca-source-missing",
            ALPACA,
            ["--tokenizer={w}/base", "--source={c}/nope.json", "--out_dir={c}/out"],
            None,
        ),
        (
            "alpaca-val_fraction-1",
            ALPACA,
            [
                "--tokenizer={w}/base",
                "--source={c}/a.json",
                "--out_dir={c}/out",
                "--val_fraction=1",
            ],
            write("a.json", ALPACA_BAD),
        ),
        (
            "alpaca-malformed",
            ALPACA,
            ["--tokenizer={w}/base", "--source={c}/a.json", "--out_dir={c}/out"],
            write("a.json", ALPACA_BAD),
        ),
        (
            "dolly-missing-field",
            DOLLY,
            ["--tokenizer={w}/base", "--source={c}/d.jsonl", "--out_dir={c}/out"],
            write("d.jsonl", '{"instruction": "i", "response": "r"}\n'),
        ),
        (
            "gsm8k-out_dir-is-a-file",
            GSM8K,
            ["--tokenizer={w}/base", "--source={c}/train.jsonl", "--out_dir={c}/out"],
            both(
                write("train.jsonl", '{"question": "q", "answer": "#### 1"}\n'),
                write("out", "a file"),
            ),
        ),
        (
            "mmlu-dev-only",
            MMLU,
            ["--tokenizer={w}/base", "--source={c}/mmlu", "--out_dir={c}/out"],
            write("mmlu/dev/x_dev.csv", MMLU_ROW),
        ),
        (
            "mmlu-not-a-tar",
            MMLU,
            ["--tokenizer={w}/base", "--source={c}/data.tar", "--out_dir={c}/out"],
            write("data.tar", "not a tar"),
        ),
        # train.py: settings, checked before anything is read or written
    ]
    + [
        (
            f"train-{name}",
            "train.py",
            ["--ckpt_dir={w}/base", "--datasets={w}/data", "--out_dir={c}/out", *argv],
            setup,
        )
        for name, argv, setup in [
            ("unknown-setting", ["--lora_rnak=4"], None),
            ("learning_rate-negative", ["--learning_rate=-1"], None),
            ("beta1-1.5", ["--beta1=1.5"], None),
            ("lora_dropout-1.5", ["--lora_dropout=1.5"], None),
            ("lora_dropout-negative", ["--lora_dropout=-0.5"], None),
            ("warmup_iters-negative", ["--warmup_iters=-5"], None),
            ("weight_decay-negative", ["--weight_decay=-10"], None),
            ("min_lr-above-learning_rate", ["--min_lr=1.0"], None),
            ("eval_examples-negative", ["--eval_examples=-1"], None),
            ("warmup-beyond-max_iters", ["--max_iters=30", "--warmup_iters=50"], None),
            ("device-cuda-without-cuda", ["--device=cuda"], None),
            ("scratch-with-adapter", ["--init_from=scratch"], None),
            ("fsdp-without-torchrun", ["--fsdp=True"], None),
            ("finetune-choice", ["--finetune=qlora"], None),
            ("lora_targets-choice", ["--lora_targets=q,x"], None),
            # train.py: files
            (
                "config-file-unknown-key",
                ["{c}/cfg.py"],
                lambda c, w: (c / "cfg.py").write_text("n_layer = 3\n"),
            ),
            ("dataset-missing", ["--datasets={c}/nope"], None),
            ("tokenizer-other-vocab", ["--tokenizer={w}/tok64/tokenizer.model"], None),
            ("out_dir-is-a-file", [], lambda c, w: (c / "out").write_text("a file\n")),
            (
                "out_dir-holds-a-run",
                [],
                lambda c, w: (
                    (c / "out").mkdir(),
                    (c / "out" / "metrics.jsonl").write_text("{}\n"),
                ),
            ),
            ("resume-without-checkpoint", ["--resume=True"], None),
            (
                "resume-corrupt-checkpoint",
                ["--resume=True"],
                lambda c, w: (
                    (c / "out").mkdir(),
                    (c / "out" / "ckpt.pt").write_bytes(b"PK\x03\x04 not a checkpoint"),
                ),
            ),
            # train.py --resume=True on a copy of a finished run: incomplete state, settings,
            # another base
            ("resume-rng-empty", ["--resume=True"], edit_run(lambda ckpt: ckpt.update(rng=[]))),
            (
                "resume-key-missing",
                ["--resume=True"],
                edit_run(lambda ckpt: ckpt.pop("data_position")),
            ),
            (
                "resume-iter_num-string",
                ["--resume=True"],
                edit_run(lambda ckpt: ckpt.update(iter_num="1")),
            ),
            (
                "resume-data_position-short",
                ["--resume=True"],
                edit_run(lambda ckpt: ckpt.update(data_position=[0])),
            ),
            (
                "resume-setting-wrong-type",
                ["--resume=True"],
                edit_run(lambda ckpt: ckpt["settings"].update(lora_rank="8")),
            ),
            (
                "resume-changes-lora_rank",
                ["--resume=True", "--lora_rank=2", "--seed=1"],
                edit_run(lambda ckpt: None),
            ),
            ("resume-other-base-weights", ["--resume=True", "--ckpt_dir={c}/other"], other_weights),
        ]
    ]
    + [
        # tools/random_llama.py: the embedded suite's ids do not fit a vocabulary of 512
        (
            "random_llama-tasks-vocab-too-small",
            "tools/random_llama.py",
            ["--dim=64", "--n_layers=1", "--vocab_size=512", "--tasks=True", "--out_dir={c}/m"],
            None,
        ),
        # generate.py: a prompt file that is not UTF-8 text (Latin-1 bytes on line 2)
        (
            "gen-prompt_file-not-utf8",
            GEN,
            [BASE, "--prompt_file={c}/p.txt"],
            lambda c, w: (c / "p.txt").write_bytes(
                "Once upon a time\nCaf\u00e9\n".encode("latin-1")
            ),
        ),
    ]
)

# -----------------------------------------------------------------------------
# running the table


def hash_tree(*roots, skip=lambda path: False):
    """{path: sha256} of every file under the roots (symbolic links as their target's name)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    out[path] = "link to " + os.readlink(path)
                elif name in files and not skip(path):
                    with open(path, "rb") as f:
                        out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def repo_data():
    # data/ minus the scripts (other people may be editing those while the tests run)
    return hash_tree(
        os.path.join(ROOT, "data"), skip=lambda p: p.endswith(".py") or "__pycache__" in p
    )


def save_adapter(model, path, edit=None):
    multilora.save_adapter(model, str(path))
    # rewrite the file with edited tensors / metadata, as a damaged or hand-made file would be
    if edit:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors, metadata = edit(load_file(str(path)), metadata)
        save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(os.path.join(ROOT, "data", "tiny_base"), w / "base")
    shutil.copytree(
        os.path.join(ROOT, "data", "tasks"),
        w / "data",
        ignore=shutil.ignore_patterns("*.py", "__pycache__"),
    )
    model = checkpoint.load_model(str(w / "base"))
    multilora.adapt_model(model, n_loras=2, lora_rank=2)
    save_adapter(model, w / "adapter.safetensors")

    def nan(tensors, metadata):
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].clone().fill_(float("nan"))
        return tensors, metadata

    def string_n_loras(tensors, metadata):
        settings = json.loads(metadata["settings"])
        return tensors, dict(metadata, settings=json.dumps(dict(settings, n_loras="2")))

    save_adapter(model, w / "nan.safetensors", nan)
    save_adapter(model, w / "badmeta.safetensors", string_n_loras)
    torch.manual_seed(0)
    other = llama.Llama(
        llama.LlamaConfig(
            dim=64, n_layers=2, n_heads=2, hidden_dim=96, vocab_size=768, max_seq_len=64
        )
    )
    multilora.adapt_model(other, n_loras=2, lora_rank=2)
    save_adapter(other, w / "other.safetensors")
    (w / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (w / "tok64").mkdir()
    train_sentencepiece(w / "tok64" / "tokenizer.model", vocab_size=64)
    # a finished run, to resume
    p = python(
        [
            sys.executable,
            "train.py",
            f"--ckpt_dir={w}/base",
            f"--datasets={w}/data",
            f"--out_dir={w}/run",
            "--max_iters=1",
            "--eval_interval=1",
            "--warmup_iters=0",
            "--eval_examples=1",
            "--exact_match_examples=0",
            "--batch_size=4",
        ],
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    return w


def run_case(case, w, c):
    _, script, argv, setup = case
    c.mkdir()
    if setup:
        setup(c, w)
    before = hash_tree(c)
    p = python([sys.executable, script, *(a.format(w=w, c=c) for a in argv)], cwd=ROOT, timeout=300)
    return p, before, hash_tree(c)


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """Every case run once, two at a time; the shared folder and data/ hashed around all of them."""
    root = tmp_path_factory.mktemp("cases")
    shared_before = hash_tree(world), repo_data()
    with ThreadPoolExecutor(2) as pool:
        futures = {case[0]: pool.submit(run_case, case, world, root / case[0]) for case in CASES}
        out = {name: f.result() for name, f in futures.items()}
    return out, shared_before, (hash_tree(world), repo_data())


def test_case_ids_are_unique():
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input(results, case):
    out, _, _ = results
    p, before, after = out[case[0]]
    lines = p.stderr.strip("\n").split("\n")
    assert p.returncode != 0, p.stdout + p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, (
        p.stderr
    )
    assert after == before, "the case's files changed or new files appeared"


def test_shared_files_untouched(results):
    _, shared_before, shared_after = results
    assert shared_after == shared_before


# -----------------------------------------------------------------------------
# export.py with good inputs: what it writes


def test_export_hf_loads_in_transformers_with_its_tokenizer(world, tmp_path):
    """The merged export carries tokenizer_config.json next to tokenizer.model: transformers'
    AutoTokenizer loads it and encodes the task prompts as tokenizer.py does."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip(
        "google.protobuf", reason="transformers >= 5 converts tokenizer.model with protobuf"
    )
    import export
    from tokenizer import load_tokenizer

    export.export_hf(str(world / "base"), str(world / "adapter.safetensors"), str(tmp_path / "hf"))
    assert (
        json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "LlamaTokenizer"
    )
    theirs, ours = (
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")),
        load_tokenizer(str(world / "base")),
    )
    for text in [
        "### Instruction:\nSort the digits from small to large.\n\n"
        "### Input:\n5 9 3\n\n### Response:\n",
        "Once upon a time, 42 birds",
        "odd",
    ]:
        assert theirs(text).input_ids == ours.encode(text, bos=True)
        assert theirs.decode(theirs(text).input_ids, skip_special_tokens=True) == text
    assert theirs.eos_token_id == ours.eos_id


def test_export_refuses_before_writing(world, tmp_path):
    """Refusals are UserErrors raised before the out_dir is created (the table checks the CLI)."""
    import export
    from util import UserError

    for out in (world / "base", world / "base" / "sub"):
        with pytest.raises(UserError, match="the base checkpoint the script reads"):
            export.export_peft(str(world / "base"), str(world / "adapter.safetensors"), str(out))
    assert not (world / "base" / "sub").exists()
    # a new folder: fine
    export.export_peft(
        str(world / "base"), str(world / "adapter.safetensors"), str(tmp_path / "peft")
    )
    (tmp_path / "empty").mkdir()
    # an empty one too
    export.export_peft(
        str(world / "base"), str(world / "adapter.safetensors"), str(tmp_path / "empty")
    )
    written = set(os.listdir(tmp_path / "empty"))  # the adapter, and the base's tokenizer files
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= written
    with pytest.raises(UserError, match="not empty"):
        export.export_peft(
            str(world / "base"), str(world / "adapter.safetensors"), str(tmp_path / "empty")
        )


def test_generate_prompt_and_prompt_file_agree_on_newlines(world, tmp_path):
    """--help shows the default prompt with \\n for its newlines; typed that way, --prompt means
    the same prompt as a real newline would, and as --prompt_file's \\n does."""
    text = "### Instruction:\nSay hi.\n\n### Response:\n"
    (tmp_path / "p.txt").write_text(text.replace("\n", "\\n") + "\n")
    outs = [
        python(
            [sys.executable, GEN, BASE.format(w=world), "--max_new_tokens=8", arg],
            cwd=ROOT,
            timeout=120,
        )
        for arg in (
            "--prompt=" + text,
            "--prompt=" + text.replace("\n", "\\n"),
            f"--prompt_file={tmp_path}/p.txt",
        )
    ]
    assert all(p.returncode == 0 for p in outs), [p.stderr for p in outs]
    assert outs[0].stdout.startswith(text)  # the prompt, decoded, then the continuation
    assert outs[1].stdout == outs[0].stdout and outs[2].stdout == outs[0].stdout
