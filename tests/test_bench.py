"""tools/bench.py's default mode (train.py's training step per arm next to transformers + PEFT)
runs end to end and prints one JSON object per configuration. Speed is not asserted (no timing in
tests); that every configuration starts from the same loss is: it shows they compute the same
thing."""

import json
import os
import sys

import pytest

from conftest import ROOT, python

pytest.importorskip("peft")


def test_bench_json_lines():
    r = python(
        [
            sys.executable,
            os.path.join(ROOT, "tools/bench.py"),
            "--json_lines",
            "--dim=32",
            "--n_layers=1",
            "--n_heads=2",
            "--hidden_dim=64",
            "--vocab_size=64",
            "--train_batch=8",
            "--train_max_len=256",
            "--rounds=1",
            "--warmup=1",
            "--threads=1",
            "--layouts=packed,padded",
            "--train_arms=multilora,lora,full",
        ],
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    keys = {"impl", "finetune", "n_loras", "lora_rank", "tokens_per_s", "peak_mem_bytes", "layout"}
    assert rows and all(keys <= set(row) for row in rows)
    by = {(row["impl"], row["finetune"], row["layout"]): row for row in rows}
    assert {
        ("ours", "multilora", "packed"),
        ("ours", "lora", "packed"),
        ("ours", "full", "packed"),
        ("ours", "lora", "padded"),
        ("peft", "lora", "packed"),
        ("peft", "lora", "padded"),
    } <= set(by)
    assert (
        by[("ours", "lora", "packed")]["lora_rank"]
        == by[("peft", "lora", "padded")]["lora_rank"]
        == 32
    )
    # packing puts the same tokens in fewer positions
    assert by[("ours", "lora", "packed")]["positions"] < by[("ours", "lora", "padded")]["positions"]
    assert len({row["tokens"] for row in rows}) == 1
    # every arm, packed or padded, ours or transformers', computes the same first loss
    first = [row["first_loss"] for row in rows]
    assert max(first) - min(first) < 1e-5
    assert all(row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0 for row in rows)
