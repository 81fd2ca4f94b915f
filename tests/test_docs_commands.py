"""Every command that README.md and docs/*.md show, and every mode of every script, runs.

Commands are discovered, not listed: the `python ...` / `torchrun ...` lines of the docs' code
blocks (fenced, indented and inline), the usage lines of each script's docstring, and one command
per choice of the settings that pick a mode (tools/bench.py --mode, eval.py --task,
export.py --format).
Each doc runs in order in a copy of the repository (so a recipe's later steps find what its earlier
steps wrote, and nothing in the repository changes), at a reduced size: RUN_SMALL appends
overrides per script (later arguments win). A placeholder (DIR, FILE, /path/to/..., a path that
does not exist) is swapped for a test file of its kind (SWAPS), which `world` writes: the embedded
base, a small adapter, fixtures in each data source's format. `a|b` runs each alternative, `[...]`
is left out.

A command fails on a traceback or a non-zero exit. ALLOWED lists, with the reason, the commands
that cannot run here (a GPU, a second machine, the network): for those one `error:` line is the
expected outcome, or they are not run at all.
"""

import ast
import glob
import json
import os
import re
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ROOT, python

# -----------------------------------------------------------------------------
# the tables: per-script reduced sizes, placeholder swaps, what may not run here

TINY_BENCH = [
    "--dim=32",
    "--n_layers=1",
    "--n_heads=2",
    "--n_kv_heads=1",
    "--hidden_dim=64",
    "--vocab_size=64",
    "--rounds=1",
    "--warmup=1",
    "--threads=1",
    "--batch_size=2",
    "--seq_len=16",
    "--memory_ns=1,2",
    "--memory_rank=2",
    "--train_batch=4",
    "--train_max_len=64",
    "--gen_tokens=4",
    "--load_gb=0.002",
    "--load_dim=64",
    "--repeats=1",
]
TRAIN_SMALL = [
    "--max_iters=20",
    "--batch_size=4",
    "--eval_examples=4",
    "--exact_match_examples=2",
    # init_from=scratch's shape (a pretrained base's comes from its files)
    "--dim=64",
    "--n_layers=2",
    "--n_heads=4",
    "--n_kv_heads=2",
    "--hidden_dim=128",
]
RUN_SMALL = {
    "train.py": TRAIN_SMALL,
    "generate.py": ["--max_new_tokens=4"],
    "eval.py": ["--limit=2", "--max_new_tokens=4"],
    "tools/bench.py": TINY_BENCH,
    "analyze.py": ["--top_k=4", "--phi_dim=4"],
    "compare.py": [
        "--seeds=1",
        "--max_iters=20",
        "--eval_interval=10",
        "--jobs=2",
        "--train_args=" + ",".join(TRAIN_SMALL[1:]),
    ],
    "data/tasks/generate.py": [],
    # a preset's shape at a few KB: the flags override the preset's values
    "tools/random_llama.py": [
        "--dim=256",  # n·r = 5·32 of the documented 7B runs fits its projections
        "--n_layers=1",
        "--n_heads=2",
        "--n_kv_heads=2",
        "--hidden_dim=128",
        # not data/tasks' 768: a run on the model needs data of its vocabulary (--tasks=True)
        "--vocab_size=1000",
        "--max_seq_len=256",
    ],
    "tools/plan.py": ["--nproc=2"],  # the paper configs' reduced accumulation is for 2 processes
}
# the prepare scripts download their source by default: a fixture in the source's format instead
SOURCES = {f"data/{n}/prepare.py": f"_docs/src/{n}" for n in ("alpaca", "dolly", "gsm8k", "mmlu")}
SOURCES["data/text/prepare.py"] = "_docs/src/text/corpus.txt"  # one document per line
ADAPTER = "_docs/multilora.safetensors"
# --key=VALUE where VALUE is a placeholder or a path that is not there: the test file for the key
SWAPS = {
    "ckpt_dir": "data/tiny_base",
    "tokenizer": "data/tiny_base/tokenizer.model",
    "adapter": ADAPTER,
    "adapters": f"{ADAPTER},_docs/lora.safetensors",
    "full": "_docs/full",
    "datasets": "data/tasks",
    "out_dir": "_docs/out/{n}",
    "out": "_docs/out/{n}.json",
    "prompt_file": "_docs/prompts.txt",
    "task": "exact_match",
}
EVAL_DATA = {
    "mc": "_docs/mc.jsonl",
    "gsm8k": "_docs/src/gsm8k/test.jsonl",
    "mmlu": "_docs/src/mmlu",
    "exact_match": "data/tasks",
    "loss": "data/tasks",
}
PATH_KEYS = {
    "ckpt_dir",
    "tokenizer",
    "adapter",
    "adapters",
    "full",
    "datasets",
    "data",
    "prompt_file",
}
# (pattern in the command as shown, reason, what happens): "skip" = not run; "error" = one `error:`
# line is the right answer here
ALLOWED = [
    (
        r"-m venv|pip install|-m pytest",
        "installs from the network / is the test suite itself",
        "skip",
    ),
    (r"--nnodes=[2-9]", "a multi-node launch waits for its other machines", "skip"),
    (r"--device=cuda", "needs a CUDA GPU: refused in one line without one", "error"),
    (
        r"config/tiny_base_pretrain\.py",
        "rebuilds the committed data/tiny_base (how it was made): "
        "refused in one line without --overwrite=True, as any run's files are",
        "error",
    ),
    (
        r"compare\.py --numerics",
        "writes the fingerprint at the evidence's own size (its train_args "
        "are refused by design); tests/test_numerics.py runs the same arithmetic",
        "error",
    ),
]
MODE_SETTINGS = {"tools/bench.py": "mode", "eval.py": "task", "export.py": "format"}
SCRIPTS = [
    "train.py",
    "generate.py",
    "eval.py",
    "export.py",
    "analyze.py",
    "tools/bench.py",
    "compare.py",
    "tools/gpu_check.py",
    "data/tasks/generate.py",
    *SOURCES,
]

