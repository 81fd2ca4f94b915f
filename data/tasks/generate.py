"""
The embedded default data: a multi-task instruction suite, a pretraining corpus without the
instruction format, and the SentencePiece tokenizer of the tiny base model. Deterministic by seed.

    python data/tasks/generate.py --overwrite=True   # rewrites the files below (ten seconds)

writes, under out_dir (default: this repository's data/):
    tiny_base/tokenizer.model   SentencePiece BPE, LLaMA settings (byte fallback, split digits,
                                unk=0 bos=1 eos=2, no pad), trained on the corpus + the tasks'
                                prompt templates (not their examples: the suite's sizes leave it
                                unchanged)
    tasks/                      the suite, a prepared dataset (see dataset.py): train/val/test
                                splits whose inputs never repeat across splits, and the raw
                                {split}.jsonl used for exact-match scoring
    tasks_corpus/               the pretraining corpus as a prepared dataset: one task "corpus",
                                one example per document, every token after BOS a target

The tasks (instruction, input -> the exact-match answer):
    add       Add the two numbers.                  "13 and 6"              -> "19"
    bigger    Which number is bigger?               "597 and 853"           -> "853"
    parity    Is the sum of the digits even or odd? "418"                   -> "odd"
    reverse   Write the digits in reverse order.    "8 7 6 1 4"             -> "4 1 6 7 8"
    sort      Sort the digits from small to large.  "5 9 3 0 3"             -> "0 3 3 5 9"
    lookup    Which color goes with the number after the semicolon?
                                                    "2 blue 4 gray ; 4"     -> "gray"
    count     How many times does the digit after the semicolon appear before it?
                                                    "5 1 9 9 ; 9"           -> "2"
add/bigger and reverse/sort share an input form: only the instruction tells them apart.
The corpus states the same kinds of facts in prose ("13 and 6 make 19 .", "write 8 7 6 1 4 in
reverse and you get 4 1 6 7 8 .") among plain sentences over the same words, but never in the
instruction format ("###", "Instruction", "Response" appear nowhere in it): the base model knows the
content, and fine-tuning has to teach it to follow the instructions. Test inputs are disjoint from
the train split, not from the corpus, as with real pretraining and instruction tuning.
"""

import io
import os
import random
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
from configurator import S  # noqa: E402
import dataset  # noqa: E402
import sources  # noqa: E402
import util
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# settings (override with --key=value)
out_dir = S(
    os.path.normpath(os.path.join(ROOT, "data")),
    None,
    "writes tiny_base/tokenizer.model, tasks/, tasks_corpus/ here",
)
overwrite = S(False, None, "replace the files of an earlier run (never replaced without it)")
seed = S(1337, "[0, inf)", "everything below is drawn from this seed")
n_train = S(800, "[1, inf)", "examples per task (fewer where a task has fewer distinct inputs)")
n_val = S(30, "[1, inf)", "validation examples per task")
n_test = S(50, "[1, inf)", "test examples per task")
n_documents = S(10000, "[1, inf)", "pretraining corpus documents")
document_sentences = S(8, "[1, inf)", "sentences per document")
vocab_size = S(768, "[16, inf)", "the tokenizer's vocabulary")
max_len = S(
    64, "[8, inf)", "task examples (all are far shorter); corpus documents get corpus_max_len"
)
corpus_max_len = S(160, "[8, inf)", "tokens per corpus document at most")
SETTINGS = configurator.declared(globals())
# times each task's prompt lines go into the tokenizer's text (about the count they had as examples)
TEMPLATE_REPEATS = 500
# -----------------------------------------------------------------------------

ANIMALS = "cat dog fox cow pig hen owl bee ant rat bat elk yak emu ox eel".split()
COLORS = "red blue green pink gray black white brown gold tan".split()
FRUITS = "apple pear plum fig lime lemon grape peach melon kiwi".split()
NAMES = "Ann Bob Sam Tom Eve Max Zoe Ben Mia Leo".split()
PLACES = "house tree hill road lake farm park barn".split()


def spaced(items):
    return " ".join(str(x) for x in items)


# Each task: an instruction, draw(rng) -> {"input", "response", and the named parts of the input},
# and prose: sentences that state the same fact in the corpus, in several wordings with the data at
# different distances from the answer (so that what pretraining learns is not tied to one layout).
# Inputs start with a digit: after the template's "\n" a word is tokenized without its leading "▁"
# (SentencePiece adds that dummy prefix only at the start of a text), a different token from the
# same word inside a sentence, which a tiny model would first have to learn to match.
def draw_add(rng):
    a, b = rng.randrange(20), rng.randrange(20)
    return dict(input=f"{a} and {b}", response=str(a + b), a=a, b=b)


def draw_bigger(rng):
    a, b = rng.sample(range(1000), 2)
    return dict(input=f"{a} and {b}", response=str(max(a, b)), a=a, b=b)


