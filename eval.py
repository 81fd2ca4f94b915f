"""
Evaluate a base model, or a base model plus an adapter, on benchmarks like those the MultiLoRA
paper reports (its exact list is not confirmed here).

    python eval.py --ckpt_dir=DIR [--adapter=FILE] --task=NAME [--data=PATH] [--out=FILE.json]
    python eval.py --help                       # every setting, its default and allowed values

tasks (--data is):
  exact_match  prepared dataset directories, comma-separated as train.py's datasets (default
               data/tasks), their {split}.jsonl: greedy generation from the training prompt, exact
               match per task (exact_match)
  loss         prepared dataset directories, comma-separated (default data/tasks): mean loss on the
               response tokens and perplexity per task, computed by evaluate as in training
  mmlu         the MMLU folder with dev/ and {split}/ CSVs, or a folder data/mmlu/prepare.py wrote
               (0-shot: it keeps no dev/): multiple choice by log-likelihood, per subject; --shots=5
               takes the shots from dev/ (Hendrycks et al. 2021)
  mc           a JSONL file of {"question", "choices", "answer"} (answer: index into choices)
  gsm8k        GSM8K test.jsonl (or its folder), or a folder data/gsm8k/prepare.py wrote: greedy
               generation, the number after "####" (else the last number); --shots=K takes the
               first K examples of train.jsonl next to it
A prompt longer than the model's context loses its oldest tokens (multiple choice: the output
counts those questions, with a warning when few-shot examples are what does not fit) or is
refused (generation: it needs room to answer).

Multiple choice: each choice is scored as a continuation of the question by the sum of its
tokens' log-probabilities (accuracy) and by that sum over its number of tokens (accuracy_norm, the
per-token normalization of the GPT-3 paper). --mc_format chooses the prompt:
  raw          "{question}" scoring "{choice}" verbatim: the text goes on with the choice, spaced
               as in the file (the default for mc; continuation sets like HellaSwag are written so)
  letter       "{question}\\nA. ...\\nB. ...\\nAnswer:" scoring " A", " B", ... (MMLU's own format,
               the default for mmlu)
  cloze        "Question: {question}\\nAnswer:" scoring " {choice}"
  instruction  dataset.py's prompt template as data/mmlu/prepare.py writes the training examples,
               scoring the letter: use it for adapters fine-tuned on data/mmlu
Everything is greedy or exact, so two runs print the same numbers. Prints a table; --out writes
JSON with "accuracy" for scored tasks ("loss" and "perplexity" for loss) and per-item details, to a
new file or over an earlier result of eval.py, never over another file.

train.py imports score_exact_match from here: importing this file has no side effects.
"""

import contextlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import chat
import checkpoint
import dataset
import sources
import llama
import util
from chunked_loss import token_loss_sum
from configurator import S, configure, declared
from generate import check_generation_size, load_for_inference
from util import UserError

# -----------------------------------------------------------------------------
TASKS = ("exact_match", "loss", "mmlu", "mc", "gsm8k")


def check_data(value, settings):
    task = settings["task"]
    if not value and task not in ("exact_match", "loss"):
        return f"a path (required for --task={task})"
    if "," in value and task not in ("exact_match", "loss"):
        return "one path (several, comma-separated, only for --task=exact_match and loss)"
    missing = [p for p in value.split(",") if not os.path.exists(p)] if value else []
    return missing and f"existing paths ({', '.join(missing)}: no such file or directory)"


def check_shots(value, settings):
    if value < 0 or (value and settings["task"] not in ("mmlu", "gsm8k")):
        return "0 (shots are only for mmlu and gsm8k)" if value > 0 else "a value >= 0"
    return None


def check_out(path, settings):
    """The result file: new, or an earlier result of eval.py (never another file), where it can be
    written (util.check_output): checked before any model work."""
    if path:
        util.check_output(path, "out", ours=util.json_with("task", "ckpt_dir", "settings"))


