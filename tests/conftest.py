import os
import sys

# the project is a flat set of top-level modules (nanoGPT style): make them importable from tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")

import pytest


def train_sentencepiece(path, vocab_size=64, text=None):
    """Train a small LLaMA-style SentencePiece BPE model (bos=1, eos=2) for tests; returns path."""
    import sentencepiece as spm

    lines = (
        text
        or [
            "Once upon a time there was a little model that learned to add numbers.",
            "The quick brown fox jumps over the lazy dog 0123456789 times.",
            "Sort the list: 3 1 2. Answer: 1 2 3. Reverse the word abc: cba.",
            "### Instruction:",
            "### Input:",
            "### Response:",
            "hello world, hello tests!",
        ]
        * 20
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path).removesuffix(".model"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        minloglevel=2,
    )
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=64)
