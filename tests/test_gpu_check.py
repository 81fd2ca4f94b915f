"""tools/gpu_check.py runs its checks only where CUDA is; elsewhere (this CPU machine, or with no
device visible) it prints one line and exits 0, so that it can sit in any script or CI job."""

import os
import sys

from conftest import ROOT, python


def test_skips_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device visible, even on a GPU machine
    r = python(
        [sys.executable, os.path.join(ROOT, "tools/gpu_check.py")], cwd=ROOT, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "gpu_check: skipped, no CUDA device"