ckpt_dir = S("", util.required, "base model (HF or Meta layout, with its tokenizer)")
tokenizer = S("", None, "tokenizer file; empty = ckpt_dir's (tokenizer.py's TOKENIZER_FILES)")
adapter = S("", None, "adapter file from train.py (merged into the weights where its arm can)")
task = S("exact_match", TASKS, "what to evaluate (eval.py's docstring describes each task)")
data = S(
    "",
    check_data,
    "exact_match, loss: prepared dataset dirs, comma-separated (default data/tasks); "
    "mmlu: MMLU's CSV folder (dev/, test/) or a prepared one; mc: a JSONL file; gsm8k: test.jsonl, "
    "its folder or a prepared one",
)
split = S(
    "",
    None,
    "prepared dataset split (default test for exact_match, val for loss) or MMLU split (test)",
)
shots = S(0, check_shots, "few-shot examples (mmlu: from dev/, gsm8k: from train.jsonl)")
mc_format = S(
    "",
    ("", "raw", "cloze", "letter", "instruction"),
    "multiple-choice prompt; empty = letter for mmlu, raw for mc",
)
subjects = S("", None, "mmlu: comma-separated subjects (default all in the split)")
limit = S(
    0,
    "[0, inf)",
    "evaluate only the first N items (per task for exact_match and loss, per subject for mmlu); "
    "0 = all",
)
max_new_tokens = S(0, "[0, inf)", "generation budget; 0 = 64 for exact_match, 256 for gsm8k")
batch_size = S(8, "[1, inf)", "sequences per forward")
device = S(util.default_device(), util.check_device, "cpu, cuda, cuda:N or mps")
dtype = S("float32", ("float32", "bfloat16", "float16"), "weights dtype")
template = S(
    "",
    lambda v, s: v == "chat" and s["task"] in ("mmlu", "mc") and "alpaca or empty for mmlu, mc",
    "prompt format: empty = the prepared data's (meta.json; alpaca for gsm8k), alpaca, or chat "
    "(the base's chat template)",
)
out = S("", check_out, "JSON result file")
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model,
    splits,
    pools,
    limit,
    batch_size,
    pad_id,
    ctx=contextlib.nullcontext(),
    rank=0,
    world_size=1,
    pack=True,
):
    """Loss (token-normalized) of each task on its first `limit` examples (0 = all), and of all of
    them together -> (overall, [per task]): train.py's validation loss, and --task=loss's. Batches
    are dealt out to the ranks; every rank runs the same number of forwards (FSDP needs all ranks in
    each), the padding ones counting nothing."""
    work = []  # (task index or -1, rows)
    for t, pool in enumerate(pools):
        rows = pool[:limit] if limit > 0 else pool
        work += [(t, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    while len(work) % world_size:
        work.append((-1, work[0][1]))
    device = next(model.parameters()).device
    sums = torch.zeros(len(pools), 2, dtype=torch.float64, device=device)  # loss sum, targets
    was_training = model.training
    model.eval()
    for t, rows in work[rank::world_size]:
        x, y, positions, segments = dataset.collate(
            [splits[d].example(i)[:2] for d, i in rows], pad_id, device, pack
        )
        with ctx:
            loss = token_loss_sum(model, x, y, positions, segments)
        if t >= 0:
            sums[t] += torch.stack([loss.double(), (y != dataset.IGNORE).sum().double()])
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    per_task = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    return (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item(), per_task


class Progress:
    """One stderr line every `every` seconds on long runs (nothing for runs shorter than that)."""

    def __init__(self, label, total, every=10.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.time()

    def update(self, done):
        now = time.time()
        if now - self.last >= self.every:
            rate = done / (now - self.start)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            print(
                f"{self.label}: {done}/{self.total} ({now - self.start:.0f}s, ~{eta:.0f}s left)",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no autograd; the model's previous mode is restored after (train.py scores its
    model in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# log-likelihood of continuations (multiple choice)


def encode_pair(tokenizer, context, continuation):
    """(context ids with BOS, continuation ids) for raw text: the whole text is encoded once and
    split where its tokens stop agreeing with the context's (lm-evaluation-harness does the same),
    because SentencePiece encodes " A" alone differently from " A" after text."""
    ctx = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + continuation, bos=True)
    n = 0
    while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
        n += 1
    if n == len(whole):
        raise UserError(f"continuation {continuation!r}: encodes to no tokens after its context")
    return whole[:n], whole[n:]


@torch.no_grad()
def continuation_logprobs(model, pairs, batch_size=8, progress=None):
    """pairs: [(context ids, continuation ids)] -> [(sum of log p(continuation token | everything
    before it), number of continuation tokens)]. Batches are right-padded, so with the causal mask
    padding never influences a real token. Sequences longer than the model's context lose tokens
    from the left of the context."""
    max_len = model.config.max_seq_len
    device = model.embed_tokens.weight.device
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise UserError("empty continuation")
        if len(cont) >= max_len:
            raise UserError(
                f"continuation of {len(cont)} tokens does not fit the model's context of {max_len}"
            )
        seq = (list(ctx) + list(cont))[-max_len:]  # keep the newest tokens when too long
        seqs.append((seq, len(cont)))
    # each distinct sequence is scored once, so equal choices (e.g. two that encode to the same
    # tokens) get bit-equal scores and tie whatever the batching; longest first: batches of similar
    # lengths pad little; results go back to input order
    first = {}
    for i, (seq, n_cont) in enumerate(seqs):
        first.setdefault((tuple(seq), n_cont), i)
    order = sorted(set(first.values()), key=lambda i: -len(seqs[i][0]))
    results = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[start : start + batch_size]]
        T = max(len(s) for s, _ in batch)
        tokens = torch.zeros((len(batch), T), dtype=torch.long)
        targets = torch.zeros((len(batch), T), dtype=torch.long)  # targets[:, t] = tokens[:, t + 1]
        at = torch.zeros((len(batch), T), dtype=torch.bool)
        for row, (s, n_cont) in enumerate(batch):
            L = len(s)
            tokens[row, :L] = torch.tensor(s)
            targets[row, : L - 1] = tokens[row, 1:L]
            # the continuation's tokens [L-n, L) are predicted at positions [L-n-1, L-1)
            at[row, L - n_cont - 1 : L - 1] = True
        # logits only where a continuation token is predicted: (N, V), rows in (batch row, position)
        # order
        logits = model(tokens.to(device), logits_at=at.to(device))
        # (N,): each predicted continuation token's log-probability
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = logp.gather(-1, targets[at].to(device)[:, None])[:, 0]
        for row, part in enumerate(logp.split([n_cont for _, n_cont in batch])):
            results[order[start + row]] = (part.sum().item(), len(part))
        if progress:
            progress.update(min(start + batch_size, len(order)))
    return [results[first[(tuple(seq), n_cont)]] for seq, n_cont in seqs]


def score_multiple_choice(model, items, batch_size=8, label="mc"):
    """items: [{"pairs": [(context ids, continuation ids) per choice], "answer": index, ...}]. Adds
    to each item "logprobs", "n_tokens", "pred" (argmax of the sum) and "pred_norm" (argmax of the
    mean per token); ties go to the first choice. Returns the items."""
    pairs = [pair for item in items for pair in item["pairs"]]
    scores = continuation_logprobs(model, pairs, batch_size, Progress(label, len(pairs)))
    k = 0
    for item in items:
        n = len(item["pairs"])
        item["logprobs"] = [s for s, _ in scores[k : k + n]]
        item["n_tokens"] = [t for _, t in scores[k : k + n]]
        k += n
        norm = [s / t for s, t in zip(item["logprobs"], item["n_tokens"])]
        item["pred"] = max(range(n), key=lambda c: (item["logprobs"][c], -c))
        item["pred_norm"] = max(range(n), key=lambda c: (norm[c], -c))
    return items


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mc_item(tokenizer, question, choices, answer, mc_format, subject="", shots=()):
    """One multiple-choice item in one of the three prompt formats (see the file's docstring).
    shots: [(question, choices, answer)] solved examples put before the question."""
    if len(choices) > len(LETTERS) and mc_format in ("letter", "instruction"):
        raise UserError(
            f"{question[:40]!r}: {len(choices)} choices: at most {len(LETTERS)} can be lettered"
        )

    def lettered(q, cs):
        return q + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(cs))

    about = f" about {subject.replace('_', ' ')}" if subject else ""
    if mc_format == "instruction":
        # exactly data/mmlu/prepare.py's training examples, encoded like dataset.encode_example:
        # prompt and response separately, each shot followed by its answer and a blank line
        instruction = (
            f"The following is a multiple choice question{about}. "
            f"Answer with the letter of the correct choice."
        )
        text = "".join(
            dataset.format_prompt(instruction, lettered(q, cs)) + LETTERS[a] + "\n\n"
            for q, cs, a in shots
        )
        ctx = tokenizer.encode(
            text + dataset.format_prompt(instruction, lettered(question, choices)), bos=True
        )
        return dict(
            pairs=[(ctx, tokenizer.encode(LETTERS[i])) for i in range(len(choices))], answer=answer
        )
    if mc_format == "letter":
        header = (
            f"The following are multiple choice questions (with answers){about}.\n\n"
            if subject
            else ""
        )
        text = header + "".join(
            lettered(q, cs) + f"\nAnswer: {LETTERS[a]}\n\n" for q, cs, a in shots
        )
        context = text + lettered(question, choices) + "\nAnswer:"
        continuations = [f" {LETTERS[i]}" for i in range(len(choices))]
    elif mc_format == "cloze":
        text = "".join(f"Question: {q}\nAnswer: {cs[a]}\n\n" for q, cs, a in shots)
        context = text + f"Question: {question}\nAnswer:"
        continuations = [f" {c}" for c in choices]
    else:  # raw: the question's text goes on with the choice, nothing added
        context = "".join(f"{q}{cs[a]}\n\n" for q, cs, a in shots) + question
        continuations = choices
    # (the context's ids can differ between choices when a choice merges with its last token)
    return dict(pairs=[encode_pair(tokenizer, context, c) for c in continuations], answer=answer)


# -----------------------------------------------------------------------------
# generation tasks (exact match, GSM8K)


def generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size=8, label="generate"):
    """Greedy continuations (decoded text, EOS excluded) of BOS + encode(prompt) for each prompt (or
    of the prompt's ids, when it is a list), in batches of similar lengths through llama.generate
    (left-padded, one KV cache per batch)."""
    ids = [p if isinstance(p, list) else tokenizer.encode(p, bos=True) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out, progress = [None] * len(ids), Progress(label, len(ids))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        longest = max(len(ids[i]) for i in index)
        room = model.config.max_seq_len - longest
        if room < 1:
            raise UserError(
                f"prompt {index[0]} has {longest} tokens: no room to generate in the model's "
                f"context of {model.config.max_seq_len}"
            )
        new = llama.generate(model, tokenizer, [ids[i] for i in index], min(max_new_tokens, room))
        for i, tokens in zip(index, new):
            out[i] = tokenizer.decode(tokens)
        progress.update(min(start + batch_size, len(order)))
    return out


def exact_match(prediction, response):
    """Does a generated answer equal the reference? Whitespace at the ends is ignored. References in
    the GSM8K style ("...reasoning...\\n#### 72") are compared on the final answer after the last
    "####"."""
    if "####" in response:
        prediction, response = prediction.rsplit("####", 1)[-1], response.rsplit("####", 1)[-1]
    return prediction.strip() == response.strip()


def exact_match_details(model, tokenizer, examples, max_new_tokens=64, batch_size=8, chat_fmt=None):
    """[{"task", "instruction", "input", "response"} or {"task", "messages"}] -> [{"task",
    "prediction", "correct"}]; chat_fmt: the data's format (dataset.chat_format)."""
    prompts = [dataset.prompt_ids(tokenizer, e, chat_fmt) for e in examples]
    with evaluating(model):
        predictions = generate_texts(
            model, tokenizer, prompts, max_new_tokens, batch_size, "exact_match"
        )
    return [
        dict(task=e["task"], prediction=p, correct=exact_match(p, dataset.reference(e)))
        for e, p in zip(examples, predictions)
    ]


def score_exact_match(model, tokenizer, examples, max_new_tokens=64, batch_size=8, chat_fmt=None):
    """{task: accuracy in [0, 1]} of greedy generation from the training prompt
    (dataset.prompt_ids) against the reference response, whitespace at the ends ignored
    (exact_match)."""
    details = exact_match_details(model, tokenizer, examples, max_new_tokens, batch_size, chat_fmt)
    return accuracy_by(details, "task")


def exact_match_report(base, tuned, per_task):
    """Print each task's exact match before -> after (train.py's closing table); -> the metrics
    record."""
    print(f"exact match on the test split ({per_task} examples per task at most):")
    for name in tuned:
        before = f"{100 * base[name]:5.1f}%" if name in base else "    ?"
        print(f"  {name:<24} base {before} -> tuned {100 * tuned[name]:5.1f}%")
    mean = lambda s: sum(s.values()) / max(len(s), 1)  # noqa: E731
    return {
        "exact_match": mean(tuned),
        **{f"exact_match/{k}": v for k, v in tuned.items()},
        "exact_match_base": mean(base),
    }


def accuracy_by(details, key, correct="correct"):
    """{value of key: share of details with details[correct] true}, in first-seen order."""
    counts = {}
    for d in details:
        n, k = counts.get(d[key], (0, 0))
        counts[d[key]] = (n + 1, k + bool(d[correct]))
    return {name: k / n for name, (n, k) in counts.items()}


# a number: 1,234,567.89 with thousands separators, or plain 1234.5 / .5; a minus sign only when it
# does not join two words or numbers ("3-4" is 3 and 4, "= -4" is -4)
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def normalize_number(text):
    """'1,234' -> '1234', '18.00' -> '18', '.5' -> '0.5', '-0' -> '0', '007' -> '7'."""
    text = text.replace(",", "")
    negative = text.startswith("-")
    text = text.lstrip("-")
    if "." in text:
        whole, frac = text.split(".")
        frac = frac.rstrip("0")
        text = str(int(whole or "0")) + ("." + frac if frac else "")
    else:
        text = str(int(text))
    return "-" + text if negative and text.strip("0.") else text


def extract_gsm8k_answer(text):
    """The final answer of GSM8K-style text as a normalized number string, or None: the first number
    after the last "####" when there is one (the dataset's answer format), else the last number."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        return normalize_number(found.group()) if found else None
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_prompts(tokenizer, records, shots=(), chat_fmt=None):
    """Each question after the solved shots, in the training format: ours (dataset.format_prompt
    + answer + blank line), or the chat template's (a user and an assistant turn a shot; ids)."""
    if chat_fmt:
        turns = [
            m
            for s in shots
            for m in chat.as_messages(dict(instruction=s["question"], response=s["answer"]))
        ]
        return [
            chat.prompt_ids(
                *chat_fmt, tokenizer, turns + [dict(role="user", content=r["question"])]
            )
            for r in records
        ]
    prefix = "".join(dataset.format_prompt(s["question"]) + s["answer"] + "\n\n" for s in shots)
    return [prefix + dataset.format_prompt(r["question"]) for r in records]


def gsm8k_details(
    model, tokenizer, records, shots=(), max_new_tokens=256, batch_size=8, chat_fmt=None
):
    """records: [{"question", "answer"}]; shots: solved records put before each question
    (gsm8k_prompts). A prediction is cut at the next "### Instruction:" (a model that does not
    stop goes on with a made-up next example)."""
    prompts = gsm8k_prompts(tokenizer, records, shots, chat_fmt)
    with evaluating(model):
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, "gsm8k")
    details = []
    for r, text in zip(records, texts):
        text = text.split("### Instruction:", 1)[0]
        pred, ref = extract_gsm8k_answer(text), extract_gsm8k_answer(r["answer"])
        details.append(
            dict(
                task="gsm8k",
                prediction=text,
                pred=pred,
                ref=ref,
                correct=pred is not None and pred == ref,
            )
        )
    return details


# -----------------------------------------------------------------------------
# validation loss on prepared datasets


def loss_table(model, data_dirs, split, limit=0, batch_size=8, pad_id=0, vocab_size=None):
    """Mean cross-entropy on the response tokens (mask = 1: response + EOS) per task of the prepared
    datasets (a task in two of them is one task), over the first `limit` examples of each task, by
    evaluate: the numbers training logs. -> {task: {tokens, loss, perplexity}}, then "all".
    vocab_size: the tokenizer's, where a tokenizer.json has fewer tokens than the embedding."""
    splits = dataset.load_splits(data_dirs, split)
    for d, s in zip(data_dirs, splits):
        if s.meta["vocab_size"] != (vocab_size or model.config.vocab_size):
            raise UserError(
                f"{os.path.join(d, 'meta.json')}: vocab_size: prepared with {s.meta['tokenizer']} "
                f"({s.meta['vocab_size']} tokens), the model has {model.config.vocab_size}: "
                f"prepare it again with the model's tokenizer"
            )
        if s.lengths.max() - 1 > model.config.max_seq_len:
            raise UserError(
                f"{d}: an example of {s.lengths.max()} tokens is longer than the model's "
                f"context of {model.config.max_seq_len}"
            )
    names, pools = dataset.task_pools(splits)
    pools = [p[:limit] if limit else p for p in pools]
    with evaluating(model):
        overall, per_task = evaluate(model, splits, pools, limit, batch_size, pad_id)
    # target tokens of each task: the mask over each example's tokens after the first
    cumulative = [np.concatenate([[0], np.cumsum(s.mask, dtype=np.int64)]) for s in splits]
    tokens = [
        int(
            sum(
                cumulative[d][splits[d].offsets[i + 1]] - cumulative[d][splits[d].offsets[i] + 1]
                for d, i in pool
            )
        )
        for pool in pools
    ]
    rows = {
        name: dict(tokens=k, loss=loss, perplexity=math.exp(loss))
        for name, k, loss in zip(names, tokens, per_task)
        if k
    }
    if not rows:
        raise UserError(f"{','.join(data_dirs)}: {split}: no response tokens to score")
    return dict(rows, all=dict(tokens=sum(tokens), loss=overall, perplexity=math.exp(overall)))


# -----------------------------------------------------------------------------
# reading the benchmark files

MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


def read_mmlu(path, limit=0):
    """One MMLU CSV (question, 4 choices, answer 0-3 or A-D; a header row is skipped) ->
    [(question, choices, answer index)]."""
    rows = []
    for line, (question, *choices, answer) in sources.read_csv(path, MMLU_HEADER, len(MMLU_HEADER)):
        answer = answer.strip()
        if answer not in ("0", "1", "2", "3", "A", "B", "C", "D"):
            raise UserError(f"{path}:{line}: answer: expected 0-3 or A-D, got {answer!r}")
        rows.append((question, choices, int(answer) if answer.isdigit() else LETTERS.index(answer)))
    return rows[:limit] if limit else rows


def prepared_mmlu(data_dir, split):
    """{subject: [(question, choices, answer index)]} of a folder data/mmlu/prepare.py wrote: its
    {split}.jsonl records hold the subject in the instruction, the question and its lettered choices
    in the input, the letter in the response."""
    rows = {}
    for line, r in dataset.read_jsonl(os.path.join(data_dir, f"{split}.jsonl"), dataset.FIELDS):
        text, choices = r["input"], []
        for letter in reversed(LETTERS[:4]):
            text, sep, choice = text.rpartition(f"\n{letter}. ")
            choices.insert(0, choice)
        about = re.search(r"question about (.+)\. Answer with", r["instruction"])
        if not sep or r["response"] not in LETTERS[:4]:
            raise UserError(
                f"{data_dir}/{split}.jsonl:{line}: expected an example data/mmlu/prepare.py writes"
            )
        subject = about.group(1).replace(" ", "_") if about else "all"
        rows.setdefault(subject, []).append((text, choices, LETTERS.index(r["response"])))
    return rows


def chosen_subjects(subjects, have, where):
    """The subjects that --subjects names (comma-separated; empty: all of have), each one of have,
    the subjects found in where."""
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] or have
    unknown = [s for s in wanted if s not in have]
    if unknown or not wanted:
        raise UserError(
            f"--subjects: {', '.join(unknown) or 'none'} not in {where} "
            f"(has: {', '.join(have) or 'none'})"
        )
    return wanted


