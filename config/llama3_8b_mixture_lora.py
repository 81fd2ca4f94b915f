# Llama-3-8B on the multi-task mixture, finetune=lora; one node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b_mixture_lora.py
# The other settings (ours, not the paper's recipe: config/_paper.py says which is which), why they
# are what they are, and how to prepare the data: config/_paper.py
_model, _data, finetune = "llama3_8b", "mixture", "lora"
out_dir = "out/llama3_8b_mixture_lora"
exec(open("config/_paper.py").read())
