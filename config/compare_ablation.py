# compare.py's ablation: MultiLoRA's two ideas apart, at a fixed total rank n·r = 32 on q,k,v,o.
#   python compare.py config/compare_ablation.py
# Horizontal scaling: n = 1, 2, 4, 8 modules of rank 32/n, all with MultiLoRA's init ("paper init":
# random A and B, s = 0, as MTL-LoRA's public reimplementation draws them; the paper's own code is
# not confirmed). The init: at n = 1 it is the only change from LoRA r=32; at n = 4 LoRA's init
# (B = 0, no s; train.py --lora_init=lora) leaves only the horizontal scaling.
# α/r is applied per module, as in PEFT and MTL-LoRA's reimplementation (the paper's choice is not
# confirmed): ΔW = (α/r)·Σ s_i ⊙ B_i·A_i. Every arm has α = 2r, so α/r = 2 for every n (LoRA r=32
# has α = 64), and no arm gets a larger step from its scale.
arms = [
    "LoRA r=32: config/tasks_lora.py",
    "paper init 1x32: config/tasks_multilora.py --n_loras=1 --lora_rank=32 --lora_alpha=64",
    "paper init 2x16: config/tasks_multilora.py --n_loras=2 --lora_rank=16 --lora_alpha=32",
    "MultiLoRA 4x8: config/tasks_multilora.py",  # paper init 4x8: the default comparison's arm
    "paper init 8x4: config/tasks_multilora.py --n_loras=8 --lora_rank=4 --lora_alpha=8",
    "LoRA init 4x8: config/tasks_multilora.py --n_loras=4 --lora_rank=8 --lora_alpha=16 "
    "--lora_init=lora",
]
baseline = "LoRA r=32"
full_arm = ""
seeds = [1, 2, 3]
# the runs the default comparison already made (LoRA r=32 and MultiLoRA 4x8, seeds 1-3, the same
# commands) are used as they are; the others are trained
out_dir = "out/compare"
reuse = True
out_prefix = "docs/compare_ablation"
arm_seeds = []  # every arm on every seed (the default names the comparison's full arm)
