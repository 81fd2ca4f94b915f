# The embedded default's LoRA arm: plain LoRA of the same total rank (n·r = 4·8 = 32) and scale α/r
# as the MultiLoRA default, on the same data and steps (compare with config/tasks_multilora.py).
ckpt_dir = "data/tiny_base"
datasets = ["data/tasks"]
out_dir = "out/tasks-lora"
finetune = "lora"
lora_targets = ["q", "k", "v", "o"]
lora_rank = 32
lora_alpha = 64.0