def draw_parity(rng):  # of the digit sum: a tiny model cannot read it off the last digit
    n = rng.randrange(100, 1000)
    return dict(input=str(n), response="odd" if sum(map(int, str(n))) % 2 else "even", n=n)


def draw_reverse(rng):
    digits = [rng.randrange(10) for _ in range(5)]
    return dict(input=spaced(digits), response=spaced(reversed(digits)))


def draw_sort(rng):
    digits = [rng.randrange(10) for _ in range(5)]
    return dict(input=spaced(digits), response=spaced(sorted(digits)))


def draw_lookup(rng):
    keys, values = rng.sample(range(10), 2), rng.sample(COLORS, 2)
    key = rng.choice(keys)
    pairs = spaced(f"{k} {v}" for k, v in zip(keys, values))
    return dict(input=f"{pairs} ; {key}", response=values[keys.index(key)], pairs=pairs, key=key)


def draw_count(rng):
    pool = rng.sample(range(10), 3)
    digits, digit = [rng.choice(pool) for _ in range(rng.randint(3, 5))], rng.choice(pool)
    return dict(
        input=f"{spaced(digits)} ; {digit}",
        response=str(digits.count(digit)),
        digits=spaced(digits),
        digit=digit,
    )


TASKS = {  # name: (instruction, draw, prose)
    "add": (
        "Add the two numbers.",
        draw_add,
        [
            "{a} and {b} make {response} .",
            "add {a} and {b} and you get {response} .",
            "the sum of {a} and {b} is {response} .",
            "{a} plus {b} , as we know , is {response} .",
        ],
    ),
    "bigger": (
        "Which number is bigger?",
        draw_bigger,
        [
            "of {a} and {b} the bigger is {response} .",
            "which is bigger , {a} or {b} ? it is {response} .",
            "{a} and {b} : the bigger number is {response} .",
        ],
    ),
    "parity": (
        "Is the sum of the digits even or odd?",
        draw_parity,
        [
            "the digits of {n} add up to an {response} number .",
            "the digit sum of {n} , we see , is {response} .",
            "{n} has an {response} digit sum .",
        ],
    ),
    "reverse": (
        "Write the digits in reverse order.",
        draw_reverse,
        [
            "{input} backwards is {response} .",
            "write {input} in reverse and you get {response} .",
            "reversed , the digits {input} read {response} .",
        ],
    ),
    "sort": (
        "Sort the digits from small to large.",
        draw_sort,
        [
            "{input} in order is {response} .",
            "sort {input} and you get {response} .",
            "from small to large , the digits {input} are {response} .",
        ],
    ),
    "lookup": (
        "Which color goes with the number after the semicolon?",
        draw_lookup,
        [
            "{pairs} , so {key} is {response} .",
            "here {pairs} . the color of {key} is {response} .",
            "{pairs} : number {key} goes with {response} .",
        ],
    ),
    "count": (
        "How many times does the digit after the semicolon appear before it?",
        draw_count,
        [
            "in {digits} the {digit} comes {response} times .",
            "count the {digit} in {digits} : {response} .",
            "{digits} has the digit {digit} {response} times .",
        ],
    ),
}
# The fine-tuning suite (data/tasks/). parity (of the digit sum) and lookup stay in the corpus and
# the tokenizer's text, so the base is unchanged, but not in the suite: neither LoRA nor full
# fine-tuning got above chance on them from this base (README, "The embedded task suite"), so they
# only add noise.
SUITE = ("add", "bigger", "reverse", "sort", "count")
# train examples of these (n_train for the others): with 800 both were at 98-100% for LoRA and full
FEWER_TRAIN = dict(reverse=200, sort=200)


def task_splits(seed, n_train, n_val, n_test, tasks=SUITE):
    """{split: [record]}: per task, distinct inputs; test and val first, train gets the rest."""
    splits = {"train": [], "val": [], "test": []}
    for name in tasks:
        instruction, draw, _ = TASKS[name]
        rng = random.Random(f"{seed}:{name}")
        examples, tries = {}, 0
        while len(examples) < n_train + n_val + n_test and tries < 100 * (n_train + n_val + n_test):
            example = draw(rng)
            examples.setdefault(example["input"], example["response"])
            tries += 1
        items = [
            dict(task=name, instruction=instruction, input=i, response=r)
            for i, r in examples.items()
        ]
        splits["test"] += items[:n_test]
        splits["val"] += items[n_test : n_test + n_val]
        splits["train"] += items[n_test + n_val :][: FEWER_TRAIN.get(name, n_train)]
    return splits


# The corpus: each task's facts in prose (fresh random instances), counting, and plain sentences
# over the same words.
# How often each kind of sentence comes: retrieval and counting are what a tiny model learns last.
CORPUS_WEIGHTS = dict(
    add=1, bigger=1, parity=1, reverse=1, sort=1, lookup=3, count=2, counting=1, plain=2
)


