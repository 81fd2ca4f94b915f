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
                        of the method's ΔW, V_j the top-j of the full fine-tuning
                        ΔW = W_full - W_base.
Writes out_dir/summary.json always, out_dir/spectra.png and out_dir/similarity.png when matplotlib
is installed (an optional extra, imported only to plot).
"""

import json
import math
import os

import torch

import checkpoint
import multilora
import util
from configurator import S, configure, declared
from generate import load_for_inference
from util import UserError

# -----------------------------------------------------------------------------
ckpt_dir = S(
    "",
    util.required,
    "base model (HF or Meta layout) the adapters and the full fine-tune start from",
)
adapters = S(
    [],
    lambda v, s: None if v or s["full"] else "at least one adapter file, or --full",
    "adapter files (multilora.py's save_adapter format), comma-separated",
)
full = S("", None, "full fine-tuning checkpoint dir of the same base (optional)")
out_dir = S(
    "analysis",
    lambda v, s: check_out_dir(v),
    "summary.json and the plots go here (replacing only an earlier analysis's)",
)
top_k = S(64, "[1, inf)", "singular values per matrix kept in the JSON and drawn in the plots")
phi_dim = S(32, "[1, inf)", "φ(i, j) is computed for i, j <= phi_dim")
device = S(
    util.default_device(),
    util.check_device,
    "where the dense SVDs of the full fine-tuning ΔW run (fp64)",
)
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# -----------------------------------------------------------------------------
# the math (pure functions on tensors; tested on synthetic ΔW with a known spectrum)


def svd_dense(delta):
    """Singular values (descending) and left singular vectors of a dense ΔW (d_out, d_in), in
    fp64."""
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
    (the tolerance numpy.linalg.matrix_rank uses, at fp32 precision since ΔW is computed in
    fp32)."""
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
        return dict(
            normalized=[0.0] * len(sigma),
            cumulative_energy=[0.0] * len(sigma),
            effective_rank=None,
            top1_share=None,
            rank=0,
            frobenius=0.0,
        )
    p = sigma / total
    nz = p[p > 0]
    entropy = -(nz * nz.log()).sum().item()
    energy = sigma.square().cumsum(0) / sigma.square().sum()
    return dict(
        normalized=p.tolist(),
        cumulative_energy=energy.tolist(),
        effective_rank=math.exp(entropy),
        top1_share=p[0].item(),
        rank=int((sigma > 0).sum()),
        frobenius=sigma.square().sum().sqrt().item(),
    )


