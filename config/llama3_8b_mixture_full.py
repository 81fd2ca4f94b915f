# Llama-3-8B (128k tiktoken vocabulary, GQA), the multi-task mixture: Alpaca + MMLU (auxiliary train) + GSM8K + Dolly, mixed in proportion to size; finetune=full.
# One node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b_mixture_full.py
# Prepare the data with this model's tokenizer first:
#   python data/alpaca/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/alpaca/llama3
#   python data/mmlu/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/mmlu/llama3
#   python data/gsm8k/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/gsm8k/llama3
#   python data/dolly/prepare.py --tokenizer=checkpoints/Meta-Llama-3-8B --out_dir=data/dolly/llama3
ckpt_dir = "checkpoints/Meta-Llama-3-8B"
datasets = ["data/alpaca/llama3", "data/mmlu/llama3", "data/gsm8k/llama3", "data/dolly/llama3"]
mixture = "proportional"
out_dir = "out/llama3_8b_mixture_full"
finetune = "full"
fsdp = True              # fp32 weights, gradients and AdamW state (16 bytes/parameter) need sharding
activation_checkpointing = True
learning_rate = 2e-5
min_lr = 2e-6
weight_decay = 0.0
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
