"""A test-only kind of adapter, declared as docs/method.md says a new arm is: a layer class plus one
entry in multilora.ARMS. No shipped file knows it. Its update is nonlinear in x,

    h = W0·x + (α/r)·B·tanh(A·x),

so it has no fixed ΔW: it cannot merge, and no PEFT LoRA computes it. Its tensors are named toy_A
and toy_B (no lora_ prefix). tests/test_arms.py registers it in its own process, and in train.py's,
export.py's subprocesses before they import anything else of ours."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import multilora


class ToyLinear(nn.Module):
    def __init__(self, base, lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, device=None):
        super().__init__()
        d_out, d_in = base.weight.shape
        device = device or base.weight.device
        self.weight = base.weight.requires_grad_(False)
        self.scale, self.lora_dropout = lora_alpha / lora_rank, lora_dropout
        # A random, B = 0: the output is the base's at step 0
        a = torch.empty(lora_rank, d_in, device=device, dtype=torch.float32).uniform_(-1, 1)
        self.toy_A = nn.Parameter(a / d_in**0.5)
        self.toy_B = nn.Parameter(torch.zeros(d_out, lora_rank, device=device))

    def forward(self, x):
        out = F.linear(x, self.weight)
        x = F.dropout(x.to(self.toy_A.dtype), self.lora_dropout, self.training)
        return out + (self.scale * F.linear(torch.tanh(F.linear(x, self.toy_A)), self.toy_B)).to(
            out.dtype
        )


# the one entry: name, layer, parameters, settings (of adapt_model's), cannot merge, no PEFT form
ARM = multilora.Arm(
    ToyLinear, ("toy_A", "toy_B"), ("lora_rank", "lora_alpha", "lora_dropout"), False
)


def register():
    multilora.ARMS["toy"] = ARM
