"""
Leave this project with a result: turn a base checkpoint + adapter file into
  --format=hf    a merged full checkpoint in the Hugging Face layout (config.json +
                 model.safetensors + tokenizer files), which transformers and llama.cpp's converter
                 read;
  --format=peft  a plain LoRA adapter in the PEFT layout (adapter_config.json +
                 adapter_model.safetensors + the base's tokenizer files) for PEFT and LoRA servers.
What was verified with which tool, and what is only the format: docs/formats.md.

    python export.py --ckpt_dir=BASE --adapter=FILE --out_dir=DIR --format=hf|peft [--dtype=auto]
    python export.py --ckpt_dir=BASE --adapter=FILE --out_dir=DIR --format=peft --base_name=NAME

out_dir must be new or empty and outside ckpt_dir: an export never overwrites or mixes with other
files. Every check (settings, folders, the adapter against its base) runs before the first write.

The PEFT export is exact for any n (docs/method.md): MultiLoRA is a rank-(n·r) LoRA with
    lora_A = [A_1; …; A_n]                          (n·r, d_in)
    lora_B = (α/r)·[diag(s_1)B_1 … diag(s_n)B_n]     (d_out, n·r)
    r' = lora_alpha' = n·r                            so PEFT's scale α'/r' is 1.
Plain LoRA adapters are written as they are (r, α, B unfolded), as PEFT would have trained them.
Each arm declares its PEFT form, or that it has none (multilora.ARMS): export refuses an arm
without one, and --format=hf an arm that cannot merge, in one line, before anything is written.
Our module names are HF's without "model." and RoPE is HF's rotate_half layout, so q/k need no
permutation: PEFT keys are base_model.model.model.{our key}.lora_A.weight.
"""

import json
import os
from contextlib import contextmanager, suppress

import torch

import checkpoint
import multilora
import util
from configurator import S, configure, declared
from generate import load_for_inference
from util import UserError

# -----------------------------------------------------------------------------
ckpt_dir = S("", util.required, "base checkpoint (HF or Meta layout)")
adapter = S("", util.required, "adapter .safetensors written by train.py")
out_dir = S("", util.required, "a new or empty folder, outside ckpt_dir")
format = S("hf", ("hf", "peft"), "hf: merged full checkpoint; peft: a LoRA adapter for the base")
dtype = S(
    "auto",
    ("auto", "float32", "bfloat16", "float16"),
    "hf format: weights dtype (auto = the base's)",
)
base_name = S(
    "",
    None,
    "peft format: the base as adapter_config.json names it, a hub id or a path "
    "(empty = --ckpt_dir as given)",
)
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


