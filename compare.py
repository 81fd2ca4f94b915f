"""
Evidence, not anecdotes: every arm x every seed through train.py on the embedded suite, then exact
match as mean ± 95% confidence interval, the paired difference to the baseline arm (same seed: same
data order, same base; the arms differ only in the finetune), the §5 figures of ΔW (analyze.py:
effective rank, top-1 share, φ to full fine-tuning) with their spread, and plots.

    python compare.py                              # LoRA r=32, MultiLoRA 4x8: seeds 1-20; full: 1-5
    python compare.py config/compare_ablation.py   # MultiLoRA's two ideas apart: n and the init
    python compare.py --seeds=1,2 --max_iters=50 --out_dir=out/quick --out_prefix=out/quick/compare

Writes out_dir/<arm>/seed<k>/ (train.py's out_dir for that run, with its train.log) and
    <out_prefix>.json    every run's figures and the summaries (the README's tables come from it)
    <out_prefix>.md      the tables in markdown, rendered from the JSON alone (also printed)
    <out_prefix>_scores.png, _paired.png (a point per seed), _spectra.png, _val_loss.png
                         when matplotlib is installed
    python compare.py --render=docs/compare.json     # print a written JSON's tables, train nothing
    python compare.py --numerics=docs/numerics.json  # the fingerprint tests/test_numerics.py checks

Statistics: for k seeds, mean ± t_{0.975, k-1}·sd/√k (Student's t). The test set is fixed, so the
interval is over seeds (initialization and data order), not over test examples. A paired difference
is arm minus baseline per seed, and its interval is the same formula over those k differences.
"""

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import analyze
import multilora
import util
from util import UserError
from configurator import Rule, S, configure, declared

# -----------------------------------------------------------------------------
# settings: override with a config/*.py file and --key=value
arms = S(
    [  # "label: train.py arguments"; arms differ only in the finetune
        "full: config/tasks_full.py",
        "LoRA r=32: config/tasks_lora.py",
        "MultiLoRA 4x8: config/tasks_multilora.py",
    ],
    None,
    "'label: train.py arguments' per arm",
)
_labels = lambda s: [a.partition(":")[0].strip() for a in s["arms"]] or [""]
baseline = S(
    Rule(
        "'LoRA r=32' if an arm has that label, else the first arm",
        lambda s: "LoRA r=32" if "LoRA r=32" in _labels(s) else _labels(s)[0],
    ),
    None,
    "paired differences are arm minus this arm, seed by seed",
)
full_arm = S(
    Rule(
        "'full' if an arm has that label, else ''", lambda s: "full" if "full" in _labels(s) else ""
    ),
    None,
    "φ is measured against this arm's ΔW of the same seed ('' = no φ)",
)
seeds = S(
    list(range(1, 21)), "[0, inf)", "20: a ±10-point MultiLoRA − LoRA interval (docs/evidence.md)"
)
arm_seeds = S(
    Rule(
        "['<full_arm>: 1-5'] when full_arm is set, else []",
        lambda s: [f"{s['full_arm']}: 1-5"] if s["full_arm"] else [],
    ),
    None,
    "'label: seeds' for an arm run on fewer seeds than --seeds, e.g. 'full: 1-5'",
)
ckpt_dir = S("data/tiny_base", None, "the base every run starts from (and analyze.py's reference)")
max_iters = S(500, "[1, inf)", "the budget of every run (the suite was calibrated at it: README)")
eval_interval = S(100, "[1, inf)", "validation-loss points of the curves")
train_args = S([], None, "more train.py arguments for every run, e.g. --train_args=--batch_size=16")
jobs = S(0, "[0, inf)", "runs at a time (0 = the number of CPU cores; each run uses 1 thread)")
reuse = S(
    False,
    None,
    "keep runs of the same command already finished in out_dir (trusts they saw the same data)",
)
overwrite = S(
    False, None, "replace runs already in out_dir (without it or reuse, compare.py refuses to)"
)
out_dir = S("out/compare", None)
out_prefix = S("docs/compare", None)
phi_dim = S(32, "[1, inf)", "analyze.py's φ(k, k), k = min(rank, phi_dim)")
render = S(
    "", None, "a written JSON: print its tables (and with --plots=True redraw its plots) and stop"
)
plots = S(False, None, "with --render: redraw the plots beside that JSON")
numerics = S(
    "",
    None,
    "write the numerics fingerprint (a few steps of each arm, seed 1) to this JSON and stop",
)
SETTINGS = declared(globals())
# -----------------------------------------------------------------------------