# -----------------------------------------------------------------------------
# discovering the commands


def shown_lines(text):
    """(line number, text) of every line a doc shows as code: fenced blocks that are not Python,
    indented blocks, inline code spans; continuation lines joined."""
    out, fence, lines = [], None, text.split("\n")
    i = 0
    while i < len(lines):
        line, n = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
        elif fence is not None:
            if fence not in ("python", "py"):
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                out.append((n, line.strip()))
        elif line.startswith("    ") and line.strip().startswith(("python ", "torchrun ")):
            out.append((n, line.strip()))
        else:
            out += [(n, span) for span in re.findall(r"`((?:python|torchrun) [^`]+)`", line)]
        i += 1
    return out


def split_command(line):
    """A shown line -> the python/torchrun commands in it, each a list of words (comments dropped,
    `&&` chains split)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for w in words + ["&&"]:
        if w in ("&&", ";", "||"):
            if current and current[0] in ("python", "python3", "torchrun"):
                commands.append(current)
            current = []
        else:
            current.append(w)
    return commands


def expand(words):
    """`[--opt]` left out; `--key=a|b` (plain words) -> one command per alternative."""
    words = [w for w in words if not (w.startswith("[") and w.endswith("]"))]
    for i, w in enumerate(words):
        key, _, value = w.partition("=")
        if (
            key.startswith("--")
            and "|" in value
            and all(re.fullmatch(r"[\w./-]+", v) for v in value.split("|"))
        ):
            return [
                c
                for v in value.split("|")
                for c in expand(words[:i] + [f"{key}={v}"] + words[i + 1 :])
            ]
    return [words]


def docstring_lines(path):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    return [
        (n + 1, line.strip())
        for n, line in enumerate(doc.split("\n"))
        if line.strip().startswith("python ")
    ]


def mode_commands():
    """One command per choice of each mode setting, read from the scripts' own settings."""
    import importlib

    sys.path.insert(0, ROOT)
    out = []
    for script, key in MODE_SETTINGS.items():
        for choice in importlib.import_module(os.path.basename(script)[:-3]).SETTINGS[key].allowed:
            base = (
                []
                if script == "tools/bench.py"
                else ["--ckpt_dir=data/tiny_base", f"--data={EVAL_DATA[choice]}"]
                if script == "eval.py"
                else ["--ckpt_dir=data/tiny_base", f"--adapter={ADAPTER}", "--out_dir=DIR"]
            )
            out.append(["python", script, f"--{key}={choice}", *base])
    out.append(
        [
            "python",
            "analyze.py",
            "--full=_docs/full",
            "--ckpt_dir=data/tiny_base",
            f"--adapters={SWAPS['adapters']}",
            "--out_dir=DIR",
        ]
    )
    out.append(["python", "generate.py", f"--adapter={ADAPTER}"])
    return out


def dedup(words):
    """What makes two shown commands the same run: their words less `--key=...` left out."""

    def dropped(w):
        key, _, value = w[2:].partition("=")
        return is_placeholder(value) and key not in SWAPS

    return tuple(w for w in words if not dropped(w))


