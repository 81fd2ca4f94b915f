"""
The prepare side of the data: reading each source's own format and writing the prepared format that
dataset.py reads (data/<name>/prepare.py and data/tasks/generate.py go through prepare() here).
Every problem stops with one line naming the file and the line, or the record of a JSON array
(nothing is skipped, so a prepared dataset is always the whole source or nothing).
"""

import csv
import io
import json
import os
import random
import urllib.request

import numpy as np

import chat
import configurator
import util
from configurator import S
from dataset import FIELDS, FORMAT, check_fields, decode_json, encode_document, encode_record
from dataset import read_jsonl, read_text
from tokenizer import load_tokenizer
from util import UserError

# -----------------------------------------------------------------------------
# writing the prepared format


def write_file(path, write, mode="wb"):
    """write(f) into path through util.atomic_write: all or nothing, umask permissions."""
    with util.atomic_write(path) as tmp, open(tmp, mode) as f:
        write(f)


def write_jsonl(path, records):
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_file(path, lambda f: f.writelines(lines), "w")


# every file of a prepared dataset: what --overwrite removes, and all of it, before writing
PREPARED_FILES = (
    "meta.json",
    *(f"{s}.jsonl" for s in ("train", "val", "test")),
    *(
        f"{s}_{a}.npy"
        for s in ("train", "val", "test")
        for a in ("tokens", "mask", "offsets", "task")
    ),
)


def check_prepared_dir(out_dir, overwrite):
    """Refuse an out_dir that holds a prepared dataset (or part of one) unless overwrite: a dataset
    is replaced whole or not at all. Before anything is written, and again under the folder's lock.
    -> the prepared files found"""
    util.check_output(out_dir, "out_dir", folder=True)
    found = [f for f in PREPARED_FILES if os.path.lexists(os.path.join(out_dir, f))]
    if found and not overwrite:
        raise UserError(
            f"--out_dir={out_dir}: holds a prepared dataset ({', '.join(found[:3])}"
            f"{f' and {len(found) - 3} more files' if len(found) > 3 else ''}); "
            f"replace it with --overwrite=True, or prepare into another folder"
        )
    return found


def write_dataset(out_dir, splits, meta, raw=None, overwrite=False):
    """splits: {split: [(task_name, ids, mask)]}; meta: vocab_size, bos_id, eos_id, tokenizer,
    max_len and optionally "tasks" (the order of task indices) and "counts" (e.g. dropped examples
    per split), to which the example and token counts are added; raw: {split: [record]} for
    {split}.jsonl. Under out_dir's lock, a dataset there is refused, or with overwrite removed whole
    (meta.json first); the new meta.json is written last: a directory with a meta.json is
    complete."""
    os.makedirs(out_dir, exist_ok=True)
    lock = util.lock_folder(out_dir)  # noqa: F841 (released when the function returns)
    for f in check_prepared_dir(out_dir, overwrite):
        os.remove(os.path.join(out_dir, f))
    util.remove_stale_tmp(out_dir, PREPARED_FILES)
    meta = dict(meta)
    tasks = list(
        meta.get("tasks")
        or sorted({task for examples in splits.values() for task, _, _ in examples})
    )
    token_dtype = np.uint16 if meta["vocab_size"] <= 65535 else np.uint32
    counts = {split: dict(c) for split, c in meta.get("counts", {}).items()}
    for split, examples in splits.items():
        lengths = [len(ids) for _, ids, _ in examples]
        arrays = {
            "tokens": np.array([t for _, ids, _ in examples for t in ids], dtype=token_dtype),
            "mask": np.array([m for _, _, mask in examples for m in mask], dtype=np.uint8),
            "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            "task": np.array([tasks.index(task) for task, _, _ in examples], dtype=np.uint16),
        }
        for name, array in arrays.items():
            write_file(os.path.join(out_dir, f"{split}_{name}.npy"), lambda f: np.save(f, array))
        per_task = {t: 0 for t in tasks}
        for task, _, _ in examples:
            per_task[task] += 1
        counts.setdefault(split, {}).update(
            examples=len(examples),
            tokens=int(sum(lengths)),
            target_tokens=int(arrays["mask"].sum()),
            per_task=per_task,
        )
    for split, records in (raw or {}).items():
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), records)
    meta.update(format=FORMAT, tasks=tasks, template=meta.get("template", "alpaca"), counts=counts)
    write_file(os.path.join(out_dir, "meta.json"), lambda f: json.dump(meta, f, indent=1), "w")
    return meta