def subspace_similarity(U, V):
    """φ(i, j) = ||U[:, :i]ᵀ V[:, :j]||_F² / min(i, j) for all i <= U.shape[1], j <= V.shape[1]
    (U, V with orthonormal columns). Returns (I, J) fp64: entry [i-1, j-1] is φ(i, j), in [0, 1]."""
    M = (U.double().t() @ V.double()).square()  # (I, J): squared cosines of directions
    cum = M.cumsum(0).cumsum(1)  # [i-1, j-1] = ||U_iᵀ V_j||_F²
    i = torch.arange(1, M.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, M.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def layer_type(name):
    """'layers.3.self_attn.q_proj' -> 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def summarize_method(spectra, top_k, full_vectors=None, phi_dim=32):
    """spectra: {matrix name: (sigma, U, shape)} for one method. Per matrix figures, and per layer
    type (and 'all') the means over layers of the figures and of the first top_k points of the
    curves. With full_vectors ({name: V}), adds φ(i, j) to full fine-tuning, i, j <= phi_dim."""
    matrices, groups = {}, {}
    for name, (sigma, U, shape) in spectra.items():
        rank = numerical_rank(sigma, shape)
        stats = spectrum_stats(sigma, rank)
        k = min(top_k, len(sigma))
        entry = dict(
            shape=list(shape),
            rank=rank,
            effective_rank=stats["effective_rank"],
            top1_share=stats["top1_share"],
            frobenius=stats["frobenius"],
            singular_values=sigma[:k].tolist(),
            normalized=stats["normalized"][:k],
            cumulative_energy=stats["cumulative_energy"][:k],
        )
        if full_vectors is not None and name in full_vectors and rank > 0:
            phi = subspace_similarity(U[:, : min(rank, phi_dim)], full_vectors[name][:, :phi_dim])
            entry["phi"] = phi.tolist()
        matrices[name] = entry
        for group in (layer_type(name), "all"):
            groups.setdefault(group, []).append(entry)
    order = {t: i for i, t in enumerate(PROJECTIONS + ("all",))}
    groups = dict(sorted(groups.items(), key=lambda kv: order.get(kv[0], -1)))

    def mean_curve(curves):  # element-wise mean over the common length
        n = min(len(c) for c in curves)
        return [sum(c[k] for c in curves) / len(curves) for k in range(n)]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    by_type = {}
    for group, entries in groups.items():
        g = dict(
            n_matrices=len(entries),
            effective_rank=mean([e["effective_rank"] for e in entries]),
            top1_share=mean([e["top1_share"] for e in entries]),
            rank=mean([e["rank"] for e in entries]),
            normalized=mean_curve([e["normalized"] for e in entries]),
            cumulative_energy=mean_curve([e["cumulative_energy"] for e in entries]),
        )
        phis = [torch.tensor(e["phi"]) for e in entries if "phi" in e]
        if phis:
            I, J = min(p.shape[0] for p in phis), min(p.shape[1] for p in phis)
            g["phi"] = torch.stack([p[:I, :J] for p in phis]).mean(0).tolist()
        by_type[group] = g
    return dict(matrices=matrices, by_layer_type=by_type)


# -----------------------------------------------------------------------------
# ΔW from files


def adapter_spectra(ckpt_dir, path):
    """An adapter file on its base -> (settings, {module name: (σ, U, (d_out, d_in))}). ΔW =
    folded_B·lora_A as multilora.py computes it, decomposed from its factors (svd_factored): exact,
    and cheap for large matrices. The base weights do not enter ΔW; they are loaded (in bf16, to
    halve the memory) only so that apply_adapter can check that the file belongs to this base."""
    model, _ = load_for_inference(ckpt_dir, None, "", "bfloat16", "cpu", merge=False)
    settings = multilora.apply_adapter(model, path)  # the file's own settings, as it stores them
    if not multilora.ARMS[settings["finetune"]].merge:
        raise UserError(
            f"{path}: finetune={settings['finetune']}: this arm has no fixed ΔW to analyze "
            "(multilora.ARMS: it cannot merge)"
        )
    spectra = {}
    with torch.no_grad():
        for name, layer in multilora.adapter_modules(model):
            factors = getattr(layer, "delta_factors", None)
            S, U = svd_factored(*factors()) if factors else svd_dense(layer.delta_weight())
            spectra[name] = (S, U, tuple(layer.weight.shape))
    return settings, spectra


def checkpoint_dir(path):
    """train.py with finetune=full writes its weights to out_dir/hf: accept out_dir too."""
    if os.path.isdir(os.path.join(path, "hf")) and not os.path.exists(
        os.path.join(path, "config.json")
    ):
        return os.path.join(path, "hf")
    return path


def full_spectra(ckpt_dir, full_dir, names, keep=64, device="cpu"):
    """ΔW = W_full - W_base (fp32) for the named projections (all of them when names is empty) ->
    {name: (σ, U[:, :keep], shape)}. Both models are held in fp32 memory at once."""
    base = checkpoint.load_model(ckpt_dir).state_dict()
    full = checkpoint.load_model(checkpoint_dir(full_dir)).state_dict()
    if not names:
        names = [
            k[: -len(".weight")]
            for k in base
            if k.endswith(".weight") and layer_type(k[: -len(".weight")]) in PROJECTIONS
        ]
    spectra = {}
    for name in names:
        key = name + ".weight"
        if key not in full or full[key].shape != base[key].shape:
            got = list(full[key].shape) if key in full else "no such tensor"
            raise UserError(
                f"--full={full_dir}: {key}: expected shape {list(base[key].shape)} as in "
                f"--ckpt_dir={ckpt_dir}, got {got}"
            )
        delta = full[key].float() - base[key].float()
        S, U = svd_dense(delta.to(device))
        spectra[name] = (S.cpu(), U[:, :keep].cpu(), tuple(delta.shape))
    return spectra


# -----------------------------------------------------------------------------
# the run


def method_label(settings, path, taken):
    """'lora', 'multilora' (from the file's settings), or the file name when that is taken."""
    label = settings.get("finetune") or os.path.basename(path)
    if label in taken:
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = f"{label} ({folder}/{os.path.basename(path)})"
    return label


def analyze():
    """-> the summary dict written to summary.json."""
    methods = {}
    for path in adapters:
        settings, spectra = adapter_spectra(ckpt_dir, path.strip())
        methods[method_label(settings, path, methods)] = dict(
            file=path.strip(), settings=settings, spectra=spectra
        )
    full_vectors = None
    if full:
        names = sorted({name for m in methods.values() for name in m["spectra"]})
        spectra = full_spectra(ckpt_dir, full, names, phi_dim, device)
        full_vectors = {name: U for name, (_, U, _) in spectra.items()}
        methods["full"] = dict(
            file=checkpoint_dir(full), settings=dict(finetune="full"), spectra=spectra
        )
    summary = dict(base=ckpt_dir, settings={k: globals()[k] for k in SETTINGS}, methods={})
    for label, m in methods.items():
        reference = full_vectors if label != "full" else None
        summary["methods"][label] = dict(
            file=m["file"],
            settings=m["settings"],
            **summarize_method(m["spectra"], top_k, reference, phi_dim),
        )
    return summary


def print_summary(summary):
    print(
        f"{'method':<12} {'layer':<10} {'matrices':>8} {'rank':>7} {'eff. rank':>9} {'top-1':>7} "
        f"{'φ(k,k)':>7}"
    )
    for label, m in summary["methods"].items():
        for group, g in m["by_layer_type"].items():
            k = len(g.get("phi", []))  # rows of φ: i <= min(rank, phi_dim) <= columns
            phi = f"{g['phi'][k - 1][k - 1]:7.3f}" if k else f"{'':>7}"
            er, top1 = g["effective_rank"], g["top1_share"]
            er = "-" if er is None else f"{er:9.2f}"  # None: ΔW = 0 (an adapter not trained)
            top1 = "-" if top1 is None else f"{top1:7.3f}"
            print(
                f"{label:<12} {group:<10} {g['n_matrices']:>8} {g['rank']:>7.1f} "
                f"{er:>9} {top1:>7} {phi}"
            )
    print(
        "eff. rank = exp(entropy of σ/Σσ); top-1 = σ_1/Σσ; φ(k,k) = subspace similarity of the "
        "top k = min(rank, phi_dim) directions to full fine-tuning's; means over the layers"
    )


def plot(summary, out_dir):
    """spectra.png (normalized spectrum and cumulative energy per layer type, one line per method)
    and similarity.png (φ(i, j) to full fine-tuning per method and layer type). Returns the files
    written, [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed: no plots (pip install matplotlib); summary.json "
            "has the numbers"
        )
        return []
    methods = summary["methods"]
    groups = [g for g in next(iter(methods.values()))["by_layer_type"] if g != "all"]
    written = [save_png(plt, plot_spectra(plt, methods, groups), out_dir, "spectra.png")]
    with_phi = [
        (label, m)
        for label, m in methods.items()
        if any("phi" in g for g in m["by_layer_type"].values())
    ]
    if with_phi:
        fig = plot_similarity(plt, with_phi, groups)
        written.append(save_png(plt, fig, out_dir, "similarity.png"))
    return written


# the helpers of plot, given matplotlib.pyplot as plt once plot has found it
def save_png(plt, fig, out_dir, name):
    """Writes fig to out_dir/name, all or nothing, and closes it. -> the path."""
    path = os.path.join(out_dir, name)
    # all or nothing; the name ends in .tmp, so say png
    with util.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_spectra(plt, methods, groups):
    """A column per layer type: the normalized spectrum above, the cumulative energy below."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        2, len(groups), figsize=(3.2 * len(groups), 6), squeeze=False, layout="constrained"
    )
    for col, group in enumerate(groups):
        for label, m in methods.items():
            g = m["by_layer_type"].get(group)
            if g is None:
                continue
            k = range(1, len(g["normalized"]) + 1)
            nz = [(i, p) for i, p in zip(k, g["normalized"]) if p > 0]
            axes[0, col].plot([i for i, _ in nz], [p for _, p in nz], marker=".", label=label)
            axes[1, col].plot(k, g["cumulative_energy"], marker=".", label=label)
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(group)
        axes[1, col].set_xlabel("k")
        axes[1, col].set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("σ_k / Σσ")
    axes[1, 0].set_ylabel("cumulative energy: share of ‖ΔW‖²_F")
    axes[0, 0].legend(fontsize=8)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Spectrum of ΔW, mean over layers")
    return fig


def plot_similarity(plt, with_phi, groups):
    """φ(i, j) to full fine-tuning as a heat map: a row per (label, method) of with_phi, a column
    per layer type."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        len(with_phi),
        len(groups),
        figsize=(3.2 * len(groups) + 1, 3 * len(with_phi)),
        squeeze=False,
        layout="constrained",
    )
    for row, (label, m) in enumerate(with_phi):
        for col, group in enumerate(groups):
            ax = axes[row, col]
            g = m["by_layer_type"].get(group, {})
            if "phi" not in g:
                ax.axis("off")
                continue
            phi = g["phi"]
            im = ax.imshow(
                phi,
                vmin=0,
                vmax=1,
                cmap="viridis",
                origin="lower",
                aspect="auto",
                extent=(0.5, len(phi[0]) + 0.5, 0.5, len(phi) + 0.5),
            )
            ax.set_title(f"{label}: {group}", fontsize=9)
            ax.set_xlabel("j (full fine-tuning)")
            ax.set_ylabel(f"i ({label})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle("Subspace similarity to full fine-tuning, φ(i, j) = ||U_iᵀ V_j||² / min(i, j)")
    return fig


def check_out_dir(folder):
    """summary.json and the plots replace only an earlier analysis's: a summary.json of this
    script's, and the plots beside it (util.check_output)."""
    util.check_output(folder, "out_dir", folder=True)
    summary = os.path.join(folder, "summary.json")
    ours = util.json_with("base", "settings", "methods")
    for name in ("summary.json", "spectra.png", "similarity.png"):
        util.check_output(os.path.join(folder, name), "out_dir", ours=lambda p: ours(summary))


def main(argv):
    globals().update(configure(SETTINGS, argv))
    summary = analyze()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "summary.json")
    util.write_text(path, json.dumps(summary, indent=1))
    print_summary(summary)
    for written in [path] + plot(summary, out_dir):
        print(f"wrote {written}")
    return summary


if __name__ == "__main__":
    util.run_cli(main)
