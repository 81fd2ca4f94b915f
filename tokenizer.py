"""
The tokenizer that ships beside a LLaMA checkpoint as tokenizer.model: SentencePiece (LLaMA 1/2,
Mistral) or a tiktoken BPE file (Llama 3; needs the optional package tiktoken), told apart by
content.
"""

import os
import re

from util import UserError

# Llama 3's pre-tokenizer pattern and special tokens, from Meta's llama3 tokenizer.py release
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


class Tokenizer:
    """SentencePiece (LLaMA 1/2, Mistral) or tiktoken BPE (Llama 3), chosen by the file's
    content."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                first = f.readline(200)
        except OSError as e:
            raise UserError(f"{path}: cannot read tokenizer ({e.strerror})") from None
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
            self._init_tiktoken(path)
        else:
            self._init_sentencepiece(path)

    def _init_sentencepiece(self, path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError):
            raise UserError(f"{path}: not a SentencePiece model or tiktoken file") from None
        self.kind = "sentencepiece"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = {self.eos_id}

    def _init_tiktoken(self, path):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise UserError(
                f"{path}: a Llama 3 (tiktoken) tokenizer needs the optional package "
                f"'tiktoken': pip install tiktoken"
            ) from None
        ranks = load_tiktoken_bpe(path)
        n = len(ranks)
        specials = _LLAMA3_SPECIAL + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_SPECIAL) + 2)
        ]
        special_ids = {tok: n + i for i, tok in enumerate(specials)}
        self.enc = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=_LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special_ids,
        )
        self.kind = "tiktoken"
        self.vocab_size = n + len(specials)
        self.bos_id = special_ids["<|begin_of_text|>"]
        self.eos_id = special_ids["<|end_of_text|>"]
        self.pad_id = special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, special_ids["<|eot_id|>"], special_ids["<|eom_id|>"]}

    def encode(self, text, bos=False, eos=False):
        ids = (
            self.sp.encode(text)
            if self.kind == "sentencepiece"
            else self.enc.encode(text, disallowed_special=())
        )
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.kind == "sentencepiece" else self.enc.decode(ids)


def load_tokenizer(path):
    """A tokenizer from a tokenizer.model file or a checkpoint directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.exists(path):
        raise UserError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


def check_tokenizer(tokenizer, config, ckpt_dir=""):
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{ckpt_dir} has vocab_size {config.vocab_size}"
        )
