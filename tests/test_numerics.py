"""The numerics fingerprint: the first 24 steps of each arm of the evidence (full, LoRA, MultiLoRA,
seed 1), run through compare.py's own train() (train.py in a subprocess, the committed configs and
base, 1 thread), must give bit for bit the losses in docs/numerics.json, which was written with the
committed evidence (docs/compare*.json). On this suite a rounding difference of 1e-7 can grow into
the other outcome of a task (learned or not), so a change to the training arithmetic makes the
evidence stale: this test says so in the commit that makes it.

It runs only on the CPU model and torch version named in docs/numerics.json: kernels may round
differently on another CPU model or torch version, so there a difference would not mean that the
arithmetic changed. There it skips and names both. About a minute on 2 cores."""

import json
import os

import pytest

import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGENERATE = (
    "python compare.py && python compare.py config/compare_ablation.py && "
    "python compare.py --numerics=docs/numerics.json"
)


def first_difference(expected, got):
    for label in expected:
        for key, values in expected[label].items():
            now = got.get(label, {}).get(key)
            if now != values:
                if isinstance(values, list) and isinstance(now, list) and len(now) == len(values):
                    i = next(i for i, (a, b) in enumerate(zip(values, now)) if a != b)
                    return f"{label} {key}[{i}]: committed {values[i]!r}, now {now[i]!r}"
                return f"{label} {key}: committed {values!r}, now {now!r}"
    return f"arms differ: committed {list(expected)}, now {list(got)}"


def test_training_arithmetic_is_the_evidence_s(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "docs", "numerics.json")) as f:
        committed = json.load(f)
    made, here = committed["provenance"], compare.provenance()
    if (made["cpu"], made["torch"]) != (here["cpu"], here["torch"]):
        pytest.skip(
            f"docs/numerics.json was made on CPU {made['cpu']!r} with torch {made['torch']}; "
            f"this is CPU {here['cpu']!r} with torch {here['torch']}, whose kernels may round "
            "differently, so a difference here would not show a change to the training arithmetic"
        )
    monkeypatch.chdir(ROOT)  # the configs' paths are the repository's
    defaults = {k: s.default for k, s in compare.SETTINGS.items()}
    assert (
        committed["steps"] == compare.FINGERPRINT_STEPS
        and committed["ckpt_dir"] == defaults["ckpt_dir"]
    )
    assert (
        committed["arms"] == defaults["arms"]
        and committed["train_args"] == compare.FINGERPRINT_ARGS
    )
    got = compare.fingerprint(
        [compare.parse_arm(a) for a in committed["arms"]], str(tmp_path), defaults["ckpt_dir"]
    )
    if got != committed["fingerprint"]:
        pytest.fail(
            f"the training arithmetic changed: regenerate the evidence ({REGENERATE}) in the same "
            f"commit. First difference: {first_difference(committed['fingerprint'], got)}",
            pytrace=False,
        )
    # and the fingerprint is one: each arm's losses move step by step, and the arms differ
    for label, f in got.items():
        assert (
            len(f["train_loss"]) == compare.FINGERPRINT_STEPS and len(set(f["train_loss"])) > 1
        ), label
    assert len({tuple(f["train_loss"]) for f in got.values()}) == len(got)
