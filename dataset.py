"""
Instruction data: one prompt template and one on-disk format that train.py memory-maps.

Template (Alpaca-style, without Alpaca's "Below is an instruction..." preamble):
    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {response}</s>
The "### Input:" block is left out when the input is empty. Tokens are
    BOS + encode(prompt) + encode(response) + EOS
with prompt and response encoded separately, so that generation from BOS + encode(prompt) sees exactly
what training saw. The loss mask is 1 on the response tokens and the EOS, 0 on BOS and the prompt.

A prepared dataset is a directory (format "multilora-v1"):
    meta.json            {"format", "tasks", "vocab_size", "bos_id", "eos_id", "tokenizer",
                          "template", "max_len", "counts"}
    {split}_tokens.npy   uint16 (uint32 when vocab_size > 65535), all examples concatenated
    {split}_mask.npy     uint8, same length, 1 = loss target
    {split}_offsets.npy  int64 (n + 1,), example i = tokens[offsets[i]:offsets[i + 1]]
    {split}_task.npy     uint16 (n,), index into meta["tasks"]
    {split}.jsonl        the raw examples {"task", "instruction", "input", "response"}, line i = example i
Examples longer than max_len tokens (BOS and EOS included) are dropped, never truncated (a truncated
example would teach a cut-off answer or hide it entirely), and counted in meta["counts"].

The data/<name>/prepare.py scripts and data/tasks/generate.py all go through prepare() below.
"""

import csv
import io
import json
import os
import random
import urllib.request
from functools import lru_cache

import numpy as np
import torch

import configurator
from configurator import S
from tokenizer import load_tokenizer
from util import UserError, atomic_write

FORMAT = "multilora-v1"
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
FIELDS = ("task", "instruction", "input", "response")  # one raw example


def format_prompt(instruction, input=""):
    if input:
        return PROMPT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_example(tok, instruction, input, response, max_len):
    """-> (ids, mask) as lists of ints, or None when longer than max_len tokens (the caller counts it)."""
    prompt = [tok.bos_id] + tok.encode(format_prompt(instruction, input))
    answer = tok.encode(response) + [tok.eos_id]
    if len(prompt) + len(answer) > max_len:
        return None
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def encode_document(tok, text, max_len):
    """Plain text for pretraining: BOS + encode(text) + EOS, every token after BOS a target.
    -> (ids, mask), or None when longer than max_len tokens."""
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    return None if len(ids) > max_len else (ids, [0] + [1] * (len(ids) - 1))


def exact_match(prediction, response):
    """Does a generated answer equal the reference? Whitespace at the ends is ignored. References in
    the GSM8K style ("...reasoning...\\n#### 72") are compared on the final answer after the last "####"."""
    if "####" in response:
        prediction, response = prediction.rsplit("####", 1)[-1], response.rsplit("####", 1)[-1]
    return prediction.strip() == response.strip()


# -----------------------------------------------------------------------------
# writing and reading the prepared format


def _atomic_write(path, write_fn, mode="wb"):
    with (
        atomic_write(path) as tmp,
        open(tmp, mode) as f,
    ):  # util's: all or nothing, umask permissions
        write_fn(f)


def write_jsonl(path, records):
    _atomic_write(
        path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "w"
    )


