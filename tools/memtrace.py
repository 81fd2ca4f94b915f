"""
Where a CPU run's peak resident memory comes from, by phase: runs a script (train.py) in this
process and attributes every rise of the process's high-water mark (VmHWM) to the phase in which it
happened: the load, each top-level module's forward (train or eval), each block's backward, the
optimizer step. The figures of docs/scaling.md come from it.

    python tools/memtrace.py out/trace.json train.py --ckpt_dir=out/l2g --finetune=lora ...
    torchrun --standalone --nproc_per_node=2 tools/memtrace.py out/trace.json train.py ... \\
        --fsdp=True

Each process writes trace.json (rank r > 0: trace.rank{r}.json; its folder is made before the
script runs, or refused in one line): the RSS just after `import torch`
(the baseline), the peak above it, and the phases in order, each with the high-water mark's rise
while it ran and the RSS at its end; it prints the peak and the phases that raised it most.
"""

import json
import os
import runpy
import sys

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# the repository's modules, from wherever this script is run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import util
from util import UserError


def rss_and_hwm():
    """(VmRSS, VmHWM) of this process in bytes."""
    with open("/proc/self/status") as f:
        got = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Vm")}
    return got["VmRSS"], got["VmHWM"]


class Trace:
    """Phases in order: (label, rise of VmHWM while it ran, VmRSS at its end)."""

    def __init__(self):
        self.base = rss_and_hwm()[0]
        self.phases = []
        self.label, self.start_hwm = "start and load", rss_and_hwm()[1]
        self.names = {}  # id(module) -> its name in the model (top-level children and blocks)

    def enter(self, label):
        if label == self.label:
            return
        rss, hwm = rss_and_hwm()
        self.phases.append((self.label, hwm - self.start_hwm, rss - self.base))
        self.label, self.start_hwm = label, hwm

    def name_model(self, model):
        self.names[id(model)] = "model (the root group's unshard)"
        for name, m in model.named_children():
            self.names[id(m)] = name
        for i, m in enumerate(getattr(model, "layers", [])):
            self.names[id(m)] = f"layers.{i}"

    def pre_forward(self, module, args):
        if id(module) not in self.names and hasattr(module, "lm_head"):
            self.name_model(module)
        name = self.names.get(id(module))
        if name is not None:
            self.enter(f"{'' if torch.is_grad_enabled() else 'eval '}fwd {name}")

    def post_forward(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        grad = torch.is_grad_enabled()
        if name.startswith("layers.") and grad and isinstance(output, torch.Tensor):
            if output.requires_grad:  # runs when this block's output gradient is ready
                output.register_hook(lambda g, n=name: self.enter(f"bwd {n}"))
        after = "" if grad else "eval "
        self.enter(f"{after}after fwd {name}")

    def report(self, path):
        rss, hwm = rss_and_hwm()
        self.phases.append((self.label, hwm - self.start_hwm, rss - self.base))
        peak = hwm - self.base
        rows = [dict(phase=p, hwm_rise=r, rss_end=e) for p, r, e in self.phases]
        report = dict(base_rss=self.base, peak_above_base=peak, phases=rows)
        util.write_text(path, json.dumps(report, indent=0))
        top = sorted(rows, key=lambda r: -r["hwm_rise"])[:8]
        print(
            f"memtrace: peak {peak / 2**30:.3f} GiB above import torch; most raised by "
            + ", ".join(f"{r['phase']} +{r['hwm_rise'] / 2**20:.0f} MiB" for r in top),
            file=sys.stderr,
        )


def main(argv):
    if argv[:1] in (["--help"], ["-h"]):
        print(__doc__.strip())
        return
    if len(argv) < 2 or not argv[1].endswith(".py"):
        raise UserError("usage: tools/memtrace.py OUT.json SCRIPT.py [its arguments]")
    out, script = argv[0], argv[1]
    rank = int(os.environ.get("RANK", 0))
    if rank:
        root, ext = os.path.splitext(out)
        out = f"{root}.rank{rank}{ext}"
    # checked before the script runs: a new file, or an earlier trace (never another file); its
    # folder is made now, not after a long run
    util.check_output(out, None, ours=util.json_with("base_rss", "peak_above_base", "phases"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    trace = Trace()
    torch.nn.modules.module.register_module_forward_pre_hook(trace.pre_forward)
    torch.nn.modules.module.register_module_forward_hook(trace.post_forward)
    register_optimizer_step_pre_hook(lambda *a: trace.enter("optimizer"))
    register_optimizer_step_post_hook(lambda *a: trace.enter("after step"))
    import checkpoint  # train.py's load under FSDP: a phase of its own

    load_into = checkpoint.load_into

    def traced_load_into(*args, **kwargs):
        trace.enter("load_into")
        try:
            return load_into(*args, **kwargs)
        finally:
            trace.enter("after load_into")

    checkpoint.load_into = traced_load_into
    sys.argv = [script] + argv[2:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        trace.report(out)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
