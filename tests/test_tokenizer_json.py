"""tokenizer.json checkpoints and the base's chat format, against transformers: a byte-level BPE
tokenizer.json trained here with `tokenizers` gives AutoTokenizer's ids, text, BOS, EOS and pad; the
chat prompt is apply_chat_template's token for token for ChatML, Llama 3's and Mistral's templates
(written here from their published form); tokenizer folders are found where the layouts keep them;
broken tokenizer files are one line naming the file."""

import json
import os
import shutil

import pytest

import chat
from tokenizer import find_tokenizer, load_tokenizer
from util import UserError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<pad>",
]
CORPUS = [
    "Once upon a time there was a little model that learned to add numbers.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Café, naïve, déjà vu, Ærøskøbing. 東京は日本の首都です。你好，世界！",
    "Emoji: 🙂🚀👍🏽 and tabs\tand    spaces\n\n\nnew lines",
    "Sort the digits from small to large. Which number is bigger? 597 and 853",
] * 30
TEXTS = [
    "hello world",
    "Sort the digits from small to large.\n\n5 9 3 0 3",
    "déjà vu à Ærøskøbing, naïve café",
    "東京は日本の首都です。你好，世界！",
    "rocket 🚀, thumbs 👍🏽, a face 🙂",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "runs   of    spaces\n\n\n\nand\t\ttabs  \n  ",
    "special <|eot_id|> in <|im_start|>text[INST] too</s><|begin_of_text|>",
    "",
]

# the published chat templates (ChatML; Meta-Llama-3-8B-Instruct's; Mistral-7B-Instruct-v0.3's)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must \
alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception \
of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
EOS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "<|end_of_text|>"}
SYSTEM = {"role": "system", "content": "You are terse. Answer in digits."}
TURNS = [
    {"role": "user", "content": "Which number is bigger?\n\n597 and 853"},
    {"role": "assistant", "content": "853"},
    {"role": "user", "content": "Sort: 5 9 3 — déjà 東京 🙂"},
    {"role": "assistant", "content": "3 5 9"},
]
CONVERSATIONS = {
    "single": TURNS[:2],
    "single+system": [SYSTEM] + TURNS[:2],
    "multi": TURNS,
    "multi+system": [SYSTEM] + TURNS,
}


def write_tokenizer_json(folder, bos=True, template=None, eos="<|end_of_text|>", stop=None):
    """A byte-level BPE tokenizer.json trained on CORPUS, its tokenizer_config.json (and
    generation_config.json when stop is given); the post-processor adds BOS when bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(folder, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 0)],
        )
    tk.save(os.path.join(folder, "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|begin_of_text|>",
        eos_token=eos,
        pad_token="<pad>",
        add_bos_token=bos,
    )
    if template:
        config["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if stop:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [tk.token_to_id(t) for t in stop]}, f)
    return str(folder)


def write_tiktoken(path, merges=(b"he", b"ll", b"hell", b"hello")):
    """A tiktoken file as Meta's Llama 3 tokenizer.model: every byte, then merges; -> the ranks."""
    import base64

    ranks = {t: r for r, t in enumerate([bytes([b]) for b in range(256)] + list(merges))}
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ranks


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    w = tmp_path_factory.mktemp("tokjson")
    return {
        "bos": write_tokenizer_json(w / "bos", stop=["<|end_of_text|>", "<|eot_id|>"]),
        "nobos": write_tokenizer_json(w / "nobos", bos=False),
        **{k: write_tokenizer_json(w / k, template=t, eos=EOS[k]) for k, t in TEMPLATES.items()},
    }


@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_ids_text_and_special_tokens_are_auto_tokenizers(folders, which):
    theirs = transformers.AutoTokenizer.from_pretrained(folders[which])
    ours = load_tokenizer(folders[which])
    assert ours.kind == "json" and ours.add_bos == (which == "bos")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text, bos=True) == ids, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ours.encode(text)) == text


