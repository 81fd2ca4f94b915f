"""
Generate text from a LLaMA checkpoint (either layout), optionally with a MultiLoRA/LoRA adapter.

    python generate.py --ckpt_dir=DIR --prompt="Once upon a time" --max_new_tokens=60
    python generate.py --ckpt_dir=DIR --prompt_file=prompts.txt --temperature=0.8 --top_p=0.9
    python generate.py --adapter=out/tasks-multilora/adapter.safetensors   # the embedded default's
    python generate.py --help                                              # every setting

BOS goes before each prompt, as LLaMA was trained; EOS ends it; all run as one left-padded batch.
load_for_inference, here, is how eval.py, export.py and analyze.py load a base too: the checkpoint,
its tokenizer checked against it, an adapter applied (checked against this base first) or merged.
"""

import json
import os
import sys
import time

import torch

import chat
import checkpoint
import dataset
import llama
import multilora
import util
from configurator import S, configure, declared
from tokenizer import check_tokenizer, load_tokenizer

# -----------------------------------------------------------------------------
ckpt_dir = S("data/tiny_base", None, "base model: HF (config.json) or Meta (params.json) layout")
tokenizer = S("", None, "tokenizer file; empty = ckpt_dir's (tokenizer.py's TOKENIZER_FILES)")
adapter = S("", None, "an adapter.safetensors written by train.py / multilora.py")
merge = S(True, None, "merge the adapter into the weights where its arm can (no overhead)")
prompt = S(
    "### Instruction:\nSort the digits from small to large.\n\n### Input:\n5 9 3 0 3\n\n"
    "### Response:\n|### Instruction:\nWhich number is bigger?\n\n### Input:\n597 and 853\n\n"
    "### Response:\n|### Instruction:\nWrite the digits in reverse order.\n\n### Input:\n"
    "8 7 6 1 4\n\n### Response:\n",
    None,
    "prompts separated by |; \\n in them is a newline, as in --prompt_file",
)
template = S(
    "",
    lambda v, s: v not in ("", "alpaca", "chat") and not os.path.isdir(v) and "a prepared data dir",
    "wrap each prompt: empty = as given; alpaca = our template (the prompt is the instruction); "
    "chat = the base's chat template (a user turn); a prepared data dir = its meta.json's",
)
prompt_file = S("", None, "UTF-8, a prompt per line (a newline in it written \\n); replaces prompt")
max_new_tokens = S(60, "[1, inf)", "tokens to generate per prompt at most")
batch_size = S(16, "[1, inf)", "prompts generated at a time (a long --prompt_file: in batches)")
temperature = S(0.0, "[0, inf)", "0 = greedy")
top_k = S(0, "[0, inf)", "sample from the k most likely tokens; 0 = off")
top_p = S(1.0, "(0, 1]", "sample from the fewest tokens with this much probability; 1 = off")
seed = S(1337, util.check_seed, "sampling seed")
dtype = S("float32", ("float32", "bfloat16", "float16"), "weights dtype")
device = S(util.default_device(), util.check_device, "cpu, cuda, cuda:N or mps")
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


def stored_dtype(ckpt_dir):
    """The dtype the base checkpoint is stored in (config.json's torch_dtype / dtype), else
    float32; Meta's consolidated.*.pth are bf16."""
    checkpoint.read_config(ckpt_dir)  # the checkpoint checked before config.json is read raw
    if checkpoint.checkpoint_layout(ckpt_dir) == "meta":
        return torch.bfloat16
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    name = str(cfg.get("torch_dtype") or cfg.get("dtype"))
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32


def load_for_inference(ckpt_dir, tokenizer, adapter, dtype, device, merge):
    """The one way generate.py, eval.py, export.py and analyze.py load a base -> (model in eval
    mode, tokenizer). tokenizer: a tokenizer file, "" for the one in ckpt_dir, None for none
    (None is returned). adapter: a file, or "" for the base alone. dtype: a torch dtype's name, or
    "auto" for the one the checkpoint is stored in."""
    dtype = stored_dtype(ckpt_dir) if dtype == "auto" else getattr(torch, dtype)
    model = checkpoint.load_model(ckpt_dir, dtype=dtype, device=device).eval()
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer or ckpt_dir)
        check_tokenizer(tok, model.config, ckpt_dir)
    if adapter:
        multilora.apply_adapter(model, adapter, merge=merge)
    return model, tok


