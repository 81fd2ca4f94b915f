"""data/text/prepare.py (your own plain text for pretraining, docs/training.md's recipe) and the
prepare scripts' --help: run from any directory, val drawn at random from all sources, over-long
documents dropped and counted, every kept document exactly BOS + its tokens + EOS."""

import json
import os
import sys

import numpy as np

import dataset
from conftest import ROOT, python
from tokenizer import load_tokenizer

TOKENIZER = os.path.join(ROOT, "data", "tiny_base", "tokenizer.model")


def test_text_corpus_from_another_directory(tmp_path):
    documents = [f"alpha {i} sorts the digits" for i in range(40)] + [
        f"beta {i} adds numbers" for i in range(40)
    ]
    too_long = ["gamma " * 200, "delta " * 300]
    (tmp_path / "corpus.txt").write_text(
        "\n".join(documents[:40] + too_long + ["", *documents[40:]]) + "\n"
    )
    (tmp_path / "elsewhere").mkdir()
    p = python(
        [
            sys.executable,
            os.path.join(ROOT, "data", "text", "prepare.py"),
            "--source=../corpus.txt",
            f"--tokenizer={TOKENIZER}",
            "--out_dir=../prepared",
            "--max_len=64",
            "--val_fraction=0.25",
        ],
        cwd=tmp_path / "elsewhere",
    )
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    counts = meta["counts"]
    assert counts["train"]["dropped_over_long"] + counts["val"]["dropped_over_long"] == 2
    assert "dropped as longer than max_len=64" in p.stdout
    tok = load_tokenizer(TOKENIZER)
    seen = {}
    for split in ("train", "val"):
        s = dataset.PreparedSplit(str(tmp_path / "prepared"), split)
        for i in range(len(s)):
            ids, mask = s.example(i)[:2]
            assert (
                ids[0] == tok.bos_id
                and ids[-1] == tok.eos_id
                and list(mask) == [0] + [1] * (len(ids) - 1)
            )
            seen[tok.decode(list(ids[1:-1]))] = split
    assert sorted(seen) == sorted(documents)  # every document once, none of the over-long ones
    val = [d for d, split in seen.items() if split == "val"]
    assert (
        len(val) == 20
        and any(d.startswith("alpha") for d in val)
        and any(d.startswith("beta") for d in val)
    )
    assert not os.path.exists(tmp_path / "prepared" / "train.jsonl")  # no copy of the corpus
    assert np.load(tmp_path / "prepared" / "train_tokens.npy").dtype == np.uint16


def test_text_corpus_needs_a_source(tmp_path):
    p = python(
        [
            sys.executable,
            "data/text/prepare.py",
            f"--tokenizer={TOKENIZER}",
            f"--out_dir={tmp_path / 'x'}",
        ],
        cwd=ROOT,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --source: expected your text file (one document per line) or a folder of .txt files"
    ]


def test_prepare_help_names_the_script_and_a_relative_out_dir():
    for name in ("alpaca", "mmlu", "text"):
        p = python([sys.executable, f"data/{name}/prepare.py", "--help"], cwd=ROOT)
        assert p.returncode == 0
        assert p.stdout.startswith(f"usage: python data/{name}/prepare.py ")
        assert f"--out_dir='data/{name}'" in p.stdout


def test_gsm8k_download_survives_its_own_prepared_files(tmp_path):
    # the downloaded files (here put where the download goes) are not overwritten by the prepared
    # train.jsonl and test.jsonl: a second run without --source (replacing the first's dataset,
    # --overwrite=True) reads them again
    records = "".join(
        json.dumps(dict(question=f"{i} + 1?", answer=f"#### {i + 1}")) + "\n" for i in range(8)
    )
    for split in ("train", "test"):
        (tmp_path / f"gsm8k_{split}.jsonl").write_text(records)
    for again in (False, True):
        p = python(
            [
                sys.executable,
                "data/gsm8k/prepare.py",
                f"--tokenizer={TOKENIZER}",
                f"--out_dir={tmp_path}",
                *["--overwrite=True"] * again,
            ],
            cwd=ROOT,
        )
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "gsm8k_train.jsonl").read_text() == records
    assert json.loads((tmp_path / "meta.json").read_text())["counts"]["test"]["examples"] == 8
