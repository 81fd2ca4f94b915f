"""bench.py's default mode (train.py's training step per arm next to transformers + PEFT) runs end
to end and prints one JSON object per configuration. Speed is not asserted (no timing in tests);
that every configuration starts from the same loss is: it shows they compute the same thing."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("peft")


def test_bench_json_lines():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--json", "--dim=32", "--n_layers=1",
                        "--n_heads=2", "--hidden_dim=64", "--vocab_size=64", "--batch_size=2", "--seq_len=8",
                        "--rounds=1", "--warmup=1", "--threads=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    keys = {"impl", "finetune", "n_loras", "lora_rank", "tokens_per_s", "peak_mem_bytes"}
    assert rows and all(keys <= set(row) for row in rows)
    configs = {(row["impl"], row["finetune"]) for row in rows}
    assert {("ours", "multilora"), ("ours", "lora"), ("ours", "full"), ("peft", "lora")} <= configs
    by = {(row["impl"], row["finetune"]): row for row in rows}
    assert by[("ours", "lora")]["lora_rank"] == by[("peft", "lora")]["lora_rank"] == 32
    assert abs(by[("ours", "lora")]["first_loss"] - by[("peft", "lora")]["first_loss"]) < 1e-5
    assert all(row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0 for row in rows)