def write_dataset(out_dir, splits, meta, raw=None):
    """splits: {split: [(task_name, ids, mask)]}; meta: vocab_size, bos_id, eos_id, tokenizer, max_len
    and optionally "tasks" (the order of task indices) and "counts" (e.g. dropped examples per split),
    to which the example and token counts are added; raw: {split: [record]} for {split}.jsonl.
    An old meta.json goes first and the new one is written last: a directory with a meta.json is complete."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
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
            _atomic_write(os.path.join(out_dir, f"{split}_{name}.npy"), lambda f: np.save(f, array))
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
    meta.update(format=FORMAT, tasks=tasks, template="alpaca", counts=counts)
    _atomic_write(os.path.join(out_dir, "meta.json"), lambda f: json.dump(meta, f, indent=1), "w")
    return meta


class PreparedSplit:
    """One split of a prepared dataset, memory-mapped: .tokens, .mask, .offsets, .task arrays,
    .tasks (names), .meta. len() = number of examples. Checked once on load (a few vectorized passes):
    a dataset that was truncated, edited or made for another tokenizer is one UserError naming the
    file, never an index error or silently wrong tokens in the middle of a run."""

    def __init__(self, data_dir, split):
        self.meta = read_meta(data_dir)
        self.tasks, self.split, self.dir = self.meta["tasks"], split, data_dir
        for name, kinds in (("tokens", "u"), ("mask", "u"), ("offsets", "iu"), ("task", "u")):
            path = os.path.join(data_dir, f"{split}_{name}.npy")
            if not os.path.exists(path):
                have = sorted(
                    f[: -len("_tokens.npy")]
                    for f in os.listdir(data_dir)
                    if f.endswith("_tokens.npy")
                )
                raise UserError(
                    f"{path}: no such file (splits in {data_dir}: {', '.join(have) or 'none'})"
                )
            try:  # allow_pickle=False: a received dataset runs no pickled code
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise UserError(
                    f"{path}: not a readable .npy file ({e}); prepare it again"
                ) from None
            if array.ndim != 1 or array.dtype.kind not in kinds:
                raise UserError(
                    f"{path}: expected a 1-d integer array, got {array.dtype} of shape {array.shape}"
                )
            setattr(self, name, array)
        n, where = len(self.task), os.path.join(data_dir, split)
        if (
            len(self.offsets) != n + 1
            or len(self.mask) != len(self.tokens)
            or self.offsets[-1] != len(self.tokens)
        ):
            raise UserError(
                f"{data_dir}: {split}: arrays disagree (tokens {len(self.tokens)}, mask "
                f"{len(self.mask)}, offsets {len(self.offsets)}, task {n}); prepare it again"
            )
        self.lengths = np.diff(self.offsets)  # (n,) tokens per example
        bad = [
            (
                f"{where}_offsets.npy",
                "offsets: expected 0 first and at least 2 tokens (BOS, EOS) per example",
                self.offsets[0] != 0 or (n and self.lengths.min() < 2),
            ),
            (
                f"{where}_tokens.npy",
                f"token ids: expected < vocab_size {self.meta['vocab_size']} (meta.json)",
                len(self.tokens) and self.tokens.max() >= self.meta["vocab_size"],
            ),
            (
                f"{where}_mask.npy",
                "mask: expected only 0 and 1",
                len(self.mask) and self.mask.max() > 1,
            ),
            (
                f"{where}_task.npy",
                f"task ids: expected < {len(self.tasks)} (the tasks in meta.json)",
                n and self.task.max() >= len(self.tasks),
            ),
        ]
        for path, expected, failed in bad:
            if failed:
                raise UserError(f"{path}: {expected}; prepare it again")

    def __len__(self):
        return len(self.task)

    def example(self, i):
        """-> (ids int64 array, mask uint8 array, task index)"""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return (
            np.asarray(self.tokens[start:end], dtype=np.int64),
            np.asarray(self.mask[start:end]),
            int(self.task[i]),
        )


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(
            f"{path}: no such file (a prepared dataset needs meta.json; run the prepare script)"
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{path}: format: expected {FORMAT!r}, got {meta.get('format') if isinstance(meta, dict) else meta!r}"
        )
    vocab_size = meta.get("vocab_size")
    for key, ok, expected in (
        ("vocab_size", type(vocab_size) is int and vocab_size > 0, "a positive int"),
        (
            "tasks",
            isinstance(meta.get("tasks"), list) and all(isinstance(t, str) for t in meta["tasks"]),
            "a list of names",
        ),
        ("bos_id", type(meta.get("bos_id")) is int and 0 <= meta["bos_id"], "a token id"),
        ("eos_id", type(meta.get("eos_id")) is int and 0 <= meta["eos_id"], "a token id"),
    ):
        if not ok:
            raise UserError(f"{path}: {key}: expected {expected}, got {meta.get(key)!r}")
    return meta


def load_dataset(data_dir, split):
    return PreparedSplit(data_dir, split)


def read_examples(data_dir, split):
    """The raw examples of a prepared split ({split}.jsonl): list of dicts, item i = load_dataset(...).example(i)."""
    return [r for _, r in read_jsonl(os.path.join(data_dir, f"{split}.jsonl"), FIELDS)]


# -----------------------------------------------------------------------------
# reading sources: every problem stops with one line naming the file and line (nothing is skipped,
# so a prepared dataset is always the whole source or nothing)


def _check_fields(where, record, fields):
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in fields:
        if field not in record:
            raise UserError(
                f"{where}: missing field {field!r} (expected fields: {', '.join(fields)})"
            )
        if not isinstance(record[field], str):
            raise UserError(
                f"{where}: field {field!r}: expected a string, got {type(record[field]).__name__}"
            )


def _open_text(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file (no examples)")
    return text


def read_jsonl(path, fields):
    """-> [(line_number, record)] for a file with one JSON object per line (blank lines allowed)."""
    records = []
    for number, line in enumerate(
        _open_text(path).split("\n"), 1
    ):  # not splitlines(): U+2028 is no line end here
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{number}: not valid JSON: {e.msg} (column {e.colno})"
            ) from None
        _check_fields(f"{path}:{number}", record, fields)
        records.append((number, record))
    return records


def read_json_records(path, fields):
    """-> [(line_number, record)] for a JSON array of objects (alpaca_data.json) or, when the file does
    not start with "[", JSON lines. Decoded one element at a time so that errors name their line."""
    text = _open_text(path)
    start = len(text) - len(text.lstrip())
    if text[start] != "[":
        return read_jsonl(path, fields)
    decoder, records, pos = json.JSONDecoder(), [], start + 1

    def skip_space(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    pos = skip_space(pos)
    while pos < len(text) and text[pos] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})"
            ) from None
        _check_fields(f"{path}:{line_of(pos)}", record, fields)
        records.append((line_of(pos), record))
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise UserError(
                f"{path}:{line_of(pos)}: not valid JSON: expected ',' or ']' after record {len(records)}"
            )
    if pos >= len(text):
        raise UserError(f"{path}:{line_of(pos)}: not valid JSON: the array is not closed with ']'")
    if not records:
        raise UserError(f"{path}: empty file (no examples)")
    return records


def read_records(path, task, fields):
    """Instruction records from a JSON array or JSON-lines file. fields: {our field: the source's
    field} for "instruction" and "response", and "input" unless the source has none (then "")."""
    return [
        dict(
            task=task,
            instruction=r[fields["instruction"]],
            input=r[fields["input"]] if "input" in fields else "",
            response=r[fields["response"]],
        )
        for _, r in read_json_records(path, tuple(fields.values()))
    ]


def read_csv(path, header, n_columns):
    """-> [(line_number, row)] for a CSV file with n_columns per row; a first row equal to header is
    skipped (re-exported copies have one, the original MMLU release has none)."""
    rows, reader = [], csv.reader(io.StringIO(_open_text(path), newline=""))
    line = 1
    for row in reader:
        if not (line == 1 and row == list(header)) and row:
            if len(row) != n_columns:
                raise UserError(
                    f"{path}:{line}: expected {n_columns} columns ({', '.join(header)}), got {len(row)}"
                )
            rows.append((line, row))
        line = (
            reader.line_num + 1
        )  # a quoted field may span lines: the next row starts after this one
    if not rows:
        raise UserError(f"{path}: empty file (no examples)")
    return rows


def source_file(source, name, ext):
    """--source may name the file itself or a directory holding it: name, else its only *ext file."""
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
    """Fetch url to path once (an existing file is reused), atomically, with the standard library."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            _atomic_write(path, lambda f: f.write(response.read()))
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
    tokenizer=S(
        "",
        lambda v, s: None if v else "a path (required)",
        "the base model's tokenizer.model, or its checkpoint directory",
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
    val_fraction=S(
        0.05,
        "[0, 1)",
        "share of the training examples held out as the val split (when the source has none)",
    ),
    seed=S(1337, None, "for choosing the val examples"),
)
PREPARE_DEFAULTS = {k: s.default for k, s in PREPARE_SETTINGS.items()}  # for callers of prepare()