def peft_adapter(model, base_model_name_or_path=""):
    """An adapted model -> (tensors {PEFT key: fp32 tensor}, adapter_config dict), in the PEFT
    LoRA form its arm declares exact (multilora.ARMS[...].peft)."""
    settings = model.adapter_settings
    form = multilora.ARMS[settings["finetune"]].peft
    tensors, rank = {}, None
    with torch.no_grad():
        for name, m in multilora.adapter_modules(model):
            prefix = f"base_model.model.model.{name}"
            lora_A, lora_B, rank, alpha = form(m)
            tensors[f"{prefix}.lora_A.weight"] = lora_A.detach().float().contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = lora_B.detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.get("lora_dropout", 0.0),
        "target_modules": [multilora.TARGET_MODULES[t].split(".")[-1] for t in settings["targets"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return tensors, config


def check_out_dir(ckpt_dir, out_dir):
    """Refuse an out_dir that is a file, holds files, or is (or lies in) ckpt_dir: an export next to
    the base's own files would overwrite them (config.json, model.safetensors)."""
    util.check_output(out_dir, "out_dir", ckpt_dir, folder=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out_dir={out_dir}: not empty; export to a new or empty folder")


def check_arm(adapter, model, what, refusal):
    """One line, before anything is written, when the adapter's arm lacks `what` (an Arm field)."""
    finetune = model.adapter_settings["finetune"]
    if not getattr(multilora.ARMS[finetune], what):
        fmt = "hf" if what == "merge" else "peft"
        raise UserError(
            f"{adapter}: finetune={finetune}: this arm {refusal} (multilora.ARMS), so it has no "
            f"--format={fmt} export"
        )


# what an export writes: the only files it removes from the folder of an interrupted one
EXPORT_FILES = (*checkpoint.HF_EXPORT_FILES, "adapter_model.safetensors", "adapter_config.json")


@contextmanager
def writing(ckpt_dir, out_dir):
    """with writing(ckpt_dir, out_dir) as folder: write the export's files in folder
    (OUT_DIR.partial, beside out_dir), locked: a second export to the same out_dir is refused, and
    out_dir is checked again under the lock. When the block ends, the folder becomes out_dir in one
    rename: an export is whole or absent. A killed export leaves OUT_DIR.partial, which the next
    one clears (of the files an export writes, nothing else) and reuses: nothing blocks the
    rerun."""
    partial = os.path.normpath(out_dir) + ".partial"
    os.makedirs(partial, exist_ok=True)
    lock = util.lock_folder(partial)
    done = False
    try:
        check_out_dir(ckpt_dir, out_dir)
        others = clear(partial)
        if others:
            raise UserError(
                f"{partial}: holds files an export does not write ({', '.join(others)}); "
                f"move them, or export to another --out_dir"
            )
        yield partial
        try:
            # replaces an empty folder, never a folder with files
            os.rename(partial, os.path.normpath(out_dir))
        except OSError as e:
            raise UserError(
                f"--out_dir={out_dir}: cannot become the export ({e.strerror}); "
                f"export to a new or empty folder"
            ) from None
        done = True
    finally:
        if not done:
            clear(partial)  # under the lock still
        os.remove(os.path.join(out_dir if done else partial, ".lock"))
        lock.close()
        if not done:
            # empty, unless files of the user's (or of an export started since) are there
            with suppress(OSError):
                os.rmdir(partial)


def clear(folder):
    """Remove from folder what an export writes (its files, their temporaries). -> what else is
    there"""
    util.remove_stale_tmp(folder, EXPORT_FILES)
    for name in set(os.listdir(folder)) & set(EXPORT_FILES):
        os.remove(os.path.join(folder, name))
    return sorted(set(os.listdir(folder)) - {".lock"})


def export_hf(ckpt_dir, adapter, out_dir, dtype="auto"):
    """Merged checkpoint. The merge adds ΔW in fp32 and casts once to `dtype` (a name; auto = the
    base's), which is what merging a fp32 copy of the base would give, without holding one.
    apply_adapter checks the file against the base first, so a wrong pair stops before any write."""
    check_out_dir(ckpt_dir, out_dir)
    model, _ = load_for_inference(ckpt_dir, None, adapter, dtype, "cpu", merge=True)
    check_arm(adapter, model, "merge", "cannot be merged into the base's weights")
    adapters = multilora.adapter_state_dict(model)
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    with writing(ckpt_dir, out_dir) as folder:
        # the tokenizer files: the base's own, or tokenizer_config.json written for its
        # tokenizer.model
        checkpoint.save_hf_checkpoint(state, folder, tokenizer_path=ckpt_dir, config=model.config)
        name = "generation_config.json"
        checkpoint.copy_side_file(os.path.join(ckpt_dir, name), os.path.join(folder, name))


def export_peft(ckpt_dir, adapter, out_dir, base_name=""):
    """The LoRA adapter, and the base's tokenizer files beside it (AutoTokenizer on the export then
    adds BOS as the adapter was trained). adapter_config.json names the base by base_name, or by
    ckpt_dir as given (not made absolute: the export holds no path of this machine)."""
    check_out_dir(ckpt_dir, out_dir)
    # the base itself is loaded (not just its config) so apply_adapter can check the file against it
    model, _ = load_for_inference(ckpt_dir, None, adapter, "auto", "cpu", merge=False)
    check_arm(adapter, model, "peft", "has no exact PEFT LoRA form")
    tensors, config = peft_adapter(model, base_name or os.path.normpath(ckpt_dir))
    with writing(ckpt_dir, out_dir) as folder:
        with util.atomic_write(os.path.join(folder, "adapter_model.safetensors")) as tmp:
            specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}  # tensor by tensor
            checkpoint.write_safetensors(tmp, specs, tensors.get, metadata={"format": "pt"})
        text = json.dumps(config, indent=2)
        util.write_text(os.path.join(folder, "adapter_config.json"), text)
        checkpoint.write_tokenizer_files(folder, ckpt_dir, model.config.max_seq_len)


def main(argv):
    globals().update(configure(SETTINGS, argv))
    if format == "hf":
        export_hf(ckpt_dir, adapter, out_dir, dtype)
    else:
        export_peft(ckpt_dir, adapter, out_dir, base_name)
    print(f"wrote {format} export to {out_dir}")


if __name__ == "__main__":
    util.run_cli(main)