def mmlu_items(
    tokenizer, data_dir, split="test", shots=0, mc_format="letter", subjects="", limit=0
):
    """MMLU as mc items with a "subject"; shots come from dev/{subject}_dev.csv (the first `shots`).
    data_dir: the CSV release, or a folder data/mmlu/prepare.py wrote (no dev/: 0-shot only)."""
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        if shots:
            raise UserError(
                f"--shots={shots}: {data_dir} is a prepared folder, which keeps no dev/ examples: "
                f"give MMLU's CSV folder (with dev/) for few-shot evaluation"
            )
        prepared = prepared_mmlu(data_dir, split)
        wanted = chosen_subjects(subjects, sorted(prepared), f"{data_dir}/{split}.jsonl")
        items = []
        for subject in wanted:
            for index, (question, choices, answer) in enumerate(prepared[subject][: limit or None]):
                item = mc_item(tokenizer, question, choices, answer, mc_format, subject)
                item.update(subject=subject, index=index)
                items.append(item)
        return items
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder) and os.path.isdir(os.path.join(data_dir, "data", split)):
        # the release's data/
        data_dir, folder = (
            os.path.join(data_dir, "data"),
            os.path.join(data_dir, "data", split),
        )
    if not os.path.isdir(folder):
        raise UserError(
            f"--data={data_dir}: expected a folder {split}/ of {{subject}}_{split}.csv files"
        )
    have = sorted(
        f[: -len(f"_{split}.csv")] for f in os.listdir(folder) if f.endswith(f"_{split}.csv")
    )
    wanted = chosen_subjects(subjects, have, folder)
    if not 0 <= shots <= 5:
        raise UserError(f"--shots: MMLU's dev split has 5 examples per subject, got {shots}")
    items = []
    for subject in wanted:
        shot_rows = (
            read_mmlu(os.path.join(data_dir, "dev", f"{subject}_dev.csv"))[:shots] if shots else []
        )
        if len(shot_rows) < shots:
            raise UserError(
                f"{data_dir}/dev/{subject}_dev.csv: {len(shot_rows)} examples, --shots={shots}"
            )
        for index, (question, choices, answer) in enumerate(
            read_mmlu(os.path.join(folder, f"{subject}_{split}.csv"), limit)
        ):
            item = mc_item(tokenizer, question, choices, answer, mc_format, subject, shot_rows)
            item.update(subject=subject, index=index)
            items.append(item)
    return items