def prepare(name, splits, config, tok):
    """Tokenize, drop over-long, write. splits: {split: [record dict with FIELDS, or {"task", "text"}
    for plain text (encode_document; no raw .jsonl is kept)]}; when there is no "val" split,
    config["val_fraction"] of "train" (chosen with config["seed"]) becomes "val". config: the
    PREPARE_SETTINGS keys (and optionally "tasks", the order of task indices)."""
    if not splits.get("train"):
        raise UserError(f"--source: no {name} training examples found there")
    splits = dict(splits)
    if "val" not in splits and config["val_fraction"] > 0:
        train = splits["train"]
        n_val = max(1, round(len(train) * config["val_fraction"]))
        val_index = set(random.Random(config["seed"]).sample(range(len(train)), n_val))
        splits["train"] = [r for i, r in enumerate(train) if i not in val_index]
        splits["val"] = [r for i, r in enumerate(train) if i in val_index]
    encoded, kept, counts = {}, {}, {}
    for split, records in sorted(
        splits.items(), key=lambda kv: ["train", "val", "test"].index(kv[0])
    ):
        encoded[split], kept[split] = [], []
        for r in records:
            example = (
                encode_document(tok, r["text"], config["max_len"])
                if "text" in r
                else encode_example(
                    tok, r["instruction"], r["input"], r["response"], config["max_len"]
                )
            )
            if example is not None:
                encoded[split].append((r["task"], *example))
                kept[split].append({k: r[k] for k in FIELDS} if "text" not in r else None)
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
            max_len=config["max_len"],
            tasks=config.get("tasks"),
            counts=counts,
        ),
        {split: records for split, records in kept.items() if None not in records},
    )
    for split, c in meta["counts"].items():
        print(
            f"{name} {split}: {c['examples']} examples, {c['tokens']} tokens ({c['target_tokens']} targets), "
            f"{c['dropped_over_long']} dropped as longer than max_len={config['max_len']}"
        )
    print(f"wrote {out_dir}")
    return meta


