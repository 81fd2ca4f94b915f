# Pretrain the embedded default's tiny base model from scratch on the generated corpus, which states
# the tasks' content in prose but never uses the instruction format (data/tasks/generate.py).
#   python data/tasks/generate.py --overwrite=True # tokenizer, data/tasks, data/tasks_corpus
#   python train.py config/tiny_base_pretrain.py --overwrite=True
# (it replaces data/tiny_base/config.json and data/tiny_base/model.safetensors)
init_from = "scratch"
finetune = "full"
datasets = ["data/tasks_corpus"]
tokenizer = "data/tiny_base/tokenizer.model"
out_dir = "out/tiny_base"
hf_dir = "data/tiny_base"
exact_match_examples = 0
# about 0.84M parameters: GQA (4 query heads, 2 key/value heads), tied embeddings
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
hidden_dim = 352
max_seq_len = 256
tie_embeddings = True
# 16 documents x 3000 steps: about 5 passes over the corpus (9500 documents)
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 3000
eval_interval = 500
eval_examples = 64
log_interval = 50
learning_rate = 3e-3
warmup_iters = 20
min_lr = 3e-4
weight_decay = 0.0
beta2 = 0.95
