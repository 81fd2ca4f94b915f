# Llama-3-8B (128k tiktoken vocabulary, GQA), the multi-task mixture: Alpaca + MMLU (auxiliary train) + GSM8K + Dolly, mixed in proportion to size; finetune=lora.
# One node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b_mixture_lora.py
# Prepare the data with this model's tokenizer first:
#   python data/alpaca/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/alpaca/llama3
#   python data/mmlu/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/mmlu/llama3
#   python data/gsm8k/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/gsm8k/llama3
#   python data/dolly/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/dolly/llama3
ckpt_dir = "checkpoints/Meta-Llama-3-8B"
datasets = ["data/alpaca/llama3", "data/mmlu/llama3", "data/gsm8k/llama3", "data/dolly/llama3"]
mixture = "proportional"
out_dir = "out/llama3_8b_mixture_lora"
finetune = "lora"
lora_targets = ["q", "k", "v", "o"]
lora_rank = 160          # the same rank (and parameter budget) as MultiLoRA's n·r = 5·32
lora_alpha = 320.0       # the same scale α/r = 2 as the MultiLoRA arm
learning_rate = 3e-4
min_lr = 3e-5
# 128 examples per optimizer step for the whole job: 4 per GPU x 32 micro-steps (4 on each of 8 GPUs)
batch_size = 4
gradient_accumulation_steps = 32
max_iters = 4000            # about 3 epochs of the ~175k-example mixture at 128 examples per step
warmup_iters = 50
beta2 = 0.999
grad_clip = 1.0
eval_interval = 200
eval_examples = 200
log_interval = 10
exact_match_examples = 0  # score with eval.py (MMLU, GSM8K) after training
device = "cuda"
dtype = "bfloat16"