def all_commands():
    """{source name: [(where, words)]} in the order shown; one list per doc, one for the scripts."""
    groups, seen = {}, set()  # a command shown in several docs runs once, where first shown
    for path in [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "*.md"))
    ):
        name = os.path.relpath(path, ROOT)
        cmds = []
        for n, line in shown_lines(open(path).read()):
            for words in split_command(line):
                for c in expand(words):
                    if dedup(c) not in seen:
                        seen.add(dedup(c))
                        cmds.append((f"{name}:{n}", c))
        if cmds:
            groups[name] = cmds
    scripts = [
        (f"{s} docstring:{n}", c)
        for s in SCRIPTS
        for n, line in docstring_lines(os.path.join(ROOT, s))
        for words in split_command(line)
        for c in expand(words)
    ]
    # a mode that a shown command already runs (same script, same --mode/--task/--format, or for
    # analyze/generate the same options) is not run twice
    shown = [c for c in seen if len(c) > 1] + [tuple(c) for _, c in scripts]

    def covered(c):
        wanted = [w.split("=")[0] if w.startswith(("--adapter", "--full")) else w for w in c[2:3]]
        return any(
            s[1] == c[1] and all(any(a.startswith(w) for a in s[2:]) for w in wanted) for s in shown
        )

    scripts += [("mode setting", c) for c in mode_commands() if not covered(c)]
    groups["scripts"] = [
        (where, c) for where, c in scripts if not (dedup(c) in seen or seen.add(dedup(c)))
    ]
    return groups


# -----------------------------------------------------------------------------
# turning a shown command into one that runs here


def is_placeholder(value):
    return (
        re.fullmatch(r"[A-Z][A-Z_]*(\.\w+)?", value) is not None
        or "path/to/" in value
        or "..." in value
        or value.startswith(("checkpoints/", "<"))
    )


def runnable(words, cwd, n):
    """words as shown -> (argv, allowed outcome or None), or (None, reason) to skip."""
    shown = " ".join(words)
    allowed = next(
        ((why, what) for pattern, why, what in ALLOWED if re.search(pattern, shown)), None
    )
    if allowed and allowed[1] == "skip":
        return None, allowed[0]
    launcher = []
    if words[0] == "torchrun":
        i = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if i is None:
            return None, "a torchrun line without a script"
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
        ]
        words = ["python"] + words[i:]
    script, args = words[1], words[2:]
    if script.startswith("-"):
        return None, "not a script"
    task = next((a.split("=", 1)[1] for a in args if a.startswith("--task=")), "exact_match")
    out, swapped = [], set()
    for a in args:
        key, eq, value = a.partition("=")
        key = key.lstrip("-")
        if not eq:
            if not is_placeholder(a):  # config/... or ...: the user's own; left out
                out.append(a)
            continue
        missing = key in PATH_KEYS and not all(
            os.path.exists(os.path.join(cwd, v)) for v in value.split(",")
        )
        chat_base = "--template=chat" in shown and key in ("ckpt_dir", "tokenizer")
        if chat_base and (is_placeholder(value) or missing):
            value = "_docs/instruct"  # a base with a chat template
        elif key == "data" and (is_placeholder(value) or missing):
            value = EVAL_DATA.get(task, "data/tasks")
        elif key in SWAPS and (is_placeholder(value) or missing):
            value = SWAPS[key].format(n=n)
            swapped.add(key)
        elif is_placeholder(value):  # --arms=...: the user's own choice; left out
            continue
        out.append(f"--{key}={value}")
    if script in SOURCES:
        out.append(f"--source={SOURCES[script]}")
    if (
        script == "eval.py"
        and task in ("mmlu", "mc", "gsm8k")
        and not any(a.startswith("--data=") for a in out)
    ):
        # `--task=a|b|...` shown without the --data they need
        out.append(f"--data={EVAL_DATA[task]}")
    if re.search(r"config/llama", shown):  # the paper's configs name a 7B/8B base and its datasets
        out += [
            "--ckpt_dir=data/tiny_base",
            "--datasets=data/tasks",
            "--tokenizer=",
            "--dtype=float32",
            "--gradient_accumulation_steps=2",
            "--warmup_iters=2",
            "--lora_rank=8",  # n·r = 160 of the paper's configs is over the tiny base's width
        ]
    if "ckpt_dir" in swapped and any(a.startswith("--lora_rank=") for a in out):
        out.append("--lora_rank=8")  # a 7B's n·r (e.g. 5·32) is over the tiny base's width, 64
    small = [] if "--help" in out else RUN_SMALL.get(script, [])
    return launcher + ([] if launcher else [sys.executable]) + [script, *out, *small], allowed


def run_group(name, commands, root):
    """Run one doc's commands in order in its own copy of the repository (conftest.python).
    -> [(where, argv, why, p)]."""
    cwd = os.path.join(root, re.sub(r"\W", "_", name))
    shutil.copytree(os.path.join(root, "_repo"), cwd, symlinks=True)
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=cwd)
    for n, (where, words) in enumerate(commands):
        argv, allowed = runnable(words, cwd, n)
        if argv is None:
            results.append((where, words, allowed, None))
            continue
        p = python(argv, cwd=cwd, env=env, timeout=600)
        results.append((where, argv, allowed, p))
    return results


