"""Nothing is replaced unasked (issue 28): through the real command lines, the six ways a user's
file was replaced or deleted, the three races, the files export.py copies beside the weights, an
interrupted export, and a save onto a full disk. Every refusal is one `error:` line, a non-zero
exit, no traceback, and the victim byte-identical; every race ends with one whole winner (or a
reader that saw one version). Runs train on the embedded base (data/tiny_base) for a step or two."""

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import checkpoint
import multilora
import train_state
import util
from conftest import ROOT, python
from test_bad_inputs import hash_tree

BASE = os.path.join(ROOT, "data", "tiny_base")
SMALL = [
    "--datasets=" + os.path.join(ROOT, "data", "tasks"),
    "--eval_interval=1",
    "--warmup_iters=0",
    "--eval_examples=1",
    "--exact_match_examples=0",
    "--batch_size=4",
]


def run(out_dir, *args, max_iters=1, ckpt_dir=BASE):
    argv = [f"--ckpt_dir={ckpt_dir}", f"--out_dir={out_dir}", f"--max_iters={max_iters}"]
    return python([sys.executable, "train.py", *argv, *SMALL, *args], cwd=ROOT, timeout=300)


def refused(p, *words):
    """One `error:` line (holding each of words), exit status 2, no traceback."""
    lines = p.stderr.strip("\n").split("\n")
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def ok(p):
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A copy of the base, a finished 1-step adapter run and a finished 1-step full fine-tune."""
    w = tmp_path_factory.mktemp("safety")
    shutil.copytree(BASE, w / "base")
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(run, w / "lora", "--finetune=lora"),
            pool.submit(run, w / "full", "--finetune=full"),
        ]
        for r in runs:
            ok(r.result())
    return w


# -----------------------------------------------------------------------------
# the six replacements


def test_received_ckpt_hf_dir_is_no_place_to_write(world, tmp_path):
    """1. A received run folder whose ckpt.pt names an hf_dir outside it: the resume writes
    out_dir/hf (a path read from a file is never written to); the folder it names is
    byte-identical."""
    shutil.copytree(world / "full", tmp_path / "out")
    shutil.copytree(BASE, tmp_path / "victim")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["settings"]["hf_dir"] = str(tmp_path / "victim")
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    victim = hash_tree(tmp_path / "victim")
    ok(run(tmp_path / "out", "--resume=True", max_iters=2))
    assert hash_tree(tmp_path / "victim") == victim
    assert checkpoint.saved_step(str(tmp_path / "out" / "hf" / "model.safetensors")) == 2


def test_hf_dir_equal_to_ckpt_dir_is_refused_even_with_overwrite(world, tmp_path):
    """2. --hf_dir=--ckpt_dir: refused as the base, with or without --overwrite (which replaces a
    run, never the base it reads), and the refusal does not suggest --overwrite."""
    base = hash_tree(world / "base")
    for extra in ([], ["--overwrite=True"]):
        p = run(
            tmp_path / "out",
            "--finetune=full",
            f"--hf_dir={world / 'base'}",
            *extra,
            ckpt_dir=world / "base",
        )
        line = refused(p, "the base checkpoint", f"--hf_dir={world / 'base'}")
        assert "overwrite" not in line
    assert hash_tree(world / "base") == base
    assert not (tmp_path / "out").exists()


def test_resume_does_not_take_a_folder_holding_another_checkpoint(world, tmp_path):
    """3. --resume=True --hf_dir=<another checkpoint>: refused as a fresh run refuses it."""
    shutil.copytree(world / "full", tmp_path / "out")
    shutil.copytree(BASE, tmp_path / "other")
    before = hash_tree(tmp_path)
    hf = f"--hf_dir={tmp_path / 'other'}"
    refused(run(tmp_path / "out", hf, "--resume=True", max_iters=2), str(tmp_path / "other"))
    refused(run(tmp_path / "new", hf, "--finetune=full"), str(tmp_path / "other"), "holds a run")
    assert hash_tree(tmp_path) == before


def test_eval_out_never_replaces_a_file_it_did_not_write(world, tmp_path):
    """4. eval.py --out=<the base's config.json>: refused before any model work; an earlier result
    of eval.py is replaced."""
    shutil.copytree(BASE, tmp_path / "base")
    before = hash_tree(tmp_path)
    cmd = [sys.executable, "eval.py", f"--ckpt_dir={tmp_path / 'base'}", "--task=loss", "--limit=1"]
    for out in (tmp_path / "base" / "config.json", tmp_path / "base" / "tokenizer.model"):
        refused(python(cmd + [f"--out={out}"], cwd=ROOT), "not an earlier result of this script")
    assert hash_tree(tmp_path) == before
    out = tmp_path / "r.json"
    ok(python(cmd + [f"--out={out}"], cwd=ROOT))
    first = json.loads(out.read_text())
    ok(python(cmd + [f"--out={out}", "--limit=2"], cwd=ROOT))
    assert json.loads(out.read_text())["settings"]["limit"] == 2 != first["settings"]["limit"]


def test_memtrace_out_never_replaces_a_file_it_did_not_write(tmp_path):
    """4'. tools/memtrace.py OUT.json: checked before the script it traces runs."""
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    p = python(
        [sys.executable, "tools/memtrace.py", str(tmp_path / "notes.json"), "train.py"], cwd=ROOT
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and p.stderr.strip().count("\n") == 0
    assert "not an earlier result" in p.stderr
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(dict(base_rss=1, peak_above_base=2, phases=[])))
    ours = util.json_with("base_rss", "peak_above_base", "phases")
    util.check_output(str(trace), None, ours=ours)  # an earlier trace: replaced