def mc_items(tokenizer, path, mc_format="cloze", limit=0):
    """A JSONL file of {"question", "choices": [text], "answer": index} as mc items."""
    items = []
    # () : the fields are not all strings, checked here
    for line, r in dataset.read_jsonl(path, ()):
        missing = [k for k in ("question", "choices", "answer") if k not in r]
        if missing or not isinstance(r["question"], str):
            raise UserError(
                f'{path}:{line}: expected {{"question": text, "choices": [text], "answer": index}}'
                + (f", missing {', '.join(missing)}" if missing else "")
            )
        if (
            not isinstance(r["choices"], list)
            or len(r["choices"]) < 2
            or not all(isinstance(c, str) for c in r["choices"])
        ):
            raise UserError(f"{path}:{line}: choices: expected a list of at least 2 strings")
        if not isinstance(r["answer"], int) or not 0 <= r["answer"] < len(r["choices"]):
            raise UserError(
                f"{path}:{line}: answer: expected an index 0..{len(r['choices']) - 1}, "
                f"got {r['answer']!r}"
            )
        item = mc_item(tokenizer, r["question"], r["choices"], r["answer"], mc_format)
        item.update(subject=str(r.get("subject", "all")), index=len(items))
        items.append(item)
    return items[:limit] if limit else items