def prepare_main(name, read_source, urls, out_dir, argv, **settings):
    """The whole of a data/<name>/prepare.py run: configurator.py's --key=value (PREPARE_SETTINGS with
    out_dir's default, then the script's own **settings), download urls ({file name: url}) into
    out_dir when no --source is given, read_source(path, config) -> {split: [records]}, prepare()."""
    out_dir_setting = PREPARE_SETTINGS["out_dir"]
    out_dir = os.path.relpath(out_dir)  # data/<name> from the repository root, as --help shows it
    config = configurator.configure(
        {
            **PREPARE_SETTINGS,
            **settings,
            "out_dir": configurator.S(out_dir, out_dir_setting.allowed, out_dir_setting.help),
        },
        argv,
        os.path.join(out_dir, "prepare.py"),
    )
    tok = load_tokenizer(config["tokenizer"])
    source = config["source"]
    if not source:
        for file_name, url in urls.items():
            download(url, os.path.join(config["out_dir"], file_name))
        source = config["out_dir"]
    return prepare(name, read_source(source, config), config, tok)


# -----------------------------------------------------------------------------
# training batches: prepared splits, a task mixture, packed micro-batches (train.py, eval.py, bench.py)

IGNORE = (
    -100
)  # target id of positions without loss (prompt, padding): F.cross_entropy's ignore_index


def load_splits(dataset_dirs, split):
    """One PreparedSplit per directory; a missing or empty one is a UserError."""
    if not dataset_dirs:
        raise UserError("datasets: expected at least one prepared dataset directory")
    splits = []
    for d in dataset_dirs:
        if not os.path.isdir(d):
            raise UserError(f"{d}: dataset directory not found (datasets setting)")
        s = load_dataset(d, split)
        if len(s) == 0:
            raise UserError(f"{d}: {split} split is empty")
        for key in ("vocab_size", "bos_id", "eos_id"):
            if s.meta.get(key) != splits[0].meta.get(key) if splits else False:
                raise UserError(
                    f"{d}: meta.json: {key} is {s.meta.get(key)!r} but {dataset_dirs[0]} has "
                    f"{splits[0].meta.get(key)!r}; all datasets must be made with one tokenizer"
                )
        splits.append(s)
    return splits


def test_examples(dataset_dirs, per_task):
    """The first per_task raw test examples of each task, from each dataset's test.jsonl (if any)."""
    chosen, counts = [], {}
    for d in dataset_dirs:
        if os.path.exists(os.path.join(d, "test.jsonl")):
            for r in read_examples(d, "test"):
                if counts.get(r["task"], 0) < per_task:
                    counts[r["task"]] = counts.get(r["task"], 0) + 1
                    chosen.append(r)
    return chosen


def task_pools(splits):
    """Group the examples of all splits by task name -> (names, pools); pools[t] is an (n_t, 2) int64
    array of (dataset index, example index). A task present in two datasets is one task."""
    names, parts = [], []
    for d, s in enumerate(splits):
        task_of = np.asarray(s.task)
        for j, name in enumerate(s.tasks):
            idx = np.flatnonzero(task_of == j)
            if len(idx) == 0:
                continue
            if name not in names:
                names.append(name)
                parts.append([])
            parts[names.index(name)].append(np.stack([np.full(len(idx), d), idx], axis=1))
    return names, [np.concatenate(p).astype(np.int64) for p in parts]


