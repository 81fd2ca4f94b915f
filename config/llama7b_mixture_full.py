# LLaMA-7B (LLaMA 1/2 7B, 32k SentencePiece vocabulary), the multi-task mixture: Alpaca + MMLU (auxiliary train) + GSM8K + Dolly, mixed in proportion to size; finetune=full.
# One node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/llama7b_mixture_full.py
# Prepare the data with this model's tokenizer first:
#   python data/alpaca/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/alpaca/llama
#   python data/mmlu/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/mmlu/llama
#   python data/gsm8k/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/gsm8k/llama
#   python data/dolly/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/dolly/llama
ckpt_dir = "checkpoints/llama-7b"
datasets = ["data/alpaca/llama", "data/mmlu/llama", "data/gsm8k/llama", "data/dolly/llama"]
mixture = "proportional"
out_dir = "out/llama7b_mixture_full"
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
