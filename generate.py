"""
Generate text from a LLaMA checkpoint (either layout), optionally with a MultiLoRA/LoRA adapter.

    python generate.py --ckpt_dir=DIR --prompt="Once upon a time" --max_new_tokens=60
    python generate.py --ckpt_dir=DIR --prompt_file=prompts.txt --temperature=0.8 --top_p=0.9
    python generate.py --adapter=out/tasks-multilora/adapter.safetensors   # the embedded default's
    python generate.py --help                                              # every setting

BOS goes before each prompt, as LLaMA was trained; EOS ends it; all run as one left-padded batch.
"""

import sys
import time

import llama
import util
from configurator import S, configure, declared
from inference import load_for_inference

# -----------------------------------------------------------------------------
ckpt_dir = S("data/tiny_base", None, "base model: HF (config.json) or Meta (params.json) layout")
tokenizer = S("", None, "tokenizer.model path; empty = the one in ckpt_dir")
adapter = S("", None, "an adapter.safetensors written by train.py / multilora.py")
merge = S(True, None, "merge the adapter into the weights (no inference overhead)")
prompt = S(
    "### Instruction:\nSort the digits from small to large.\n\n### Input:\n5 9 3 0 3\n\n"
    "### Response:\n|### Instruction:\nWhich number is bigger?\n\n### Input:\n597 and 853\n\n"
    "### Response:\n|### Instruction:\nWrite the digits in reverse order.\n\n### Input:\n"
    "8 7 6 1 4\n\n### Response:\n",
    None,
    "prompts separated by |; \\n in them is a newline, as in --prompt_file",
)
prompt_file = S("", None, "UTF-8, a prompt per line (a newline in it written \\n); replaces prompt")
max_new_tokens = S(60, "[1, inf)", "tokens to generate per prompt at most")
temperature = S(0.0, "[0, inf)", "0 = greedy")
top_k = S(0, "[0, inf)", "sample from the k most likely tokens; 0 = off")
top_p = S(1.0, "(0, 1]", "sample from the fewest tokens with this much probability; 1 = off")
seed = S(1337, None, "sampling seed")
dtype = S("float32", ("float32", "bfloat16", "float16"), "weights dtype")
device = S(util.default_device(), util.check_device, "cpu, cuda, cuda:N or mps")
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------


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


def main(argv):
    globals().update(configure(SETTINGS, argv))
    prompts = read_prompts() if prompt_file else prompt.replace("\\n", "\n").split("|")
    t0 = time.perf_counter()
    model, tok = load_for_inference(ckpt_dir, tokenizer, adapter, dtype, device, merge)
    t1 = time.perf_counter()
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, seed=seed)
    outputs = llama.generate(model, tok, prompts, max_new_tokens, **sampling)
    t2, n_new = time.perf_counter(), sum(len(o) for o in outputs)
    for p, out in zip(prompts, outputs):
        if len(prompts) > 1:
            print("-" * 40)
        print(tok.decode(tok.encode(p) + out))  # decoded together: word boundaries come out right
    rate = f"{n_new / max(t2 - t1, 1e-9):.1f} tokens/s"
    print(f"loaded in {t1 - t0:.2f}s; {n_new} tokens in {t2 - t1:.2f}s ({rate})", file=sys.stderr)


if __name__ == "__main__":
    util.run_cli(main)