# -----------------------------------------------------------------------------
# reading sources


def read_records(path, task, fields):
    """Instruction records from a JSON array of objects (alpaca_data.json) or, when the file does
    not start with "[", JSON lines. fields: {our field: the source's field} for "instruction" and
    "response", and "input" unless the source has none (then ""). A record with a "messages" list
    is a conversation (chat.py), kept as one. An error in an array names the line where the JSON
    breaks, or the record (its index in the array, from 0) and the field."""
    text, names = read_text(path), tuple(fields.values())
    if text.lstrip().startswith("["):
        records = decode_json(text, path)
        if not records:
            raise UserError(f"{path}: empty file (no examples)")
        numbered = [(f"{path}: record [{i}]", r) for i, r in enumerate(records)]
    else:
        numbered = [(f"{path}:{n}", r) for n, r in read_jsonl(path, ())]
    out = []
    for where, r in numbered:
        if isinstance(r, dict) and "messages" in r:
            chat.check_messages(where, r["messages"])
            out.append(dict(task=task, messages=r["messages"]))
            continue
        check_fields(where, r, names)
        out.append(
            dict(
                task=task,
                instruction=r[fields["instruction"]],
                input=r[fields["input"]] if "input" in fields else "",
                response=r[fields["response"]],
            )
        )
    return out


def read_csv(path, header, n_columns):
    """-> [(line_number, row)] for a CSV file with n_columns per row; a first row equal to header is
    skipped (re-exported copies have one, the original MMLU release has none)."""
    rows, reader = [], csv.reader(io.StringIO(read_text(path), newline=""))
    line = 1
    for row in reader:
        if not (line == 1 and row == list(header)) and row:
            if len(row) != n_columns:
                raise UserError(
                    f"{path}:{line}: expected {n_columns} columns ({', '.join(header)}), "
                    f"got {len(row)}"
                )
            rows.append((line, row))
        line = reader.line_num + 1  # a quoted field may span lines: the next row starts after it
    if not rows:
        raise UserError(f"{path}: empty file (no examples)")
    return rows


def source_file(source, name, ext):
    """--source may name the file itself or a directory holding it: name, else its only *ext
    file."""
    if not os.path.isdir(source):
        return source
    if os.path.exists(os.path.join(source, name)):
        return os.path.join(source, name)
    found = sorted(f for f in os.listdir(source) if f.endswith(ext))
    if len(found) != 1:
        raise UserError(
            f"--source={source}: expected {name} or a single *{ext} file, found {found or 'none'}"
        )
    return os.path.join(source, found[0])


