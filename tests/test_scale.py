"""Real shapes: Llama-2-7B, Llama-3-8B and the 70Bs on the meta device (parameter counts, adapters,
adapter metadata, FLOPs, the memory plan), each against a hand formula or the published figure; and
a real model whose embedding has more than 2^24 entries trained one step (a float32 index rounds
past 2^24)."""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch

import checkpoint
import llama
import multilora
import plan
import random_llama
import train
import util
from checkpoint import iter_safetensors, read_safetensors_header
from chunked_loss import token_loss_sum
from conftest import ROOT
from configurator import configure

# published totals (Meta's model cards / HF configs), in parameters
PUBLISHED = {"llama2-7b": 6.74e9, "llama3-8b": 8.03e9, "llama2-70b": 68.98e9, "llama3-70b": 70.55e9}
SHAPES = {  # written out here, not read from random_llama: the presets are checked against these
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000
    ),
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256
    ),
    "llama2-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=32000
    ),
    "llama3-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=128256
    ),
}
N, R, TARGETS = 5, 32, ("q", "k", "v", "o")


def shapes(D, L, H, KV, I, V):
    """{module: (d_in, d_out)} of one layer, and the parameter total, by hand (untied lm_head)."""
    hd = D // H
    mods = {
        "q": (D, H * hd),
        "k": (D, KV * hd),
        "v": (D, KV * hd),
        "o": (H * hd, D),
        "gate": (D, I),
        "up": (D, I),
        "down": (I, D),
    }
    per_layer = sum(a * b for a, b in mods.values()) + 2 * D  # + two RMSNorm weights
    return mods, 2 * V * D + L * per_layer + D  # embedding, lm_head, blocks, final norm


@pytest.fixture(scope="module", params=list(SHAPES))
def meta_model(request):
    name = request.param
    c = random_llama.preset_config(name)
    with torch.device("meta"):
        model = llama.Llama(c)
    return name, c, model


def test_preset_is_the_published_shape(meta_model):
    name, c, model = meta_model
    want = SHAPES[name]
    assert {k: getattr(c, k) for k in want} == want
    assert c.rope_theta == (500000.0 if want["vocab_size"] == 128256 else 10000.0)
    _, total = shapes(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size)
    assert model.num_params() == total
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.001  # the model card's rounding


