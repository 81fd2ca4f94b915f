# The embedded default, spelled out: MultiLoRA on the generated task suite (data/tasks) from the
# tiny base (data/tiny_base). `python train.py` runs exactly this; tasks_lora.py and tasks_full.py
# are the same budget for the other two arms (the README's comparison table). n = 4, r = 8, α = 2r:
# ours, sized to the tiny base (the paper's values are not confirmed).
ckpt_dir = "data/tiny_base"
datasets = ["data/tasks"]
out_dir = "out/tasks-multilora"
finetune = "multilora"
lora_targets = ["q", "k", "v", "o"]
n_loras = 4
lora_rank = 8
lora_alpha = 16.0