# t_{0.975, df} for df = 1..30 (two-sided 95%), from any table of Student's t (e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, 1.3.6.7.2); beyond 30 df the normal 1.960 (within 2%)
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def mean_ci(values):
    """-> {mean, ci (half-width of the 95% interval; None for one value), sd, min, max, n}."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    sd = float(x.std(ddof=1)) if n > 1 else None
    ci = (T975[n - 2] if n <= 31 else 1.960) * sd / np.sqrt(n) if n > 1 else None
    return dict(mean=float(x.mean()), ci=ci, sd=sd, min=float(x.min()), max=float(x.max()), n=n)


def paired_difference(a, b):
    """Mean ± 95% CI of a - b, element by element (the same seed in both)."""
    return mean_ci(np.subtract(a, b))


def parse_arm(spec):
    label, _, args = spec.partition(":")
    return label.strip(), shlex.split(args)


def slug(label):
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def parse_seeds(text):
    """'1-5' or '1,2,7' or '1-3,9' -> [1, 2, 3, 9]."""
    out = []
    for part in text.replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise UserError(f"arm_seeds: expected seeds like '1-5' or '1,2,7', got {text!r}")
        out += list(range(int(first), int(last or first) + 1))
    return out


def seeds_by_arm(labels):
    """{label: its seeds}: --seeds, or fewer of them where arm_seeds says so."""
    chosen = {label: list(seeds) for label in labels}
    for spec in arm_seeds:
        label, _, text = spec.rpartition(":")
        label = label.strip()
        if label not in chosen:
            raise UserError(
                f"arm_seeds: expected 'label: seeds' with a label of {labels}, got {spec!r}"
            )
        chosen[label] = [s for s in seeds if s in parse_seeds(text)]  # those of --seeds it names
    return chosen


def compact(values):
    """[1, 2, 3, 5] -> '1–3, 5'."""
    parts, values = [], sorted(values)
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(
        f"{a}" if a == b else f"{a}–{b}" if b > a + 1 else f"{a}, {b}" for a, b in parts
    )


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), which the kernels' rounding may depend on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance():
    """What the numbers were made with: the commit (and whether tracked files differed from it), the
    torch version and the CPU model. Runs on another CPU or torch may round differently and, on this
    suite, a rounding difference can grow into the other outcome of a task (learned or not)."""

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args],
                cwd=os.path.dirname(os.path.abspath(__file__)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return dict(
        commit=commit,
        dirty=dirty,
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=cpu_model(),
    )


# -----------------------------------------------------------------------------
# the runs


def train(label, args, seed):
    """One train.py run in a subprocess (1 thread) -> its directory. Output goes to train.log."""
    run_dir = os.path.join(out_dir, slug(label), f"seed{seed}")
    command = [
        sys.executable,
        "train.py",
        *args,
        f"--ckpt_dir={ckpt_dir}",
        f"--seed={seed}",
        f"--out_dir={run_dir}",
        f"--max_iters={max_iters}",
        f"--eval_interval={eval_interval}",
        "--threads=1",
        *train_args,
    ]
    if reuse and finished(run_dir, command):
        return run_dir
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and not overwrite:
        raise UserError(
            f"{run_dir}: holds a run; keep it with --reuse=True or replace it with --overwrite=True"
        )
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        code = subprocess.run(
            command + ["--overwrite=True"] * overwrite,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).returncode
    if code != 0:
        tail = open(os.path.join(run_dir, "train.log")).read().strip().splitlines()[-3:]
        raise UserError(
            f"{label} seed {seed}: train.py failed ({shlex.join(command)}): {' | '.join(tail)}"
        )
    with open(os.path.join(run_dir, "done.json"), "w") as f:
        json.dump(dict(command=command[1:], wall_s=round(time.time() - t0, 1)), f)
    return run_dir


def finished(run_dir, command):
    """A run of exactly this command (the same arm, seed and budget) already ended there."""
    path = os.path.join(run_dir, "done.json")
    return os.path.exists(path) and json.load(open(path))["command"] == command[1:]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_figures(run_dir):
    """Exact match per task, the validation-loss curves, the final losses, from metrics.jsonl. The
    train loss is the mean of the logged batches in the last tenth of the run (one batch is
    noisy)."""
    records = read_metrics(run_dir)
    scores = {k.split("/", 1)[1]: v for k, v in records[-1].items() if k.startswith("exact_match/")}
    evals = [r for r in records if "val_loss" in r]
    last = max(r["iter"] for r in records if "train_loss" in r)
    train_losses = [
        r["train_loss"] for r in records if "train_loss" in r and r["iter"] >= 0.9 * last
    ]
    curves = {
        "iters": [r["iter"] for r in evals],
        "mean": [r["val_loss"] for r in evals],
        **{task: [r[f"val_loss/{task}"] for r in evals] for task in scores},
    }
    return dict(
        exact_match=scores,
        val_loss=evals[-1]["val_loss"],
        train_loss=float(np.mean(train_losses)),
        val_curves=curves,
        wall_s=json.load(open(os.path.join(run_dir, "done.json")))["wall_s"],
    )


def spectrum_figures(run_dirs):
    """{label: run directory} of one seed -> {label: effective rank, top-1 share, φ(k, k) to the
    full arm, normalized spectrum}: the means over all adapted matrices (analyze.py's 'all'
    group)."""
    adapters = {
        label: os.path.join(d, "adapter.safetensors")
        for label, d in run_dirs.items()
        if label != full_arm
    }
    # an arm without a fixed ΔW (one that cannot merge: multilora.ARMS) has no spectrum figures
    spectra = {
        label: analyze.adapter_spectra(ckpt_dir, path)[1]
        for label, path in adapters.items()
        if multilora.ARMS[multilora.load_adapter(path)[1]["finetune"]].merge
    }
    full_vectors = None
    if full_arm in run_dirs:
        names = sorted({name for s in spectra.values() for name in s})
        spectra[full_arm] = analyze.full_spectra(ckpt_dir, run_dirs[full_arm], names, keep=phi_dim)
        full_vectors = {name: U for name, (_, U, _) in spectra[full_arm].items()}
    figures = {}
    for label, s in spectra.items():
        g = analyze.summarize_method(s, 64, full_vectors if label != full_arm else None, phi_dim)[
            "by_layer_type"
        ]["all"]
        k = len(g.get("phi", []))
        figures[label] = dict(
            effective_rank=g["effective_rank"],
            top1_share=g["top1_share"],
            phi=g["phi"][k - 1][k - 1] if k else None,
            normalized=g["normalized"],
        )
    return figures


# -----------------------------------------------------------------------------
# the numerics fingerprint: a few steps of each arm through the same train() as the evidence

FINGERPRINT_STEPS = 24  # past the configs' 20 warmup steps, so the schedule is the evidence's kind
FINGERPRINT_ARGS = ["--log_interval=1", "--exact_match_examples=5"]


def fingerprint(specs, work_dir, base, steps=FINGERPRINT_STEPS):
    """{label: {train_loss per step, val_loss at 0 and at the end, exact_match}} of seed 1 of every
    arm, `steps` steps each from `base`, the evidence's command otherwise (tests/test_numerics.py
    compares it bit for bit with docs/numerics.json: a change to the training arithmetic shows here
    first)."""
    global out_dir, max_iters, eval_interval, train_args, reuse, overwrite, ckpt_dir
    saved = out_dir, max_iters, eval_interval, train_args, reuse, overwrite, ckpt_dir
    out_dir, max_iters, eval_interval, reuse, overwrite = work_dir, steps, steps, False, False
    train_args, ckpt_dir = FINGERPRINT_ARGS, base
    try:
        with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            dirs = {label: pool.submit(train, label, args, 1) for label, args in specs}
            records = {label: read_metrics(f.result()) for label, f in dirs.items()}
    finally:
        out_dir, max_iters, eval_interval, train_args, reuse, overwrite, ckpt_dir = saved
    return {
        label: dict(
            train_loss=[r["train_loss"] for r in rs if "train_loss" in r],
            val_loss=[r["val_loss"] for r in rs if "val_loss" in r],
            exact_match=rs[-1].get("exact_match"),
        )
        for label, rs in records.items()
    }


def write_fingerprint(specs, path):
    """--numerics=path: the fingerprint of the arms (no train_args: the evidence's commands) and
    what it was made with."""
    import tempfile

    if train_args:
        raise UserError(
            "numerics: expected no train_args (the fingerprint is of the evidence's "
            f"commands), got {train_args}"
        )
    with tempfile.TemporaryDirectory() as work_dir:
        losses = fingerprint(specs, work_dir, ckpt_dir)
    result = dict(
        provenance=provenance(),
        arms=[f"{label}: {shlex.join(args)}" for label, args in specs],
        steps=FINGERPRINT_STEPS,
        train_args=FINGERPRINT_ARGS,
        ckpt_dir=ckpt_dir,
        fingerprint=losses,
    )
    util.write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}: {', '.join(losses)}, {FINGERPRINT_STEPS} steps of seed 1 each")


# -----------------------------------------------------------------------------
# the summary: what the JSON holds and the tables show

SCALARS = ("val_loss", "train_loss", "effective_rank", "top1_share", "phi")


def summarize(runs, labels):
    """runs: [{arm, seed, exact_match {task: acc}, val_loss, ...}] -> per arm: mean ± CI of each
    figure, and under "vs" its paired differences (seeds in common) to the baseline and to the full
    arm (not the baseline's to the full arm: that is the full arm's to the baseline, negated)."""
    by_arm = {
        label: sorted((r for r in runs if r["arm"] == label), key=lambda r: r["seed"])
        for label in labels
    }
    tasks = list(runs[0]["exact_match"])

    def values(rs, key):
        if key in tasks:
            return [r["exact_match"][key] for r in rs]
        if key == "mean":
            return [float(np.mean(list(r["exact_match"].values()))) for r in rs]
        return [r[key] for r in rs] if all(r.get(key) is not None for r in rs) else None

    summary = {}
    for label, all_rs in by_arm.items():
        arm = {}
        for key in tasks + ["mean", *SCALARS]:  # φ: the seeds the full arm ran
            rs = [
                r for r in all_rs if key in tasks or key == "mean" or r.get(key) is not None
            ] or all_rs
            v = values(rs, key)
            if v is None:
                continue
            arm[key] = dict(mean_ci(v), vs={})
            for ref in (baseline, full_arm):
                ref_runs = {r["seed"]: r for r in by_arm.get(ref, [])}
                common = [r for r in rs if r["seed"] in ref_runs]
                b = values([ref_runs[r["seed"]] for r in common], key)
                if ref and label not in (ref, baseline) and common and b is not None:
                    arm[key]["vs"][ref] = paired_difference(values(common, key), b)
        summary[label] = arm
    return dict(tasks=tasks, arms=summary)


def fmt(stat, scale=1.0, digits=1):
    if stat is None:
        return ""
    ci = "" if stat["ci"] is None else f" ± {stat['ci'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}{ci}"


def render_tables(result):
    """The markdown tables, from the JSON's content alone."""
    s, labels = result["summary"], list(result["summary"]["arms"])
    arms = s["arms"]
    pairs = [
        (label, ref)
        for ref in (result["settings"]["baseline"], result["settings"]["full_arm"])
        for label in labels
        if ref in arms[label]["mean"]["vs"]
    ]
    head = ["", *labels, *[f"{label} − {ref}" for label, ref in pairs]]
    by_arm = result.get("seeds_by_arm") or {label: result["settings"]["seeds"] for label in labels}
    fewer = [
        f"{label}: seeds {compact(by_arm[label])}"
        for label in labels
        if len(by_arm[label]) < len(result["settings"]["seeds"])
    ]
    over = compact(result["settings"]["seeds"]) + (" (" + "; ".join(fewer) + ")" if fewer else "")
    lines = [
        f"Exact match (%) and figures of ΔW, mean ± 95% CI over seeds {over} "
        f"({max_iters_of(result)} steps each); the last columns are paired differences (same "
        "seed, over the seeds both arms ran).",
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
    ]
    lines += table_rows(s["tasks"], arms, labels, pairs)
    lines += [
        "",
        "Per task, the range of the arms' mean exact match (%): "
        + ", ".join(
            f"{task} {min(means) * 100:.1f}–{max(means) * 100:.1f}"
            for task in s["tasks"]
            for means in [[arms[label][task]["mean"] for label in labels]]
        )
        + ".",
    ]
    made = result.get("provenance")
    if made:
        state = {True: "with uncommitted changes", False: "clean", None: "not a git checkout"}
        lines += [
            "",
            f"Made at commit {(made['commit'] or 'unknown')[:12]} ({state[made['dirty']]}), "
            f"torch {made['torch']}, "
            f"Python {made['python']}, CPU {made['cpu']}: {len(result['runs'])} runs in "
            f"{result['wall_s']['total'] / 60:.1f} min.",
        ]
    return "\n".join(lines) + "\n"


def table_rows(tasks, arms, labels, pairs):
    """The table's rows, a column per arm of labels, then per (label, ref) of pairs; a row whose
    cells are all empty is left out."""
    rows = [(task, task, 100, 1) for task in tasks] + [
        ("**mean**", "mean", 100, 1),
        ("sd of the mean over seeds", "sd", 100, 1),
    ]
    rows += [
        ("val loss", "val_loss", 1, 3),
        ("train loss (last 10%)", "train_loss", 1, 3),
        ("effective rank of ΔW", "effective_rank", 1, 1),
        ("top-1 share σ₁/Σσ", "top1_share", 1, 3),
        ("φ(k,k) to full (its seeds)", "phi", 1, 3),
    ]
    lines = []
    for name, key, scale, digits in rows:
        if key == "sd":
            cells = [
                f"{arms[label]['mean']['sd'] * scale:.1f}"
                if arms[label]["mean"]["sd"] is not None
                else ""
                for label in labels
            ]
            cells += [""] * len(pairs)
        else:
            cells = [fmt(arms[label].get(key), scale, digits) for label in labels]
            cells += [
                fmt(arms[label].get(key, {}).get("vs", {}).get(ref), scale, digits)
                for label, ref in pairs
            ]
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def max_iters_of(result):
    return result["settings"]["max_iters"]


# -----------------------------------------------------------------------------
# plots (matplotlib is optional)


def plot(result, prefix):
    """{prefix}_scores.png, _paired.png, _spectra.png (when the runs have spectra) and
    _val_loss.png. -> the files written, [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    written = [save(plot_scores(plt, result), prefix + "_scores.png")]
    written.append(save(plot_paired(plt, result), prefix + "_paired.png"))
    if any(r.get("normalized") for r in result["runs"]):
        written.append(save(plot_spectra(plt, result), prefix + "_spectra.png"))
    written.append(save(plot_val_loss(plt, result), prefix + "_val_loss.png"))
    return written


# the figures of plot, given matplotlib.pyplot as plt once plot has found it
def plot_scores(plt, result):
    """Exact match per task and their mean, bars with 95% CI error bars, a point per seed."""
    arms, tasks, runs = result["summary"]["arms"], result["summary"]["tasks"], result["runs"]
    labels = list(arms)
    fig, ax = plt.subplots(figsize=(10, 4))
    keys, width = tasks + ["mean"], 0.8 / len(labels)
    for i, label in enumerate(labels):
        m = [100 * arms[label][k]["mean"] for k in keys]
        e = [100 * (arms[label][k]["ci"] or 0) for k in keys]
        x = np.arange(len(keys)) + (i - (len(labels) - 1) / 2) * width
        bars = ax.bar(x, m, width, yerr=e, capsize=2, label=label, alpha=0.6)
        rs = [r for r in runs if r["arm"] == label]  # every seed's point, spread across the bar
        spread = np.linspace(-0.35, 0.35, len(rs)) * width if len(rs) > 1 else np.zeros(1)
        for j, key in enumerate(keys):
            y = [100 * v for r in rs for _, v in em_items(r, [key])]
            ax.scatter(
                x[j] + spread,
                y,
                s=6,
                color=bars.patches[0].get_facecolor(),
                edgecolors="black",
                linewidths=0.3,
                alpha=1.0,
                zorder=3,
            )
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("exact match (%): mean ± 95% CI, a point per seed")
    ax.legend(fontsize=8)
    return fig


def plot_paired(plt, result):
    """The paired differences to the baseline (same seed), a point per seed, mean ± 95% CI."""
    arms, tasks, runs = result["summary"]["arms"], result["summary"]["tasks"], result["runs"]
    labels, keys = list(arms), tasks + ["mean"]
    ref = result["settings"]["baseline"]
    others = [label for label in labels if ref in arms[label]["mean"]["vs"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(others), 1)
    base = {(r["seed"], key): v for r in runs if r["arm"] == ref for key, v in em_items(r, keys)}
    for i, label in enumerate(others):
        x = np.arange(len(keys)) + (i - (len(others) - 1) / 2) * width
        color = f"C{labels.index(label)}"
        for j, key in enumerate(keys):
            d = [
                100 * (v - base[r["seed"], key])
                for r in runs
                if r["arm"] == label
                for k, v in em_items(r, [key])
                if (r["seed"], key) in base
            ]
            ax.scatter(x[j] + np.linspace(-0.3, 0.3, len(d)) * width, d, s=6, color=color, zorder=3)
            stat = arms[label][key]["vs"][ref]
            ax.errorbar(
                x[j],
                100 * stat["mean"],
                100 * (stat["ci"] or 0),
                fmt="_",
                color="black",
                capsize=3,
                markersize=12,
                label="mean ± 95% CI" if i == j == 0 else None,
            )
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel(f"exact match − {ref} (points)")
    for i, label in enumerate(others):
        ax.scatter(
            [],
            [],
            s=12,
            color=f"C{labels.index(label)}",
            label=f"{label} − {ref}, a point per seed",
        )
    ax.legend(fontsize=7)
    return fig


def plot_spectra(plt, result):
    """The normalized spectrum of ΔW, mean and min-max band over seeds."""
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in result["summary"]["arms"]:
        curves = [r["normalized"] for r in runs if r["arm"] == label and r.get("normalized")]
        n = min(len(c) for c in curves)
        c = np.array([c[:n] for c in curves])
        (line,) = ax.plot(range(1, n + 1), c.mean(0), label=label)
        ax.fill_between(range(1, n + 1), c.min(0), c.max(0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="k", ylabel="σ_k / Σσ (mean over matrices)", yscale="log", xlim=(1, 48))
    ax.legend(fontsize=8)
    return fig


def plot_val_loss(plt, result):
    """The validation loss per task against steps, mean and min-max band over seeds."""
    tasks, runs = result["summary"]["tasks"], result["runs"]
    fig, axes = plt.subplots(2, (len(tasks) + 2) // 2, figsize=(12, 5), sharex=True)
    for ax, key in zip(axes.flat, tasks + ["mean"]):
        for label in result["summary"]["arms"]:
            rs = [r for r in runs if r["arm"] == label]
            c = np.array([r["val_curves"][key] for r in rs])
            (line,) = ax.plot(rs[0]["val_curves"]["iters"], c.mean(0), label=label)
            ax.fill_between(
                rs[0]["val_curves"]["iters"], c.min(0), c.max(0), color=line.get_color(), alpha=0.2
            )
        ax.set(title=key, yscale="log")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("validation loss (mean, min-max band over seeds)")
    return fig


def em_items(run, keys):
    """(key, exact match) of a run for the tasks and 'mean' among keys."""
    em = run["exact_match"]
    return [(key, float(np.mean(list(em.values()))) if key == "mean" else em[key]) for key in keys]


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# -----------------------------------------------------------------------------


def main(argv=None):
    settings = configure(SETTINGS, sys.argv[1:] if argv is None else argv, "compare.py")
    globals().update(settings)
    if render:
        with open(render) as f:
            result = json.load(f)
        print(render_tables(result), end="")
        if plots:
            print("wrote " + ", ".join(plot(result, os.path.splitext(render)[0])))
        return
    specs = [parse_arm(a) for a in arms]
    labels = [label for label, _ in specs]
    if (
        len(set(labels)) != len(labels)
        or baseline not in labels
        or (full_arm and full_arm not in labels)
    ):
        raise UserError(
            f"arms: expected distinct labels including baseline={baseline!r} and "
            f"full_arm={full_arm!r}, got {labels}"
        )
    if numerics:
        return write_fingerprint(specs, numerics)
    ours = util.json_with("settings", "summary", "runs")
    for end in (".json", ".md", "_scores.png", "_paired.png", "_spectra.png", "_val_loss.png"):
        # written at the end: replacing only an earlier comparison's (its JSON says so)
        util.check_output(out_prefix + end, "out_prefix", ours=lambda p: ours(out_prefix + ".json"))
    by_arm = seeds_by_arm(labels)
    made_with = provenance()  # before any run: the commit the runs are made from
    workers = jobs or os.cpu_count() or 1
    t0 = time.time()
    n_runs = sum(map(len, by_arm.values()))
    print(f"{len(specs)} arms, {n_runs} runs, {workers} at a time, in {out_dir}")
    with ThreadPoolExecutor(workers) as pool:
        futures = {
            (label, seed): pool.submit(train, label, args, seed)
            for seed in seeds
            for label, args in specs
            if seed in by_arm[label]
        }
        run_dirs = {key: f.result() for key, f in futures.items()}
    t_train = time.time() - t0
    runs = []
    for seed in seeds:
        here = [label for label in labels if seed in by_arm[label]]
        figures = spectrum_figures({label: run_dirs[label, seed] for label in here})
        for label in here:
            runs.append(
                dict(
                    arm=label,
                    seed=seed,
                    **run_figures(run_dirs[label, seed]),
                    **figures.get(label, {}),
                )
            )
    result = dict(
        settings=settings,
        provenance=made_with,
        seeds_by_arm=by_arm,
        summary=summarize(runs, labels),
        runs=runs,
        wall_s=dict(train=t_train, total=time.time() - t0),
    )
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    util.write_text(out_prefix + ".json", json.dumps(result, indent=1))
    tables = render_tables(result)
    util.write_text(out_prefix + ".md", tables)
    print(tables, end="")
    written = plot(result, out_prefix)
    print(
        f"wrote {out_prefix}.json, {out_prefix}.md{''.join(', ' + p for p in written)} "
        f"in {(time.time() - t0) / 60:.1f} min ({t_train / 60:.1f} training)"
    )


if __name__ == "__main__":
    util.run_cli(main)