def test_stop_tokens_come_from_generation_config(folders):
    tok = load_tokenizer(folders["bos"])
    theirs = transformers.GenerationConfig.from_pretrained(folders["bos"])
    assert tok.stop_ids == set(theirs.eos_token_id)
    assert tok.stop_ids == {tok.eos_id, tok.tk.token_to_id("<|eot_id|>")}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_prompt_is_apply_chat_templates(folders, name, conversation):
    """The generation prompt of every turn, and the whole conversation's text, are
    apply_chat_template's; the targets are exactly the assistant turns with their end."""
    messages = CONVERSATIONS[conversation]
    theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
    tok = load_tokenizer(folders[name])
    template, where = chat.base_template(folders[name])
    assert template == TEMPLATES[name] and where.endswith("tokenizer_config.json")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            expected = theirs.apply_chat_template(
                messages[:i], add_generation_prompt=True, return_dict=False
            )
            assert chat.prompt_ids(template, where, tok, messages[:i]) == list(expected)
    if name == "mistral" and "system" in conversation:
        # its template writes the system prompt only into a conversation that ends with a user
        # turn: no conversation text holds the prompt each turn was answered from
        with pytest.raises(UserError, match="chat template: no place for the assistant's turn"):
            chat.encode_conversation(template, where, tok, messages, 10_000)
        return
    whole = theirs.apply_chat_template(messages, tokenize=False)
    assert chat.render(template, where, tok, messages, False) == whole
    ids, mask = chat.encode_conversation(template, where, tok, messages, 10_000)
    assert tok.decode(ids) == whole
    targets = tok.decode([t for t, m in zip(ids, mask) if m])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    ends = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "<|end_of_text|>"}
    lead = " " if name == "mistral" else ""
    assert targets == "".join(lead + a + ends[name] for a in answers)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_prompt_on_a_sentencepiece_tokenizer_is_apply_chat_templates(tmp_path, name):
    """A tokenizer.model (LLaMA 2's and Mistral's settings) in the chat format: the template's <s>
    and </s> are the control tokens, and the text after them has no "▁" put before it, as in
    transformers' LlamaTokenizer."""
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model with it")
    import sentencepiece as spm

    import checkpoint

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # LLaMA's: the text as it is, newlines and runs of spaces included
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    checkpoint.write_tokenizer_files(str(tmp_path), str(tmp_path / "tokenizer.model"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATES[name]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    template, where = chat.base_template(str(tmp_path))
    for messages in CONVERSATIONS.values():
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                expected = theirs.apply_chat_template(
                    messages[:i], add_generation_prompt=True, return_dict=False
                )
                assert chat.prompt_ids(template, where, tok, messages[:i]) == list(expected)


def test_bad_templates_are_one_line(folders, tmp_path):
    tok = load_tokenizer(folders["chatml"])
    conv = CONVERSATIONS["single"]
    broken = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(UserError, match=r"^t.jinja: chat template: TemplateSyntaxError"):
        chat.encode_conversation(broken, "t.jinja", tok, conv, 100)
    with pytest.raises(UserError, match="roles must alternate"):
        chat.encode_conversation(MISTRAL, "t.jinja", tok, conv + conv[1:], 100)
    # a template that writes only the user turns has no place for the assistant's
    no_assistant = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    with pytest.raises(UserError, match=r"^t.jinja: chat template: no place for the assistant"):
        chat.encode_conversation(no_assistant, "t.jinja", tok, conv, 100)
    with pytest.raises(UserError, match="no chat template"):
        chat.base_template(folders["bos"])


def test_tokenizer_is_found_where_each_layout_keeps_it(folders, tmp_path, capsys):
    """tokenizer.model, then tokenizer.json, then original/tokenizer.model (Llama 3's HF layout);
    one line says which when there are several; none names --tokenizer."""
    from conftest import train_sentencepiece

    root = tmp_path / "llama3"
    write_tiktoken(root / "original" / "tokenizer.model")
    tok = load_tokenizer(str(root))
    assert tok.kind == "tiktoken" and tok.path == str(root / "original" / "tokenizer.model")
    assert tok.encode("hello") == [259]
    assert capsys.readouterr().err == ""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(folders["bos"], name), root)
    assert load_tokenizer(str(root)).kind == "json"
    assert "using tokenizer.json (also there: original/tokenizer.model)" in capsys.readouterr().err
    train_sentencepiece(root / "tokenizer.model")
    assert load_tokenizer(str(root)).kind == "sentencepiece"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no tokenizer found .*; pass --tokenizer=FILE"):
        find_tokenizer(str(tmp_path / "empty"))


def test_tiktoken_file_is_read_by_us_and_its_ranks_handed_to_tiktoken(tmp_path):
    """Our ranks give tiktoken's ids (the reference: an Encoding of the ranks written); a file
    replaced at the same path is read again: no cache keyed by the path stands in between."""
    tiktoken = pytest.importorskip("tiktoken")
    import tokenizer

    path = str(tmp_path / "tokenizer.model")
    ranks = write_tiktoken(path)
    tok = load_tokenizer(path)
    ref = tiktoken.Encoding(
        name="ref",
        pat_str=tokenizer._LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=tok.specials,
    )
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, disallowed_special=()), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hello") == [ranks[b"hello"]]
    write_tiktoken(path, merges=(b"he",))
    assert load_tokenizer(path).encode("hello") == [256, ranks[b"l"], ranks[b"l"], ranks[b"o"]]


