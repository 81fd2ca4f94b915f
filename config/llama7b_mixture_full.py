# LLaMA-7B on the multi-task mixture, finetune=full; one node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama7b_mixture_full.py
# The other settings (ours, not the paper's recipe: config/_paper.py says which is which), why they
# are what they are, and how to prepare the data: config/_paper.py
_model, _data, finetune = "llama7b", "mixture", "full"
out_dir = "out/llama7b_mixture_full"
exec(open("config/_paper.py").read())
