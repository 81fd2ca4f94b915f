"""train.py and configurator.py: distributed equivalence (DDP, FSDP2 over gloo), exact resume
after SIGKILL, torn checkpoint writes, loss masking and token normalization, early errors.

Everything runs on a tiny random LLaMA (saved with checkpoint.save_hf_checkpoint) and a tiny
prepared dataset (sources.write_dataset) made in a temporary directory; the runs that are compared
with each other are all subprocesses with OMP_NUM_THREADS=1, so they do the same floating-point
work."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import configurator
import dataset
import sources
import llama
import multilora
import train
from conftest import ROOT, python
from util import UserError
import checkpoint
from tokenizer import load_tokenizer

TIMING_KEYS = ("tokens_per_s", "mfu", "peak_mem_bytes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_path):
    """A random 2-layer GQA LLaMA with the test tokenizer, and a 3-task instruction dataset."""
    root = tmp_path_factory.mktemp("train")
    tok = load_tokenizer(tiny_tokenizer_path)
    config = llama.LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=tok.vocab_size,
        max_seq_len=128,
        tie_embeddings=True,
        bos_id=tok.bos_id,
        eos_id=[tok.eos_id],
    )
    torch.manual_seed(0)
    model = llama.Llama(config)
    model.init_weights()
    checkpoint.save_hf_checkpoint(model, str(root / "base"), tokenizer_path=tiny_tokenizer_path)

    rng = random.Random(0)

    def example(task):
        word = "".join(rng.choice("abcdehlowrt") for _ in range(rng.randint(2, 6)))
        if task == "reverse":
            return "Reverse the word.", word, word[::-1]
        if task == "upper":
            return "Upper case it.", word, word.upper()
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        return "Add the numbers.", f"{a} {b}", str(a + b)

    splits, raw = {}, {}
    for split, n in (("train", 48), ("val", 9), ("test", 6)):
        records, encoded = [], []
        for i in range(n):
            # reverse is twice as frequent in train: proportional and equal mixtures differ
            task = (
                ["reverse", "upper", "add", "reverse"][i % 4]
                if split == "train"
                else ["reverse", "upper", "add"][i % 3]
            )
            instruction, inp, response = example(task)
            ids, mask = dataset.encode_example(tok, instruction, inp, response, 64)
            encoded.append((task, ids, mask))
            records.append(dict(task=task, instruction=instruction, input=inp, response=response))
        splits[split], raw[split] = encoded, records
    meta = dict(
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        tokenizer=tiny_tokenizer_path,
        max_len=64,
    )
    sources.write_dataset(str(root / "data"), splits, meta, raw)
    return {
        "root": root,
        "base": str(root / "base"),
        "data": str(root / "data"),
        "tokenizer": tiny_tokenizer_path,
    }


def base_args(tiny, out_dir, **overrides):
    settings = dict(
        ckpt_dir=tiny["base"],
        datasets=tiny["data"],
        out_dir=str(out_dir),
        exact_match_examples=0,
        n_loras=2,
        lora_rank=2,
        batch_size=2,
        gradient_accumulation_steps=2,
        log_interval=1,
        eval_interval=3,
        max_iters=6,
        learning_rate=1e-2,
        warmup_iters=1,
        eval_examples=0,
        # 0: leave torch's thread count alone (in-process runs share pytest's)
        threads=0,
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def run(args, nproc=0, env=None, check=True, prelude=""):
    """train.py in a subprocess (under torchrun with nproc processes when nproc > 0). prelude:
    Python run in that process before train.main (a test wraps a function there to crash on cue)."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    script = (
        ["-c", f"import sys, util, train\n{prelude}\nutil.run_cli(train.main)"]
        if prelude
        else ["train.py"]
    )
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = python(launcher + script + args, cwd=ROOT, env=full_env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(
            f"train.py exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def adapter(out_dir):
    return multilora.load_adapter(os.path.join(out_dir, "adapter.safetensors"))[0]


# -----------------------------------------------------------------------------
# distributed: the same global batch on 1 or 2 processes gives the same run


@pytest.fixture(scope="module")
def single_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(base_args(tiny, out, gradient_accumulation_steps=4))
    return str(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny, single_run, tmp_path, mode):
    # 4 micro-steps of the job: 4 on one process, 2 on each of two (gradient sync on the last only)
    run(base_args(tiny, tmp_path, gradient_accumulation_steps=4, fsdp=mode == "fsdp"), nproc=2)
    ref, got = metrics(single_run), metrics(tmp_path)
    assert [r["iter"] for r in ref] == [r["iter"] for r in got]
    assert sum("train_loss" in r for r in ref) == 6 and sum("val_loss" in r for r in ref) == 3
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["iter"], k)
    ref_adapter, got_adapter = adapter(single_run), adapter(tmp_path)
    assert ref_adapter.keys() == got_adapter.keys()
    for k in ref_adapter:
        torch.testing.assert_close(got_adapter[k], ref_adapter[k], atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# checkpoints: SIGKILL between checkpoints and inside a checkpoint write, then resume


def test_kill_and_resume_is_exact(tiny, tmp_path):
    # dropout on, so the RNG state must come back too; checkpoints at 3, 6 and 7
    args = dict(max_iters=7, lora_dropout=0.1)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(base_args(tiny, whole, **args))

    kill_after_5_steps = (
        "import os, signal\nstep, n = train.train_step, [0]\n"
        "def killing_step(*a, **k):\n    out = step(*a, **k)\n    n[0] += 1\n"
        "    if n[0] == 5: os.kill(os.getpid(), signal.SIGKILL)\n    return out\n"
        "train.train_step = killing_step"
    )
    p = run(base_args(tiny, broken, **args), prelude=kill_after_5_steps, check=False)
    # SIGKILL after step 4: the last checkpoint is step 3
    assert p.returncode == -9, p.stderr[-2000:]
    # resume, and die half-way through writing the step-6 checkpoint
    torn_save_at_6 = (
        "import os, signal, torch\nsave = torch.save\n"
        "def torn(obj, f, *a, **k):\n    save(obj, f, *a, **k)\n"
        "    if isinstance(obj, dict) and obj.get('iter_num') == 6:\n"
        # f: a path, or the open file train_state.save_file writes through
        "        path = getattr(f, 'name', f)\n        getattr(f, 'flush', lambda: None)()\n"
        "        os.truncate(path, os.path.getsize(path) // 2)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = torn"
    )
    p = run(base_args(tiny, broken, resume=True, **args), prelude=torn_save_at_6, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    torn = [f for f in os.listdir(broken) if f.startswith("ckpt.pt.") and f.endswith(".tmp")]
    assert len(torn) == 1  # the torn write...
    with pytest.raises(Exception):
        torch.load(broken / torn[0], weights_only=True)
    # ...left the previous checkpoint whole
    ckpt = torch.load(broken / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3
    multilora.load_adapter(str(broken / "adapter.safetensors"))

    p = run(base_args(tiny, broken, resume=True, **args))
    assert "resumed from" in p.stdout
    assert not [f for f in os.listdir(broken) if f.endswith(".tmp")]  # leftovers cleaned
    a, b = adapter(whole), adapter(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(whole) == metrics(broken)
    assert exported(whole, "lora") == exported(broken, "lora")  # byte for byte, metadata included


def torchrun(args, tmp_path, prelude="", check=True):
    """train.py under torchrun with 2 gloo processes; prelude: Python run in each first."""
    script = tmp_path / "run_train.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\n"
        f"import os, signal, util, train\n{prelude}\nutil.run_cli(train.main)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(
        launcher + [str(script)] + args,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"train.py exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def exported(out_dir, finetune):
    path = (
        os.path.join(out_dir, "hf", "model.safetensors")
        if finetune == "full"
        else os.path.join(out_dir, "adapter.safetensors")
    )
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_fsdp_resume_is_exact_and_sharded(tiny, tmp_path, finetune):
    """Under FSDP each rank checkpoints its own shard and ckpt.pt holds no tensors of the model; a
    run of 6 steps equals 3 steps + a bare --resume=True to 6 (the run's settings come from its
    checkpoint), in the metrics and in the exported file's bytes. For LoRA, a crash after the step-6
    shards are written but before ckpt.pt commits them leaves step 3 resumable."""
    args = dict(
        finetune=finetune,
        fsdp=True,
        lora_dropout=0.1,
        lr_decay_iters=6,
        eval_interval=3,
        max_iters=6,
        gradient_accumulation_steps=2,
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(base_args(tiny, whole, **args), tmp_path)
    torchrun(base_args(tiny, parts, **dict(args, max_iters=3)), tmp_path)
    ckpt = torch.load(parts / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and "model" not in ckpt and "optimizer" not in ckpt
    assert ckpt["shards"] == ["ckpt.step3.rank0-of-2.pt", "ckpt.step3.rank1-of-2.pt"]
    shards = [torch.load(parts / f, weights_only=True) for f in ckpt["shards"]]
    export = parts / ("hf/model.safetensors" if finetune == "full" else "adapter.safetensors")
    n_trainable = sum(t.numel() for _, t in checkpoint.iter_safetensors(str(export)))
    if finetune == "lora":  # the adapters only, not the frozen base
        lora = multilora.ARMS["lora"].params
        assert all(k.rsplit(".", 1)[1] in lora for s in shards for k in s["model"])
    # each row of each trainable tensor in exactly one shard
    assert sum(t.numel() for s in shards for t in s["model"].values()) == n_trainable
    if finetune == "lora":  # killed after the step-6 shards, before the commit
        kill = (
            "import train_state\nwrite = train_state.write_weights\n"
            "def dying(step, *a, **k):\n"
            "    if step == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return write(step, *a, **k)\ntrain_state.write_weights = dying"
        )
        p = torchrun(
            ["--out_dir=" + str(parts), "--resume=True", "--max_iters=6"],
            tmp_path,
            prelude=kill,
            check=False,
        )
        assert p.returncode != 0
        assert torch.load(parts / "ckpt.pt", weights_only=True)["iter_num"] == 3
        assert (parts / "ckpt.step6.rank1-of-2.pt").exists()
    torchrun(["--out_dir=" + str(parts), "--resume=True", "--max_iters=6"], tmp_path)
    assert metrics(whole) == metrics(parts)
    assert exported(whole, finetune) == exported(parts, finetune)
    # older shards gone
    assert sorted(f for f in os.listdir(parts) if f.startswith("ckpt.")) == [
        "ckpt.pt",
        "ckpt.step6.rank0-of-2.pt",
        "ckpt.step6.rank1-of-2.pt",
    ]
    for f in ("ckpt.step6.rank0-of-2.pt", "ckpt.step6.rank1-of-2.pt"):
        a, b = torch.load(whole / f, weights_only=True), torch.load(parts / f, weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert all(
            torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
            for i in a["optimizer"]["state"]
            for k in a["optimizer"]["state"][i]
        )


# -----------------------------------------------------------------------------
# the loss: response tokens only, normalized by the target tokens of the whole step


def load_tiny_model(tiny, finetune="multilora"):
    model = checkpoint.load_model(tiny["base"])
    torch.manual_seed(0)
    if finetune == "full":
        model.requires_grad_(True)
    else:
        multilora.adapt_model(
            model, finetune, targets=["q", "v"], n_loras=2, lora_rank=2, lora_alpha=4.0
        )
    if finetune == "multilora":
        with torch.no_grad():  # move off the zero init so every adapter weight gets a gradient
            for name, p in model.named_parameters():
                if name.endswith("lora_s"):
                    p.normal_(0, 0.5)
    return model


def test_collate_masks_prompt_and_padding(tiny):
    split = dataset.PreparedSplit(tiny["data"], "train")
    examples = [split.example(i)[:2] for i in range(3)]
    x, y, positions, segments = dataset.collate(examples, pad_id=2, device="cpu")
    assert positions is None and segments is None
    assert x.shape == y.shape == (3, max(len(ids) for ids, _ in examples) - 1)
    for b, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1].tolist()
        target = (y[b] != dataset.IGNORE).nonzero().flatten().tolist()
        assert target == [j - 1 for j in range(1, len(ids)) if mask[j]]  # response + EOS only
        assert y[b, target].tolist() == [int(ids[j + 1]) for j in target]
        assert (y[b, n:] == dataset.IGNORE).all()


def test_loss_counts_only_response_tokens(tiny):
    """train_step's loss equals an independent computation over the mask=1 tokens read from the
    prepared arrays; changing the targets of prompt positions changes nothing."""
    model = load_tiny_model(tiny)
    split = dataset.PreparedSplit(tiny["data"], "train")
    examples = [split.example(i)[:2] for i in range(4)]
    x, y, _, _ = dataset.collate(examples, pad_id=0, device="cpu")
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=-1)
    total, count = 0.0, 0
    for b, (ids, mask) in enumerate(examples):
        for j in range(1, len(ids)):
            if mask[j]:
                total -= logp[b, j - 1, ids[j]].item()
                count += 1
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss_sum = train.train_step(model, optimizer, [(x, y, None, None)], n_targets=count)
    assert loss_sum.item() / count == pytest.approx(total / count, rel=1e-5)
    # what a prompt position would have to predict cannot matter: it is not a target
    prompt_positions = (y == dataset.IGNORE) & (x != 0)
    assert prompt_positions.sum() > 0
    assert int((y != dataset.IGNORE).sum()) == count


def grads_of_split(tiny, examples, batch_size, pack=False):
    model = load_tiny_model(tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    batches = [
        dataset.collate(examples[i : i + batch_size], 0, "cpu", pack)
        for i in range(0, len(examples), batch_size)
    ]
    n_targets = sum(int((y != dataset.IGNORE).sum()) for _, y, _, _ in batches)
    loss = (
        train.train_step(model, torch.optim.SGD(params, lr=1.0), batches, n_targets).item()
        / n_targets
    )
    return loss, [b - p.detach() for b, p in zip(before, params)]  # SGD with lr 1: the gradient


def test_token_normalized_loss_is_independent_of_micro_steps(tiny):
    split = dataset.PreparedSplit(tiny["data"], "train")
    examples = [split.example(i)[:2] for i in range(8)]
    loss_1, grads_1 = grads_of_split(tiny, examples, 8)
    for batch_size in (4, 1):
        loss_n, grads_n = grads_of_split(tiny, examples, batch_size)
        assert loss_n == pytest.approx(loss_1, rel=1e-6)
        for a, b in zip(grads_1, grads_n):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # a mean of per-micro-batch means (what this avoids) is a different number on this data
    model = load_tiny_model(tiny)
    means = []
    for ids, mask in examples:
        x, y, _, _ = dataset.collate([(ids, mask)], 0, "cpu")
        with torch.no_grad():
            means.append(
                torch.nn.functional.cross_entropy(
                    model(x)[0], y[0], ignore_index=dataset.IGNORE
                ).item()
            )
    assert abs(np.mean(means) - loss_1) > 1e-3


def varied_lengths(tiny, n):
    """n training examples, most with their prompt cut short (BOS, the prompt's last few tokens,
    the whole response), so that their lengths vary and several fit in one row."""
    split = dataset.PreparedSplit(tiny["data"], "train")
    out = []
    for i in range(n):
        ids, mask = split.example(i)[:2]
        first = int(np.argmax(mask))  # the first response token
        keep = (
            np.r_[0, max(1, first - 2 - 3 * (i % 4)) : len(ids)] if i % 3 else np.arange(len(ids))
        )
        out.append((ids[keep], mask[keep]))
    return out


def test_packed_collate_places_every_example_whole(tiny):
    examples = varied_lengths(tiny, 9)
    x, y, positions, segments = dataset.collate(examples, pad_id=0, device="cpu", pack=True)
    T = max(len(ids) for ids, _ in examples) - 1
    assert x.shape[1] == T and x.shape[0] < len(examples)  # the same row length, fewer rows
    _, y_pad, _, _ = dataset.collate(examples, pad_id=0, device="cpu")
    found = []
    for r in range(x.shape[0]):
        for s in segments[r].unique().tolist():
            if s < 0:
                assert (y[r, segments[r] == s] == dataset.IGNORE).all()  # padding is no target
                continue
            at = (segments[r] == s).nonzero().flatten()
            assert at.tolist() == list(range(int(at[0]), int(at[-1]) + 1))  # contiguous
            assert positions[r, at].tolist() == list(range(len(at)))  # RoPE restarts
            found.append((x[r, at].tolist(), y[r, at].tolist()))
    expected = [
        (ids[:-1].tolist(), y_pad[b, : len(ids) - 1].tolist())
        for b, (ids, _) in enumerate(examples)
    ]
    assert sorted(found) == sorted(expected)  # each example exactly once, with its own targets


def test_packing_gives_the_same_loss_and_gradients(tiny):
    """A packed micro-batch (block-diagonal attention, restarted positions) trains exactly as the
    padded one: loss and every adapter gradient, in one micro-step and split in two."""
    examples = varied_lengths(tiny, 8)
    assert dataset.collate(examples, 0, "cpu", pack=True)[0].shape[0] < 8  # it does pack
    loss_pad, grads_pad = grads_of_split(tiny, examples, 8)
    for batch_size in (8, 4):
        loss_pack, grads_pack = grads_of_split(tiny, examples, batch_size, pack=True)
        assert loss_pack == pytest.approx(loss_pad, rel=1e-6)
        for a, b in zip(grads_pad, grads_pack):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_tasks_are_grouped_by_name_across_datasets(tiny):
    one = dataset.PreparedSplit(tiny["data"], "train")
    names, pools = dataset.task_pools([one, one])
    assert sorted(names) == ["add", "reverse", "upper"]
    for name, pool in zip(names, pools):
        assert len(pool) == 2 * int((np.asarray(one.task) == one.tasks.index(name)).sum())
        assert set(pool[:, 0].tolist()) == {0, 1}  # from both datasets
        assert all(one.tasks[one.example(i)[2]] == name for _, i in pool)


def test_mixture_weights_and_sampler():
    w = dataset.mixture_weights([100, 25, 25], "proportional", 2.0)
    assert w.tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6])
    assert dataset.mixture_weights([100, 25, 25], "equal", 2.0).tolist() == pytest.approx(
        [1 / 3] * 3
    )
    t = dataset.mixture_weights([100, 25, 25], "temperature", 2.0)  # p ∝ n^(1/2): 10, 5, 5
    assert t.tolist() == pytest.approx([0.5, 0.25, 0.25])
    pools = [np.array([[0, i] for i in range(5)]), np.array([[0, 5 + i] for i in range(3)])]
    position = [0, 0]
    rows = [
        tuple(r)
        for it in range(6)
        for r in dataset.sample_examples(pools, [0.5, 0.5], position, 4, 7, it)
    ]
    assert sum(position) == 24
    # without replacement within an epoch: each example of a task once before any twice
    task0 = [r for r in rows if r[1] < 5]
    assert sorted(task0[:5]) == [(0, i) for i in range(5)]
    again = [0, 0]
    assert rows == [
        tuple(r)
        for it in range(6)
        for r in dataset.sample_examples(pools, [0.5, 0.5], again, 4, 7, it)
    ]


# -----------------------------------------------------------------------------
# in-process runs: full fine-tuning from scratch writes a usable base; the embedded default's output


def test_scratch_full_finetune_writes_a_base(tiny, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    args = base_args(
        tiny,
        tmp_path,
        init_from="scratch",
        finetune="full",
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=48,
        max_seq_len=64,
        max_iters=2,
        eval_interval=2,
    )
    train.main(args)
    model = checkpoint.load_model(str(tmp_path / "hf"))
    assert model.config.n_layers == 1 and model.config.n_kv_heads == 1
    assert os.path.exists(tmp_path / "hf" / "tokenizer.model")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["settings"]["finetune"] == "full" and ckpt["iter_num"] == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], atol=0, rtol=0)
    assert not os.path.exists(tmp_path / "adapter.safetensors")


def test_bf16_autocast_run(tiny, tmp_path, monkeypatch):
    """dtype=bfloat16 (the GPU default) on CPU: the frozen base is stored in bf16, the adapter
    trains in fp32."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    train.main(base_args(tiny, tmp_path, dtype="bfloat16", max_iters=2, eval_interval=2))
    records = metrics(tmp_path)
    assert all(np.isfinite(r.get("train_loss", 0.0)) for r in records)
    state = adapter(tmp_path)
    assert state and all(v.dtype == torch.float32 for v in state.values())
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["dtype"] == "bfloat16"


def test_run_ends_with_exact_match_line(tiny, tmp_path, monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    train.main(
        base_args(tiny, tmp_path, max_iters=2, exact_match_examples=1, exact_match_max_new_tokens=4)
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"exact match: base \d+\.\d% -> tuned \d+\.\d%", lines[-1])
    assert lines[-2] == f"adapter: {tmp_path / 'adapter.safetensors'}"
    assert sum(line.startswith("  ") and "base" in line for line in lines) == 3  # one line per task
    records = metrics(tmp_path)
    assert {"iter", "train_loss", "lr"} <= records[1].keys()
    assert {"val_loss", "val_loss/add", "val_loss/reverse", "val_loss/upper"} <= records[0].keys()


# -----------------------------------------------------------------------------
# bad settings and bad data: one clear line, before any training


def bad_inputs(tiny, root):
    os.makedirs(root / "no_weights", exist_ok=True)
    (root / "no_weights" / "config.json").write_text(
        open(os.path.join(tiny["base"], "config.json")).read()
    )
    sources.write_dataset(
        str(root / "empty"),
        {"train": [], "val": []},
        dict(vocab_size=64, bos_id=1, eos_id=2, tokenizer="", max_len=64),
    )
    return [
        (
            ["--no_such_setting=1"],
            r"no_such_setting: unknown setting; known settings: .*batch_size",
        ),
        (["--batch_size=two"], r"batch_size: expected int"),
        (["--learning_rate=[1]"], r"learning_rate: expected float"),
        (["--datasets=" + str(root / "missing")], r"missing: dataset directory not found"),
        (["--datasets=" + str(root / "empty")], r"empty: train split is empty"),
        (
            ["--ckpt_dir=" + str(root / "no_weights")],
            r"no_weights: config.json but no model.safetensors",
        ),
        (
            ["--resume=True", "--out_dir=" + str(root / "never_ran")],
            r"ckpt.pt: resume=True but there is no checkpoint",
        ),
        (
            ["--n_loras=8", "--lora_rank=8"],
            r"base: MultiLoRALinear: n_loras\*lora_rank: expected <= min\(d_in, d_out\) = \d+, "
            r"got 8\*8 = 64",
        ),
        (["--finetune=qlora"], r"finetune: expected one of multilora, lora, full"),
        (
            ["--gradient_accumulation_steps=0"],
            r"gradient_accumulation_steps: expected a positive multiple of the 1 processes",
        ),
        (
            ["--max_iters=30", "--warmup_iters=50"],
            r"warmup_iters: expected a value in \[0, max_iters\] \(max_iters = 30\)",
        ),
        (
            ["--min_lr=1", "--learning_rate=0.1"],
            r"min_lr: expected a value in \[0, learning_rate\]",
        ),
        (["--init_from=scratch"], r"init_from: expected pretrained, or scratch with finetune=full"),
        (["--device=cuda"], r"device: expected cpu \(no CUDA device here\)"),
    ]


def test_bad_settings_fail_early(tiny, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for extra, message in bad_inputs(tiny, tmp_path):
        args = base_args(tiny, tmp_path / "out") + extra
        with pytest.raises(UserError, match=message):
            train.main(args)
        assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")  # nothing ran


def test_cli_error_is_one_line(tiny, tmp_path):
    p = run(base_args(tiny, tmp_path) + ["--lora_rnak=4"], check=False)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --lora_rnak=4: lora_rnak: unknown setting; known settings:"
    )


# -----------------------------------------------------------------------------
# configurator


def test_configurator_types_files_and_lists(tmp_path):
    defaults = dict(n=1, x=0.5, name="a", flag=False, items=["q", "k"], numbers=[1, 2])
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\n_helper = 3\nn = 4\nx = 2\nitems = ['v']\n")
    final = configurator.configure(
        dict(defaults),
        [str(cfg), "--name=7", "--flag=true", "--numbers=3,4", "--items=q,k,v,o", "--x=1e-3"],
    )
    assert final == dict(
        n=4, x=1e-3, name="7", flag=True, items=["q", "k", "v", "o"], numbers=[3, 4]
    )
    # a bare --flag is true
    assert configurator.configure(dict(defaults), ["--flag"])["flag"] is True
    assert isinstance(configurator.configure(dict(defaults), [str(cfg)])["x"], float)
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 3\n")
    with pytest.raises(
        UserError, match=r"bad.py: n_layer: unknown setting; known settings: flag, items"
    ):
        configurator.configure(dict(defaults), [str(bad)])
    for arg in ("--flag=1", "--n=1.5", "--numbers=a", "--n"):
        with pytest.raises(UserError):
            configurator.configure(dict(defaults), [arg])
    with pytest.raises(UserError, match="no such config file"):
        configurator.configure(dict(defaults), [str(tmp_path / "none.py")])


def test_config_files_are_valid(monkeypatch):
    """Every shipped config file sets only known settings, with the right types (config/_paper.py is
    a part the paper-setup files include, not a config of its own)."""
    files = sorted(
        f
        for f in os.listdir(os.path.join(ROOT, "config"))
        if f.endswith(".py") and not f.startswith("_")
    )
    assert len(files) >= 16
    # config files are given relative to the repository root, where train.py runs
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RANK", "0")  # as under torchrun: the paper's full fine-tuning arms use FSDP
    for f in files:
        if f.startswith("compare"):  # compare.py's configs (its arms are train.py arguments)
            import compare

            final = configurator.configure(
                compare.SETTINGS
                if hasattr(compare, "SETTINGS")
                else {k: v for k, v in vars(compare).items() if k.islower()},
                [os.path.join("config", f)],
            )
            assert final["baseline"] in [a.partition(":")[0].strip() for a in final["arms"]], f
            continue
        final = configurator.configure(train.SETTINGS, [os.path.join("config", f)])
        assert final["finetune"] in ("multilora", "lora", "full"), f


def test_first_fit_against_hand_computed_rows():
    # longest first: 7 opens row 0, 5 row 1, 4 row 2; 3 fits row 1 (5+3 = 8), 1 fits row 0 (7+1)
    assert dataset.first_fit([3, 7, 5, 1, 4], 8) == [[1, 3], [2, 0], [4]]
    assert dataset.first_fit([2, 2, 2], 2) == [[0], [1], [2]]  # nothing shares: one per row


# -----------------------------------------------------------------------------
# data safety: a run is never replaced unasked, nothing is written before every check, no code
# runs on load


def tree_hashes(folder):
    import hashlib

    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run(base_args(tiny, out, max_iters=3))
    return out


def test_finished_run_is_never_replaced_unasked(tiny, finished_run, tmp_path):
    before = tree_hashes(finished_run)
    p = run(base_args(tiny, finished_run, max_iters=3, learning_rate=2e-2), check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert (
        p.stderr.startswith(f"error: {finished_run}: holds a run (")
        and "--overwrite=True" in p.stderr
    )
    assert tree_hashes(finished_run) == before  # byte-identical
    # --overwrite=True replaces it: the same run again gives the same metrics
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(finished_run, copy)
    run(base_args(tiny, copy, max_iters=3, overwrite=True))
    assert metrics(copy) == metrics(finished_run)


def test_second_live_process_is_refused(tiny, tmp_path):
    import util

    os.makedirs(tmp_path / "out")
    held = util.lock_folder(str(tmp_path / "out"))  # as a running train.py holds it
    p = run(base_args(tiny, tmp_path / "out"), check=False)
    held.close()
    assert (
        p.returncode == 2
        and "another process is using this folder" in p.stderr
        and p.stderr.count("\n") == 1
    )
    assert sorted(os.listdir(tmp_path / "out")) == [".lock"]


def test_crafted_checkpoint_runs_no_code(tiny, finished_run, tmp_path):
    import pickle
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(out / "ckpt.pt", "wb") as f:
        pickle.dump({"settings": Exploit()}, f)
    before = tree_hashes(out)
    p = run(base_args(tiny, out, max_iters=3, resume=True), check=False)
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: {out / 'ckpt.pt'}: cannot read the checkpoint"
    )
    assert not marker.exists()  # weights_only=True: the pickled call never ran
    assert tree_hashes(out) == before


def test_diverged_run_stops_and_keeps_the_last_good_adapter(tiny, finished_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = tree_hashes(out)
    # continue the finished 3-step run to step 6 with a learning rate that blows the weights up
    p = run(
        base_args(tiny, out, max_iters=6, resume=True, learning_rate=1e30, min_lr=0.0), check=False
    )
    assert p.returncode == 2, p.stdout[-2000:]
    assert re.fullmatch(
        r"error: step \d+: the (training|validation) loss is nan: the run diverged \(try a lower "
        r"learning_rate\); .* keeps the checkpoint of step 3\n",
        p.stderr,
    ), p.stderr
    after = tree_hashes(out)
    for f in ("adapter.safetensors", "ckpt.pt"):
        assert after[f] == before[f]
    multilora.load_adapter(str(out / "adapter.safetensors"))  # finite, loadable


def test_wrong_tokenizer_or_ids_refused_before_out_dir_is_touched(tiny, tmp_path):
    import sentencepiece as spm

    other = tmp_path / "other"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 50),
        model_prefix=str(other),
        vocab_size=10,
        model_type="word",
        minloglevel=2,
    )
    out = tmp_path / "out"
    p = run(base_args(tiny, out, tokenizer=f"{other}.model"), check=False)
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: {other}.model: tokenizer has 10 tokens but the model"
    )
    assert not out.exists()
    # a prepared dataset whose ids exceed the vocabulary its meta.json claims
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    tokens = np.load(data / "train_tokens.npy")
    tokens[5] = dataset.read_meta(str(data))["vocab_size"]
    np.save(data / "train_tokens.npy", tokens)
    p = run(base_args(tiny, out, datasets=str(data)), check=False)
    assert (
        p.returncode == 2
        and p.stderr.startswith(f"error: {data / 'train_tokens.npy'}")
        and "vocab" in p.stderr
    ), p.stderr
    assert not out.exists()


def test_final_exact_match_goes_to_metrics(tiny, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    train.main(
        base_args(
            tiny,
            tmp_path,
            max_iters=1,
            eval_interval=1,
            exact_match_examples=2,
            exact_match_max_new_tokens=2,
        )
    )
    last = json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])
    tasks = [k for k in last if k.startswith("exact_match/")]
    assert sorted(tasks) == ["exact_match/add", "exact_match/reverse", "exact_match/upper"]
    assert last["exact_match"] == pytest.approx(sum(last[k] for k in tasks) / 3)
