"""Defaults that follow other settings (configurator.Rule): they never turn into an error, an
explicit value is still checked, and every committed config resolves to exactly the settings it had
when the defaults were plain values (the evidence in docs/ was trained with those)."""

import os
import shlex

import pytest

import bench
import compare
import configurator
import dataset
import train
from conftest import ROOT
from configurator import Rule, S
from test_train import base_args, run, tiny  # noqa: F401 (tiny is a fixture)
from util import UserError

# the plain defaults the rules replaced (main at a6c78c6), on this machine: one process, CPU
OLD_DEFAULTS = {
    train: dict(
        warmup_iters=20,
        min_lr=3e-4,
        gradient_accumulation_steps=1,
        n_kv_heads=2,
        dtype="float32",
        peak_flops=1e12,
    ),
    compare: dict(baseline="LoRA r=32", full_arm="full", arm_seeds=["full: 1-5"]),
    # tools/bench.py's device and dtype were "auto" then: on this machine, cpu and float32
    bench: dict(n_kv_heads=4, device="cpu", dtype="float32", peak_flops=1e12),
}


def old_rules(module, argv):
    """The settings as the plain defaults resolved them: the old value of each rule, then config
    files and arguments on top, nothing checked."""
    plain = {k: S(OLD_DEFAULTS[module].get(k, s.default)) for k, s in module.SETTINGS.items()}
    assert not any(isinstance(s.default, Rule) for s in plain.values()), (
        "a rule without its old default"
    )
    return configurator.configure(plain, argv)


def config_argvs():
    """(module, argv) for the embedded default, every config file, and every arm compare.py runs."""
    files = sorted(
        f
        for f in os.listdir(os.path.join(ROOT, "config"))
        if f.endswith(".py") and not f.startswith("_")
    )
    yield compare, []
    for f in files:
        if f.startswith("compare"):
            yield compare, [os.path.join("config", f)]
    yield train, []
    yield bench, []
    for f in files:
        if not f.startswith("compare"):
            yield train, [os.path.join("config", f)]
    for cfg in [[]] + [[os.path.join("config", f)] for f in files if f.startswith("compare")]:
        c = configurator.configure(compare.SETTINGS, cfg)
        # the command line compare.train builds (seed and out_dir change nothing here)
        for spec in c["arms"]:
            args = shlex.split(spec.partition(":")[2])
            yield (
                train,
                args
                + [
                    f"--ckpt_dir={c['ckpt_dir']}",
                    "--seed=1",
                    f"--max_iters={c['max_iters']}",
                    f"--eval_interval={c['eval_interval']}",
                    "--threads=1",
                    *c["train_args"],
                ],
            )