def gsm8k_records(path, limit=0, split="test"):
    """[{"question", "answer"}] of GSM8K's own JSONL, or of a split data/gsm8k/prepare.py wrote."""
    if os.path.isdir(path):
        path = os.path.join(path, f"{split}.jsonl")
    rows = dataset.read_jsonl(path, ())
    prepared = (
        bool(rows)
        and isinstance(rows[0][1], dict)
        and "question" not in rows[0][1]
        and "instruction" in rows[0][1]
    )
    fields = ("instruction", "response") if prepared else ("question", "answer")
    for line, r in rows:
        dataset.check_fields(f"{path}:{line}", r, fields)
    return [dict(question=r[fields[0]], answer=r[fields[1]]) for _, r in rows][: limit or None]


# -----------------------------------------------------------------------------
# the command line


def truncation(items, context, shots):
    """How many questions (of mc items) are longer than the context, and lose their oldest tokens;
    said on stderr, as a warning when they are few-shot prompts: their shots are what is cut, so the
    score is not a few-shot score. -> (questions truncated, shots exceed the context)."""
    truncated = sum(any(len(c) + len(x) > context for c, x in i["pairs"]) for i in items)
    if truncated:
        what = (
            f"{truncated} of {len(items)} questions are longer than the model's context of "
            f"{context} tokens and lose their oldest tokens"
        )
        if shots:
            print(
                f"warning: --shots={shots}: the few-shot prompts exceed the context: {what}, "
                f"the shots first, so this is not a {shots}-shot score; use fewer shots or a model "
                f"with a longer context",
                file=sys.stderr,
            )
        else:
            print(f"note: {what}", file=sys.stderr)
    return truncated, bool(truncated and shots)