def test_broken_tokenizer_files_are_one_line_naming_the_file(folders, tmp_path):
    good = open(os.path.join(folders["bos"], "tokenizer.json"), "rb").read()
    cases = {
        "truncated": good[: len(good) // 2],
        "not-json": b"\x00\x01 garbage",
        # merges naming tokens the vocabulary lacks: the library refuses (or panics on) it
        "bad-merges": good.replace(b'"merges": [', b'"merges": [["zzq", "qzz"], ', 1),
        # a normalizer the library panics on (PanicException, not an Exception)
        "panic": good.replace(
            b'"normalizer": null',
            b'"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}',
        ),
    }
    for name, data in cases.items():
        path = tmp_path / name / "tokenizer.json"
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(UserError, match=f"^{path}: not a tokenizer.json the tokenizers"):
            load_tokenizer(str(path.parent))
    # a tiktoken file with a line that is not `base64 rank`
    bad = tmp_path / "tiktoken" / "tokenizer.model"
    bad.parent.mkdir()
    bad.write_text("YQ== 0\nYg== 1\nnot a rank line\n")
    with pytest.raises(UserError, match=rf"^{bad}:3: expected 'base64 rank'"):
        load_tokenizer(str(bad))
    bad.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(UserError, match=rf"^{bad}: ranks: expected 0..1"):
        load_tokenizer(str(bad))
    # not a regular file: a device is never read
    dev = tmp_path / "dev" / "tokenizer.model"
    dev.parent.mkdir()
    os.symlink("/dev/zero", dev)
    with pytest.raises(UserError, match=rf"^{dev}: not a regular file"):
        load_tokenizer(str(dev.parent))


# -----------------------------------------------------------------------------
# a random-weight LLaMA in the HF layout whose only tokenizer is a tokenizer.json, through every
# script, and transformers + PEFT on the export


def random_hf_llama(folder, vocab_size):
    import torch

    import checkpoint
    import llama

    torch.manual_seed(0)
    config = llama.LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        vocab_size=vocab_size,
        max_seq_len=128,
        tie_embeddings=True,
    )
    model = llama.Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # large enough that the greedy text varies with the prompt
    checkpoint.save_hf_checkpoint(model, str(folder), config=config)
    return str(folder)


