"""
Leave this project with a result: turn a base checkpoint + adapter file into
  --format=hf    a merged full checkpoint in the Hugging Face layout (config.json + model.safetensors
                 + tokenizer files), which transformers, vLLM and llama.cpp's converter read;
  --format=peft  a plain LoRA adapter in the PEFT layout (adapter_config.json +
                 adapter_model.safetensors) that any LoRA serving stack can load onto the base.

    python export.py --ckpt_dir=BASE --adapter=FILE --out_dir=DIR --format=hf|peft [--dtype=auto]

The PEFT export is exact for any n (docs/multilora.md): MultiLoRA is a rank-(n·r) LoRA with
    lora_A = [A_1; …; A_n]                          (n·r, d_in)
    lora_B = (α/r)·[diag(s_1)B_1 … diag(s_n)B_n]     (d_out, n·r)
    r' = lora_alpha' = n·r                            so PEFT's scale α'/r' is 1.
Plain LoRA adapters are written as they are (r, α, B unfolded), as PEFT itself would have trained them.
Our module names are HF's without "model." and RoPE is HF's rotate_half layout, so q/k need no
permutation: PEFT keys are base_model.model.model.{our key}.lora_A.weight.
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

import llama
import multilora
import util
import checkpoint

# tokenizer/generation files of a HF checkpoint that a merged export should carry along
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peft_adapter(model, base_model_name_or_path=""):
    """An adapted model -> (tensors {PEFT key: fp32 tensor}, adapter_config dict)."""
    settings = model.adapter_settings
    tensors, rank = {}, None
    with torch.no_grad():
        for name, m in multilora.adapter_modules(model):
            prefix = f"base_model.model.model.{name}"
            if m.lora_s is None:  # plain LoRA: PEFT's own form
                lora_B, rank, alpha = m.lora_B, m.lora_rank, m.lora_alpha
            else:                 # MultiLoRA: the rank-(n·r) identity, scale folded into B
                lora_B, rank = m.folded_B(), m.n_loras * m.lora_rank
                alpha = rank
            tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = lora_B.detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": settings["lora_dropout"],
        "target_modules": [multilora.TARGET_MODULES[t].split(".")[-1] for t in settings["targets"]],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    return tensors, config


def base_dtype(ckpt_dir):
    """The dtype the base checkpoint is stored in (config.json's torch_dtype / dtype), else float32."""
    if checkpoint.checkpoint_layout(ckpt_dir) == "meta":
        return torch.bfloat16  # Meta ships bf16 consolidated.*.pth
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    return DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), torch.float32)


def export_hf(ckpt_dir, adapter, out_dir, dtype=None):
    """Merged checkpoint. The merge adds ΔW in fp32 and casts once to `dtype`, which is what
    merging a fp32 copy of the base would give, without holding one."""
    dtype = dtype or base_dtype(ckpt_dir)
    model = checkpoint.load_model(ckpt_dir, dtype=dtype)
    multilora.apply_adapter(model, adapter, merge=True)
    state = {k: v for k, v in model.state_dict().items() if not multilora.is_lora_key(k)}
    tokenizer = os.path.join(ckpt_dir, "tokenizer.model")
    checkpoint.save_hf_checkpoint(state, out_dir, tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None,
                             config=model.config)
    for name in HF_SIDE_FILES:
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            shutil.copyfile(os.path.join(ckpt_dir, name), os.path.join(out_dir, name + ".tmp"))
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def export_peft(ckpt_dir, adapter, out_dir):
    # the base itself is loaded (not just its config) so apply_adapter can check the file against it
    model = checkpoint.load_model(ckpt_dir, dtype=base_dtype(ckpt_dir))
    multilora.apply_adapter(model, adapter)
    tensors, config = peft_adapter(model, os.path.abspath(ckpt_dir))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    util.write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt_dir", required=True, help="base checkpoint (HF or Meta layout)")
    p.add_argument("--adapter", required=True, help="adapter .safetensors written by train.py")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--format", choices=("hf", "peft"), default="hf")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="hf format: weights dtype (auto = the base checkpoint's)")
    args = p.parse_args(argv)
    if args.format == "hf":
        export_hf(args.ckpt_dir, args.adapter, args.out_dir, None if args.dtype == "auto" else DTYPES[args.dtype])
    else:
        export_peft(args.ckpt_dir, args.adapter, args.out_dir)
    print(f"wrote {args.format} export to {args.out_dir}")


if __name__ == "__main__":
    util.run_cli(main)
