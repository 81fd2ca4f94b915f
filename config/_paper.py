# Included by the config/llama*_{alpaca,mixture}_{multilora,lora,full}.py arm files; not a runnable
# config by itself. These are our setups for real models, not the paper's: what we know of the
# MultiLoRA paper (arXiv 2311.11501, November 2023) is its abstract and a section-by-section summary
# of its claims, not its recipe.
# From the paper (the abstract): LLaMA 7B to 65B; MultiLoRA against LoRA and full fine-tuning; about
# 2.5% extra parameters; training data mixing instruction following, natural language understanding
# and world knowledge.
# Ours (the paper's values are not confirmed): n=5, r=32, the q,k,v,o targets, α, the learning
# rates, epochs, batch and the mixture (Alpaca, MMLU, GSM8K, Dolly: it has no natural language
# understanding set), and every model beyond LLaMA 7B-65B: Llama-3-8B (April 2024) postdates the
# paper, and the 70B configs are ours too.
# Each arm file sets _model, _data, finetune and out_dir, then runs this file, which sets everything
# else. One node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/<model>_<data>_<finetune>.py
# Prepare the data with the model's tokenizer first (LLaMA-7B: checkpoints/llama-7b into
# data/*/llama; Llama-3-8B: checkpoints/Meta-Llama-3-8B into data/*/llama3); Alpaca alone needs only
# the first line:
#   python data/alpaca/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/alpaca/llama
#   python data/mmlu/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/mmlu/llama
#   python data/gsm8k/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/gsm8k/llama
#   python data/dolly/prepare.py --tokenizer=checkpoints/llama-7b --out_dir=data/dolly/llama

# model: LLaMA-7B (LLaMA 1/2 7B, 32k SentencePiece vocabulary) or Llama-3-8B (128k tiktoken
# vocabulary, GQA)
# 65B/70B: config/llama*_70b_*.py, llama65b_*
_ckpt_dirs = {
    "llama7b": "checkpoints/llama-7b",
    "llama3_8b": "checkpoints/Meta-Llama-3-8B",
    "llama65b": "checkpoints/llama-65b",
    "llama2_70b": "checkpoints/Llama-2-70b-hf",
    "llama3_70b": "checkpoints/Meta-Llama-3-70B",
}
# LLaMA 1 and 2 share one
_data_tags = {
    "llama7b": "llama",
    "llama3_8b": "llama3",  # data/<dataset>/<tag>: prepared with that tokenizer
    "llama65b": "llama",
    "llama2_70b": "llama",
    "llama3_70b": "llama3",
}
ckpt_dir = _ckpt_dirs[_model]

# data (ours): Alpaca alone (instruction following), or our mixture: Alpaca + MMLU (auxiliary
# train, world knowledge) + GSM8K + Dolly, mixed in proportion to size. The paper's datasets: not
# confirmed; its mixture also has natural language understanding, ours does not
_dataset_names = {"alpaca": ["alpaca"], "mixture": ["alpaca", "mmlu", "gsm8k", "dolly"]}[_data]
datasets = [f"data/{_name}/{_data_tags[_model]}" for _name in _dataset_names]
mixture = "proportional"
# ours: 128 examples per optimizer step for the whole job: 4 per GPU x 32 micro-steps (4 on each of
# 8 GPUs), about 3 epochs, the learning rates and schedule below
batch_size = 4
gradient_accumulation_steps = 32
if _data == "alpaca":
    max_iters = 1200  # 52k examples, 3 epochs at 128 examples per step
else:
    max_iters = 4000  # about 3 epochs of the ~175k-example mixture at 128 examples per step
warmup_iters = 50
beta2 = 0.999
grad_clip = 1.0

# fine-tuning arm
if finetune == "multilora":
    # ours: n = 5, r = 32, α = 2r on q,k,v,o; n·r = 160 there is about 2.5% extra parameters on
    # LLaMA-7B, the abstract's figure. The paper's n, r, α and projections: not confirmed
    lora_targets = ["q", "k", "v", "o"]
    n_loras = 5
    lora_rank = 32
    lora_alpha = 64.0
elif finetune == "lora":
    lora_targets = ["q", "k", "v", "o"]
    lora_rank = 160  # the same rank (and parameter budget) as MultiLoRA's n·r = 5·32
    lora_alpha = 320.0  # the same scale α/r = 2 as the MultiLoRA arm
if finetune == "full":
    fsdp = True  # fp32 weights, gradients and AdamW state (16 bytes/parameter) need sharding
    activation_checkpointing = True
    learning_rate = 2e-5
    min_lr = 2e-6
    weight_decay = 0.0
else:
    learning_rate = 3e-4
    min_lr = 3e-5

# evaluation and system
eval_interval = 200
eval_examples = 200
log_interval = 10
exact_match_examples = 0  # score with eval.py (MMLU, GSM8K) after training
# device and dtype: the defaults (cuda and bfloat16 where CUDA is available)
