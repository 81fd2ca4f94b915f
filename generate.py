"""
Generate text from a LLaMA checkpoint (either layout), optionally with a MultiLoRA/LoRA adapter.

    python generate.py --ckpt_dir=DIR --prompt="Once upon a time" --max_new_tokens=60 --temperature=0
    python generate.py --ckpt_dir=DIR --prompt_file=prompts.txt --temperature=0.8 --top_p=0.9 --seed=1
    python generate.py --adapter=out/tasks-multilora/adapter.safetensors   # the embedded default's result

The prompt gets BOS prepended, as LLaMA was trained; generation stops at EOS. Several prompts
(--prompt_file, one per line, or prompts separated by "|" with --prompt) run as one left-padded batch.
"""

import sys
import time

import torch

import llama
from configurator import configure

# -----------------------------------------------------------------------------
ckpt_dir = "data/tiny_base"  # base model: HF (config.json) or Meta (params.json) layout
tokenizer = ""               # tokenizer.model path; default: the one in ckpt_dir
adapter = ""                 # an adapter.safetensors written by train.py / multilora.py
merge = True                 # merge the adapter into the weights (no inference overhead)
prompt = ("### Instruction:\nSort the digits from small to large.\n\n### Input:\n5 9 3 0 3\n\n### Response:\n|"
          "### Instruction:\nWhich number is bigger?\n\n### Input:\n597 and 853\n\n### Response:\n|"
          "### Instruction:\nWrite the digits in reverse order.\n\n### Input:\n8 7 6 1 4\n\n### Response:\n")
prompt_file = ""             # one prompt per line (\n inside a prompt written as \\n)
max_new_tokens = 60
temperature = 0.0            # 0 = greedy
top_k = 0                    # 0 = off
top_p = 1.0                  # 1.0 = off
seed = 1337
dtype = "float32"            # float32 | bfloat16 | float16
device = "cpu"
# -----------------------------------------------------------------------------


def main():
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    globals().update(configure(defaults, sys.argv[1:]))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise llama.UserError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    t0 = time.perf_counter()
    model = llama.load_model(ckpt_dir, dtype=getattr(torch, dtype), device=device)
    model.eval()
    tok = llama.load_tokenizer(tokenizer or ckpt_dir)
    llama.check_tokenizer(tok, model.config, ckpt_dir)
    if adapter:
        import multilora
        multilora.apply_adapter(model, adapter, merge=merge)
    if prompt_file:
        try:
            with open(prompt_file) as f:
                prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise llama.UserError(f"{prompt_file}: cannot read prompt file ({e.strerror})") from None
        if not prompts:
            raise llama.UserError(f"{prompt_file}: no prompts in file")
    else:
        prompts = prompt.split("|")
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    outputs = llama.generate(model, tok, prompts, max_new_tokens, temperature=temperature,
                             top_k=top_k or None, top_p=top_p, seed=seed)
    elapsed = time.perf_counter() - t1
    for p, out in zip(prompts, outputs):
        if len(prompts) > 1:
            print("-" * 40)
        print(tok.decode(tok.encode(p) + out))  # decoded together, so word boundaries come out right
    n_new = sum(len(o) for o in outputs)
    print(f"loaded in {t_load:.2f}s; {n_new} tokens in {elapsed:.2f}s ({n_new / max(elapsed, 1e-9):.1f} tokens/s)",
          file=sys.stderr)


if __name__ == "__main__":
    llama.run_cli(main)