@pytest.mark.parametrize(
    "script,arg,victim",
    [
        ("tools/bench.py", "--out_file={d}/notes.json", "notes.json"),
        ("analyze.py", "--out_dir={d} --full={base} --ckpt_dir={base}", "summary.json"),
        ("analyze.py", "--out_dir={d} --full={base} --ckpt_dir={base}", "spectra.png"),
        ("compare.py", "--out_prefix={d}/draft --ckpt_dir={base}", "draft.md"),
    ],
)
def test_other_outputs_never_replace_a_file_they_did_not_write(tmp_path, script, arg, victim):
    """4''. The other scripts' outputs: refused before any work when they name a file the script
    did not write (compare.py's .md and plots, analyze.py's plots: only beside their own JSON)."""
    (tmp_path / victim).write_text('{"mine": 1}')
    argv = [sys.executable, script, *arg.format(d=tmp_path, base=BASE).split()]
    refused(python(argv, cwd=ROOT), "not an earlier result of this script")
    assert os.listdir(tmp_path) == [victim] and (tmp_path / victim).read_text() == '{"mine": 1}'


def test_earlier_results_are_recognized():
    """The committed docs/compare.json is compare.py's own: a rerun may replace it."""
    assert util.json_with("settings", "summary", "runs")(os.path.join(ROOT, "docs", "compare.json"))
    assert not util.json_with("settings")(os.path.join(BASE, "config.json"))


def test_stale_tmp_cleanup_removes_only_our_temporaries(world, tmp_path):
    """5. A resume removes the temporaries atomic_write names for the run's files (a killed save's
    ckpt.pt.<pid>.tmp), never the user's own *.tmp files."""
    shutil.copytree(world / "lora", tmp_path / "out")
    mine = {"thesis-draft.tmp": "chapter 1", "notes.123.tmp": "a", "ckpt.pt.tmp": "b"}
    for name, text in mine.items():
        (tmp_path / "out" / name).write_text(text)
    (tmp_path / "out" / "ckpt.pt.999999.tmp").write_bytes(b"torn")
    (tmp_path / "out" / "adapter.safetensors.999999.tmp").write_bytes(b"torn")
    ok(run(tmp_path / "out", "--resume=True", max_iters=2))
    assert {n: (tmp_path / "out" / n).read_text() for n in mine} == mine
    assert not (tmp_path / "out" / "ckpt.pt.999999.tmp").exists()
    assert not (tmp_path / "out" / "adapter.safetensors.999999.tmp").exists()


def prepare_text(out_dir, corpus, *extra):
    return python(
        [
            sys.executable,
            "data/text/prepare.py",
            f"--source={corpus}",
            f"--tokenizer={BASE}/tokenizer.model",
            f"--out_dir={out_dir}",
            *extra,
        ],
        cwd=ROOT,
    )


def test_prepared_data_is_replaced_whole_or_not_at_all(tmp_path):
    """6. data/text/prepare.py into a folder holding a prepared dataset (data/tasks: train, val and
    test): refused; with --overwrite=True the old dataset goes whole (no test split of the old one
    stays beside the new train and val), so no mixture of two datasets remains."""
    shutil.copytree(
        os.path.join(ROOT, "data", "tasks"),
        tmp_path / "data",
        ignore=shutil.ignore_patterns("*.py", "__pycache__"),
    )
    (tmp_path / "data" / "README.txt").write_text("my notes")
    (tmp_path / "corpus.txt").write_text(
        "".join(f"Once upon a time {i} cats.\n" for i in range(40))
    )
    before = hash_tree(tmp_path / "data")
    refused(prepare_text(tmp_path / "data", tmp_path / "corpus.txt"), "--overwrite=True")
    assert hash_tree(tmp_path / "data") == before
    ok(prepare_text(tmp_path / "data", tmp_path / "corpus.txt", "--overwrite=True"))
    left = set(os.listdir(tmp_path / "data")) - {".lock"}
    assert left == {"README.txt", "meta.json"} | {
        f"{s}_{a}.npy" for s in ("train", "val") for a in ("tokens", "mask", "offsets", "task")
    }
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["name"] == "text"
    assert (tmp_path / "data" / "README.txt").read_text() == "my notes"