def check_room(tokenizer, prompts, context, shots):
    """A generation prompt must leave room for an answer: refused in one line (naming --shots when
    few-shot examples are what takes the room) before any generating."""
    lengths = [
        len(p) if isinstance(p, list) else len(tokenizer.encode(p, bos=True)) for p in prompts
    ]
    longest = max(lengths, default=0)
    if longest >= context:
        fix = f"the {shots} shots take most of it: use fewer --shots, " if shots else ""
        raise UserError(
            f"prompts of up to {longest} tokens leave no room to answer in the model's context "
            f"of {context}: {fix}or use a model with a longer context (max_seq_len)"
        )


def print_table(title, rows, columns):
    """rows: {name: {column: value}}; accuracy columns' floats in [0, 1] printed as percentages."""
    width = max([len(title)] + [len(str(r)) for r in rows])
    print(f"{title:<{width}}  " + "  ".join(f"{c:>13}" for c in columns))
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(
                f"{'':>13}"
                if v is None
                else f"{100 * v:12.2f}%"
                if c.startswith("accuracy")
                else f"{v:13.4f}"
                if isinstance(v, float)
                else f"{v:>13}"
            )
        print(f"{name:<{width}}  " + "  ".join(cells))


def prompt_format(path, tokenizer):
    """The chat format (dataset.chat_format) to evaluate in, or None for ours: the prepared data's,
    which --template, when given, must name."""
    if task not in ("exact_match", "loss"):
        return chat.base_template(tokenizer.path) if template == "chat" else None
    chat_fmt = dataset.data_format(path.split(","))
    prepared = "chat" if chat_fmt else "alpaca"
    if template and template != prepared:
        raise UserError(
            f"--template={template}: {path} was prepared with --template={prepared}; a model is "
            f"evaluated in the format it was trained in"
        )
    return chat_fmt


