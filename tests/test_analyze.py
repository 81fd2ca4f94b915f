"""analyze.py on synthetic ΔW with a known spectrum: ΔW = U·diag(σ)·Vᵀ from orthonormal factors."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analyze
from util import UserError
import checkpoint


def orthonormal(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return Q


def synthetic(sigma, d_out=48, d_in=40, seed=0):
    sigma = torch.tensor(sigma, dtype=torch.float64)
    U, V = orthonormal(d_out, len(sigma), seed), orthonormal(d_in, len(sigma), seed + 1)
    return U, (U * sigma) @ V.t(), V


def test_dense_svd_returns_the_known_spectrum():
    sigma = [8.0, 4.0, 2.0, 1.0, 0.5]
    U, delta, _ = synthetic(sigma)
    S, U_hat = analyze.svd_dense(delta.float())
    assert analyze.numerical_rank(S, delta.shape) == 5
    torch.testing.assert_close(
        S[:5], torch.tensor(sigma, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    # same directions up to sign: |Uᵀ Û| = I on the top 5
    torch.testing.assert_close(
        (U.t() @ U_hat[:, :5]).abs(), torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_factored_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(48, 6, generator=g), torch.randn(6, 40, generator=g)
    S_f, U_f = analyze.svd_factored(B, A)
    S_d, U_d = analyze.svd_dense(B @ A)
    torch.testing.assert_close(S_f, S_d[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        (U_f.t() @ U_d[:, :6]).abs(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # rank-deficient B·A: the extra singular values are 0 up to round-off
    B[:, 5] = B[:, 4]
    A[5] = 0
    S_f, _ = analyze.svd_factored(B, A)
    assert analyze.numerical_rank(S_f, (48, 40)) == 5


def test_spectrum_stats_known_values():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    s = analyze.spectrum_stats(sigma)
    p = [8 / 15, 4 / 15, 2 / 15, 1 / 15]
    assert s["rank"] == 4
    assert s["normalized"][:4] == pytest.approx(p) and s["normalized"][4:] == [0.0, 0.0]
    assert s["top1_share"] == pytest.approx(8 / 15)
    assert s["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    energy = [64 / 85, 80 / 85, 84 / 85, 1.0, 1.0, 1.0]
    assert s["cumulative_energy"] == pytest.approx(energy)
    assert s["frobenius"] == pytest.approx(math.sqrt(85))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_flat_spectrum_has_effective_rank_k(k):
    _, delta, _ = synthetic([2.5] * k)
    S, _ = analyze.svd_dense(delta.float())
    s = analyze.spectrum_stats(S, analyze.numerical_rank(S, delta.shape))
    assert s["rank"] == k
    assert s["effective_rank"] == pytest.approx(k, rel=1e-5)
    assert s["top1_share"] == pytest.approx(1 / k, rel=1e-5)


def test_zero_delta_has_no_figures():
    S, _ = analyze.svd_dense(torch.zeros(8, 6))
    s = analyze.spectrum_stats(S, analyze.numerical_rank(S, (8, 6)))
    assert s["rank"] == 0 and s["effective_rank"] is None and s["top1_share"] is None


def test_subspace_similarity_identical_and_orthogonal():
    Q = orthonormal(64, 16, seed=5)
    U, V_same, V_orth = Q[:, :8], Q[:, :8], Q[:, 8:]
    phi_same = analyze.subspace_similarity(U, V_same)
    phi_orth = analyze.subspace_similarity(U, V_orth)
    # identical subspaces: U_i ⊂ V_j or V_j ⊂ U_i, so φ(i, j) = 1 for every i, j
    torch.testing.assert_close(phi_same, torch.ones(8, 8, dtype=torch.float64))
    assert phi_orth.abs().max() < 1e-12
    # same span, rotated basis: φ(8, 8) = 1 still, φ(1, 1) a squared cosine
    R = orthonormal(8, 8, seed=6)
    phi_rot = analyze.subspace_similarity(U, U @ R)
    assert phi_rot[7, 7].item() == pytest.approx(1.0)
    assert phi_rot[0, 0].item() == pytest.approx((R[0, 0] ** 2).item())


def test_subspace_similarity_partial_overlap_by_formula():
    Q = orthonormal(32, 6, seed=7)
    U = Q[:, :4]  # directions 0..3
    V = torch.cat([Q[:, 2:4], Q[:, 4:6]], 1)  # directions 2, 3 then 4, 5
    phi = analyze.subspace_similarity(U, V)
    # ||U_iᵀ V_j||_F² counts the shared directions among the first i of U and first j of V
    assert phi[3, 1].item() == pytest.approx(2 / 2)  # U_4 ⊃ {2,3} = V_2
    assert phi[3, 3].item() == pytest.approx(2 / 4)
    assert phi[1, 3].item() == pytest.approx(0.0)  # U_2 = {0,1}


def test_summarize_method_with_full_reference():
    # two "layers" of q_proj: method ΔW of rank 4 lies inside the full ΔW's top-4 subspace
    spectra, full_vectors = {}, {}
    for layer in range(2):
        U, delta, _ = synthetic([4.0, 3.0, 2.0, 1.0], seed=10 * layer)
        S, U_hat = analyze.svd_dense(delta.float())
        spectra[f"layers.{layer}.self_attn.q_proj"] = (S, U_hat, tuple(delta.shape))
        full_vectors[f"layers.{layer}.self_attn.q_proj"] = U
    out = analyze.summarize_method(spectra, top_k=6, full_vectors=full_vectors, phi_dim=4)
    g = out["by_layer_type"]["q_proj"]
    assert g["n_matrices"] == 2 and g["rank"] == 4
    assert g["top1_share"] == pytest.approx(0.4, rel=1e-5)
    assert len(g["normalized"]) == 6 and g["normalized"][4] == 0.0
    phi = torch.tensor(g["phi"])
    assert phi.shape == (4, 4) and phi[3, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert out["by_layer_type"]["all"]["n_matrices"] == 2


# -----------------------------------------------------------------------------
# from files: a base checkpoint, adapter files and a "full fine-tune" whose ΔW is known


def make_run(tmp_path):
    """Base checkpoint; a MultiLoRA adapter with random (trained-looking) A, B, s; a LoRA adapter;
    and a full checkpoint = base + the MultiLoRA ΔW on its matrices, so full fine-tuning's top
    subspace is exactly MultiLoRA's."""
    import llama
    import multilora

    torch.manual_seed(0)
    config = llama.LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40, max_seq_len=32
    )
    model = llama.Llama(config)
    model.init_weights()
    base_dir = tmp_path / "base"
    checkpoint.save_hf_checkpoint(model, str(base_dir))
    files = {}
    for finetune, n_loras in (("multilora", 2), ("lora", 1)):
        adapted = checkpoint.load_model(str(base_dir))
        multilora.adapt_model(
            adapted, finetune=finetune, targets=("q", "v"), n_loras=n_loras, lora_rank=3
        )
        with torch.no_grad():
            for p in multilora.adapter_state_dict(adapted).values():
                p.copy_(torch.randn_like(p))
        files[finetune] = str(tmp_path / f"{finetune}.safetensors")
        multilora.save_adapter(adapted, files[finetune])
        if finetune == "multilora":
            deltas = multilora.delta_weights(adapted)
    full = checkpoint.load_model(str(base_dir))
    with torch.no_grad():
        for name, delta in deltas.items():
            full.get_submodule(name).weight += delta
    checkpoint.save_hf_checkpoint(full, str(tmp_path / "full" / "hf"))
    return str(base_dir), files, str(tmp_path / "full"), deltas


