"""dataset.py, sources.py, data/<name>/prepare.py and data/tasks/generate.py on small fixtures in
each source's real format (written here; no network, no ../shared). Decoding uses the committed tiny
tokenizer, which has LLaMA's settings (byte fallback, identity normalization), so every text
round-trips."""

import csv
import importlib.util
import json
import os
import sys
import tarfile

import numpy as np
import pytest

import dataset
import sources
from util import UserError
from tokenizer import load_tokenizer
from conftest import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tiny_base", "tokenizer.model")


def load_script(name):
    path = os.path.join(ROOT, "data", name, "prepare.py" if name != "tasks" else "generate.py")
    spec = importlib.util.spec_from_file_location(f"data_{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def check_prepared(out_dir, tok, expected):
    """Every example decodes to exactly the template's prompt and response, masked as it says;
    expected: {split: [(instruction, input, response)]}."""
    meta = dataset.read_meta(out_dir)
    assert meta["format"] == "multilora-v1" and meta["vocab_size"] == tok.vocab_size
    for split, records in expected.items():
        data = dataset.PreparedSplit(out_dir, split)
        raw = dataset.read_examples(out_dir, split)
        assert len(data) == len(raw) == len(records) == meta["counts"][split]["examples"]
        assert data.tokens.dtype == np.uint16 and data.mask.dtype == np.uint8
        assert [(r["instruction"], r["input"], r["response"]) for r in raw] == records
        for i, (instruction, input, response) in enumerate(records):
            ids, mask, task = data.example(i)
            n_prompt = int((mask == 0).sum())
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            # prompt 0s, then response + EOS 1s
            assert not mask[:n_prompt].any() and mask[n_prompt:].all()
            assert tok.decode(ids[1:n_prompt]) == dataset.format_prompt(instruction, input)
            assert tok.decode(ids[n_prompt:-1]) == response
            assert data.tasks[task] == meta["tasks"][task]
    return meta


def run_prepare(name, tmp_path, source, *extra):
    out_dir = str(tmp_path / "out")
    load_script(name).main(
        [f"--source={source}", f"--tokenizer={TOKENIZER}", f"--out_dir={out_dir}", *extra]
    )
    return out_dir


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -----------------------------------------------------------------------------
# the template


def test_template_text():
    assert (
        dataset.format_prompt("Add.", "1 2")
        == "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert dataset.format_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_encode_example_mask_and_over_long(tok):
    ids, mask = dataset.encode_example(tok, "Sort the digits.", "3 1 2", "1 2 3", 64)
    prompt = [tok.bos_id] + tok.encode(dataset.format_prompt("Sort the digits.", "3 1 2"))
    assert ids == prompt + tok.encode("1 2 3") + [tok.eos_id]
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert dataset.encode_example(tok, "Sort the digits.", "3 1 2", "1 2 3", len(ids)) is not None
    assert dataset.encode_example(tok, "Sort the digits.", "3 1 2", "1 2 3", len(ids) - 1) is None


# -----------------------------------------------------------------------------
# prepare scripts on fixtures in each source's format


def test_alpaca(tmp_path, tok):
    records = [
        {
            "instruction": "Give three tips for staying healthy.",
            "input": "",
            "output": "1. Eat well.\n2. Sleep.\n3. Move.",
        },
        {
            "instruction": "Translate to French.",
            "input": "Good morning, café!",
            "output": "Bonjour, café !",
        },
        {"instruction": "Say it at length.", "input": "", "output": "word " * 80},
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
    ]
    source = tmp_path / "alpaca_data.json"
    # the published file's layout
    source.write_text(json.dumps(records, indent=4, ensure_ascii=False))
    out_dir = run_prepare(
        "alpaca", tmp_path, tmp_path, "--max_len=100", "--val_fraction=0.25", "--seed=1"
    )
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    assert (
        meta["counts"]["train"]["dropped_over_long"] + meta["counts"]["val"]["dropped_over_long"]
        == 1
    )
    kept = [(r["instruction"], r["input"], r["output"]) for r in records if len(r["output"]) < 100]
    val = [
        (r["instruction"], r["input"], r["response"]) for r in dataset.read_examples(out_dir, "val")
    ]
    assert len(val) == 1 and val[0] in kept
    check_prepared(out_dir, tok, {"train": [k for k in kept if k not in val], "val": val})
    assert meta["tasks"] == ["alpaca"] and meta["max_len"] == 100


def test_dolly(tmp_path, tok):
    records = [
        {
            "instruction": "When did Virgin Australia start operating?",
            "context": "Virgin Australia commenced services on 31 August 2000.",
            "response": "On 31 August 2000.",
            "category": "closed_qa",
        },
        {
            "instruction": "Which is a species of fish? Tope or Rope",
            "context": "",
            "response": "Tope",
            "category": "classification",
        },
    ]
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", records)
    out_dir = run_prepare(
        "dolly", tmp_path, tmp_path / "databricks-dolly-15k.jsonl", "--val_fraction=0.0"
    )
    check_prepared(
        out_dir, tok, {"train": [(r["instruction"], r["context"], r["response"]) for r in records]}
    )


def test_gsm8k(tmp_path, tok):
    train = [
        {
            "question": f"Natalia sold {n} clips. How many?",
            "answer": f"She sold <<{n}*1={n}>>{n}.\n#### {n}",
        }
        for n in range(10)
    ]
    test = [
        {
            "question": "Weng earns $12 an hour. How much?",
            "answer": "12/60 = $<<12/60=0.2>>0.2\n#### 10",
        }
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    out_dir = run_prepare("gsm8k", tmp_path, tmp_path, "--val_fraction=0.2")
    val = dataset.read_examples(out_dir, "val")
    assert len(val) == 2
    check_prepared(
        out_dir,
        tok,
        {
            "train": [
                (r["question"], "", r["answer"])
                for r in train
                if r["question"] not in [v["instruction"] for v in val]
            ],
            "val": [(v["instruction"], "", v["response"]) for v in val],
            "test": [(r["question"], "", r["answer"]) for r in test],
        },
    )


MMLU_ROWS = [["What is 2 + 2?", "3", "4", "5", "6"], ['Which is "prime"?', "4", "6", "7", "9"]]


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def mmlu_expected(rows, answers, subject):
    about = f" about {subject}" if subject else ""
    return [
        (
            f"The following is a multiple choice question{about}. "
            "Answer with the letter of the correct choice.",
            question + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices)),
            answer,
        )
        for (question, *choices), answer in zip(rows, answers)
    ]


def test_mmlu_shared_layout(tmp_path, tok, capsys):
    """../shared/data/mmlu: dev/ and test/, a header row, answers 0-3. Without auxiliary_train/ the
    only training data would be dev/, eval.py's few-shot examples: refused unless asked for,
    loudly."""
    header = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    write_csv(
        tmp_path / "mmlu" / "dev" / "elementary_mathematics_dev.csv",
        [r + [a] for r, a in zip(MMLU_ROWS, "12")],
        header,
    )
    write_csv(
        tmp_path / "mmlu" / "test" / "elementary_mathematics_test.csv",
        [MMLU_ROWS[1] + ["2"]],
        header,
    )
    with pytest.raises(UserError, match="no auxiliary_train/ .* needs --train_on_dev=True"):
        run_prepare("mmlu", tmp_path, tmp_path / "mmlu", "--val_fraction=0.0")
    assert not (tmp_path / "out").exists()
    out_dir = run_prepare(
        "mmlu", tmp_path, tmp_path / "mmlu", "--val_fraction=0.0", "--train_on_dev=True"
    )
    assert "WARNING: --train_on_dev=True" in capsys.readouterr().err
    check_prepared(
        out_dir,
        tok,
        {
            "train": mmlu_expected(MMLU_ROWS, "BC", "elementary mathematics"),
            "test": mmlu_expected(MMLU_ROWS[1:], "C", "elementary mathematics"),
        },
    )


def test_mmlu_release_tar(tmp_path, tok):
    """The original data.tar: data/{auxiliary_train,dev,val,test}, no header, answers A-D."""
    data = tmp_path / "release" / "data"
    write_csv(data / "auxiliary_train" / "race.csv", [MMLU_ROWS[0] + ["B"]])
    write_csv(data / "dev" / "astronomy_dev.csv", [MMLU_ROWS[1] + ["C"]])
    write_csv(data / "val" / "astronomy_val.csv", [MMLU_ROWS[0] + ["A"]])
    write_csv(data / "test" / "astronomy_test.csv", [MMLU_ROWS[1] + ["D"]])
    with tarfile.open(tmp_path / "data.tar", "w") as tar:
        tar.add(data, arcname="data")
    # dev/ stays out of train by default
    out_dir = run_prepare("mmlu", tmp_path, tmp_path / "data.tar")
    check_prepared(
        out_dir,
        tok,
        {
            "train": mmlu_expected(MMLU_ROWS[:1], "B", ""),
            "val": mmlu_expected(MMLU_ROWS[:1], "A", "astronomy"),
            "test": mmlu_expected(MMLU_ROWS[1:], "D", "astronomy"),
        },
    )
    out_dir = run_prepare(
        "mmlu", tmp_path, tmp_path / "data.tar", "--train_on_dev=True", "--overwrite=True"
    )
    check_prepared(
        out_dir,
        tok,
        {
            "train": mmlu_expected(MMLU_ROWS[:1], "B", "")
            + mmlu_expected(MMLU_ROWS[1:], "C", "astronomy")
        },
    )


# -----------------------------------------------------------------------------
# malformed input stops with one line naming the file and line

GOOD = '{"question": "q", "answer": "a\\n#### 1"}\n'
MALFORMED = [
    (
        "gsm8k",
        "train.jsonl",
        GOOD + '{"question": "q", "answer": \n',
        "train.jsonl:2: not valid JSON",
    ),
    (
        "gsm8k",
        "train.jsonl",
        GOOD + GOOD + '{"question": "q"}\n',
        "train.jsonl:3: missing field 'answer'",
    ),
    (
        "gsm8k",
        "train.jsonl",
        GOOD + '{"question": 7, "answer": "a"}\n',
        "train.jsonl:2: field 'question': expected a string",
    ),
    ("gsm8k", "train.jsonl", "\n", "train.jsonl: empty file"),
    (
        "dolly",
        "d.jsonl",
        '{"instruction": "i", "response": "r"}\n',
        "d.jsonl:1: missing field 'context'",
    ),
    (
        "alpaca",
        "a.json",
        '[\n  {"instruction": "i", "input": "", "output": "o"},\n'
        '  {"instruction": "i",\n   "input": ""}\n]\n',
        "a.json: record [1]: missing field 'output'",
    ),
    (
        "alpaca",
        "a.json",
        '[\n  {"instruction": "i", "input": "", "output": "o"}\n  {"instruction": "j"}\n]',
        "a.json:3: not valid JSON",
    ),
    ("alpaca", "a.json", "", "a.json: empty file"),
    ("alpaca", "a.json", "[]", "a.json: empty file"),
    ("mmlu", "dev/x_dev.csv", "q,a,b,c,d,A\nq,a,b,c,B\n", "x_dev.csv:2: expected 6 columns"),
    (
        "mmlu",
        "dev/x_dev.csv",
        'q,a,b,c,d,A\n"two\nlines",a,b,c,d,E\n',
        "x_dev.csv:2: answer: expected 0-3 or A-D, got 'E'",
    ),
]


@pytest.mark.parametrize("name,file_name,text,message", MALFORMED)
def test_malformed_input_stops(tmp_path, name, file_name, text, message):
    path = tmp_path / "src" / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    source = tmp_path / "src" if name == "mmlu" else path
    with pytest.raises(
        UserError,
        match="^" + str(path.parent if name == "mmlu" else tmp_path / "src").replace("\\", "\\\\"),
    ) as e:
        run_prepare(name, tmp_path, source, *["--train_on_dev=True"] * (name == "mmlu"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_error_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with open(path, "a") as f:
        f.write("{not json}\n")
    result = python(
        [
            sys.executable,
            os.path.join(ROOT, "data", "gsm8k", "prepare.py"),
            f"--source={path}",
            f"--tokenizer={TOKENIZER}",
            f"--out_dir={tmp_path / 'out'}",
        ]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:2: not valid JSON: "
        "Expecting property name enclosed in double quotes (column 2)"
    ]
    assert not (tmp_path / "out" / "meta.json").exists()


def test_load_dataset_errors(tmp_path, tok):
    with pytest.raises(UserError, match="meta.json: no such file"):
        dataset.PreparedSplit(str(tmp_path), "train")
    sources.write_dataset(
        str(tmp_path),
        {"train": [("t", [1, 5, 2], [0, 1, 1])]},
        dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2),
    )
    with pytest.raises(UserError, match=r"val_tokens.npy: no such file \(splits in .*: train\)"):
        dataset.PreparedSplit(str(tmp_path), "val")
    data = dataset.PreparedSplit(str(tmp_path), "train")
    assert len(data) == 1 and data.example(0)[0].tolist() == [1, 5, 2] and data.tasks == ["t"]


def np_save(path, array):
    np.save(path, array, allow_pickle=True)


# a prepared split damaged in one way -> the file named and what was expected
CORRUPT = [
    (
        "train_tokens.npy",
        lambda p: p.write_bytes(p.read_bytes()[:-3]),
        "train_tokens.npy: not a readable .npy",
    ),
    (
        "train_tokens.npy",
        lambda p: p.write_bytes(p.read_bytes()[:40]),
        "train_tokens.npy: not a readable .npy",
    ),
    (
        "train_task.npy",
        lambda p: np_save(p, np.array([{"a": 1}], dtype=object)),
        "train_task.npy: not a readable .npy",
    ),
    (
        "train_tokens.npy",
        lambda p: np_save(p, np.array([1, 5, 2, 1, 6, 768, 2], dtype=np.uint16)),
        "token ids: expected < vocab_size 768",
    ),
    (
        "train_offsets.npy",
        lambda p: np_save(p, np.array([1, 3, 7])),
        "train_offsets.npy: offsets: expected 0 first",
    ),
    ("train_offsets.npy", lambda p: np_save(p, np.array([0, 8, 7])), "train_offsets.npy: offsets"),
    ("train_offsets.npy", lambda p: np_save(p, np.array([0, 1, 7])), "at least 2 tokens"),
    ("train_offsets.npy", lambda p: np_save(p, np.array([0, 3, 6])), "arrays disagree"),
    (
        "train_offsets.npy",
        lambda p: np_save(p, np.array([0.0, 3.0, 7.0])),
        "expected a 1-d integer array, got float64",
    ),
    (
        "train_mask.npy",
        lambda p: np_save(p, np.array([0, 1, 2, 0, 0, 1, 1], dtype=np.uint8)),
        "train_mask.npy: mask: expected only 0 and 1",
    ),
    (
        "train_mask.npy",
        lambda p: np_save(p, np.zeros((2, 3), dtype=np.uint8)),
        "expected a 1-d integer array",
    ),
    (
        "train_task.npy",
        lambda p: np_save(p, np.array([0, 2], dtype=np.uint16)),
        "train_task.npy: task ids: expected < 2",
    ),
    (
        "meta.json",
        lambda p: p.write_text(p.read_text().replace('"vocab_size": 768', '"vocab_size": "768"')),
        "meta.json: vocab_size",
    ),
    (
        "meta.json",
        lambda p: p.write_text(p.read_text().replace('"bos_id": 1', '"bos_id": null')),
        "meta.json: bos_id",
    ),
    (
        "meta.json",
        lambda p: p.write_text(p.read_text().replace('"eos_id": 2', '"eos_id": 2.0')),
        "meta.json: eos_id",
    ),
    (
        "meta.json",
        lambda p: p.write_text(json.dumps(dict(json.loads(p.read_text()), tasks="a"))),
        "meta.json: tasks",
    ),
    ("meta.json", lambda p: p.write_text("[1]"), "meta.json: format"),
]


@pytest.mark.parametrize(
    "name,damage,message", CORRUPT, ids=[f"{n}:{m[:30]}" for n, _, m in CORRUPT]
)
def test_damaged_dataset_is_one_error_naming_the_file(tmp_path, tok, name, damage, message):
    sources.write_dataset(
        str(tmp_path),
        {"train": [("a", [1, 5, 2], [0, 1, 1]), ("b", [1, 6, 7, 2], [0, 0, 1, 1])]},
        dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2),
    )
    assert len(dataset.PreparedSplit(str(tmp_path), "train")) == 2  # intact, it loads
    damage(tmp_path / name)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        dataset.PreparedSplit(str(tmp_path), "train")
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the embedded task suite

SMALL = ["--n_train=30", "--n_val=5", "--n_test=10", "--n_documents=60", "--vocab_size=400"]


def test_generator_is_deterministic_and_splits_do_not_overlap(tmp_path):
    generate = load_script("tasks")

    def run(*extra):
        generate.main([f"--out_dir={tmp_path}", *SMALL, *extra])
        return {
            os.path.relpath(os.path.join(d, f), tmp_path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(tmp_path)
            for f in files
        }

    first = run()
    assert {
        "tiny_base/tokenizer.model",
        "tasks/test_tokens.npy",
        "tasks_corpus/train_tokens.npy",
    } <= set(first)
    with pytest.raises(UserError, match="holds a prepared dataset .*--overwrite=True"):
        run()  # an earlier run's files are replaced only when asked
    assert run("--overwrite=True") == first  # same seed, same bytes (the tokenizer included)

    out = str(tmp_path / "tasks")
    seen = {}
    for split in ("train", "val", "test"):
        for r in dataset.read_examples(out, split):
            # no input in two splits
            assert seen.setdefault((r["task"], r["instruction"], r["input"]), split) == split
    assert dataset.read_meta(out)["tasks"] == list(generate.SUITE)
    corpus = dataset.PreparedSplit(str(tmp_path / "tasks_corpus"), "train")
    text = load_tokenizer(str(tmp_path / "tiny_base" / "tokenizer.model")).decode(
        corpus.tokens.tolist()
    )
    assert "###" not in text and "Instruction" not in text and "Response" not in text
    assert corpus.mask.sum() == len(corpus.tokens) - len(corpus)  # every token but BOS is a target


def test_generator_answers_are_right():
    generate = load_script("tasks")

    def lookup(text):
        pairs, key = text.split(" ; ")
        return dict(zip(pairs.split()[::2], pairs.split()[1::2]))[key]

    answer = {
        "add": lambda s: str(sum(map(int, s.split(" and ")))),
        "bigger": lambda s: str(max(map(int, s.split(" and ")))),
        "parity": lambda s: ["even", "odd"][sum(map(int, s)) % 2],  # of the digit sum
        "reverse": lambda s: " ".join(s.split()[::-1]),
        "sort": lambda s: " ".join(sorted(s.split())),
        "lookup": lookup,
        "count": lambda s: str(s.split(" ; ")[0].split().count(s.split(" ; ")[1])),
    }
    # the corpus-only tasks too
    splits = generate.task_splits(7, 20, 5, 5, tasks=list(generate.TASKS))
    assert set(answer) == set(generate.TASKS)
    for r in splits["train"] + splits["val"] + splits["test"]:
        assert answer[r["task"]](r["input"]) == r["response"], r


def test_committed_suite_matches_generator(tok):
    """data/tasks/ is what `python data/tasks/generate.py` writes with its defaults."""
    generate = load_script("tasks")
    splits = generate.task_splits(generate.seed, generate.n_train, generate.n_val, generate.n_test)
    out = os.path.join(ROOT, "data", "tasks")
    for split, records in splits.items():
        assert dataset.read_examples(out, split) == records
    test = dataset.PreparedSplit(out, "test")
    for i in range(0, len(test), 97):
        ids, mask, _ = test.example(i)
        assert tok.decode(ids[mask == 1][:-1]) == splits["test"][i]["response"]
    assert max(test.lengths) < 64