# -----------------------------------------------------------------------------
# the three races


def test_two_runs_on_one_empty_out_dir_one_wins(world, tmp_path):
    """Two train.py started together on one empty out_dir: exactly one finishes, the other is
    refused in one line, and the winner's files are whole (its checkpoint resumes)."""
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run, out, f"--seed={s}") for s in (1, 2)]
        ps = [r.result() for r in runs]
    assert sorted(p.returncode for p in ps) == [0, 2], [p.stderr for p in ps]
    loser = next(p for p in ps if p.returncode)
    refused(loser)
    seed = train_state.read(str(out / "ckpt.pt"))["settings"]["seed"]
    assert ps[seed - 1].returncode == 0  # the checkpoint is the winner's
    ok(run(out, "--resume=True", max_iters=2))


def test_out_dir_is_checked_again_under_the_lock(world, tmp_path, monkeypatch):
    """The race made deterministic: B checks the empty out_dir, A's run ends there (a finished run
    copied in), then B takes the lock: B is refused (with --overwrite too: another process wrote
    there meanwhile) and A's files are byte-identical."""
    import train

    out = tmp_path / "out"
    argv = [f"--ckpt_dir={BASE}", f"--out_dir={out}", "--max_iters=1", *SMALL]
    for overwrite in (False, True):
        shutil.rmtree(out, ignore_errors=True)
        config = train_state.configure_run(train.SETTINGS, argv + [f"--overwrite={overwrite}"])
        found = train_state.check_out_dir(config)  # B, before the lock
        assert found == []
        shutil.copytree(world / "lora", out)  # A
        before = hash_tree(out)
        for k, v in config.items():
            monkeypatch.setattr(train, k, v, raising=False)
        expected = "another process wrote there" if overwrite else "holds a run"
        with pytest.raises(util.UserError, match=expected):
            train.take_out_dir(found, config)  # B, under the lock
        assert hash_tree(out) == before


def export(out_dir, adapter, fmt="peft", ckpt_dir=BASE):
    argv = [f"--ckpt_dir={ckpt_dir}", f"--adapter={adapter}", f"--out_dir={out_dir}"]
    return python([sys.executable, "export.py", *argv, f"--format={fmt}"], cwd=ROOT)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters of the base with other weights: which export won is told by its bytes."""
    d = tmp_path_factory.mktemp("adapters")
    for i in (1, 2):
        model = checkpoint.load_model(BASE)
        torch.manual_seed(i)
        multilora.adapt_model(model, n_loras=2, lora_rank=2)
        with torch.no_grad():
            for _, m in multilora.adapter_modules(model):
                m.lora_B.normal_(0, 0.02)
        multilora.save_adapter(model, str(d / f"a{i}.safetensors"))
    return d


def test_two_exports_into_one_folder_one_wins(adapters, tmp_path):
    """Two export.py into one folder at once: exactly one succeeds, the other is refused in one
    line, and the folder holds the winner's export whole (byte-identical to it made alone)."""
    refs = {}
    for i in (1, 2):
        ok(export(tmp_path / f"ref{i}", adapters / f"a{i}.safetensors"))
        refs[i] = hash_tree(tmp_path / f"ref{i}")
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:
        ps = list(pool.map(lambda i: export(out, adapters / f"a{i}.safetensors"), (1, 2)))
    assert sorted(p.returncode for p in ps) == [0, 2], [p.stderr for p in ps]
    refused(next(p for p in ps if p.returncode))
    winner = 1 if ps[0].returncode == 0 else 2
    got = {
        k.replace(str(out), str(tmp_path / f"ref{winner}")): v for k, v in hash_tree(out).items()
    }
    assert got == refs[winner]
    assert not os.path.exists(f"{out}.partial")


def test_export_refused_while_another_holds_the_folder(adapters, tmp_path):
    """The export race made deterministic: the test holds the export's lock, as a running export
    does: the second is refused before writing anything."""
    os.makedirs(tmp_path / "out.partial")
    held = util.lock_folder(str(tmp_path / "out.partial"))
    try:
        refused(export(tmp_path / "out", adapters / "a1.safetensors"), "another process")
    finally:
        held.close()
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "out.partial") == [".lock"]


