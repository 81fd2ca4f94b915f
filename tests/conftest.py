import atexit
import os
import subprocess
import sys

# the project is a flat set of top-level modules (nanoGPT style) and the tools beside them: make
# both importable from tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
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


_zygote = None


def python(argv, cwd=None, env=None, timeout=600):
    """subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout) for
    argv = [sys.executable, SCRIPT or -c CODE, ...], run in a fork of a process that imported torch
    already (tests/zygote.py; 1.2 s less a command). Its server's environment has one thread
    (OMP_NUM_THREADS=1: two commands run at a time) and unbuffered output (PYTHONUNBUFFERED=1: a
    command that kills itself has written what it printed). `python -m ...` (torchrun, which
    starts its workers as new interpreters anyway) is a plain subprocess."""
    if argv[1] == "-m":
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    global _zygote
    if _zygote is None:
        from zygote import Zygote

        base = {
            k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        }
        _zygote = Zygote(dict(base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), n=2)
        atexit.register(_zygote.close)
    return _zygote.run(argv, cwd=os.getcwd() if cwd is None else cwd, env=env, timeout=timeout)
