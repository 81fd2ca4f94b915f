"""Where our files meet other tools: transformers' AutoTokenizer on every folder that holds a base
or an export (the embedded base, a full fine-tune's hf/, the PEFT export) adds BOS and tokenizes as
tokenizer.py does; PEFT's greedy text on our PEFT export is generate.py's; the export still loads
after being moved; llama.cpp's converter reads the merged export (where it is importable)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import export
import llama
import multilora
from conftest import ROOT, python
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip(
    "google.protobuf", reason="transformers >= 5 converts tokenizer.model with protobuf"
)

BASE = os.path.join(ROOT, "data", "tiny_base")
TEMPLATE = "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"
PROMPTS = [
    TEMPLATE.format("Sort the digits from small to large.", "5 9 3 0 3"),
    TEMPLATE.format("Which number is bigger?", "597 and 853"),
    TEMPLATE.format("Write the digits in reverse order.", "8 7 6 1 4"),
    "Once upon a time, 42 birds",
    "odd  spacing\tand tabs",
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A copy of the embedded base, an adapter on it whose every part is non-zero (s, B: a trained
    adapter's), its PEFT export, and a full fine-tune's hf/ as train.py writes it."""
    w = tmp_path_factory.mktemp("exports")
    shutil.copytree(BASE, w / "base")
    model = checkpoint.load_model(str(w / "base"))
    torch.manual_seed(0)
    multilora.adapt_model(model, n_loras=2, lora_rank=4)
    with torch.no_grad():
        for _, m in multilora.adapter_modules(model):
            m.lora_B.normal_(0, 0.3)  # strong enough to change the greedy text, BOS too
            m.lora_s.normal_(1, 0.3)
    multilora.save_adapter(model, str(w / "adapter.safetensors"))
    export.export_peft(str(w / "base"), str(w / "adapter.safetensors"), str(w / "peft"))
    full = checkpoint.load_model(str(w / "base"))  # train.py's write_weights for finetune=full
    checkpoint.save_hf_checkpoint(
        full.state_dict(),
        str(w / "hf"),
        config=full.config,
        tokenizer_path=str(w / "base" / "tokenizer.model"),
        step=1,
    )
    return w


@pytest.mark.parametrize("folder", ["repo_base", "hf", "peft"])
def test_auto_tokenizer_adds_bos_as_ours(exports, folder):
    path = BASE if folder == "repo_base" else str(exports / folder)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(BASE)
    assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
    for text in PROMPTS:
        assert theirs(text).input_ids == ours.encode(text, bos=True), text
        assert theirs.decode(theirs(text).input_ids, skip_special_tokens=True) == text


def test_peft_greedy_text_is_generate_py_text(exports):
    """transformers + PEFT on the export, with the export's own tokenizer, gives generate.py's
    greedy text (llama.generate on the base with the adapter applied) prompt for prompt."""
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(exports / "base"), dtype=torch.float32
    )
    hf = peft.PeftModel.from_pretrained(hf, str(exports / "peft")).eval()
    tok_hf = transformers.AutoTokenizer.from_pretrained(str(exports / "peft"))
    ours = checkpoint.load_model(str(exports / "base")).eval()
    multilora.apply_adapter(ours, str(exports / "adapter.safetensors"), merge=False)
    tok = load_tokenizer(str(exports / "base"))
    n_new = 24
    mine = llama.generate(ours, tok, PROMPTS, n_new)  # as generate.py: stops at EOS
    for prompt, out in zip(PROMPTS, mine):
        ids = tok_hf(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )
        theirs = tok_hf.decode(gen[0], skip_special_tokens=True)
        assert theirs == tok.decode(tok.encode(prompt) + out), prompt  # generate.py prints this


def test_peft_export_names_the_base_as_given_and_loads_after_a_move(exports, tmp_path, monkeypatch):
    """adapter_config.json holds no path of the machine that wrote it: --ckpt_dir as given (here
    relative), or --base_name. Moved next to its base, AutoPeftModel finds the base by that name."""
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(exports)
    export.export_peft("base", "adapter.safetensors", str(tmp_path / "rel"))
    assert (
        json.loads((tmp_path / "rel" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        == "base"
    )
    r = python(
        [
            sys.executable,
            os.path.join(ROOT, "export.py"),
            "--ckpt_dir=base",
            "--adapter=adapter.safetensors",
            f"--out_dir={tmp_path}/named",
            "--format=peft",
            "--base_name=my-org/tiny-base",
        ],
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny-base"
    moved = tmp_path / "elsewhere"
    shutil.copytree(exports / "base", moved / "base")
    shutil.move(str(tmp_path / "rel"), moved / "adapter")
    monkeypatch.chdir(moved)
    model = peft.AutoPeftModelForCausalLM.from_pretrained("adapter").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ours = checkpoint.load_model("base").eval()
    multilora.apply_adapter(ours, str(exports / "adapter.safetensors"), merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_llama_cpp_converter_reads_the_merged_export(exports, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (not a pip package: put a llama.cpp checkout on PYTHONPATH)
    turns the merged export into a GGUF whose tensors are ours. Only the converter is checked here,
    not llama.cpp's inference (that needs its C++ build)."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        pytest.skip(
            "llama.cpp's convert_hf_to_gguf.py is not importable (not on PyPI; add a llama.cpp "
            "checkout to PYTHONPATH to run this)"
        )
    import gguf  # llama.cpp's own gguf-py, beside its converter

    export.export_hf(
        str(exports / "base"), str(exports / "adapter.safetensors"), str(tmp_path / "hf")
    )
    out = tmp_path / "model.gguf"
    script = importlib.util.find_spec("convert_hf_to_gguf").origin
    r = subprocess.run(
        [sys.executable, script, str(tmp_path / "hf"), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    merged = checkpoint.load_model(str(tmp_path / "hf")).state_dict()
    # names that the converter does not permute (q/k are permuted into llama.cpp's RoPE layout)
    for ours, theirs in [
        ("embed_tokens.weight", "token_embd.weight"),
        ("norm.weight", "output_norm.weight"),
        ("layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
        ("layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
    ]:
        got = torch.from_numpy(tensors[theirs].data.copy()).reshape(merged[ours].shape)
        torch.testing.assert_close(got, merged[ours], atol=0, rtol=0)