def test_adapters_metadata_flops_at_real_shape(meta_model, tmp_path):
    name, c, model = meta_model
    with torch.device("meta"):
        model = llama.Llama(c)  # a fresh one: adapt_model changes it
    D, L, H, KV, I, V = c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size
    mods, total = shapes(D, L, H, KV, I, V)
    settings = multilora.adapt_model(
        model, "multilora", targets=",".join(TARGETS), n_loras=N, lora_rank=R, scaling="channel"
    )
    # per module: A (n·r, d_in), B (d_out, n·r), s (n, d_out) for scaling=channel
    want = L * sum(N * R * (mods[t][0] + mods[t][1]) + N * mods[t][1] for t in TARGETS)
    trainable, base = multilora.count_trainable(model)
    assert (trainable, base) == (want, total)
    assert all(p.is_meta for p in model.parameters())

    # the adapter file's metadata: settings, fingerprint of the base's names and shapes, summary
    names = [("embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (H * (D // H), D)),
            (p + "self_attn.k_proj.weight", (KV * (D // H), D)),
            (p + "self_attn.v_proj.weight", (KV * (D // H), D)),
            (p + "self_attn.o_proj.weight", (D, H * (D // H))),
            (p + "mlp.gate_proj.weight", (I, D)),
            (p + "mlp.up_proj.weight", (I, D)),
            (p + "mlp.down_proj.weight", (D, I)),
            (p + "input_layernorm.weight", (D,)),
            (p + "post_attention_layernorm.weight", (D,)),
        ]
    names += [("norm.weight", (D,)), ("lm_head.weight", (V, D))]
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters() if "lora_" not in n]
    assert sorted(got) == sorted(names)  # the same names and shapes; the hash follows model order
    fp = hashlib.sha256("\n".join(f"{n}:{s}" for n, s in got).encode()).hexdigest()[:16]
    assert checkpoint.base_fingerprint(model) == fp
    path = str(tmp_path / "adapter.safetensors")
    multilora.save_adapter(model, path, state={}, step=3)  # the metadata alone: no real tensors
    _, meta, _ = read_safetensors_header(path)
    assert meta["format"] == checkpoint.ADAPTER_FORMAT and meta["step"] == "3"
    assert (
        json.loads(meta["settings"])
        == dict(
            finetune="multilora",
            targets=list(TARGETS),
            n_loras=N,
            lora_rank=R,
            lora_alpha=16,
            lora_dropout=0.0,
            scaling="channel",
        )
        == settings
    )
    assert meta["base_fingerprint"] == fp
    assert meta["base_summary"] == (
        f"dim={D} n_layers={L} n_heads={H} n_kv_heads={KV} hidden_dim={I} vocab_size={V}"
    )
    assert json.loads(meta["base_sample"]) == []  # a weightless base has no values to sample

    # FLOPs: 4 per frozen matmul weight (forward + input gradients), 6 per trained one,
    # + attention 12·L·H·hd·T; matmul weights = all but the embedding table and the norms
    T = 4096
    matmul = total - V * D - (2 * L + 1) * D
    assert (
        util.flops_per_token(c, trainable, "multilora", T)
        == 4 * matmul + 6 * trainable + 12 * L * H * (D // H) * T
    )
    assert util.flops_per_token(c, total, "full", T) == 6 * matmul + 12 * L * D * T


def plan_settings(**over):
    argv = [f"--{k}={v}" for k, v in over.items()]
    return configure(plan.plan_settings(), argv, "tools/plan.py")


@pytest.mark.parametrize("name,nproc", [("llama2-7b", 1), ("llama3-70b", 8)])
def test_plan_weights_and_optimizer_by_hand(name, nproc):
    c = random_llama.preset_config(name)
    s = plan_settings(
        model=name,
        finetune="multilora",
        n_loras=N,
        lora_rank=R,
        lora_targets=",".join(TARGETS),
        dtype="bfloat16",
        nproc=nproc,
        fsdp=nproc > 1,
        batch_size=1,
        seq_len=512,
        gradient_accumulation_steps=nproc,
    )
    terms, _ = plan.plan(s, c)
    D, L, H, KV, I, V = c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size
    mods, _ = shapes(D, L, H, KV, I, V)

    def local(rows, cols):  # FSDP2 shards dim 0: ceil(rows / N) rows on each rank (padded)
        return math.ceil(rows / nproc) * cols

    frozen = (
        2 * local(V, D)
        + local(D, 1)
        + L * (sum(local(d_out, d_in) for d_in, d_out in mods.values()) + 2 * local(D, 1))
    )
    lora = L * sum(
        local(N * R, mods[t][0]) + local(mods[t][1], N * R) + local(N, mods[t][1]) for t in TARGETS
    )
    assert terms["base weights"] == 2 * frozen  # bf16
    assert terms["trainable weights (fp32)"] == 4 * lora
    assert terms["gradients (fp32)"] == 4 * lora
    assert terms["AdamW moments (2 x fp32)"] == 8 * lora
    if nproc == 1:  # 7B: 12.6 GiB of bf16 base + 16 bytes per adapter parameter
        assert 2 * frozen == 2 * 6738415616
        assert lora == 32 * 4 * (N * R * 8192 + N * 4096)
    else:  # untied: the largest FSDP group is the final norm with lm_head, gathered in bf16,
        # frozen (no gradients), twice (the all-gather's buffer and the parameters)
        block = sum(d_in * d_out for d_in, d_out in mods.values()) + 2 * D
        block += sum(N * R * (mods[t][0] + mods[t][1]) + N * mods[t][1] for t in TARGETS)
        assert V * D + D > block
        assert terms["FSDP unsharded (2 x largest group)"] == 2 * 2 * (V * D + D)


# -----------------------------------------------------------------------------
# a real model past 2^24 embedding entries, trained one step; sampling past 2^24 logits


def test_embedding_past_2_24_trains_and_loads(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    c = llama.LlamaConfig(
        dim=576,
        n_layers=2,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=64,
        vocab_size=32000,
        max_seq_len=128,
        bos_id=1,
        eos_id=[2],
    )
    assert c.vocab_size * c.dim > 2**24
    torch.manual_seed(0)
    base = llama.Llama(c)
    base.init_weights()
    checkpoint.save_hf_checkpoint(base, str(tmp_path / "base"))
    data = tmp_path / "data"
    shutil.copytree(os.path.join(ROOT, "data", "tasks"), data)
    with open(data / "meta.json") as f:
        meta = json.load(f)
    with open(data / "meta.json", "w") as f:
        json.dump(dict(meta, vocab_size=32000), f)
    out = tmp_path / "out"
    train.main(
        [
            f"--ckpt_dir={tmp_path / 'base'}",
            f"--datasets={data}",
            f"--out_dir={out}",
            "--finetune=multilora",
            "--n_loras=2",
            "--lora_rank=2",
            "--max_iters=1",
            "--batch_size=2",
            "--gradient_accumulation_steps=1",
            "--eval_interval=1",
            "--eval_examples=0",
            "--exact_match_examples=0",
            "--learning_rate=1e-2",
            "--warmup_iters=0",
            "--threads=0",
        ]
    )
    path = str(out / "adapter.safetensors")
    _, meta, _ = read_safetensors_header(path)
    # the recorded sample: 8 evenly spaced entries at integer positions, found here by hand
    emb = base.embed_tokens.weight.detach().reshape(-1)
    n = emb.numel()
    want = [float(emb[i * (n - 1) // 7]) for i in range(8)]
    assert (n - 1) == 18431999 and 7 * (n - 1) // 7 > 2**24  # the last positions are past 2^24
    assert json.loads(meta["base_sample"])[:8] == pytest.approx(want, rel=0, abs=0)

    model = checkpoint.load_model(str(tmp_path / "base"))  # base_sample checked against this model
    multilora.apply_adapter(model, path)
    state = multilora.adapter_state_dict(model)
    saved = dict(iter_safetensors(path))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(k.endswith("lora_s") and saved[k].abs().sum() > 0 for k in saved)  # it trained


def test_sample_past_2_24_logits():
    B, V = 131, 128256
    assert B * V > 2**24
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    logits[-1, V - 1] = 50.0  # the last row's best: flat index B·V - 1, past 2^24
    assert torch.equal(llama.sample_next(logits), logits.argmax(-1))
    for kw in (dict(top_k=1), dict(top_p=0.5), dict(top_k=50, top_p=0.9)):
        out = llama.sample_next(logits, temperature=0.8, generator=g, **kw)
        assert out.shape == (B,) and out.dtype == torch.int64
        assert bool(((out >= 0) & (out < V)).all()) and int(out[-1]) == V - 1
        if "top_k" in kw:  # each row's token is among its top_k
            kth = torch.topk(logits, kw["top_k"]).values[:, -1]
            assert bool((logits.gather(1, out[:, None])[:, 0] >= kth).all())


# -----------------------------------------------------------------------------
# tools/plan.py's activation count against what autograd keeps


def saved_bytes(model, s, x, y, positions=None, segments=None):
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    bf16 = s["dtype"] == "bfloat16"
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        token_loss_sum(model, x, y, positions, segments)
    return sum(seen.values())


@pytest.mark.parametrize(
    "finetune,dtype,ckpt,pack,targets",
    [
        ("multilora", "float32", False, False, "q,k,v,o"),
        ("multilora", "bfloat16", False, True, "v,gate,down"),
        ("lora", "bfloat16", True, False, "q,k,v,o"),
        ("full", "float32", False, True, "q,k,v,o"),
        ("full", "bfloat16", True, False, "q,k,v,o"),
    ],
)
def test_plan_activations_equal_autograd_saved(finetune, dtype, ckpt, pack, targets):
    c = llama.LlamaConfig(
        dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=300
    )
    s = plan_settings(
        finetune=finetune,
        dtype=dtype,
        activation_checkpointing=ckpt,
        pack=pack,
        lora_targets=targets,
        n_loras=2,
        lora_rank=4,
        lora_scaling="channel",
    )
    B, T = 2, 24
    torch.manual_seed(0)
    model = llama.Llama(c).to(torch.float32 if finetune == "full" else getattr(torch, dtype))
    train.adapt(
        model,
        finetune,
        dict(
            targets=s["lora_targets"],
            n_loras=2,
            lora_rank=4,
            lora_alpha=16,
            lora_dropout=0.0,
            scaling="channel",
            init="",
        ),
    )
    model.checkpoint_blocks, model.loss_chunk = ckpt, 7
    model.train()
    x, y = torch.randint(0, c.vocab_size, (B, T)), torch.randint(0, c.vocab_size, (B, T))
    positions = segments = None
    if pack:  # two packed examples a row
        positions = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)])[None].expand(B, T)
        segments = (torch.arange(T) >= T // 2).long()[None].expand(B, T)
    act = 4 if dtype == "float32" else 2
    resid = 4 if finetune == "full" else act
    kept = plan.activation_bytes(c, s, B, T, act, resid)[0]
    assert kept == saved_bytes(model, s, x, y, positions, segments)


# -----------------------------------------------------------------------------
# train.shard, 2 gloo ranks against 1 process, with trained ends (full fine-tuning) and frozen ones
# (LoRA), tied and untied. Untied: the embedding is an FSDP2 group, and so are the final norm with
# lm_head, whose lm_head the chunked loss uses without calling it (gathered by norm's forward,
# resharded by the root's post-forward, gathered again for the backward); for LoRA each projection
# is a group of its own too (fsdp_units=linear). Tied: the embedding is in the root group.


SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)


def _run(script, args, nproc=1):
    import subprocess
    import sys

    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
        else []
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(
        launcher + [script] + [f"--{k}={v}" for k, v in args.items()],
        cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]


def _train(out_dir, nproc, finetune, base, tied):
    """2 steps of 4 micro-batches of 2 (-> losses by step, the trained weights): full fine-tuning
    from a random init of SHAPE, LoRA over the base written at that shape."""
    scratch = dict(init_from="scratch", tie_embeddings=tied, **SHAPE)
    model = scratch if finetune == "full" else dict(ckpt_dir=base)
    data = os.path.join(base, "tasks") if base.exists() else os.path.join(ROOT, "data", "tasks")
    args = dict(
        finetune=finetune, datasets=data, batch_size=2,
        gradient_accumulation_steps=4, max_iters=2, eval_interval=2, eval_examples=4,
        exact_match_examples=0, log_interval=1, warmup_iters=0, learning_rate=1e-2, threads=0,
        out_dir=str(out_dir), fsdp=nproc > 1, **model,
    )  # fmt: skip
    if nproc > 1 and finetune != "full" and not tied:
        args["fsdp_units"] = "linear"
    _run("train.py", args, nproc)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [(r["iter"], r.get("train_loss"), r.get("val_loss")) for r in rows]
    path = "hf/model.safetensors" if finetune == "full" else "adapter.safetensors"
    return losses, dict(iter_safetensors(os.path.join(out_dir, path)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp_ends_match_one_process(finetune, tied, tmp_path):
    # full: lm_head trains, so its gradient must come back whole through the group's reduce-scatter
    base = tmp_path / "base"
    if finetune != "full":
        # an uneven vocabulary over 2 ranks; tasks/: the embedded suite with this vocab_size
        shape = dict(vocab_size=1001, tie_embeddings=tied, tasks=True, out_dir=base, **SHAPE)
        _run("tools/random_llama.py", shape)
    ref_losses, ref = _train(tmp_path / "one", 1, finetune, base, tied)
    got_losses, got = _train(tmp_path / "two", 2, finetune, base, tied)
    assert [r[0] for r in ref_losses] == [r[0] for r in got_losses]
    assert sum(r[1] is not None for r in ref_losses) == 2
    for a, b in zip(ref_losses, got_losses):
        assert a == pytest.approx(b, abs=1e-5)
    assert ref.keys() == got.keys() and (finetune != "full" or ("lm_head.weight" in ref) != tied)
    for k in ref:  # after 2 steps: every gradient, lm_head's included, was the same
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)


def test_memtrace_makes_the_report_folder_or_refuses(tmp_path):
    """tools/memtrace.py OUT.json: a folder that is not there yet is made (the report is written
    after the run); a path that cannot hold the report is refused in one line before the script
    runs."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text("open(__file__ + '.ran', 'w').close()\n")
    out = tmp_path / "new" / "deeper" / "trace.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "memtrace.py")]
    p = subprocess.run(cmd + [str(out), str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.read_text())
    assert report["peak_above_base"] >= 0 and report["phases"]
    os.remove(f"{script}.ran")
    for bad in (tmp_path / "new", tmp_path / "job.py" / "trace.json"):
        p = subprocess.run(
            cmd + [str(bad), str(script)], capture_output=True, text=True, timeout=60
        )
        assert p.returncode != 0 and p.stderr.startswith(f"error: {bad}: ")
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        assert not os.path.exists(f"{script}.ran")
