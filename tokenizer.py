"""
The tokenizer that ships beside a LLaMA checkpoint, in one of three files:
    tokenizer.model   SentencePiece (LLaMA 1/2, Mistral), or Llama 3's tiktoken BPE file (needs the
                      optional package tiktoken), told apart by content
    tokenizer.json    the Hugging Face format (SmolLM, DeepSeek-R1-Distill, Llama 3 fine-tunes),
                      read by the optional package tokenizers; BOS, EOS, pad and the stop tokens as
                      transformers' AutoTokenizer and generate take them from the folder's
                      tokenizer_config.json and generation_config.json
A checkpoint folder is searched in the order of TOKENIZER_FILES (Llama 3's HF layout keeps the
tiktoken file in original/). Only regular files of a bounded size are read.
"""

import base64
import binascii
import json
import os
import re
import sys
from contextlib import contextmanager

import util
from util import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", os.path.join("original", "tokenizer.model"))
MAX_BYTES = 256 << 20  # the largest tokenizer file read (Llama 3's tokenizer.json is 9 MB)

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


def read_file(path, limit=MAX_BYTES):
    """The bytes of a tokenizer file: a regular file (a symlink is followed) of at most limit
    bytes, never a device, a FIFO or a folder, which could be read without end or block."""
    return util.read_regular(path, limit, "tokenizer file")