def corpus_sentence(rng):
    kind = rng.choices(list(CORPUS_WEIGHTS), weights=list(CORPUS_WEIGHTS.values()))[0]
    if kind in TASKS:
        _, draw, prose = TASKS[kind]
        return rng.choice(prose).format(**draw(rng))
    if kind == "counting":
        start = rng.randrange(90)
        return f"counting up : {spaced(range(start, start + rng.randint(3, 6)))} ."
    return rng.choice(
        [
            f"{rng.choice(NAMES)} sees a {rng.choice(COLORS)} {rng.choice(ANIMALS)} "
            f"by the {rng.choice(PLACES)} .",
            f"the {rng.choice(ANIMALS)} eats {rng.randint(2, 9)} {rng.choice(FRUITS)}s .",
            f"{rng.choice(NAMES)} has a {rng.choice(COLORS)} {rng.choice(FRUITS)} .",
            f"the {rng.choice(PLACES)} is {rng.choice(COLORS)} "
            f"and the {rng.choice(ANIMALS)} is {rng.choice(COLORS)} .",
        ]
    )


def corpus_documents(seed, n_documents, document_sentences):
    rng = random.Random(f"{seed}:corpus")
    return [
        " ".join(corpus_sentence(rng) for _ in range(document_sentences))
        for _ in range(n_documents)
    ]


def train_tokenizer(lines, vocab_size, path):
    """SentencePiece BPE with the LLaMA 1/2 settings. Trained from an iterator into memory so that
    the model file holds no temporary paths: the same lines give the same bytes."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sources.write_file(path, lambda f: f.write(model.getvalue()))


def main(argv=None):
    config = configurator.configure(
        SETTINGS, sys.argv[1:] if argv is None else argv, "data/tasks/generate.py"
    )
    tokenizer_path = os.path.join(config["out_dir"], "tiny_base", "tokenizer.model")
    # every target checked before anything is written (the prepared folders again under their lock)
    for name in ("tasks", "tasks_corpus"):
        sources.check_prepared_dir(os.path.join(config["out_dir"], name), config["overwrite"])
    if os.path.lexists(tokenizer_path) and not config["overwrite"]:
        raise util.UserError(
            f"{tokenizer_path}: exists; replace it with --overwrite=True (the base's weights are "
            f"trained for it: pretrain again after), or write into another --out_dir"
        )
    splits = task_splits(config["seed"], config["n_train"], config["n_val"], config["n_test"])
    documents = corpus_documents(
        config["seed"], config["n_documents"], config["document_sentences"]
    )
    assert not any("###" in d for d in documents)  # the corpus never shows the instruction format

    # each task's prompt template, a line at a time (SentencePiece trains on lines), so that
    # "### Instruction:" gets pieces of its own; not the suite's examples, so that the suite's sizes
    # and inputs can change without changing the tokenizer (and so the pretrained base)
    template_lines = [
        line
        for instruction, _, _ in TASKS.values()
        for line in dataset.format_prompt(instruction, "0").split("\n")
        if line
    ] * TEMPLATE_REPEATS
    train_tokenizer(documents + template_lines, config["vocab_size"], tokenizer_path)
    print(f"wrote {tokenizer_path}")
    tok = load_tokenizer(tokenizer_path)

    prepare_config = dict(
        sources.PREPARE_DEFAULTS,
        seed=config["seed"],
        tokenizer=os.path.relpath(tokenizer_path, ROOT),
        overwrite=config["overwrite"],
    )
    sources.prepare(
        "tasks",
        splits,
        dict(
            prepare_config,
            out_dir=os.path.join(config["out_dir"], "tasks"),
            max_len=config["max_len"],
            tasks=list(SUITE),
        ),
        tok,
    )
    corpus = os.path.join(config["out_dir"], "tasks_corpus")
    write_corpus(documents, corpus, tok, config["corpus_max_len"], config["overwrite"])


def write_corpus(documents, out_dir, tok, max_len, overwrite=False):
    """The corpus as a prepared dataset (task "corpus", no raw jsonl): 1 in 20 documents for val."""
    n_val = len(documents) // 20
    splits = {"train": documents[n_val:], "val": documents[:n_val]}
    encoded = {
        split: [e for e in (dataset.encode_document(tok, d, max_len) for d in docs) if e]
        for split, docs in splits.items()
    }
    counts = {
        split: {"dropped_over_long": len(splits[split]) - len(encoded[split])} for split in splits
    }
    meta = sources.write_dataset(
        out_dir,
        {split: [("corpus", *e) for e in examples] for split, examples in encoded.items()},
        dict(
            name="tasks_corpus",
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            tokenizer=os.path.relpath(tok.path, ROOT),
            max_len=max_len,
            counts=counts,
        ),
        overwrite=overwrite,
    )
    for split, c in meta["counts"].items():
        print(
            f"tasks_corpus {split}: {c['examples']} documents, {c['tokens']} tokens, "
            f"{c['dropped_over_long']} dropped as longer than max_len={max_len}"
        )


if __name__ == "__main__":
    util.run_cli(main)