def mixture_weights(sizes, mixture, temperature):
    """Sampling probability of each task from its number of training examples."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if mixture == "proportional":
        w = sizes
    elif mixture == "equal":
        w = np.ones_like(sizes)
    else:  # 'temperature': T = 1 is proportional, T -> infinity is equal
        w = sizes ** (1.0 / temperature)
    return w / w.sum()


@lru_cache(maxsize=64)
def epoch_order(seed, task, epoch, n):
    return np.random.default_rng([seed, 1, task, epoch]).permutation(n)


def sample_examples(pools, weights, position, n, seed, iter_num):
    """The n examples of one optimizer step of the whole job, as (dataset index, example index) rows.
    Each slot's task is drawn with the mixture weights from an RNG seeded by (seed, iter_num); within
    a task, examples come in the order of a per-epoch permutation, so the data position is just the
    number taken from each task so far: `position` (updated in place) goes into the checkpoint."""
    tasks = np.random.default_rng([seed, 0, iter_num]).choice(len(pools), size=n, p=weights)
    rows = []
    for t in tasks:
        epoch, k = divmod(position[t], len(pools[t]))
        rows.append(pools[t][epoch_order(seed, int(t), epoch, len(pools[t]))[k]])
        position[t] += 1
    return rows


def first_fit(lengths, capacity):
    """Bin packing, first-fit decreasing: -> rows, each a list of indices into lengths whose sum
    is at most capacity (no single length may exceed it). Few rows, not always the fewest (that is
    NP-hard); deterministic: ties keep their order."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(examples, pad_id, device, pack=False):
    """[(ids, mask)] -> (x, y, positions, segments): x (R, T) inputs, y (R, T) targets.
    Token j is predicted from tokens < j: x = ids[:-1], y = ids[1:] where mask[1:] = 1 (response
    and EOS), IGNORE elsewhere (prompt, padding), so prompt tokens contribute nothing to the loss.

    Unpacked (positions, segments None): one example per row, right-padded to the longest; right
    padding needs no attention mask, as a causal model never looks at later positions.
    Packed: the examples go end to end into fewer rows of that same length T (first_fit; no
    example is split), each with RoPE positions 0..n-1 and its own segment id, so
    that the model's block-diagonal mask gives every example exactly the logits it gets alone.
    Same loss, same gradients, far fewer padded positions when lengths vary (Alpaca: 63% of a
    padded batch of 32 is padding). When nothing shares a row, the plain padded batch is returned."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    T = max(lengths)
    rows = [[i] for i in range(len(examples))]  # one example per row
    if pack:
        rows = first_fit(lengths, T)
    packed = len(rows) < len(examples)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), T), dtype=np.int64)
    segments = np.full((len(rows), T), -1, dtype=np.int64)  # padding: a segment of its own
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            (ids, mask), end = examples[i], start + lengths[i]
            x[r, start:end] = ids[:-1]
            y[r, start:end] = np.where(mask[1:] == 1, ids[1:], IGNORE)
            positions[r, start:end] = np.arange(lengths[i])
            segments[r, start:end] = k
            start = end
    arrays = (x, y, positions, segments) if packed else (x, y)
    if str(device).startswith("cuda"):
        tensors = [torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays]
    else:
        tensors = [torch.from_numpy(a).to(device) for a in arrays]
    return tuple(tensors) if packed else (*tensors, None, None)


def micro_batches(splits, rows, batch_size, rank, world_size, pad_id, device, pack=False):
    """Cut one step's examples into micro-batches of batch_size; this process takes its contiguous
    share (micro-step g of the job is on rank g // (steps / world_size)), so 1 or N processes see the
    same global batch in the same micro-batches. -> ([collate's (x, y, positions, segments)], target
    tokens, input tokens without padding), the counts taken on the host so that they cost no device
    synchronization."""
    groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    per_rank = len(groups) // world_size
    examples = [
        [splits[d].example(i)[:2] for d, i in g]
        for g in groups[rank * per_rank : (rank + 1) * per_rank]
    ]
    n_targets = sum(int(mask[1:].sum()) for g in examples for _, mask in g)
    n_tokens = sum(len(ids) - 1 for g in examples for ids, _ in g)
    return [collate(g, pad_id, device, pack) for g in examples], n_targets, n_tokens
