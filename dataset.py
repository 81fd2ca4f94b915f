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
with prompt and response encoded separately, so that generation from BOS + encode(prompt) sees
exactly what training saw (BOS where the tokenizer adds one: tokenizer.py's add_bos). The loss mask
is 1 on the response tokens and the EOS, 0 on BOS and the prompt.
The other format is the base's own chat template (chat.py), chosen when the data is prepared
(--template=chat) and kept in meta.json ("template": "chat", "chat_template": its text): train.py,
eval.py and generate.py take it from there. Records with a `messages` list (a conversation) need it.

A prepared dataset is a directory (format "multilora-v1"):
    meta.json            {"format", "tasks", "vocab_size", "bos_id", "eos_id", "tokenizer",
                          "template", ["chat_template",] "max_len", "counts"}
    {split}_tokens.npy   uint16 (uint32 when vocab_size > 65535), all examples concatenated
    {split}_mask.npy     uint8, same length, 1 = loss target
    {split}_offsets.npy  int64 (n + 1,), example i = tokens[offsets[i]:offsets[i + 1]]
    {split}_task.npy     uint16 (n,), index into meta["tasks"]
    {split}.jsonl        the raw examples {"task", "instruction", "input", "response"} or
                         {"task", "messages"}, a line each
Examples longer than max_len tokens (BOS and EOS included) are dropped, never truncated (a truncated
example would teach a cut-off answer or hide it entirely), and counted in meta["counts"].

sources.py writes it (data/<name>/prepare.py, data/tasks/generate.py); train.py, eval.py and
tools/bench.py read it here, and cut the training batches from it (the end of this file).
"""

import json
import os
from functools import lru_cache

import numpy as np
import torch

import chat
from util import UserError

FORMAT = "multilora-v1"
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
FIELDS = ("task", "instruction", "input", "response")  # one raw example


def format_prompt(instruction, input=""):
    if input:
        return PROMPT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_example(tok, instruction, input, response, max_len):
    """-> (ids, mask), lists of ints, or None when longer than max_len tokens (the caller counts)"""
    prompt = tok.encode(format_prompt(instruction, input), bos=True)
    answer = tok.encode(response) + [tok.eos_id]
    if len(prompt) + len(answer) > max_len:
        return None
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def encode_document(tok, text, max_len):
    """Plain text for pretraining: BOS + encode(text) + EOS, every token after BOS a target.
    -> (ids, mask), or None when longer than max_len tokens."""
    ids = tok.encode(text, bos=True, eos=True)
    return None if len(ids) > max_len else (ids, [0] + [1] * (len(ids) - 1))


def chat_format(meta, where):
    """A prepared dataset's prompt format: None for ours, else (chat template, where it is from)."""
    return (meta["chat_template"], where) if meta.get("template") == "chat" else None


def data_format(data_dirs):
    """chat_format of prepared datasets, which must all have one."""
    metas = [read_meta(d) for d in data_dirs]
    for d, meta in zip(data_dirs, metas):
        if (meta.get("template"), meta.get("chat_template")) != (
            metas[0].get("template"),
            metas[0].get("chat_template"),
        ):
            raise UserError(
                f"{os.path.join(d, 'meta.json')}: template: prepared in another format than "
                f"{data_dirs[0]}; prepare them with one --template"
            )
    return chat_format(metas[0], os.path.join(data_dirs[0], "meta.json"))


def encode_record(tok, record, max_len, chat_fmt=None):
    """An instruction or `messages` record in the dataset's format -> encode_example's result."""
    if chat_fmt:
        return chat.encode_conversation(*chat_fmt, tok, chat.as_messages(record), max_len)
    if "messages" in record:
        raise UserError(
            "--template=alpaca: conversations (`messages` records) need --template=chat"
        )
    return encode_example(tok, record["instruction"], record["input"], record["response"], max_len)


def prompt_ids(tok, record, chat_fmt=None):
    """What the model is given to answer a record: its prompt in the dataset's format."""
    if chat_fmt:
        return chat.prompt_ids(*chat_fmt, tok, chat.as_messages(record)[:-1])
    return tok.encode(format_prompt(record["instruction"], record["input"]), bos=True)


def reference(record):
    """The answer a record expects: the response, or a conversation's last (assistant) turn."""
    return record["messages"][-1]["content"] if "messages" in record else record["response"]


# -----------------------------------------------------------------------------
# reading the prepared format (sources.py writes it)


def load_array(data_dir, split, name, kinds):
    """data_dir/{split}_{name}.npy memory-mapped, a 1-d array of a dtype kind among kinds (numpy's
    letters: "u" unsigned, "i" signed), or one UserError naming the file."""
    path = os.path.join(data_dir, f"{split}_{name}.npy")
    if not os.path.exists(path):
        have = sorted(
            f[: -len("_tokens.npy")] for f in os.listdir(data_dir) if f.endswith("_tokens.npy")
        )
        raise UserError(f"{path}: no such file (splits in {data_dir}: {', '.join(have) or 'none'})")
    # allow_pickle=False: a received dataset runs no pickled code
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{path}: not a readable .npy file ({e}); prepare it again") from None
    if array.ndim != 1 or array.dtype.kind not in kinds:
        raise UserError(
            f"{path}: expected a 1-d integer array, got {array.dtype} of shape {array.shape}"
        )
    return array


class PreparedSplit:
    """One split of a prepared dataset, memory-mapped: .tokens, .mask, .offsets, .task arrays,
    .tasks (names), .meta. len() = number of examples. Checked once on load (a few vectorized
    passes): a dataset that was truncated, edited or made for another tokenizer is one UserError
    naming the file, never an index error or silently wrong tokens in the middle of a run."""

    def __init__(self, data_dir, split):
        self.meta = read_meta(data_dir)
        self.tasks, self.split, self.dir = self.meta["tasks"], split, data_dir
        for name, kinds in (("tokens", "u"), ("mask", "u"), ("offsets", "iu"), ("task", "u")):
            setattr(self, name, load_array(data_dir, split, name, kinds))
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
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file (a device, FIFO or folder)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise UserError(f"{path}: format: expected {FORMAT!r}, got {got!r}")
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
        ("template", meta.get("template", "alpaca") in ("alpaca", "chat"), "alpaca or chat"),
        (
            "chat_template",
            meta.get("template") != "chat" or isinstance(meta.get("chat_template"), str),
            "the chat template's text (template is chat)",
        ),
    ):
        if not ok:
            raise UserError(f"{path}: {key}: expected {expected}, got {meta.get(key)!r}")
    return meta


