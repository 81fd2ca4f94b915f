# Llama-2-70B on the multi-task mixture, finetune=multilora; one node of 8x80 GB GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama2_70b_mixture_multilora.py
# The other settings, why they are what they are, and how to prepare the data: config/_paper.py
# From the paper (its abstract): LLaMA 7B-65B. Ours: Llama-2-70B itself (beyond the paper's
# LLaMA 7B-65B), the FSDP, activation checkpointing and bf16 settings, and the hyperparameters of
# config/_paper.py.
# 138.0 GB of bf16 weights do not fit one GPU: FSDP shards them (and the adapters, their gradients
# and AdamW state) over the 8, activation checkpointing keeps one block input per layer.
# Expected per GPU, rows of 1024 tokens (docs/scaling.md):
#   python tools/plan.py config/llama2_70b_mixture_multilora.py --model=llama2-70b --nproc=8 \
#       --seq_len=1024
#   -> 28.6 GiB of 80: base 16.1, adapters + gradients + AdamW 1.2,
#      FSDP's gathered groups 4.2, activations 7.1 (121.59 GiB without activation checkpointing)
_model, _data, finetune = "llama2_70b", "mixture", "multilora"
out_dir = "out/llama2_70b_mixture_multilora"
exec(open("config/_paper.py").read())
fsdp = True
activation_checkpointing = True
dtype = "bfloat16"