def test_committed_configs_resolve_as_before(monkeypatch):
    monkeypatch.chdir(ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(train, "WORLD_SIZE", 1)
    seen = 0
    for module, argv in config_argvs():
        if (
            module is train
            and argv
            and "llama" in argv[0]
            and ("_full" in argv[0] or "65b" in argv[0] or "70b" in argv[0])
        ):
            monkeypatch.setenv("RANK", "0")  # fsdp=True is only allowed under torchrun
        else:
            monkeypatch.delenv("RANK", raising=False)
        new, old = configurator.configure(module.SETTINGS, argv), old_rules(module, argv)
        if module is train:
            train.check_settings(new)  # the rules between settings hold too
        assert new == old, (
            module.__name__,
            argv,
            {k: (new[k], old[k]) for k in new if new[k] != old[k]},
        )
        for k, v in new.items():
            assert type(v) is type(old[k]), (argv, k)  # 3e-4, not 3.0000000000000003e-4 or an int
        seen += 1
    assert seen >= 25


def test_defaults_follow_what_the_user_set(monkeypatch):
    monkeypatch.setattr(train, "WORLD_SIZE", 1)
    c = configurator.configure(train.SETTINGS, ["--max_iters=2", "--learning_rate=1e-4"])
    assert (c["warmup_iters"], c["min_lr"]) == (2, 1e-5)
    c = configurator.configure(train.SETTINGS, ["--lr_decay_iters=5"])
    train.check_settings(c)  # the rules between settings hold
    assert c["warmup_iters"] == 4  # lr_decay_iters must stay above the warmup
    assert configurator.configure(train.SETTINGS, ["--n_heads=3"])["n_kv_heads"] == 1
    dtype_rule = train.SETTINGS["dtype"].default.function
    assert (dtype_rule({"device": "cuda:1"}), dtype_rule({"device": "cpu"})) == (
        "bfloat16",
        "float32",
    )
    monkeypatch.setattr(train, "WORLD_SIZE", 4)
    assert configurator.configure(train.SETTINGS, [])["gradient_accumulation_steps"] == 4
    c = configurator.configure(compare.SETTINGS, ["--arms=a: --n_loras=2,b: --n_loras=3"])
    assert (c["baseline"], c["full_arm"]) == ("a", "")
    assert configurator.configure(bench.SETTINGS, ["--n_heads=2"])["n_kv_heads"] == 1


def test_explicit_values_are_still_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "WORLD_SIZE", 1)
    for argv, message in [
        (
            ["--max_iters=2", "--warmup_iters=5"],
            r"--warmup_iters=5: warmup_iters: expected a value in "
            r"\[0, max_iters\] \(max_iters = 2\), got 5$",
        ),
        (
            ["--learning_rate=1e-4", "--min_lr=1e-3"],
            r"min_lr: expected a value in \[0, learning_rate\]",
        ),
        (
            ["--warmup_iters=20", "--lr_decay_iters=5"],
            r"lr_decay_iters: expected 0 or more than warmup_iters",
        ),
        (["--n_heads=2", "--n_kv_heads=4"], r"n_kv_heads: expected a value in \[1, n_heads\]"),
    ]:
        with pytest.raises(UserError, match=message):
            train.check_settings(configurator.configure(train.SETTINGS, argv))
    cfg = tmp_path / "c.py"
    cfg.write_text("min_lr = 1\n")  # a config file's value is explicit too (and an int is a float)
    with pytest.raises(UserError, match=r"c.py: min_lr: expected a value in \[0, learning_rate\]"):
        configurator.configure(train.SETTINGS, [str(cfg)])
    monkeypatch.setattr(train, "WORLD_SIZE", 2)
    with pytest.raises(
        UserError, match="gradient_accumulation_steps: expected a positive multiple of the 2"
    ):
        train.check_settings(
            configurator.configure(train.SETTINGS, ["--gradient_accumulation_steps=3"])
        )
    # a rule whose value breaks a bound is reported as a default, with its rule
    settings = dict(a=S(1, "[0, 5]"), b=S(Rule("a + 10", lambda s: s["a"] + 10), "[0, 5]"))
    with pytest.raises(
        UserError, match=r"^b: expected a value in \[0, 5\], got 11 \(its default, a \+ 10\)$"
    ):
        configurator.configure(settings, [])


def test_help_shows_the_rules(capsys):
    with pytest.raises(SystemExit):
        configurator.configure(train.SETTINGS, ["--help"], "train.py")
    text = capsys.readouterr().out
    assert "--min_lr (default: learning_rate / 10) [0, learning_rate]" in text
    assert "--warmup_iters (default: min(20, max_iters" in text
    assert "--gradient_accumulation_steps (default: the number of processes" in text


def test_short_run_and_lower_learning_rate_with_the_defaults(tiny, tmp_path):  # noqa: F811
    # the first two commands, on the test model: no warmup_iters or min_lr given
    args = [
        a
        for a in base_args(tiny, tmp_path, max_iters=2, learning_rate=1e-4)
        if not a.startswith(("--warmup_iters", "--gradient_accumulation_steps"))
    ]
    p = run(args)
    assert '"warmup_iters": 2' in p.stdout and '"min_lr": 1e-05' in p.stdout


def test_torchrun_with_the_default_accumulation(tiny, tmp_path):  # noqa: F811
    # 2 processes, gradient_accumulation_steps not given: one micro-step on each, a global batch of
    # 2·batch_size, as 1 process with gradient_accumulation_steps=2 (test_train checks that
    # equality)
    args = [
        a
        for a in base_args(tiny, tmp_path, max_iters=2)
        if not a.startswith("--gradient_accumulation_steps")
    ]
    p = run(args, nproc=2)
    assert '"gradient_accumulation_steps": 2' in p.stdout


def test_data_longer_than_the_context_names_the_settings(tiny, tmp_path, monkeypatch):  # noqa: F811
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    longest = int(dataset.PreparedSplit(tiny["data"], "train").lengths.max())
    args = [
        f"--datasets={tiny['data']}",
        f"--out_dir={tmp_path / 'out'}",
        "--init_from=scratch",
        "--finetune=full",
        f"--tokenizer={tiny['tokenizer']}",
        "--max_seq_len=8",
        "--dim=32",
        "--n_layers=1",
        "--hidden_dim=64",
        "--exact_match_examples=0",
    ]
    with pytest.raises(
        UserError,
        match=rf"examples of up to {longest} tokens exceed the model's context of 8 "
        rf"\(max_seq_len\): prepare the data with --max_len=8, or train with "
        rf"--max_seq_len={longest - 1}$",
    ):
        train.main(args)
    assert not os.path.exists(tmp_path / "out")
