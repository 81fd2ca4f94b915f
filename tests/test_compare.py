"""compare.py: the interval arithmetic against hand-computed cases, the JSON -> table rendering, and
two runs with the same seeds giving the same numbers (a tiny budget; about a minute on 2 cores)."""

import json
import os

import pytest
import torch
import torch.nn as nn

import compare
import multilora


def test_mean_ci_by_hand():
    # 1..5: mean 3, sd = √2.5 = 1.5811, se = sd/√5 = 0.70711, t(0.975, 4 df) = 2.776 -> 1.9629
    s = compare.mean_ci([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["min"] == 1 and s["max"] == 5 and s["n"] == 5
    assert s["sd"] == pytest.approx(1.58114, abs=1e-5) and s["ci"] == pytest.approx(
        1.96293, abs=1e-4
    )
    one = compare.mean_ci([0.7])
    assert one["mean"] == 0.7 and one["ci"] is None and one["sd"] is None


def test_paired_difference_by_hand():
    # differences 2, 3, 2: mean 7/3, sd = √(1/3) = 0.57735, se = 0.33333,
    # t(0.975, 2 df) = 4.303 -> 1.43433
    d = compare.paired_difference([3, 5, 4], [1, 2, 2])
    assert d["mean"] == pytest.approx(7 / 3) and d["ci"] == pytest.approx(1.43433, abs=1e-4)
    # the same two arms unpaired would have a far wider interval: pairing removes the seed's effect
    assert compare.mean_ci([3, 5, 4])["ci"] > d["ci"]


def test_table_is_rendered_from_the_json():
    stat = lambda m, ci, diff=None: dict(
        mean=m, ci=ci, sd=0.01, min=m, max=m, n=2, vs={"LoRA": diff} if diff else {}
    )
    result = {
        "settings": {"baseline": "LoRA", "full_arm": "", "seeds": [1, 2], "max_iters": 10},
        "summary": {
            "tasks": ["add"],
            "arms": {
                "LoRA": {"add": stat(0.5, 0.1), "mean": stat(0.5, 0.1)},
                "Multi": {
                    "add": stat(0.6, 0.05, stat(0.1, 0.02)),
                    "mean": stat(0.6, 0.05, stat(0.1, 0.02)),
                    "effective_rank": stat(16.25, 1.0, stat(4.0, 0.5)),
                },
            },
        },
    }
    table = compare.render_tables(result)
    assert "| add | 50.0 ± 10.0 | 60.0 ± 5.0 | 10.0 ± 2.0 |" in table
    assert "| **mean** | 50.0 ± 10.0 | 60.0 ± 5.0 | 10.0 ± 2.0 |" in table
    assert "| effective rank of ΔW |  | 16.2 ± 1.0 | 4.0 ± 0.5 |" in table
    assert "add 50.0–60.0" in table


def test_seed_lists_and_provenance_line(monkeypatch):
    assert compare.parse_seeds("1-3,9") == [1, 2, 3, 9]
    assert compare.compact([1, 2, 3, 5, 7, 8]) == "1–3, 5, 7, 8"
    monkeypatch.setattr(compare, "seeds", [1, 2, 3, 4, 5, 6])
    monkeypatch.setattr(compare, "arm_seeds", ["full: 1-3,9"])
    assert compare.seeds_by_arm(["full", "LoRA"]) == {"full": [1, 2, 3], "LoRA": [1, 2, 3, 4, 5, 6]}
    monkeypatch.setattr(compare, "arm_seeds", ["fully: 1-3"])
    with pytest.raises(compare.UserError, match="arm_seeds"):
        compare.seeds_by_arm(["full", "LoRA"])
    made = compare.provenance()  # this checkout: a commit of 40 hex digits, the running torch
    assert len(made["commit"] or "x" * 40) == 40 and made["torch"] == torch.__version__
    assert made["cpu"]
    stat = dict(mean=0.5, ci=0.1, sd=0.1, min=0.4, max=0.6, n=3, vs={})
    arms = {label: {"add": stat, "mean": stat} for label in ("LoRA", "full")}
    result = {
        "settings": {"baseline": "LoRA", "full_arm": "", "seeds": [1, 2, 3, 4], "max_iters": 10},
        "seeds_by_arm": {"LoRA": [1, 2, 3, 4], "full": [1, 2]},
        "runs": [{}] * 6,
        "provenance": dict(
            commit="0123456789abcdef", dirty=False, torch="2.0", python="3.11", cpu="CPU X"
        ),
        "wall_s": {"total": 90.0},
        "summary": {"tasks": ["add"], "arms": arms},
    }
    table = compare.render_tables(result)
    assert "over seeds 1–4 (full: seeds 1, 2) (10 steps each)" in table
    assert (
        "Made at commit 0123456789ab (clean), torch 2.0, Python 3.11, CPU CPU X: 6 runs in 1.5 min."
        in table
    )


def test_arm_seeds_default_follows_the_arms(monkeypatch):
    """--arm_seeds' default gives the full arm 5 seeds where there is one, and is empty otherwise:
    --arms without a 'full' arm runs every arm on --seeds instead of being refused."""

    def seeds_of(argv):
        monkeypatch.setattr(compare, "seeds", [1, 2, 3, 4, 5, 6])
        settings = compare.configure(compare.SETTINGS, argv, "compare.py")
        monkeypatch.setattr(compare, "arm_seeds", settings["arm_seeds"])
        labels = [compare.parse_arm(a)[0] for a in settings["arms"]]
        return settings["arm_seeds"], compare.seeds_by_arm(labels)

    no_full = "--arms=LoRA r=32: config/tasks_lora.py,MultiLoRA 4x8: config/tasks_multilora.py"
    assert seeds_of([no_full]) == (
        [],
        {"LoRA r=32": [1, 2, 3, 4, 5, 6], "MultiLoRA 4x8": [1, 2, 3, 4, 5, 6]},
    )
    assert seeds_of([]) == (
        ["full: 1-5"],
        {
            "full": [1, 2, 3, 4, 5],
            "LoRA r=32": [1, 2, 3, 4, 5, 6],
            "MultiLoRA 4x8": [1, 2, 3, 4, 5, 6],
        },
    )
    ft = "--arms=FT: config/tasks_full.py,LoRA r=32: config/tasks_lora.py"
    assert seeds_of([ft, "--full_arm=FT"])[1] == {
        "FT": [1, 2, 3, 4, 5],
        "LoRA r=32": [1, 2, 3, 4, 5, 6],
    }
    # given, it is checked as before
    with pytest.raises(compare.UserError, match="arm_seeds: expected 'label: seeds'"):
        seeds_of([no_full, "--arm_seeds=full: 1-5"])


def test_lora_init_with_n_modules_is_lora_of_rank_n_r():
    """The ablation's 'horizontal scaling alone' arm: LoRA's init with 4 modules of rank 8 and
    α/r = 2 starts from the same A (the same draws) and B = 0 as LoRA r=32 with α/r = 2, so the two
    compute the same function and get the same gradients: at fixed n·r and α/r the split alone
    changes nothing."""
    base = nn.Linear(32, 32, bias=False)
    torch.manual_seed(0)
    one = multilora.MultiLoRALinear(base, n_loras=1, lora_rank=16, lora_alpha=32, init="lora")
    torch.manual_seed(0)
    four = multilora.MultiLoRALinear(base, n_loras=4, lora_rank=4, lora_alpha=8, init="lora")
    assert torch.equal(one.lora_A, four.lora_A) and four.lora_s is None and one.scale == four.scale
    with torch.no_grad():
        for layer in (one, four):
            layer.lora_B.copy_(torch.arange(32 * 16.0).view(32, 16) / 512)
    x = torch.randn(3, 32)
    torch.testing.assert_close(one(x), four(x), rtol=0, atol=0)


def test_same_seeds_same_numbers(tmp_path, monkeypatch):
    # paths are the repository's
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(name):
        compare.main(
            [
                f"--out_dir={tmp_path / name}",
                f"--out_prefix={tmp_path / name / 'compare'}",
                "--seeds=1,2",
                "--max_iters=3",
                "--eval_interval=3",
                "--jobs=2",
                "--train_args=--exact_match_examples=2,--eval_examples=4,--batch_size=8,--warmup_iters=1",
            ]
        )
        with open(tmp_path / name / "compare.json") as f:
            result = json.load(f)
        for r in result["runs"]:
            del r["wall_s"]
        return result

    first, second = run("a"), run("b")
    assert first["runs"] == second["runs"] and first["summary"] == second["summary"]
    assert [(r["arm"], r["seed"]) for r in first["runs"]] == [
        (a, s) for s in (1, 2) for a in ("full", "LoRA r=32", "MultiLoRA 4x8")
    ]
    # φ of LoRA to full, not of full
    assert first["runs"][1]["phi"] is not None and first["runs"][0]["phi"] is None
    table = open(tmp_path / "a" / "compare.md").read()
    assert table == compare.render_tables(json.load(open(tmp_path / "a" / "compare.json")))
    assert os.path.isdir(tmp_path / "a" / "lora-r-32" / "seed2")


@pytest.mark.parametrize("name", ["compare", "compare_ablation"])
def test_committed_tables_are_the_committed_json(name):
    """docs/<name>.md (what the README quotes) is the rendering of docs/<name>.json, nothing
    edited by hand."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    with open(os.path.join(docs, name + ".json")) as f:
        result = json.load(f)
    table = compare.render_tables(result)
    assert open(os.path.join(docs, name + ".md")).read() == table
    if name == "compare":  # and the README quotes it as it is
        assert table.strip() in open(os.path.join(docs, "..", "README.md")).read()