def download(url, path):
    """Fetch url to path once (an existing file is reused), atomically, with the standard
    library."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            write_file(path, lambda f: f.write(response.read()))
    except OSError as e:  # URLError, HTTPError, timeouts
        raise UserError(
            f"{url}: download failed ({e}); pass --source=PATH to use a local copy"
        ) from None
    return path


# -----------------------------------------------------------------------------
# the pipeline shared by the prepare scripts

PREPARE_SETTINGS = dict(
    source=S(
        "",
        lambda v, s: v and not os.path.exists(v) and "an existing file or directory",
        "local file or directory in the source's own format; empty = download it",
    ),
    tokenizer=S("", util.required, "the base model's tokenizer file, or its checkpoint directory"),
    template=S(
        "alpaca",
        ("alpaca", "chat"),
        "prompt format: ours (dataset.py), or the base's chat template (chat.py); in meta.json",
    ),
    out_dir=S(
        "",
        lambda v, s: os.path.isfile(v) and f"a folder ({v} is a file)",
        "where the prepared files go (each script defaults to its own directory)",
    ),
    max_len=S(
        512,
        "[2, inf)",
        "examples longer than this many tokens (BOS + prompt + response + EOS) are dropped",
    ),
    overwrite=S(False, None, "replace a prepared dataset in out_dir (never replaced without it)"),
    val_fraction=S(
        0.05,
        "[0, 1)",
        "share of the training examples held out as the val split (when the source has none)",
    ),
    seed=S(1337, None, "for choosing the val examples"),
)
PREPARE_DEFAULTS = {k: s.default for k, s in PREPARE_SETTINGS.items()}  # for callers of prepare()


def with_val(splits, config):
    """splits, with config["val_fraction"] of "train" (chosen with config["seed"]) as "val" when
    there is no "val" split."""
    splits = dict(splits)
    if "val" not in splits and config["val_fraction"] > 0:
        train = splits["train"]
        n_val = max(1, round(len(train) * config["val_fraction"]))
        val_index = set(random.Random(config["seed"]).sample(range(len(train)), n_val))
        splits["train"] = [r for i, r in enumerate(train) if i not in val_index]
        splits["val"] = [r for i, r in enumerate(train) if i in val_index]
    return splits


def prepare(name, splits, config, tok):
    """Tokenize, drop over-long, write. splits: {split: [record dict with FIELDS, or {"task",
    "text"} for plain text (encode_document; no raw .jsonl is kept)]}, "val" made by with_val when
    there is none. config: the PREPARE_SETTINGS keys (and optionally "tasks", the order of task
    indices)."""
    if not splits.get("train"):
        raise UserError(f"--source: no {name} training examples found there")
    splits = with_val(splits, config)
    chat_fmt = chat.base_template(config["tokenizer"]) if config["template"] == "chat" else None
    encoded, kept, counts = {}, {}, {}
    for split, records in sorted(
        splits.items(), key=lambda kv: ["train", "val", "test"].index(kv[0])
    ):
        encoded[split], kept[split] = [], []
        for r in records:
            example = (
                encode_document(tok, r["text"], config["max_len"])
                if "text" in r
                else encode_record(tok, r, config["max_len"], chat_fmt)
            )
            if example is not None:
                encoded[split].append((r["task"], *example))
                raw = {k: r[k] for k in FIELDS + ("messages",) if k in r}
                kept[split].append(None if "text" in r else raw)
        counts[split] = {"dropped_over_long": len(records) - len(kept[split])}
        if records and not kept[split]:
            raise UserError(
                f"--max_len={config['max_len']}: every {split} example is longer; raise it"
            )
    out_dir = config["out_dir"]
    meta = write_dataset(
        out_dir,
        encoded,
        dict(
            name=name,
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            tokenizer=config["tokenizer"],
            **({"template": "chat", "chat_template": chat_fmt[0]} if chat_fmt else {}),
            max_len=config["max_len"],
            tasks=config.get("tasks"),
            counts=counts,
        ),
        {split: records for split, records in kept.items() if None not in records},
        config["overwrite"],
    )
    for split, c in meta["counts"].items():
        print(
            f"{name} {split}: {c['examples']} examples, {c['tokens']} tokens "
            f"({c['target_tokens']} targets), {c['dropped_over_long']} dropped as longer than "
            f"max_len={config['max_len']}"
        )
    print(f"wrote {out_dir}")
    return meta


def prepare_main(name, read_source, urls, out_dir, argv, **settings):
    """The whole of a data/<name>/prepare.py run: configurator.py's --key=value (PREPARE_SETTINGS
    with out_dir's default, then the script's own **settings); urls ({file name: url}) downloaded
    into out_dir when no --source is given; read_source(path, config) -> {split: [records]}; then
    prepare()."""
    out_dir_setting = PREPARE_SETTINGS["out_dir"]
    out_dir = os.path.relpath(out_dir)  # data/<name> from the repository root, as --help shows it
    config = configurator.configure(
        {
            **PREPARE_SETTINGS,
            **settings,
            "out_dir": S(out_dir, out_dir_setting.allowed, out_dir_setting.help),
        },
        argv,
        os.path.join(out_dir, "prepare.py"),
    )
    check_prepared_dir(config["out_dir"], config["overwrite"])
    tok = load_tokenizer(config["tokenizer"])
    source = config["source"]
    if not source:
        for file_name, url in urls.items():
            download(url, os.path.join(config["out_dir"], file_name))
        source = config["out_dir"]
    return prepare(name, read_source(source, config), config, tok)