def read_json(path):
    """A JSON object from a tokenizer's side file ({} when there is none)."""
    if not os.path.lexists(path):
        return {}
    try:
        value = json.loads(read_file(path))
    except (ValueError, RecursionError):
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class Tokenizer:
    """encode(text, bos, eos) -> ids, decode(ids) -> text; .bos_id, .eos_id, .pad_id, .stop_ids
    (generation ends on any), .add_bos (whether bos=True puts BOS first), .vocab_size, .kind."""

    def __init__(self, path):
        self.path, self.add_bos = path, True
        data = read_file(path)
        if path.endswith(".json"):
            self._init_json(path, data)
        elif re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", data.split(b"\n", 1)[0] + b"\n"):
            self._init_tiktoken(path, data)
        else:
            self._init_sentencepiece(path, data)

    def _init_sentencepiece(self, path, data):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (OSError, RuntimeError, TypeError):
            raise UserError(f"{path}: not a SentencePiece model or tiktoken file") from None
        self.kind = "sentencepiece"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = {self.eos_id}
        # control pieces (<s>, </s>) written in a chat template's text
        self.specials = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)
        }

    def _init_tiktoken(self, path, data):
        try:
            import tiktoken
        except ImportError:
            raise UserError(
                f"{path}: a Llama 3 (tiktoken) tokenizer needs the optional package "
                f"'tiktoken': pip install tiktoken"
            ) from None
        ranks = parse_tiktoken(path, data)
        n = len(ranks)
        specials = _LLAMA3_SPECIAL + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_SPECIAL) + 2)
        ]
        self.specials = {tok: n + i for i, tok in enumerate(specials)}
        # the ranks we parsed, handed over: tiktoken's own loader would cache the file by its path
        self.enc = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=_LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.specials,
        )
        self.kind = "tiktoken"
        self.vocab_size = n + len(specials)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.pad_id = self.specials["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, self.specials["<|eot_id|>"], self.specials["<|eom_id|>"]}
        # Llama 3's HF layout: original/tokenizer.model, generation_config.json above it
        folder = os.path.dirname(path)
        if os.path.basename(folder) == "original":
            self.stop_ids |= generation_eos(os.path.dirname(folder))

    def _init_json(self, path, data):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise UserError(
                f"{path}: a tokenizer.json needs the optional package 'tokenizers': "
                f"pip install tokenizers"
            ) from None
        try:
            with silent_stderr():
                self.tk = Backend.from_str(data.decode("utf-8"))
        except BaseException as e:
            # a file the library panics on raises its PanicException, not an Exception
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            why = str(e).strip().split("\n")[0][:200]
            raise UserError(f"{path}: not a tokenizer.json the tokenizers library reads ({why})")
        folder = os.path.dirname(path)
        config = read_json(os.path.join(folder, "special_tokens_map.json"))
        config.update(read_json(os.path.join(folder, "tokenizer_config.json")))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.kind, self.vocab_size = "json", max(vocab.values(), default=-1) + 1
        self.eos_id = self._special_id(config, "eos_token", vocab)
        self.bos_id = self._special_id(config, "bos_token", vocab)
        pad = self._special_id(config, "pad_token", vocab)
        self.pad_id = self.eos_id if pad is None else pad
        # add_bos_token as tokenizer_config.json says, else as the file's post-processor does
        added = self.tk.encode("", add_special_tokens=True).ids
        self.add_bos = bool(config.get("add_bos_token", added[:1] == [self.bos_id]))
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if i is None:
                raise UserError(f"{path}: no {key} (tokenizer_config.json names none)")
        self.stop_ids = {self.eos_id} | generation_eos(folder)

    def _special_id(self, config, key, vocab):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and (not isinstance(token, str) or token not in vocab):
            raise UserError(f"{self.path}: {key} {token!r} is not a token of its vocabulary")
        return vocab.get(token)

    @property
    def bos(self):
        return [self.bos_id] if self.add_bos else []

    def encode(self, text, bos=False, eos=False, specials=False):
        """specials: the special tokens' text (<|eot_id|>, </s>) becomes their ids, as a chat
        template's text needs; a tokenizer.json always does this, as AutoTokenizer does."""
        if self.kind == "json":
            ids = self.tk.encode(text, add_special_tokens=False).ids
        elif self.kind == "tiktoken":
            ids = self.enc.encode(
                text, allowed_special="all" if specials else set(), disallowed_special=()
            )
        elif specials and self.specials:
            ids = []
            pieces = re.split(f"({'|'.join(map(re.escape, self.specials))})", text)
            for i, p in enumerate(pieces):
                ids += [self.specials[p]] if p in self.specials else self._sp_encode(p, i > 0)
        else:
            ids = self.sp.encode(text)
        return (self.bos if bos else []) + ids + ([self.eos_id] if eos else [])

    def _sp_encode(self, text, after_special):
        """SentencePiece puts "▁" before a text; transformers' LlamaTokenizer (legacy=False) does
        not after a special token: the text is encoded after <unk>, whose pieces are dropped."""
        if not after_special or not text:
            return self.sp.encode(text)
        unk = self.sp.id_to_piece(self.sp.unk_id())
        return self.sp.encode(unk + text)[len(self.sp.encode(unk)) :]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.kind == "json":
            return self.tk.decode(ids, skip_special_tokens=False)
        return self.sp.decode(ids) if self.kind == "sentencepiece" else self.enc.decode(ids)


@contextmanager
def silent_stderr():
    """Nothing written to the process's stderr (file descriptor 2) gets out: where the tokenizers
    library panics, Rust prints its own lines there before raising."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_tiktoken(path, data):
    """{token bytes: rank} of a tiktoken file: a `base64 rank` line per token, ranks 0..n-1."""
    ranks = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        match = re.fullmatch(rb"([A-Za-z0-9+/=]+) (\d{1,9})\r?", line)
        try:
            token = base64.b64decode(match.group(1), validate=True) if match else None
        except binascii.Error:
            token = None
        if token is None and line.strip():
            raise UserError(f"{path}:{number}: expected 'base64 rank', got {line[:60]!r}")
        if token is not None:
            ranks[token] = int(match.group(2))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks: expected 0..{len(ranks) - 1}, each once, one per token")
    return ranks


def generation_eos(folder):
    """The stop tokens generation_config.json lists (Llama 3 Instruct: 128001 and 128009)."""
    path = os.path.join(folder, "generation_config.json")
    ids = read_json(path).get("eos_token_id") if folder else None
    ids = [ids] if isinstance(ids, int) else ids or []
    if not all(type(i) is int and i >= 0 for i in ids):
        raise UserError(f"{path}: eos_token_id: expected a token id or a list of them")
    return set(ids)


def find_tokenizer(folder, required=True):
    """The tokenizer file of a checkpoint folder, the first of TOKENIZER_FILES it has (None when
    it has none and one is not required)."""
    found = [n for n in TOKENIZER_FILES if os.path.lexists(os.path.join(folder, n))]
    if not found and not required:
        return None
    if not found:
        raise UserError(
            f"{folder}: no tokenizer found (looked for {', '.join(TOKENIZER_FILES)}); pass "
            f"--tokenizer=FILE"
        )
    if len(found) > 1:
        print(f"{folder}: using {found[0]} (also there: {', '.join(found[1:])})", file=sys.stderr)
    return os.path.join(folder, found[0])


def load_tokenizer(path):
    """A tokenizer from a tokenizer file, or from a checkpoint folder holding one."""
    if os.path.isdir(path):
        path = find_tokenizer(path)
    if not os.path.lexists(path):
        raise UserError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


def check_tokenizer(tokenizer, config, ckpt_dir=""):
    """Every id the tokenizer gives must have an embedding row. A SentencePiece or tiktoken file
    must match the vocabulary exactly; a tokenizer.json may have fewer tokens than the embedding
    (checkpoints pad it)."""
    n, v = tokenizer.vocab_size, config.vocab_size
    if n > v or (tokenizer.kind != "json" and n != v):
        raise UserError(
            f"{tokenizer.path}: tokenizer has {n} tokens but the model {ckpt_dir} has "
            f"vocab_size {v}"
        )
