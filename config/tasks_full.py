# The embedded default's full fine-tuning arm: every weight of the tiny base trains, on the same
# data and steps as config/tasks_multilora.py.
ckpt_dir = "data/tiny_base"
datasets = ["data/tasks"]
out_dir = "out/tasks-full"
finetune = "full"
learning_rate = 3e-4
min_lr = 3e-5
