"""multilora.ARMS is the one place an arm is declared: a test-only arm (tests/toy_arm.py: a layer
class and one entry, no shipped file touched) trains, saves, resumes bit for bit and loads through
train.py and multilora.py, while export.py, analyze.py and tools/plan.py refuse it in one line.
References: a run killed and resumed equals the same run whole, byte for byte; the loaded layer
equals its formula computed by hand from the file's tensors."""

import json
import os
import sys

import pytest
import torch

import analyze
import checkpoint
import multilora
import plan
import toy_arm
from conftest import ROOT, python
from generate import load_for_inference
from test_train import adapter, base_args, exported, metrics, tiny  # noqa: F401 (tiny: fixture)
from util import UserError

TESTS = os.path.dirname(os.path.abspath(__file__))


def with_toy(module, args, prelude=""):
    """module.main(args) in a new process that registers the toy arm before it imports the script
    (as a user's own launcher would). prelude: Python run after the import."""
    code = (
        f"import sys\nsys.path.insert(0, {TESTS!r})\nimport toy_arm\ntoy_arm.register()\n"
        f"import util, {module}\n{prelude}\nutil.run_cli({module}.main)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return python([sys.executable, "-c", code, *args], cwd=ROOT, env=env, timeout=300)


@pytest.fixture
def toy(monkeypatch):
    """The toy arm registered in this process, for this test only."""
    monkeypatch.setitem(multilora.ARMS, "toy", toy_arm.ARM)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):  # noqa: F811
    """The toy arm trained 4 steps whole, and the same run killed in step 3 (its last checkpoint:
    step 2) then resumed."""
    root = tmp_path_factory.mktemp("toy")
    args = dict(finetune="toy", max_iters=4, eval_interval=2, lora_dropout=0.1)
    whole, broken = root / "whole", root / "broken"
    p = with_toy("train", base_args(tiny, whole, **args))
    assert p.returncode == 0, p.stderr[-3000:]
    kill_in_step_3 = (
        "import os, signal\nstep, n = train.train_step, [0]\n"
        "def killing_step(*a, **k):\n    n[0] += 1\n"
        "    if n[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n    return step(*a, **k)\n"
        "train.train_step = killing_step"
    )
    p = with_toy("train", base_args(tiny, broken, **args), kill_in_step_3)
    assert p.returncode == -9, p.stderr[-3000:]
    assert torch.load(broken / "ckpt.pt", weights_only=True)["iter_num"] == 2
    p = with_toy("train", base_args(tiny, broken, resume=True, **args))
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    return tiny, whole, broken


def test_toy_arm_trains_saves_and_resumes_bit_for_bit(runs, toy):
    data, whole, broken = runs
    a, b = adapter(whole), adapter(broken)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(whole) == metrics(broken)
    assert exported(whole, "toy") == exported(broken, "toy")
    # the file holds the arm's own tensors and settings, and names the base as it was
    assert {k.rsplit(".", 1)[1] for k in a} == {"toy_A", "toy_B"}
    assert len(a) == 2 * 2 * 4  # 2 tensors, 2 layers, targets q,k,v,o
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("toy_B"))  # it trained
    path = str(whole / "adapter.safetensors")
    _, meta, _ = checkpoint.read_safetensors_header(path)
    settings = json.loads(meta["settings"])
    assert settings == dict(
        finetune="toy", targets=["q", "k", "v", "o"], lora_rank=2, lora_alpha=16.0, lora_dropout=0.1
    )
    base = checkpoint.load_model(data["base"])
    assert meta["base_fingerprint"] == checkpoint.base_fingerprint(base)


def test_toy_arm_loads_and_computes_its_formula(runs, toy):
    data, whole, _ = runs
    path = str(whole / "adapter.safetensors")
    state = adapter(whole)
    x = torch.randint(3, 60, (2, 9))
    base, _ = load_for_inference(data["base"], None, "", "float32", "cpu", merge=False)
    # generate.py and eval.py ask for a merge: an arm that cannot merge runs unmerged instead
    model, _ = load_for_inference(data["base"], None, path, "float32", "cpu", merge=True)
    assert model.adapter_settings["finetune"] == "toy"
    layers = dict(multilora.adapter_modules(model))
    assert len(layers) == 8 and all(isinstance(m, toy_arm.ToyLinear) for m in layers.values())
    q = layers["layers.0.self_attn.q_proj"]
    A, B = state["layers.0.self_attn.q_proj.toy_A"], state["layers.0.self_attn.q_proj.toy_B"]
    h = torch.randn(5, q.weight.shape[1])
    by_hand = h @ q.weight.t() + (16.0 / 2) * torch.tanh(h @ A.t()) @ B.t()
    with torch.no_grad():
        torch.testing.assert_close(q(h), by_hand, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(x), base(x))
    trainable, base_total = multilora.count_trainable(model)
    assert trainable == sum(v.numel() for v in state.values())
    assert base_total == base.num_params()


@pytest.mark.parametrize("fmt", ["peft", "hf"])
def test_export_refuses_the_toy_arm_in_one_line(runs, tmp_path, fmt):
    data, whole, _ = runs
    path, out = str(whole / "adapter.safetensors"), tmp_path / "export"
    args = [
        f"--ckpt_dir={data['base']}",
        f"--adapter={path}",
        f"--out_dir={out}",
        f"--format={fmt}",
    ]
    p = with_toy("export", args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: {path}: finetune=toy: ") and f"--format={fmt}" in p.stderr
    assert not out.exists()  # nothing written


def test_analyze_and_plan_refuse_the_toy_arm(runs, toy):
    data, whole, _ = runs
    with pytest.raises(UserError, match="finetune=toy: this arm has no fixed ΔW") as e:
        analyze.adapter_spectra(data["base"], str(whole / "adapter.safetensors"))
    assert "\n" not in str(e.value)
    c = checkpoint.read_config(data["base"])
    settings = dict(finetune="toy", lora_targets=["q"], n_loras=1, lora_rank=2, lora_alpha=4.0)
    settings |= dict(lora_dropout=0.0, lora_scaling="channel", lora_init="")
    with pytest.raises(UserError, match="finetune: expected an arm whose layer plan.py counts"):
        plan.adapted_model(c, settings)


def test_an_unregistered_arm_is_refused_in_one_line(runs):
    _, whole, _ = runs
    path = str(whole / "adapter.safetensors")
    with pytest.raises(
        UserError, match=r"metadata.settings.finetune: expected 'multilora' or 'lora', got 'toy'"
    ):
        multilora.load_adapter(path)