def wrap(prompts, tok):
    """The prompts' ids in --template's format (a prompt as an instruction, or a user turn)."""
    chat_fmt = chat.base_template(tok.path) if template == "chat" else None
    if template not in ("", "alpaca", "chat"):
        chat_fmt = dataset.data_format([template])
    if not template:
        return [tok.encode(p, bos=True) for p in prompts]
    records = [dict(instruction=p, input="", response="") for p in prompts]
    return [dataset.prompt_ids(tok, r, chat_fmt) for r in records]


def read_prompts():
    """--prompt_file's lines, read before the model so that a wrong file costs no loading time."""
    with open(prompt_file, "rb") as f:
        data = f.read()
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        line, byte = data[: e.start].count(b"\n") + 1, data[e.start : e.start + 1]
        raise util.UserError(
            f"{prompt_file}: line {line}: not UTF-8 (byte {byte!r}); save the prompts as UTF-8"
        ) from None
    prompts = [line.rstrip("\r").replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise util.UserError(f"{prompt_file}: no prompts in file")
    return prompts


def check_generation_size(config, prompts, max_new_tokens, batch_size, dtype, device, where):
    """Refuse, before the model is loaded, max_new_tokens past the model's context and a batch
    whose KV cache and weights this machine cannot hold (a prompt's tokens are at most its UTF-8
    bytes, + BOS). eval.py checks its settings with this too."""
    c = config
    if max_new_tokens >= c.max_seq_len:
        raise util.UserError(
            f"max_new_tokens: expected less than the model's context of {c.max_seq_len} tokens "
            f"({where}), got {max_new_tokens}"
        )
    longest = max(len(p.encode()) + 1 for p in prompts) if prompts else 1
    total = min(c.max_seq_len, longest + max_new_tokens)
    size = getattr(torch, dtype).itemsize if isinstance(dtype, str) else 4
    rows = min(batch_size, max(len(prompts), 1))
    kv = 2 * c.n_layers * rows * total * c.n_kv_heads * c.head_dim * size
    need = checkpoint.config_numel(c) * size + kv + rows * c.vocab_size * 8 * 2
    util.check_memory(
        need,
        f"max_new_tokens {max_new_tokens} for {rows} prompts at a time (batch_size) on {where}",
        device,
    )


def main(argv):
    globals().update(configure(SETTINGS, argv))
    prompts = read_prompts() if prompt_file else prompt.replace("\\n", "\n").split("|")
    config = checkpoint.read_config(ckpt_dir)
    check_generation_size(config, prompts, max_new_tokens, batch_size, dtype, device, ckpt_dir)
    t0 = time.perf_counter()
    model, tok = load_for_inference(ckpt_dir, tokenizer, adapter, dtype, device, merge)
    t1 = time.perf_counter()
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, seed=seed)
    ids, n_new = wrap(prompts, tok), 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        outputs = llama.generate(model, tok, batch, max_new_tokens, **sampling)
        n_new += sum(len(o) for o in outputs)
        for p, out in zip(batch, outputs):
            if len(prompts) > 1:
                print("-" * 40)
            # decoded together, so that word boundaries come out right; BOS left out
            print(tok.decode((p[1:] if p[:1] == [tok.bos_id] else p) + out))
    t2 = time.perf_counter()
    rate = f"{n_new / max(t2 - t1, 1e-9):.1f} tokens/s"
    print(f"loaded in {t1 - t0:.2f}s; {n_new} tokens in {t2 - t1:.2f}s ({rate})", file=sys.stderr)


if __name__ == "__main__":
    util.run_cli(main)
