"""Loading under FSDP2 that shards from the start (train.build_model with fsdp=True), and NaN/inf
in a base checkpoint refused at load.

Two gloo ranks under torchrun run train.build_model on checkpoints written here from known random
weights: Hugging Face (two shards; one file with tied embeddings), Meta's two
consolidated.NN.safetensors (LLaMA-2 style, the embedding split on dim 1) and three bf16
consolidated.NN.pth (Llama-3 style, split on dim 0), all GQA with a vocabulary that 2 ranks do not
divide. Each rank saves its local shards; this process checks them bit for bit against torch.chunk
of the weights written (the references: the weights themselves and a single-process load, itself
checked equal to them), the adapters against a single-process adapt_model with the same seed, the
bytes each rank read (the loader's count, and the kernel's /proc/self/io for the safetensors
layouts) against its shard's bytes, and the adapter file rank 0 writes against one written in a
single process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

if __name__ != "__main__":
    from conftest import ROOT, python
else:  # the torchrun worker below: the project's modules from the repository root
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, ROOT)
import checkpoint
import llama
import multilora
from util import UserError

SEED, LORA = 1234, dict(n_loras=2, lora_rank=4)
HF = llama.LlamaConfig(
    dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=1001
)
# Meta: hidden_dim = 512 from params.json (2/3 of 4·dim, multiple_of 32); wk's 96 rows split
# mid-head by FSDP
META = dict(
    dim=192, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=-1, multiple_of=32, norm_eps=1e-5
)


def random_weights(config, seed=0):
    torch.manual_seed(seed)
    model = llama.Llama(config)
    model.init_weights()
    for p in model.parameters():  # no two rows alike, norms included
        p.data += torch.rand_like(p) * 0.01
    return {
        k: v.detach()
        for k, v in model.state_dict().items()
        if not (config.tie_embeddings and k == "lm_head.weight")
    }


def write_hf(out, config, weights, n_files):
    os.makedirs(out)
    keys = list(weights)
    files = (
        [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
        if n_files > 1
        else ["model.safetensors"]
    )
    weight_map = {}
    for i, f in enumerate(files):
        part = keys[i * len(keys) // n_files : (i + 1) * len(keys) // n_files]
        save_file(
            {
                ("" if k == "lm_head.weight" else "model.") + k: weights[k].contiguous()
                for k in part
            },
            os.path.join(out, f),
        )
        weight_map.update({("" if k == "lm_head.weight" else "model.") + k: f for k in part})
    if n_files > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(checkpoint.config_to_hf(config), fh)


def write_meta(out, weights, n_files, fmt, embed_dim, dtype):
    """Meta names, wq/wk rows in interleaved RoPE order (HF -> Meta), split as model-parallel files
    are: wo and w2 on dim 1, the other matrices on dim 0, the embedding on embed_dim, norms
    copied."""
    os.makedirs(out)
    with open(os.path.join(out, "params.json"), "w") as fh:
        json.dump(META, fh)
    hd = META["dim"] // META["n_heads"]
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    shards = [{} for _ in range(n_files)]
    for k, w in weights.items():
        if k.startswith("layers."):
            _, i, *mid, _ = k.split(".")
            mk = f"layers.{i}.{names['.'.join(mid)]}.weight"
        else:
            mk = {
                "embed_tokens.weight": "tok_embeddings.weight",
                "lm_head.weight": "output.weight",
            }.get(k, k)
        if mk.endswith(("wq.weight", "wk.weight")):
            heads = w.shape[0] // hd
            w = (
                w.view(heads, 2, hd // 2, w.shape[1])
                .transpose(1, 2)
                .reshape(heads * hd, w.shape[1])
            )
        dim = (
            None
            if w.dim() == 1
            else 1
            if mk.endswith(("wo.weight", "w2.weight"))
            else embed_dim
            if mk == "tok_embeddings.weight"
            else 0
        )
        for s, part in zip(shards, [w] * n_files if dim is None else w.chunk(n_files, dim)):
            s[mk] = part.to(dtype).clone()
    for i, s in enumerate(shards):
        path = os.path.join(out, f"consolidated.{i:02d}.{fmt}")
        torch.save(s, path) if fmt == "pth" else save_file(s, path)


def rchar():  # bytes this process has read with read(2) and friends (Linux)
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def worker(out, cases):
    """Under torchrun: train.build_model (fsdp=True) on each checkpoint; every rank saves its
    shards."""
    import configurator
    import train

    rank = int(os.environ["RANK"])
    for i, (name, ckpt) in enumerate(cases):
        vars(train).update(
            configurator.configure(
                train.SETTINGS,
                [
                    f"--ckpt_dir={ckpt}",
                    "--fsdp=True",
                    "--gradient_accumulation_steps=2",
                    f"--seed={SEED}",
                    "--finetune=multilora",
                    f"--n_loras={LORA['n_loras']}",
                    f"--lora_rank={LORA['lora_rank']}",
                ],
            )
        )
        if i == 0:
            train.init_distributed()
        config = checkpoint.read_config(ckpt)
        model = train.build_model(config)
        local = {k: v.to_local().detach().clone() for k, v in model.named_parameters()}
        # the bytes a load reads: the loader's count, and the kernel's
        with torch.device("meta"):
            again = llama.Llama(config)
        train.shard(again, "cpu")
        before = rchar()
        n_bytes = checkpoint.load_into(again, ckpt)
        read = rchar() - before
        torch.save(
            dict(local=local, n_bytes=n_bytes, rchar=read, sample=model.base_sample),
            os.path.join(out, f"{name}.rank{rank}.pt"),
        )
        # collective
        adapter = {k: v.full_tensor() for k, v in multilora.adapter_state_dict(model).items()}
        if rank == 0:
            multilora.save_adapter(
                model,
                os.path.join(out, f"{name}.adapter.safetensors"),
                model.adapter_settings,
                state=adapter,
            )
    torch.distributed.barrier()  # every rank's files are written
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: destroying gloo's threads at exit can abort (SIGABRT)


CASES = [  # name, writer(dir, config, weights), file dtype
    ("hf_sharded", lambda d, c, w: write_hf(d, c, w, 2), torch.float32),
    ("hf_tied", lambda d, c, w: write_hf(d, c, w, 1), torch.float32),
    (
        "meta_safetensors",
        lambda d, c, w: write_meta(d, w, 2, "safetensors", 1, torch.float32),
        torch.float32,
    ),
    ("meta_pth", lambda d, c, w: write_meta(d, w, 3, "pth", 0, torch.bfloat16), torch.bfloat16),
]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_load")
    meta_config = checkpoint.config_from_meta(META, HF.vocab_size)
    made = {}
    for seed, (name, write, dtype) in enumerate(CASES):
        config = HF if name.startswith("hf") else meta_config
        if name == "hf_tied":
            config = llama.LlamaConfig(**{**vars(HF), "tie_embeddings": True})
        # another base each: the adapter check must tell them apart
        weights = random_weights(config, seed)
        write(str(root / name), config, weights)
        made[name] = (str(root / name), {k: v.to(dtype).float() for k, v in weights.items()}, dtype)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    cases = json.dumps([(n, made[n][0]) for n, *_ in CASES])
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(ROOT, "tests", "test_fsdp_load.py"),
            str(root),
            cases,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, made


def single_process(ckpt):
    """The reference: one process loads the whole model and adapts it, as train.py does."""
    torch.manual_seed(SEED)
    model = checkpoint.load_model(ckpt)
    multilora.adapt_model(model, "multilora", **LORA)
    return model


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sharded_load_equals_single_process(sharded, name):
    root, made = sharded
    ckpt, weights, dtype = made[name]
    ref = single_process(ckpt)
    params, adapters = dict(ref.named_parameters()), multilora.adapter_state_dict(ref)
    for k, w in weights.items():  # the single-process load is the weights written, bit for bit
        assert torch.equal(params[k], w), k
    assert (ref.lm_head.weight is ref.embed_tokens.weight) == (name == "hf_tied")
    for rank in range(2):
        got = torch.load(root / f"{name}.rank{rank}.pt", weights_only=True)
        assert got["local"].keys() == params.keys()
        base_bytes = 0
        for k, p in params.items():
            chunks = p.detach().chunk(2)  # FSDP2 shards dim 0 as torch.chunk does
            want = chunks[rank] if rank < len(chunks) else p[:0]
            assert torch.equal(got["local"][k], want), (k, rank)  # adapters included: same draws
            base_bytes += 0 if k in adapters else want.numel() * dtype.itemsize
        assert got["n_bytes"] == base_bytes  # what it read is exactly its own rows
        if name != "meta_pth":  # memory-mapped .pth reads are page faults, not read(2)
            assert base_bytes <= got["rchar"] <= base_bytes + 128 * 1024  # + config and headers
            assert base_bytes < sum(p.numel() for p in ref.parameters()) * dtype.itemsize * 0.6


@pytest.mark.parametrize("name", ["hf_sharded", "meta_pth"])
def test_adapter_file_written_under_fsdp_carries_the_base_identity(sharded, name, tmp_path):
    root, made = sharded
    ref = single_process(made[name][0])
    multilora.save_adapter(ref, str(tmp_path / "ref.safetensors"))
    meta = {
        p: checkpoint.read_safetensors_header(str(p))[1]
        for p in (tmp_path / "ref.safetensors", root / f"{name}.adapter.safetensors")
    }
    a, b = meta.values()
    assert a["base_fingerprint"] == b["base_fingerprint"]
    assert (
        json.loads(a["base_sample"]) == json.loads(b["base_sample"])
        and len(json.loads(a["base_sample"])) == 24
    )
    multilora.load_adapter(str(root / f"{name}.adapter.safetensors"), ref)  # accepted for this base
    other = checkpoint.load_model(
        made["hf_tied" if name == "hf_sharded" else "meta_safetensors"][0]
    )
    with pytest.raises(UserError, match="base_"):  # and refused for another one
        multilora.load_adapter(str(root / f"{name}.adapter.safetensors"), other)


# -----------------------------------------------------------------------------
# NaN or inf in a base weight: refused at load, one line naming the file and the tensor


@pytest.mark.parametrize("bad,layout", [(float("nan"), "hf"), (float("inf"), "meta")])
def test_non_finite_base_weight_is_refused(tmp_path, bad, layout):
    weights = random_weights(
        HF if layout == "hf" else checkpoint.config_from_meta(META, HF.vocab_size)
    )
    weights["layers.1.mlp.up_proj.weight"][7, 3] = bad
    if layout == "hf":
        write_hf(str(tmp_path / "ckpt"), HF, weights, 2)
        file = "model-00002-of-00002.safetensors"
    else:
        write_meta(str(tmp_path / "ckpt"), weights, 2, "pth", 1, torch.float32)
        file = "consolidated.*"
    p = python(
        [sys.executable, "generate.py", f"--ckpt_dir={tmp_path / 'ckpt'}", "--max_new_tokens=1"],
        cwd=ROOT,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert (
        lines[0].startswith("error: ")
        and file in lines[0]
        and "layers.1.mlp.up_proj.weight" in lines[0]
        and "NaN or inf" in lines[0]
    ), lines[0]


def test_weight_beyond_float16_range_is_refused(tmp_path):
    weights = random_weights(HF)
    weights["norm.weight"][5] = 1e6  # finite in the fp32 file, inf in fp16
    write_hf(str(tmp_path / "ckpt"), HF, weights, 1)
    with pytest.raises(
        UserError, match=r"model.safetensors: tensor norm.weight: values beyond torch.float16"
    ):
        checkpoint.load_model(str(tmp_path / "ckpt"), dtype=torch.float16)
    assert checkpoint.load_model(str(tmp_path / "ckpt")).norm.weight[5] == 1e6  # fine in fp32


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]))
