"""
How "democratic" is a weight update? The spectrum of ΔW for LoRA, MultiLoRA and full fine-tuning
(MultiLoRA paper, Wang et al. 2023, arXiv 2311.11501, §5 "Understanding MultiLoRA").

    python analyze.py --ckpt_dir=BASE --adapters=A.safetensors,B.safetensors [--full=FULL_CKPT_DIR]
                      [--out_dir=analysis] [--top_k=64] [--phi_dim=32]

For every adapted matrix: ΔW, its singular values σ_1 >= σ_2 >= … and, per method and layer type,
  normalized spectrum   p_k = σ_k / Σσ
  cumulative energy     E_k = Σ_{l<=k} σ_l² / Σσ²   (share of ||ΔW||_F² in the top k directions)
  effective rank        exp(H(p)), H(p) = -Σ p_k log p_k   (Roy & Vetterli 2007; = k for k equal σ)
  top-1 share           σ_1 / Σσ
  subspace similarity to full fine-tuning (LoRA paper, Hu et al. 2021, §7):
                        φ(i, j) = ||U_iᵀ V_j||_F² / min(i, j), U_i the top-i left singular vectors
                        of the method's ΔW, V_j the top-j of the full fine-tuning ΔW = W_full - W_base.
Writes out_dir/summary.json always, out_dir/spectra.png and out_dir/similarity.png when matplotlib is
installed (an optional extra, imported only to plot).
"""

import json
import math
import os
import sys

import torch

import llama
from llama import UserError

# -----------------------------------------------------------------------------
# settings (overridden by --key=value)
defaults = dict(
    ckpt_dir="",      # base model (HF or Meta layout) the adapters and the full fine-tune start from
    adapters="",      # comma-separated adapter files (multilora.py's save_adapter format)
    full="",          # full fine-tuning checkpoint dir of the same base (optional)
    out_dir="analysis",
    top_k=64,         # singular values per matrix kept in the JSON and drawn in the plots
    phi_dim=32,       # φ(i, j) is computed for i, j <= phi_dim
)

# -----------------------------------------------------------------------------
# the math (pure functions on tensors; tested on synthetic ΔW with a known spectrum)

def svd_dense(delta):
    """Singular values (descending) and left singular vectors of a dense ΔW (d_out, d_in), in fp64."""
    U, S, _ = torch.linalg.svd(delta.double(), full_matrices=False)
    return S, U


def svd_factored(B, A):
    """SVD of ΔW = B·A (B (d_out, k), A (k, d_in)) without forming ΔW: O((d_out + d_in)·k²).
    B = Q_B R_B, Aᵀ = Q_A R_A  =>  ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the k×k core M = U_m S V_mᵀ
    gives ΔW = (Q_B U_m) S (Q_A V_m)ᵀ exactly. Returns (S (k,), U (d_out, k)) in fp64."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().t())
    U_m, S, _ = torch.linalg.svd(R_B @ R_A.t())
    return S, Q_B @ U_m


def numerical_rank(sigma, shape):
    """Singular values below σ_1·max(d_out, d_in)·eps(fp32) are round-off of an fp32 ΔW, not signal
    (the tolerance numpy.linalg.matrix_rank uses, at fp32 precision since ΔW is computed in fp32)."""
    if len(sigma) == 0 or sigma[0] <= 0:
        return 0
    tol = sigma[0].item() * max(shape) * torch.finfo(torch.float32).eps
    return int((sigma > tol).sum())


def spectrum_stats(sigma, rank=None):
    """Scalar "democracy" figures and curves of one spectrum σ (descending). Values past `rank`
    count as 0. Returns dict with normalized (p_k), cumulative_energy (E_k), effective_rank,
    top1_share, rank; figures are None for ΔW = 0."""
    sigma = sigma.double().clone()
    if rank is not None:
        sigma[rank:] = 0
    total = sigma.sum().item()
    if total <= 0:
        return dict(normalized=[0.0] * len(sigma), cumulative_energy=[0.0] * len(sigma),
                    effective_rank=None, top1_share=None, rank=0, frobenius=0.0)
    p = sigma / total
    nz = p[p > 0]
    entropy = -(nz * nz.log()).sum().item()
    energy = sigma.square().cumsum(0) / sigma.square().sum()
    return dict(normalized=p.tolist(), cumulative_energy=energy.tolist(),
                effective_rank=math.exp(entropy), top1_share=p[0].item(),
                rank=int((sigma > 0).sum()), frobenius=sigma.square().sum().sqrt().item())


def subspace_similarity(U, V):
    """φ(i, j) = ||U[:, :i]ᵀ V[:, :j]||_F² / min(i, j) for all i <= U.shape[1], j <= V.shape[1]
    (U, V with orthonormal columns). Returns (I, J) fp64: entry [i-1, j-1] is φ(i, j), in [0, 1]."""
    M = (U.double().t() @ V.double()).square()           # (I, J): squared cosines of directions
    cum = M.cumsum(0).cumsum(1)                           # [i-1, j-1] = ||U_iᵀ V_j||_F²
    i = torch.arange(1, M.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, M.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def layer_type(name):
    """'layers.3.self_attn.q_proj' -> 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def summarize_method(spectra, top_k, full_vectors=None, phi_dim=32):
    """spectra: {matrix name: (sigma, U, shape)} for one method. Per matrix figures, and per layer
    type (and 'all') the means over layers of the figures and of the first top_k points of the curves.
    With full_vectors ({name: V}), adds φ(i, j) to full fine-tuning, i, j <= phi_dim."""
    matrices, groups = {}, {}
    for name, (sigma, U, shape) in spectra.items():
        rank = numerical_rank(sigma, shape)
        stats = spectrum_stats(sigma, rank)
        k = min(top_k, len(sigma))
        entry = dict(shape=list(shape), rank=rank, effective_rank=stats["effective_rank"],
                     top1_share=stats["top1_share"], frobenius=stats["frobenius"],
                     singular_values=sigma[:k].tolist(), normalized=stats["normalized"][:k],
                     cumulative_energy=stats["cumulative_energy"][:k])
        if full_vectors is not None and name in full_vectors and rank > 0:
            phi = subspace_similarity(U[:, :min(rank, phi_dim)], full_vectors[name][:, :phi_dim])
            entry["phi"] = phi.tolist()
        matrices[name] = entry
        for group in (layer_type(name), "all"):
            groups.setdefault(group, []).append(entry)

    def mean_curve(curves):  # element-wise mean over the common length
        n = min(len(c) for c in curves)
        return [sum(c[k] for c in curves) / len(curves) for k in range(n)]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    by_type = {}
    for group, entries in groups.items():
        g = dict(n_matrices=len(entries),
                 effective_rank=mean([e["effective_rank"] for e in entries]),
                 top1_share=mean([e["top1_share"] for e in entries]),
                 rank=mean([e["rank"] for e in entries]),
                 normalized=mean_curve([e["normalized"] for e in entries]),
                 cumulative_energy=mean_curve([e["cumulative_energy"] for e in entries]))
        phis = [torch.tensor(e["phi"]) for e in entries if "phi" in e]
        if phis:
            I, J = min(p.shape[0] for p in phis), min(p.shape[1] for p in phis)
            g["phi"] = torch.stack([p[:I, :J] for p in phis]).mean(0).tolist()
        by_type[group] = g
    return dict(matrices=matrices, by_layer_type=by_type)