# -----------------------------------------------------------------------------
# the test files


def write_world(repo):
    """A copy of the repository with _docs/: adapters on the embedded base, a full fine-tune
    folder, and a small fixture in each data source's format."""
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", "out", "analysis", "__pycache__", ".venv", "*.tmp", ".pytest_cache"
        ),
    )
    d = os.path.join(repo, "_docs")
    sys.path.insert(0, ROOT)
    import checkpoint
    import multilora

    for finetune, name in (("multilora", "multilora"), ("lora", "lora")):
        model = checkpoint.load_model(os.path.join(ROOT, "data", "tiny_base"))
        torch.manual_seed(0)
        multilora.adapt_model(model, finetune=finetune, n_loras=2, lora_rank=2)
        with torch.no_grad():  # a trained adapter's: B and s not zero
            for _, m in multilora.adapter_modules(model):
                m.lora_B.normal_(0, 0.02)
                if m.lora_s is not None:
                    m.lora_s.normal_(1, 0.1)
        multilora.save_adapter(model, os.path.join(d, f"{name}.safetensors"))
    full = checkpoint.load_model(os.path.join(ROOT, "data", "tiny_base"))
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    checkpoint.save_hf_checkpoint(
        full, os.path.join(d, "full"), tokenizer_path=os.path.join(ROOT, "data", "tiny_base")
    )

    def write(rel, text):
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def jsonl(records):
        return "".join(json.dumps(r) + "\n" for r in records)

    # an Instruct base for --template=chat: the embedded one with a chat template (ChatML's)
    shutil.copytree(os.path.join(ROOT, "data", "tiny_base"), os.path.join(d, "instruct"))
    write(
        "instruct/chat_template.jinja",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}",
    )

    write(
        "src/text/corpus.txt",
        "".join(f"Once upon a time there were {i} cats.\n" for i in range(40)),
    )
    write(
        "src/alpaca/alpaca_data.json",
        json.dumps(
            [
                {"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}
                for i in range(20)
            ]
        ),
    )
    write(
        "src/dolly/databricks-dolly-15k.jsonl",
        jsonl(
            [
                {"instruction": f"Name {i}.", "context": "", "response": f"n{i}", "category": "qa"}
                for i in range(20)
            ]
        ),
    )
    gsm = [
        {
            "question": f"Tom has {i} apples. How many?",
            "answer": f"He has <<{i}*1={i}>>{i}.\n#### {i}",
        }
        for i in range(20)
    ]
    write("src/gsm8k/train.jsonl", jsonl(gsm[:15]))
    write("src/gsm8k/test.jsonl", jsonl(gsm[15:]))
    rows = "".join(f"What is {i} + {i}?,{2 * i},{i},{i + 1},{3 * i},A\n" for i in range(1, 6))
    for split in ("dev", "test", "val", "auxiliary_train"):
        write(f"src/mmlu/{split}/elementary_mathematics_{split}.csv", rows)
    write("prompts.txt", "Once upon a time\n### Instruction:\\nSay hi.\\n\\n### Response:\\n\n")
    write(
        "mc.jsonl",
        jsonl(
            [
                {"question": f"{i} + {i} =", "choices": [f" {2 * i}", f" {i}"], "answer": 0}
                for i in range(4)
            ]
        ),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs_commands")
    write_world(os.path.join(root, "_repo"))
    groups = all_commands()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_group, name, cmds, str(root)) for name, cmds in groups.items()]
        return [r for f in futures for r in f.result()]


def test_commands_are_discovered():
    """The discovery itself: the docs' main commands and every mode are found."""
    groups = all_commands()
    shown = {" ".join(w) for cmds in groups.values() for _, w in cmds}
    for expected in (
        "python train.py",
        "python tools/bench.py --mode=multilora",
        "python eval.py --task=mc",
        "python export.py --format=peft",
    ):
        assert any(
            s.startswith(expected.split(" --")[0]) and all(p in s for p in expected.split())
            for s in shown
        ), expected
    assert expand(["python", "x.py", "--f=hf|peft", "[--dtype=auto]"]) == [
        ["python", "x.py", "--f=hf"],
        ["python", "x.py", "--f=peft"],
    ]


def test_every_shown_command_runs(runs):
    failures = []
    for where, argv, allowed, p in runs:
        if p is None:
            continue
        lines = p.stderr.strip().split("\n")
        refused = p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
        if "Traceback" in p.stderr or (p.returncode != 0 and not (allowed and refused)):
            failures.append(
                f"{where}: {' '.join(argv[1:])}\n  exit {p.returncode}: {p.stderr.strip()[-1500:]}"
            )
    assert not failures, f"{len(failures)} of {len(runs)} commands failed:\n" + "\n".join(failures)