def read_examples(data_dir, split):
    """The raw examples of a prepared split ({split}.jsonl): list of dicts, item i is
    PreparedSplit(data_dir, split).example(i)."""
    path, records = os.path.join(data_dir, f"{split}.jsonl"), []
    for number, r in read_jsonl(path, ("task",)):
        if "messages" in r:
            chat.check_messages(f"{path}:{number}", r["messages"])
        else:
            check_fields(f"{path}:{number}", r, FIELDS)
        records.append(r)
    return records


# -----------------------------------------------------------------------------
# JSON lines, of a prepared split and of the sources (sources.py, eval.py): every problem stops with
# one line naming the file and line


def check_fields(where, record, fields):
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


def read_text(path):
    """A UTF-8 text file with something in it."""
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


def decode_json(text, path, line=1):
    """json.loads(text), an error naming path and the line (text starts at that line of path)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}:{line + e.lineno - 1}"
        raise UserError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None


def read_jsonl(path, fields):
    """-> [(line_number, record)] for a file with one JSON object per line (blank lines allowed)."""
    records = []
    # not splitlines(): U+2028 is no line end here
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        record = decode_json(line, path, number)
        check_fields(f"{path}:{number}", record, fields)
        records.append((number, record))
    return records


# -----------------------------------------------------------------------------
# training batches: prepared splits, a task mixture, packed micro-batches (train.py, eval.py,
# tools/bench.py)

IGNORE = -100  # target of positions without loss (prompt, padding): cross_entropy's ignore_index


def load_splits(dataset_dirs, split):
    """One PreparedSplit per directory; a missing or empty one is a UserError."""
    if not dataset_dirs:
        raise UserError("datasets: expected at least one prepared dataset directory")
    splits = []
    for d in dataset_dirs:
        if not os.path.isdir(d):
            raise UserError(f"{d}: dataset directory not found (datasets setting)")
        s = PreparedSplit(d, split)
        if len(s) == 0:
            raise UserError(f"{d}: {split} split is empty")
        for key in ("vocab_size", "bos_id", "eos_id"):
            if s.meta.get(key) != splits[0].meta.get(key) if splits else False:
                raise UserError(
                    f"{d}: meta.json: {key} is {s.meta.get(key)!r} but {dataset_dirs[0]} has "
                    f"{splits[0].meta.get(key)!r}; all datasets must be made with one tokenizer"
                )
        splits.append(s)
    data_format(dataset_dirs)  # and in one prompt format
    return splits


def test_examples(dataset_dirs, per_task):
    """The first per_task raw test examples of each task, from each dataset's test.jsonl if any."""
    chosen, counts = [], {}
    for d in dataset_dirs:
        if os.path.exists(os.path.join(d, "test.jsonl")):
            for r in read_examples(d, "test"):
                if counts.get(r["task"], 0) < per_task:
                    counts[r["task"]] = counts.get(r["task"], 0) + 1
                    chosen.append(r)
    return chosen


def task_pools(splits):
    """Group the examples of all splits by task name -> (names, pools); pools[t] is an (n_t, 2)
    int64 array of (dataset index, example index). A task present in two datasets is one task."""
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
    """The n examples of one optimizer step of the whole job, as (dataset index, example index)
    rows. Each slot's task is drawn with the mixture weights from an RNG seeded by (seed, iter_num);
    within a task, examples come in the order of a per-epoch permutation, so the data position is
    just the number taken from each task so far: `position` (updated in place) is checkpointed."""
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
    padded batch of 32 is padding). When nothing shares a row, it returns the plain padded batch."""
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
    share (micro-step g of the job is on rank g // (steps / world_size)), so 1 or N processes see
    the same global batch in the same micro-batches. -> ([collate's (x, y, positions, segments)],
    target tokens, input tokens without padding), the counts taken on the host so that they cost no
    device synchronization."""
    groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    per_rank = len(groups) // world_size
    examples = [
        [splits[d].example(i)[:2] for d, i in g]
        for g in groups[rank * per_rank : (rank + 1) * per_rank]
    ]
    n_targets = sum(int(mask[1:].sum()) for g in examples for _, mask in g)
    n_tokens = sum(len(ids) - 1 for g in examples for ids, _ in g)
    return [collate(g, pad_id, device, pack) for g in examples], n_targets, n_tokens