def run():
    """Evaluate as the settings say (checked by configure); -> the result dict that --out writes."""
    path, settings = data or "data/tasks", {k: globals()[k] for k in SETTINGS}
    model, tokenizer = load_for_inference(
        ckpt_dir, settings["tokenizer"], adapter, dtype, device, merge=True
    )
    chat_fmt = prompt_format(path, tokenizer)
    result = dict(task=task, ckpt_dir=ckpt_dir, adapter=adapter, data=path, settings=settings)
    if task in ("mmlu", "mc"):
        result.update(run_multiple_choice(model, tokenizer, path))
    elif task in ("exact_match", "gsm8k"):
        result.update(run_generation(model, tokenizer, path, chat_fmt))
    else:
        result.update(run_loss(model, tokenizer, path))
    return result


# the tasks of run, as the settings say: -> the result's entries of the task, its table printed
def run_multiple_choice(model, tokenizer, path):
    """mmlu or mc: accuracy (the choice of the largest summed log-probability), accuracy_norm
    (per token), per subject."""
    fmt = mc_format or ("letter" if task == "mmlu" else "raw")
    if task == "mmlu":
        items = mmlu_items(tokenizer, path, split or "test", shots, fmt, subjects, limit)
    else:
        items = mc_items(tokenizer, path, fmt, limit)
    truncated, shots_cut = truncation(items, model.config.max_seq_len, shots)
    with evaluating(model):
        score_multiple_choice(model, items, batch_size, task)
    for item in items:
        item["correct"], item["correct_norm"] = (
            item["pred"] == item["answer"],
            item["pred_norm"] == item["answer"],
        )
    acc, acc_norm = accuracy_by(items, "subject"), accuracy_by(items, "subject", "correct_norm")
    per = {
        s: dict(n=sum(i["subject"] == s for i in items), accuracy=acc[s], accuracy_norm=acc_norm[s])
        for s in acc
    }
    overall = dict(
        n=len(items),
        accuracy=sum(i["correct"] for i in items) / len(items),
        accuracy_norm=sum(i["correct_norm"] for i in items) / len(items),
    )
    out = dict(
        overall,
        mc_format=fmt,
        shots=shots,
        truncated=truncated,
        shots_exceed_context=shots_cut,
        per_subject=per,
        details=[
            {
                k: i[k]
                for k in (
                    "subject",
                    "index",
                    "answer",
                    "pred",
                    "pred_norm",
                    "logprobs",
                    "n_tokens",
                )
            }
            for i in items
        ],
    )
    rows = dict(per, **({"all (questions)": overall} if len(per) > 1 else {}))
    if len(per) > 1:
        out["accuracy_macro"] = sum(p["accuracy"] for p in per.values()) / len(per)
    print_table(f"{task} {fmt} {shots}-shot", rows, ("n", "accuracy", "accuracy_norm"))
    return out


