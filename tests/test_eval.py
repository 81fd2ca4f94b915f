"""eval.py: multiple-choice log-likelihoods on a model whose log-probabilities are known in closed
form, batched = one at a time, greedy exact match = a naive greedy loop, validation loss by formula,
GSM8K answer extraction, the prompt formats, the command line; and (with ../shared) choice
log-likelihoods on stories260K against transformers' LlamaForCausalLM."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
import sources
import eval as evaluate  # the project's eval.py (as a name, "eval" would hide the builtin)
import llama
from conftest import ROOT, SHARED, python
from util import UserError
import checkpoint
from generate import load_for_inference
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# a model whose next-token distribution depends only on the previous token (a bigram table), and a
# one-character-per-token tokenizer: log p(continuation | context) is a sum over table rows

V = 128  # ASCII; ids 0, 1, 2 are pad, BOS, EOS


class CharTokenizer:
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, V

    def encode(self, text, bos=False, eos=False):
        assert all(3 <= ord(c) < V for c in text)
        return ([1] if bos else []) + [ord(c) for c in text] + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 3)


class Bigram(nn.Module):
    def __init__(self, table, max_seq_len=256):
        super().__init__()
        self.table = table  # (V, V): logits of the next token given the current one
        self.config = llama.LlamaConfig(
            dim=8, n_layers=1, n_heads=1, hidden_dim=8, vocab_size=V, max_seq_len=max_seq_len
        )
        self.embed_tokens = nn.Embedding(1, 1)  # where eval.py looks for the device

    # packed rows change nothing for a model that sees one token
    def forward(
        self,
        tokens,
        start_pos=0,
        positions=None,
        key_valid=None,
        last_only=False,
        logits_at=None,
        segments=None,
        targets=None,
    ):
        logits = self.table[tokens]  # (B, T, V)
        if targets is not None:  # llama.Llama's loss path: token losses at the logits_at positions
            return F.cross_entropy(logits[logits_at], targets, reduction="none")
        return (
            logits[:, -1:] if last_only else logits[logits_at] if logits_at is not None else logits
        )

    # llama.generate's calls; a bigram needs no cache
    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        pass

    def clear_cache(self):
        pass


def bigram_logp(table, prev, nxt):
    """log softmax(table[prev])[nxt] with math only (an independent reference)."""
    row = table[prev].tolist()
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def known_table():
    # uniform except: after " " an "x" is nearly certain, and after "x" another "x"
    table = torch.zeros(V, V)
    table[ord(" "), ord("x")] = 10.0
    table[ord("x"), ord("x")] = 10.0
    return table


def test_choice_logprobs_equal_the_closed_form():
    table = known_table()
    tok = CharTokenizer()
    item = evaluate.mc_item(tok, "Q?", ["x", "xxxx", "y"], 0, "cloze")
    evaluate.score_multiple_choice(Bigram(table), [item], batch_size=2)
    # context "Question: Q?\nAnswer:", continuations " x", " xxxx", " y"
    for choice, text in enumerate([" x", " xxxx", " y"]):
        prev, expected = ord(":"), 0.0
        for c in text:
            expected += bigram_logp(table, prev, ord(c))
            prev = ord(c)
        assert item["logprobs"][choice] == pytest.approx(expected, abs=1e-5)
        assert item["n_tokens"][choice] == len(text)
    # the sum prefers the short " x" (every extra token costs a little), the per-token mean " xxxx"
    assert item["pred"] == 0 and item["pred_norm"] == 1


def test_raw_format_scores_the_text_going_on_with_the_choice(tiny_tokenizer_path):
    """--mc_format=raw (mc's default): log p(choice | question) of the plain concatenation, which a
    direct forward over the tokens of question + choice gives independently."""
    tok = load_tokenizer(tiny_tokenizer_path)
    model = tiny_llama(vocab_size=tok.vocab_size)
    context, choices = "The quick brown fox jumps over the", [" lazy dog", " hello world", "!"]
    item = evaluate.mc_item(tok, context, choices, 0, "raw")
    evaluate.score_multiple_choice(model, [item], batch_size=2)
    for choice, ours in zip(choices, item["logprobs"]):
        ids = tok.encode(context + choice, bos=True)
        n_ctx = len(tok.encode(context, bos=True))
        # this text splits cleanly at the choice
        assert ids[:n_ctx] == tok.encode(context, bos=True)
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0].double().log_softmax(-1)
        assert ours == pytest.approx(
            sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))), abs=1e-4
        )
    # no wrapper around the text
    assert tok.decode(sum(item["pairs"][1], [])) == context + choices[1]


def test_mc_file_known_answers_and_accuracy(tmp_path, monkeypatch):
    path = tmp_path / "mc.jsonl"
    records = [
        dict(question="Q1", choices=["y", "x"], answer=1),  # " x" certain
        # sum: 1, norm: 0 (wrong)
        dict(question="Q2", choices=["xxxx", "x", "yyyy"], answer=0, subject="s"),
        dict(question="Q3", choices=["z", "x"], answer=0),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = evaluate.mc_items(CharTokenizer(), str(path), "cloze")
    evaluate.score_multiple_choice(Bigram(known_table()), items, batch_size=4)
    assert [i["pred"] for i in items] == [1, 1, 1]
    assert [i["pred_norm"] for i in items] == [1, 0, 1]
    assert [i["subject"] for i in items] == ["all", "s", "all"]


def tiny_llama(vocab_size=64, seed=0, max_seq_len=128):
    torch.manual_seed(seed)
    config = llama.LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        eos_id=[2],
    )
    model = llama.Llama(config)
    model.init_weights(std=0.3)  # large weights: peaked distributions, distinct choices
    return model.eval()


def test_batched_scores_equal_one_at_a_time():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for n in range(13):  # contexts and continuations of many lengths, so batches need padding
        ctx = [1] + torch.randint(
            3, 64, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g
        ).tolist()
        cont = torch.randint(3, 64, (1 + n % 5,), generator=g).tolist()
        pairs.append((ctx, cont))
    with torch.no_grad():
        single = evaluate.continuation_logprobs(model, pairs, batch_size=1)
        batched = evaluate.continuation_logprobs(model, pairs, batch_size=5)
        # reference: one unpadded forward per pair, log-softmax by hand
        for (ctx, cont), (s, n) in zip(pairs, single):
            logits = model(torch.tensor([ctx + cont]))[0].double()
            logp = logits - logits.logsumexp(-1, keepdim=True)
            ref = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            assert s == pytest.approx(ref, abs=1e-4) and n == len(cont)
    for (s1, n1), (s2, n2) in zip(single, batched):
        assert n1 == n2 and s1 == pytest.approx(s2, abs=1e-5)

    # equal pairs score bit-equal (computed once), so ties stay ties whatever the batch size
    twice = evaluate.continuation_logprobs(model, [pairs[0], pairs[1], pairs[0]], batch_size=2)
    assert twice[0] == twice[2]


def test_too_long_context_keeps_the_newest_tokens():
    model = tiny_llama(max_seq_len=16)
    ctx, cont = [1] + list(range(3, 30)), [5, 6]
    with torch.no_grad():
        ((s, n),) = evaluate.continuation_logprobs(model, [(ctx, cont)])
        kept = (ctx + cont)[-16:]
        logp = model(torch.tensor([kept]))[0].log_softmax(-1)
        assert s == pytest.approx((logp[13, 5] + logp[14, 6]).item(), abs=1e-5)


# -----------------------------------------------------------------------------
# generation: batched KV-cache greedy decoding = a naive loop of full forward passes


def naive_greedy(model, ids, max_new_tokens, eos=2):
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_exact_match():
    assert evaluate.exact_match(" 19 ", "19") and not evaluate.exact_match("19", "190")
    # GSM8K: the final answer
    assert evaluate.exact_match("so it is 6\n#### 72", "48/2 = 24\n#### 72")
    assert not evaluate.exact_match("#### 71", "#### 72")


def test_score_exact_match_against_naive_greedy(tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    model = tiny_llama(vocab_size=tok.vocab_size)
    examples = []
    for i, (instruction, input) in enumerate(
        [
            ("Sort the list", "3 1 2"),
            ("Reverse the word", "abc"),
            ("add numbers", ""),
            ("hello", "world, hello tests"),
            ("The quick brown fox", ""),
        ]
    ):
        ids = [tok.bos_id] + tok.encode(dataset.format_prompt(instruction, input))
        truth = tok.decode(naive_greedy(model, ids, 6))
        task = "right" if i % 2 == 0 else "wrong"
        examples.append(
            dict(
                task=task,
                instruction=instruction,
                input=input,
                response=f"  {truth}\n" if task == "right" else truth + " 0",
            )
        )
    model.train()
    scores = evaluate.score_exact_match(model, tok, examples, max_new_tokens=6, batch_size=2)
    assert scores == {"right": 1.0, "wrong": 0.0}
    assert model.training  # the caller's mode is restored


# -----------------------------------------------------------------------------
# validation loss


def test_loss_table_equals_the_closed_form(tmp_path):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    tok = CharTokenizer()
    raw = [
        ("a", "add", "1 2", "3"),
        ("b", "echo", "", "hello"),
        ("a", "add", "2 2", "4 "),
        ("b", "echo", "x", "yz"),
        ("c", "copy", "q", "q"),
    ]
    dirs = [str(tmp_path / "one"), str(tmp_path / "two")]  # task "b" in both: one row
    examples = [(task, *dataset.encode_example(tok, i, x, r, 100)) for task, i, x, r in raw]
    for d, part in zip(dirs, (examples[:3], examples[3:])):
        sources.write_dataset(
            d, {"val": part}, dict(vocab_size=V, bos_id=1, eos_id=2, tokenizer="chars", max_len=100)
        )

    def expected(chosen):
        sums = {}
        for task, ids, mask in chosen:
            loss = sum(
                -bigram_logp(table, ids[t - 1], ids[t]) for t in range(1, len(ids)) if mask[t]
            )
            for name in (task, "all"):
                s, k = sums.get(name, (0.0, 0))
                sums[name] = (s + loss, k + sum(mask))
        return sums

    rows = evaluate.loss_table(Bigram(table), dirs, "val", batch_size=3)
    assert list(rows) == ["a", "b", "c", "all"]
    for name, (s, k) in expected(examples).items():
        assert rows[name]["tokens"] == k and rows[name]["loss"] == pytest.approx(s / k, rel=1e-5)
        assert rows[name]["perplexity"] == pytest.approx(math.exp(s / k), rel=1e-5)
    # limit: the first example of each task (b's first is in the first dataset)
    first = evaluate.loss_table(Bigram(table), dirs, "val", limit=1)
    assert first["all"]["tokens"] == expected([examples[0], examples[1], examples[4]])["all"][1]


# -----------------------------------------------------------------------------
# GSM8K answers


@pytest.mark.parametrize(
    "text, answer",
    [
        (
            "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
            "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18",
            "18",
        ),
        (
            "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000",
            "70000",
        ),
        ("#### 1,234,567", "1234567"),
        ("#### -5", "-5"),
        ("The temperature fell to -5 degrees.", "-5"),
        ("pages 3-4", "4"),  # a hyphen between numbers is no minus sign
        ("The answer is $18.00.", "18"),  # trailing zeros and the sentence's full stop
        ("It costs 3.50 dollars", "3.5"),
        ("half is .5", "0.5"),
        ("agent 007 reporting", "7"),
        ("1,2,3 and then 4", "4"),  # commas that are no thousands separators
        ("a list 1,2,3", "3"),
        ("10% of 250 is 25", "25"),
        ("first 12 then #### 7 more 9", "7"),  # after "####" the first number counts
        ("#### 3\n#### 4", "4"),  # the last "####"
        ("#### no number", None),
        ("no digits at all", None),
        ("", None),
        ("-0 is 0? #### -0", "0"),
    ],
)
def test_extract_gsm8k_answer(text, answer):
    assert evaluate.extract_gsm8k_answer(text) == answer


def test_gsm8k_details_compare_final_numbers():
    tok = CharTokenizer()
    # a model that always says "7": after anything, "7" is certain; after "7", EOS
    table = torch.zeros(V, V)
    table[:, ord("7")] = 20.0
    table[ord("7"), :] = 0.0
    table[ord("7"), 2] = 20.0
    records = [
        dict(question="How many?", answer="3+4=<<3+4=7>>7\n#### 7"),
        dict(question="Again?", answer="#### 8"),
    ]
    details = evaluate.gsm8k_details(Bigram(table), tok, records, max_new_tokens=5, batch_size=2)
    assert [d["pred"] for d in details] == ["7", "7"]
    assert [d["correct"] for d in details] == [True, False]


# -----------------------------------------------------------------------------
# prompt formats


def test_instruction_format_is_what_training_saw(tmp_path, tiny_tokenizer_path):
    # data/mmlu/prepare.py writes the training examples; eval's "instruction" format must score
    # exactly the tokens of the example's prompt and its letter
    sys.path.insert(0, os.path.join(ROOT, "data", "mmlu"))
    try:
        import prepare as mmlu_prepare
    finally:
        sys.path.pop(0)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "world_religions_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nWhat is 1 + 1?,1,2,3,4,1\n"
    )
    (record,) = mmlu_prepare.read_folder(str(tmp_path / "test"), "test")
    tok = load_tokenizer(tiny_tokenizer_path)
    ids, mask = dataset.encode_example(
        tok, record["instruction"], record["input"], record["response"], 1000
    )
    item = evaluate.mc_item(
        tok, "What is 1 + 1?", ["1", "2", "3", "4"], 1, "instruction", subject="world_religions"
    )
    ctx, cont = item["pairs"][1]
    assert ctx + cont + [tok.eos_id] == ids


def write_mmlu(root):
    for split, rows in (("dev", [("d1", "0"), ("d2", "C")]), ("test", [("t1", "2"), ("t2", "B")])):
        os.makedirs(root / split, exist_ok=True)
        text = "question,choice0,choice1,choice2,choice3,answer\n" + "".join(
            f"{q},a{q},b{q},c{q},d{q},{a}\n" for q, a in rows
        )
        (root / split / f"high_school_geography_{split}.csv").write_text(text)


def test_mmlu_letter_format_with_shots(tmp_path):
    write_mmlu(tmp_path)
    items = evaluate.mmlu_items(CharTokenizer(), str(tmp_path), "test", shots=2, mc_format="letter")
    assert [(i["subject"], i["answer"]) for i in items] == [
        ("high_school_geography", 2),
        ("high_school_geography", 1),
    ]
    ctx, cont = items[0]["pairs"][2]
    assert CharTokenizer().decode(ctx) == (
        "The following are multiple choice questions (with answers) about high school "
        "geography.\n\n"
        "d1\nA. ad1\nB. bd1\nC. cd1\nD. dd1\nAnswer: A\n\n"
        "d2\nA. ad2\nB. bd2\nC. cd2\nD. dd2\nAnswer: C\n\n"
        "t1\nA. at1\nB. bt1\nC. ct1\nD. dt1\nAnswer:"
    )
    assert CharTokenizer().decode(cont) == " C"
    with pytest.raises(UserError, match="--subjects: nope"):
        evaluate.mmlu_items(CharTokenizer(), str(tmp_path), "test", subjects="nope")
    with pytest.raises(UserError, match="--shots"):
        evaluate.mmlu_items(CharTokenizer(), str(tmp_path), "test", shots=6)


def test_encode_pair_splits_where_the_context_tokens_end(tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    ctx, cont = evaluate.encode_pair(tok, "Answer:", " A")
    assert ctx[0] == tok.bos_id and ctx + cont == tok.encode("Answer: A", bos=True)
    assert tok.decode(cont).strip() == "A"


# -----------------------------------------------------------------------------
# the command line, on a small random checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_path):
    out = tmp_path_factory.mktemp("ckpt")
    model = tiny_llama(vocab_size=load_tokenizer(tiny_tokenizer_path).vocab_size, max_seq_len=256)
    checkpoint.save_hf_checkpoint(model, str(out), tokenizer_path=tiny_tokenizer_path)
    return str(out)


def test_cli_mc_and_mmlu_write_json(ckpt, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        json.dumps(dict(question="hello", choices=["world", "tests", "fox"], answer=1)) + "\n"
    )
    out = tmp_path / "r.json"
    result = evaluate.main([f"--ckpt_dir={ckpt}", "--task=mc", f"--data={path}", f"--out={out}"])
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == result["accuracy"] in (0.0, 1.0) and saved["n"] == 1
    assert len(saved["details"][0]["logprobs"]) == 3
    write_mmlu(tmp_path / "mmlu")
    again = [
        evaluate.main(
            [
                f"--ckpt_dir={ckpt}",
                "--task=mmlu",
                f"--data={tmp_path / 'mmlu'}",
                "--shots=1",
                f"--batch_size={b}",
            ]
        )
        for b in (1, 3)
    ]
    assert again[0]["n"] == again[1]["n"] == 2
    for a, b in zip(again[0]["details"], again[1]["details"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        best = sorted(a["logprobs"])
        if best[-1] - best[-2] > 1e-4 or best[-1] == best[-2]:  # no float near-tie: same prediction
            assert a["pred"] == b["pred"]


def test_cli_exact_match_and_loss(ckpt, tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    raw = [
        dict(task="sort", instruction="Sort the list", input="3 1 2", response="1 2 3"),
        dict(task="sort", instruction="Sort the list", input="2 1", response="1 2"),
        dict(task="reverse", instruction="Reverse the word", input="abc", response="cba"),
    ]
    splits = {
        "test": [
            (
                r["task"],
                *dataset.encode_example(tok, r["instruction"], r["input"], r["response"], 200),
            )
            for r in raw
        ]
    }
    sources.write_dataset(
        str(tmp_path),
        splits,
        dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2, tokenizer="t", max_len=200),
    )
    sources.write_jsonl(str(tmp_path / "test.jsonl"), raw)
    em = evaluate.main(
        [f"--ckpt_dir={ckpt}", "--task=exact_match", f"--data={tmp_path}", "--max_new_tokens=4"]
    )
    assert em["per_task"]["sort"]["n"] == 2 and em["per_task"]["reverse"]["n"] == 1
    assert em["accuracy"] == 0.0  # a random model
    assert (
        evaluate.main(
            [f"--ckpt_dir={ckpt}", f"--data={tmp_path}", "--limit=1", "--max_new_tokens=1"]
        )["n"]
        == 2
    )
    loss = evaluate.main(
        [f"--ckpt_dir={ckpt}", "--task=loss", f"--data={tmp_path}", "--split=test"]
    )
    assert set(loss["per_task"]) == {"sort", "reverse"}
    assert loss["perplexity"] == pytest.approx(math.exp(loss["loss"])) and loss["tokens"] == sum(
        sum(m) for _, _, m in splits["test"]
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, vocab_size=32000)))
    with pytest.raises(UserError, match="vocab_size: prepared with t"):
        evaluate.main([f"--ckpt_dir={ckpt}", "--task=loss", f"--data={tmp_path}", "--split=test"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task=nope"], "task: expected one of"),
        (["--bogus=1"], "bogus: unknown setting"),
        (["--task=mc", "--data=/nonexistent.jsonl"], "no such file"),
        (
            ["--task=mc", "--shots=2", f"--data={ROOT}/README.md"],
            "shots: expected 0 \\(shots are only for mmlu and gsm8k",
        ),
        (["--task=mmlu"], "data: expected a path \\(required for --task=mmlu"),
        (
            ["--task=mc", "--data=data/tasks,data/tiny_base"],
            "several, comma-separated, only for --task=exact_match and loss",
        ),
        ([f"--out={ROOT}"], "out=.*: expected a file, it is a folder"),
        ([f"--out={ROOT}/README.md/r.json"], "out=.*: cannot be written \\(.* is not a writable"),
    ],
)
def test_cli_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        evaluate.main(["--ckpt_dir=x", *args])


def test_cli_user_error_is_one_line_and_exit_status_2():
    p = python([sys.executable, "eval.py", "--ckpt_dir=x", "--task=nope"], cwd=ROOT)
    assert p.returncode == 2 and "task: expected one of" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def prepare_script(name, argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"prepare_{name}", os.path.join(ROOT, "data", name, "prepare.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_prepared_mmlu_folder_gives_the_csv_folders_items(tmp_path, tiny_tokenizer_path):
    write_mmlu(tmp_path / "mmlu")
    prepare_script(
        "mmlu",
        [
            f"--source={tmp_path / 'mmlu'}",
            f"--tokenizer={tiny_tokenizer_path}",
            f"--out_dir={tmp_path / 'prepared'}",
            "--train_on_dev=True",
            "--val_fraction=0",
        ],
    )
    for mc_format in ("letter", "instruction", "cloze"):
        csv = evaluate.mmlu_items(
            CharTokenizer(), str(tmp_path / "mmlu"), "test", mc_format=mc_format
        )
        prepared = evaluate.mmlu_items(
            CharTokenizer(), str(tmp_path / "prepared"), "test", mc_format=mc_format
        )
        assert [(i["pairs"], i["answer"], i["subject"]) for i in prepared] == [
            (i["pairs"], i["answer"], i["subject"]) for i in csv
        ]
    with pytest.raises(UserError, match="--shots=1: .* is a prepared folder, which keeps no dev/"):
        evaluate.mmlu_items(CharTokenizer(), str(tmp_path / "prepared"), "test", shots=1)
    with pytest.raises(UserError, match="--subjects: nope not in"):
        evaluate.mmlu_items(CharTokenizer(), str(tmp_path / "prepared"), "test", subjects="nope")


def test_prepared_gsm8k_folder_gives_the_source_records(tmp_path, tiny_tokenizer_path):
    records = [
        dict(question=f"What is {i} + 1?", answer=f"{i} + 1 = {i + 1}\n#### {i + 1}")
        for i in range(6)
    ]
    (tmp_path / "src").mkdir()
    for split in ("train", "test"):
        (tmp_path / "src" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    prepare_script(
        "gsm8k",
        [
            f"--source={tmp_path / 'src'}",
            f"--tokenizer={tiny_tokenizer_path}",
            f"--out_dir={tmp_path / 'prepared'}",
        ],
    )
    assert (
        evaluate.gsm8k_records(str(tmp_path / "prepared"))
        == records
        == evaluate.gsm8k_records(str(tmp_path / "src" / "test.jsonl"))
    )
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: missing field 'answer'"):
        evaluate.gsm8k_records(str(tmp_path / "bad.jsonl"))


def test_truncation_counts_questions_and_warns_about_shots(capsys):
    tok = CharTokenizer()
    rows = [("q" * 30, ["a", "b" * 12]), ("q" * 5, ["a", "b"]), ("q" * 40, ["a", "b"])]
    items = [evaluate.mc_item(tok, q, cs, 0, "raw") for q, cs in rows]
    # by hand: BOS + question + choice > 40 tokens for question 1 (its second choice) and question 3
    assert evaluate.truncation(items, 40, shots=0) == (2, False)
    assert (
        "note: 2 of 3 questions are longer than the model's context of 40"
        in capsys.readouterr().err
    )
    assert evaluate.truncation(items, 40, shots=5) == (2, True)
    err = capsys.readouterr().err
    assert (
        err.startswith("warning: --shots=5: the few-shot prompts exceed the context")
        and "not a 5-shot" in err
    )
    assert evaluate.truncation(items, 100, shots=5) == (0, False) and capsys.readouterr().err == ""


def test_generation_prompt_without_room_is_refused_naming_shots():
    tok = CharTokenizer()
    evaluate.check_room(tok, ["x" * 8], 10, shots=0)  # BOS + 8: one token of room
    with pytest.raises(
        UserError, match=r"up to 10 tokens leave no room .* context of 10: the 2 shots take"
    ):
        evaluate.check_room(tok, ["x" * 9], 10, shots=2)


def test_cli_mmlu_shots_beyond_the_context_in_json(ckpt, tmp_path, capsys):
    write_mmlu(tmp_path / "mmlu")
    out = tmp_path / "r.json"
    evaluate.main(
        [
            f"--ckpt_dir={ckpt}",
            "--task=mmlu",
            f"--data={tmp_path / 'mmlu'}",
            "--shots=2",
            f"--out={out}",
        ]
    )
    saved = json.loads(out.read_text())
    # the tiny checkpoint's context (256) holds both 2-shot prompts: nothing truncated
    assert (saved["truncated"], saved["shots_exceed_context"]) == (0, False)


def test_cli_exact_match_takes_several_datasets(ckpt, tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    for name, task in (("a", "sort"), ("b", "reverse")):
        raw = [dict(task=task, instruction="Do it", input=f"{i}", response="x") for i in range(3)]
        d = tmp_path / name
        sources.write_dataset(
            str(d),
            {
                "test": [
                    (
                        r["task"],
                        *dataset.encode_example(
                            tok, r["instruction"], r["input"], r["response"], 200
                        ),
                    )
                    for r in raw
                ]
            },
            dict(vocab_size=tok.vocab_size, bos_id=1, eos_id=2, tokenizer="t", max_len=200),
        )
        sources.write_jsonl(str(d / "test.jsonl"), raw)
    em = evaluate.main(
        [
            f"--ckpt_dir={ckpt}",
            f"--data={tmp_path / 'a'},{tmp_path / 'b'}",
            "--max_new_tokens=1",
            "--limit=2",
        ]
    )
    assert {k: v["n"] for k, v in em["per_task"].items()} == {"sort": 2, "reverse": 2}


# -----------------------------------------------------------------------------
# against transformers on a real checkpoint (the team's ../shared only)

STORIES = os.path.join(SHARED, "models", "stories260K", "hf")
MMLU = os.path.join(SHARED, "data", "mmlu")


@pytest.mark.skipif(
    not (os.path.isdir(STORIES) and os.path.isdir(MMLU)),
    reason="../shared/models/stories260K and ../shared/data/mmlu not present "
    "(only on the team's machines)",
)
@pytest.mark.parametrize("mc_format, shots", [("letter", 0), ("cloze", 5)])
def test_stories260k_mmlu_choice_logprobs_match_transformers(mc_format, shots):
    transformers = pytest.importorskip("transformers")
    model, tok = load_for_inference(STORIES, "", "", "float32", "cpu", merge=True)
    items = evaluate.mmlu_items(
        tok,
        MMLU,
        "test",
        shots=shots,
        mc_format=mc_format,
        subjects="high_school_geography,marketing",
        limit=2,
    )
    evaluate.score_multiple_choice(model, items, batch_size=4)
    ref = transformers.LlamaForCausalLM.from_pretrained(STORIES).float().eval()
    worst = 0.0
    with torch.no_grad():
        for item in items:
            for (ctx, cont), ours in zip(item["pairs"], item["logprobs"]):
                seq = (ctx + cont)[-512:]
                logp = ref(torch.tensor([seq])).logits[0].double().log_softmax(-1)
                theirs = sum(
                    logp[len(seq) - len(cont) - 1 + k, t].item() for k, t in enumerate(cont)
                )
                worst = max(worst, abs(ours - theirs))
    assert worst < 1e-4, worst