def test_interrupted_export_does_not_block_the_rerun(adapters, tmp_path):
    """A killed export leaves OUT.partial (its files, torn temporaries): the rerun clears it and
    writes the export whole; a file an export does not write is refused, never removed."""
    ok(export(tmp_path / "ref", adapters / "a1.safetensors", "hf"))
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / ".lock").write_text("")
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors.4242.tmp").write_bytes(b"torn")
    ok(export(tmp_path / "out", adapters / "a1.safetensors", "hf"))
    assert not partial.exists()
    got = {k.replace("/out/", "/ref/"): v for k, v in hash_tree(tmp_path / "out").items()}
    assert got == hash_tree(tmp_path / "ref")
    # a file of the user's in OUT.partial: refused, kept
    partial = tmp_path / "out2.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("mine")
    refused(export(tmp_path / "out2", adapters / "a1.safetensors", "hf"), "mine.txt")
    assert (partial / "mine.txt").read_text() == "mine" and not (tmp_path / "out2").exists()


def versions(tmp_path):
    """Two full checkpoints of the base's shapes: every weight 1.0, or every weight 2.0."""
    model = checkpoint.load_model(BASE)
    out = []
    for value in (1.0, 2.0):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return model.config, out


def test_reader_sees_one_version_while_hf_is_rewritten(tmp_path):
    """checkpoint.load_model(out_dir/hf) while a full fine-tune rewrites hf/ (one rename per file):
    deterministic (the rewrite lands between two tensors of one load), then a writer thread
    rewriting hf/ without pause during 40 loads: every load is one whole version."""
    config, (one, two) = versions(tmp_path)
    hf = str(tmp_path / "hf")
    checkpoint.save_hf_checkpoint(one, hf, config=config)
    _, tensors = checkpoint._source(hf)
    stream = tensors()
    first = [next(stream)[1].read(0, 1)]
    checkpoint.save_hf_checkpoint(two, hf, config=config)  # between two tensors of the load
    rest = [stored.read(0, stored.shape[0]) for _, stored in stream]
    assert all(bool((t == 1.0).all()) for t in first + rest)

    stop = threading.Event()

    def writer():
        while not stop.is_set():
            for state in (one, two):
                checkpoint.save_hf_checkpoint(state, hf, config=config)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        for _ in range(40):
            values = {
                float(p.detach().flatten()[0]) for p in checkpoint.load_model(hf).parameters()
            }
            seen.append(values)
    finally:
        stop.set()
        thread.join()
    assert all(len(v) == 1 for v in seen), seen  # never two versions in one model


# -----------------------------------------------------------------------------
# what export copies beside the weights; a full disk


def test_export_copies_side_files_only_when_they_parse(adapters, tmp_path):
    """A received base whose tokenizer.json is a symlink to a private file: that file's content
    never lands in the export; a generation_config.json that is a symlink to a real one (the
    Hugging Face cache is made of them) is copied."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (tmp_path / "secret.txt").write_text("password: hunter2\n")
    (tmp_path / "gen.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    os.symlink(tmp_path / "secret.txt", base / "tokenizer.json")
    os.symlink(tmp_path / "gen.json", base / "generation_config.json")
    ok(export(tmp_path / "out", adapters / "a1.safetensors", "hf", ckpt_dir=base))
    names = set(os.listdir(tmp_path / "out"))
    assert "tokenizer.json" not in names and "generation_config.json" in names
    for name in names:
        assert b"hunter2" not in (tmp_path / "out" / name).read_bytes()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


def test_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(world, tmp_path):
    """A save onto a full filesystem (a tmpfs holding the run and half of a second ckpt.pt): one
    line naming ckpt.pt and the cause; the previous ckpt.pt and adapter byte-identical, no
    temporary left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    pages = sum(-(-os.path.getsize(f) // 4096) for f in (world / "lora").iterdir())
    size = pages * 4 + os.path.getsize(world / "lora" / "ckpt.pt") // 2048
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        shutil.copytree(world / "lora", disk / "out")
        keep = {n: (disk / "out" / n).read_bytes() for n in ("ckpt.pt", "adapter.safetensors")}
        p = run(disk / "out", "--resume=True", max_iters=2)
        line = refused(p, str(disk / "out" / "ckpt.pt"), "No space left on device")
        assert "previous" in line or "before" in line
        assert {n: (disk / "out" / n).read_bytes() for n in keep} == keep
        assert not [f for f in os.listdir(disk / "out") if f.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