def cli(script, *args):
    import sys

    from conftest import ROOT, python

    return python([sys.executable, os.path.join(ROOT, script), *args], timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random-weight base whose only tokenizer is a tokenizer.json with a ChatML template, data
    prepared with --template=chat (Alpaca-style and `messages` records), a LoRA trained on it."""
    tmp_path = tmp_path_factory.mktemp("trained")
    base = tmp_path / "base"
    tok_dir = write_tokenizer_json(
        tmp_path / "tok", template=CHATML, eos="<|im_end|>", stop=["<|im_end|>", "<|end_of_text|>"]
    )
    n = load_tokenizer(tok_dir).vocab_size
    random_hf_llama(base, vocab_size=n + 48)  # an embedding padded past the tokenizer's ids
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), base)
    assert not (base / "tokenizer.model").exists()
    records = [
        {"instruction": "Sort the digits.", "input": f"{i} 3 1", "output": f"1 3 {i}"}
        for i in range(6)
    ] + [{"messages": [SYSTEM] + TURNS}] * 4
    (tmp_path / "src.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data, out = tmp_path / "data", tmp_path / "out"
    p = cli(
        "data/alpaca/prepare.py",
        f"--tokenizer={base}",
        "--template=chat",
        f"--source={tmp_path / 'src.jsonl'}",
        f"--out_dir={data}",
        "--max_len=128",
        "--val_fraction=0.2",
    )
    assert p.returncode == 0, p.stderr
    train = [f"--ckpt_dir={base}", f"--datasets={data}", f"--out_dir={out}", "--finetune=lora"]
    train += ["--lora_rank=4", "--batch_size=2", "--max_iters=4", "--learning_rate=3e-2"]
    train += ["--warmup_iters=1", "--eval_examples=0", "--exact_match_examples=0", "--threads=1"]
    p = cli("train.py", *train)
    assert p.returncode == 0, p.stderr
    return dict(base=base, data=data, adapter=str(out / "adapter.safetensors"), tmp=tmp_path)


def test_chat_data_records_the_template_and_targets_the_answers(trained):
    import dataset

    meta = json.loads((trained["data"] / "meta.json").read_text())
    assert meta["template"] == "chat" and meta["chat_template"] == CHATML
    tok = load_tokenizer(str(trained["base"]))
    split = dataset.PreparedSplit(str(trained["data"]), "train")
    raw = dataset.read_examples(str(trained["data"]), "train")
    for i, record in enumerate(raw):
        ids, mask, _ = split.example(i)
        answers = [m["content"] for m in chat.as_messages(record) if m["role"] == "assistant"]
        targets = tok.decode([t for t, m in zip(ids, mask) if m])
        assert targets == "".join(a + "<|im_end|>\n" for a in answers)
    # data of another format in the same run, or evaluated in another format: one line
    other = trained["tmp"] / "other"
    shutil.copytree(trained["data"], other)
    (other / "meta.json").write_text(json.dumps(dict(meta, template="alpaca")))
    with pytest.raises(UserError, match="prepared in another format than"):
        dataset.data_format([str(trained["data"]), str(other)])
    import eval as evaluate

    with pytest.raises(UserError, match="was prepared with --template=chat"):
        evaluate.main(
            [f"--ckpt_dir={trained['base']}", f"--data={trained['data']}", "--template=alpaca"]
        )


def test_tokenizer_json_base_through_generate_export_and_peft(trained):
    import torch

    peft = pytest.importorskip("peft")
    base, data, adapter, tmp_path = (
        trained["base"],
        trained["data"],
        trained["adapter"],
        trained["tmp"],
    )
    prompt = "Sort the digits.\n\n5 3 1"
    p = cli(
        "generate.py",
        f"--ckpt_dir={base}",
        f"--adapter={adapter}",
        f"--template={data}",
        f"--prompt={prompt}",
        "--max_new_tokens=12",
    )
    assert p.returncode == 0, p.stderr
    printed = p.stdout.rstrip("\n")
    peft_dir = tmp_path / "peft"
    p = cli(
        "export.py",
        f"--ckpt_dir={base}",
        f"--adapter={adapter}",
        f"--out_dir={peft_dir}",
        "--format=peft",
    )
    assert p.returncode == 0, p.stderr
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(peft_dir))
    hf_dir = tmp_path / "hf"
    p = cli("export.py", f"--ckpt_dir={base}", f"--adapter={adapter}", f"--out_dir={hf_dir}")
    assert p.returncode == 0, p.stderr
    for folder in (peft_dir, hf_dir):  # the tokenizer and the chat template came along
        assert chat.base_template(str(folder))[0] == CHATML
    # and the merged export, a base of its own, stops where the base stops
    assert load_tokenizer(str(hf_dir)).stop_ids == load_tokenizer(str(base)).stop_ids
    # transformers + PEFT on the export, prompted with apply_chat_template of its own tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(peft_dir))
    ids = theirs.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    stops = transformers.GenerationConfig.from_pretrained(str(base)).eos_token_id
    with torch.no_grad():
        gen = hf.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=theirs.pad_token_id,
        )[0].tolist()
    new = gen[len(ids) :]
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert printed == theirs.decode(list(ids) + new)
    assert printed.startswith("<|im_start|>user\nSort the digits.")


def test_llama3_layout_and_broken_tokenizers_through_generate(tmp_path, folders):
    """A Llama 3-shaped HF root (original/tokenizer.model, no tokenizer.model at the root)
    generates; a tokenizer with ids past the model's vocabulary, a device as tokenizer.model and a
    tokenizer.json the library panics on are one line naming the file."""
    root = tmp_path / "llama3"
    ranks = write_tiktoken(root / "original" / "tokenizer.model")
    random_hf_llama(root, vocab_size=len(ranks) + 256)  # + Llama 3's 256 special tokens
    p = cli("generate.py", f"--ckpt_dir={root}", "--prompt=hello", "--max_new_tokens=3")
    assert p.returncode == 0 and p.stdout.startswith("hello"), p.stderr
    small = tmp_path / "small"
    random_hf_llama(small, vocab_size=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(folders["bos"], name), small)
    p = cli("generate.py", f"--ckpt_dir={small}", "--prompt=hello", "--max_new_tokens=3")
    expected = f"error: {small}/tokenizer.json: tokenizer has 400 tokens but the model"
    assert p.returncode == 2 and p.stderr.startswith(expected), p.stderr
    assert p.stderr.count("\n") == 1
    good = open(os.path.join(small, "tokenizer.json"), "rb").read()
    (small / "tokenizer.json").write_bytes(
        good.replace(
            b'"normalizer": null',
            b'"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}',
        )
    )
    p = cli("generate.py", f"--ckpt_dir={small}", "--prompt=hello")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: {small}/tokenizer.json: not a tokenizer.json")
    os.symlink("/dev/zero", small / "tokenizer.model")
    p = cli("generate.py", f"--ckpt_dir={small}", "--prompt=hello")
    assert p.returncode == 2 and p.stderr.count("\n") == 2, p.stderr
    assert f"error: {small}/tokenizer.model: not a regular file" in p.stderr