def run_generation(model, tokenizer, path, chat_fmt):
    """exact_match or gsm8k: the share of greedy answers that are right, per task; chat_fmt: the
    prompt format (prompt_format)."""
    if task == "exact_match":
        examples, seen = [], {}
        rows = [e for d in path.split(",") for e in dataset.read_examples(d, split or "test")]
        for e in rows:  # the first `limit` of each task
            seen[e["task"]] = seen.get(e["task"], 0) + 1
            if not limit or seen[e["task"]] <= limit:
                examples.append(e)
        details = exact_match_details(
            model, tokenizer, examples, max_new_tokens or 64, batch_size, chat_fmt
        )
    else:
        records = gsm8k_records(path, limit, split or "test")
        solved = []
        if shots:
            folder = os.path.dirname(path) if os.path.isfile(path) else path
            solved = gsm8k_records(os.path.join(folder, "train.jsonl"))[:shots]
        prompts = gsm8k_prompts(tokenizer, records, solved, chat_fmt)
        check_room(tokenizer, prompts, model.config.max_seq_len, len(solved))
        details = gsm8k_details(
            model, tokenizer, records, solved, max_new_tokens or 256, batch_size, chat_fmt
        )
    if not details:
        raise UserError(f"--data={path}: no examples")
    acc = accuracy_by(details, "task")
    per = {t: dict(n=sum(d["task"] == t for d in details), accuracy=a) for t, a in acc.items()}
    overall = dict(n=len(details), accuracy=sum(d["correct"] for d in details) / len(details))
    print_table(
        task,
        dict(per, **({"all (examples)": overall} if len(per) > 1 else {})),
        ("n", "accuracy"),
    )
    return dict(overall, per_task=per, details=details)


def run_loss(model, tokenizer, path):
    """loss: the mean loss on the response tokens and its perplexity, per task and over all."""
    which = split or "val"
    vocab = tokenizer.vocab_size if tokenizer.kind == "json" else None
    per = loss_table(model, path.split(","), which, limit, batch_size, tokenizer.pad_id, vocab)
    out = dict(per.pop("all"), per_task=per)
    print_table(
        f"loss {which}",
        dict(per, all={k: out[k] for k in ("tokens", "loss", "perplexity")}),
        ("tokens", "loss", "perplexity"),
    )
    return out


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    util.write_text(path, json.dumps(obj, indent=1))


def main(argv):
    globals().update(configure(SETTINGS, argv))
    if max_new_tokens:  # past the context, or more than memory holds: refused before loading
        config = checkpoint.read_config(ckpt_dir)
        check_generation_size(config, [], max_new_tokens, batch_size, dtype, device, ckpt_dir)
    result = run()
    if out:
        write_json(out, result)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    util.run_cli(main)
