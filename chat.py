"""
The base's own chat format, the alternative to dataset.py's instruction template: the Jinja
template an Instruct checkpoint ships (chat_template.jinja, or "chat_template" in
tokenizer_config.json), rendered as transformers' apply_chat_template renders it (jinja2, an
optional package, in a sandbox: a received template runs no code) and tokenized as its text says,
special tokens included, with no BOS added (the template writes it).

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Training
targets are the assistant turns: each one's text is what the template adds for that turn to the
conversation before it (its content and the end of its turn, e.g. "<|eot_id|>"), found in the
whole conversation's text; everything else is prompt.
"""

import json
import os

from util import UserError

ROLES = ("system", "user", "assistant")


def find_template(folder):
    """-> (template text, the file it is in) of a checkpoint or tokenizer folder (Llama 3's
    original/ looks in the folder above it), or (None, None)."""
    from tokenizer import read_file, read_json

    folders = (
        [folder, os.path.dirname(folder)] if os.path.basename(folder) == "original" else [folder]
    )
    for d in folders:
        path = os.path.join(d, "chat_template.jinja")
        if os.path.lexists(path):
            return read_file(path).decode("utf-8", "replace"), path
        path = os.path.join(d, "tokenizer_config.json")
        template = read_json(path).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None:
            if not isinstance(template, str):
                raise UserError(f"{path}: chat_template: expected a string")
            return template, path
    return None, None


def base_template(tokenizer_path):
    """The chat template beside a tokenizer (a file or its folder); an error when there is none."""
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    template, where = find_template(folder)
    if template is None:
        raise UserError(
            f"{folder}: no chat template (chat_template.jinja, or chat_template in "
            f"tokenizer_config.json) for --template=chat"
        )
    return template, where


def token_text(tok, i):
    """A special token's text, as the template writes it (bos_token, eos_token)."""
    if i is None:
        return ""
    return tok.sp.id_to_piece(i) if tok.kind == "sentencepiece" else tok.decode([i])


def render(template, where, tok, messages, add_generation_prompt):
    """The conversation's text, as transformers' apply_chat_template(tokenize=False) gives it."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("--template=chat needs the optional package 'jinja2': pip install jinja2")

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=token_text(tok, tok.bos_id),
            eos_token=token_text(tok, tok.eos_id),
            pad_token=token_text(tok, tok.pad_id),
        )
    except Exception as e:  # a template is a received program: any error is the template's
        raise UserError(f"{where}: chat template: {type(e).__name__}: {e}") from None


def encode(tok, text):
    return tok.encode(text, specials=True)


def prompt_ids(template, where, tok, messages):
    """Token ids of a conversation ending in a user turn, with the assistant's turn opened: what a
    model fine-tuned in this format is given to answer."""
    return encode(tok, render(template, where, tok, messages, True))


def encode_conversation(template, where, tok, messages, max_len):
    """-> (ids, mask), mask 1 on the assistant turns; None when longer than max_len tokens."""
    whole = render(template, where, tok, messages, False)
    pieces, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, where, tok, messages[:i], True)
        turn = render(template, where, tok, messages[: i + 1], False)
        answer = turn[len(before) :] if turn.startswith(before) else ""
        start = whole.find(answer, cursor) if m["content"].strip() in answer else -1
        if not answer or start < 0:
            raise UserError(
                f"{where}: chat template: no place for the assistant's turn (message {i}): "
                f"rendering messages 0..{i} does not extend the prompt of messages 0..{i - 1}"
            )
        pieces += [(whole[cursor:start], 0), (answer, 1)]
        cursor = start + len(answer)
    pieces.append((whole[cursor:], 0))
    ids, mask = [], []
    for text, target in pieces:
        part = encode(tok, text)
        ids, mask = ids + part, mask + [target] * len(part)
    return (ids, mask) if len(ids) <= max_len else None


def check_messages(where, messages):
    """A `messages` record: an optional system turn, then user and assistant turns, ending with the
    assistant's (what is learned)."""
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok or messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: messages: expected a list of {{'role': system|user|assistant, 'content': "
            f"str}} ending with an assistant turn"
        )


def as_messages(record):
    """A record's conversation: its `messages`, or an instruction record (dataset.FIELDS) as one
    user turn (the instruction, a blank line, the input) and one assistant turn."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [dict(role="user", content=user), dict(role="assistant", content=record["response"])]