def test_analyze_files_end_to_end(tmp_path):
    base_dir, files, full_dir, deltas = make_run(tmp_path)
    out = tmp_path / "analysis"
    summary = analyze.main(
        [
            f"--ckpt_dir={base_dir}",
            f"--adapters={files['multilora']},{files['lora']}",
            f"--full={full_dir}",
            f"--out_dir={out}",
            "--top_k=10",
            "--phi_dim=8",
        ]
    )
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["methods"]) == {"multilora", "lora", "full"}
    ml, lora, full = (saved["methods"][k] for k in ("multilora", "lora", "full"))
    assert (
        set(ml["matrices"])
        == set(deltas)
        == {f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    )
    assert set(ml["by_layer_type"]) == {"q_proj", "v_proj", "all"}
    for name, delta in deltas.items():
        expected = torch.linalg.svdvals(delta.double())
        m = ml["matrices"][name]
        assert m["rank"] == 6 and lora["matrices"][name]["rank"] == 3  # n·r = 2·3 and r = 3
        torch.testing.assert_close(
            torch.tensor(m["singular_values"][:6], dtype=torch.float64),
            expected[:6],
            rtol=1e-5,
            atol=1e-6,
        )
        # full fine-tuning's ΔW is MultiLoRA's (up to fp32 round-off of W_base + ΔW - W_base)
        torch.testing.assert_close(
            torch.tensor(full["matrices"][name]["singular_values"][:6], dtype=torch.float64),
            expected[:6],
            rtol=1e-3,
            atol=1e-4,
        )
        assert full["matrices"][name]["rank"] >= 6
        phi = torch.tensor(m["phi"])
        assert phi.shape == (6, 8) and phi[5, 5].item() == pytest.approx(1.0, abs=1e-4)
        assert len(lora["matrices"][name]["phi"]) == 3
    assert "phi" not in full["matrices"][name]
    assert (out / "spectra.png").stat().st_size > 0 and (out / "similarity.png").stat().st_size > 0


def test_analyze_user_errors(tmp_path):
    with pytest.raises(UserError, match="ckpt_dir: expected a path"):
        analyze.main(["--adapters=a.safetensors"])
    with pytest.raises(UserError, match="adapters: expected at least one adapter file, or --full"):
        analyze.main(["--ckpt_dir=x"])
    base_dir, files, _, _ = make_run(tmp_path)
    with pytest.raises(UserError, match="adapter file not found"):
        analyze.main(
            [
                f"--ckpt_dir={base_dir}",
                f"--adapters={tmp_path}/nope.safetensors",
                f"--out_dir={tmp_path}/o",
            ]
        )


def test_summary_table_of_a_zero_update(capsys):
    """An adapter that was never trained (ΔW = 0) has no effective rank: the table says "-"."""
    spectra = {"layers.0.self_attn.q_proj": (torch.zeros(4), torch.eye(8)[:, :4], (8, 6))}
    analyze.print_summary(dict(methods={"lora": analyze.summarize_method(spectra, top_k=4)}))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert rows == [["lora", "q_proj", "1", "0.0", "-", "-"], ["lora", "all", "1", "0.0", "-", "-"]]
