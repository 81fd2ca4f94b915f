"""tests/zygote.py runs a script as `python SCRIPT ARGS...` does: the same exit status, stdout and
stderr (an uncaught exception's last line; its frames differ) as a new interpreter, for each way a
script ends."""

import subprocess
import sys
import textwrap

import pytest

from zygote import Zygote

SCRIPTS = {
    "exception": "import sibling\nprint('before', flush=True)\nraise ValueError(sibling.X)",
    "exit_message": "import sys\nprint('out')\nsys.exit('error: a message')",
    "exit_status": "import sys\nprint('partial', end='')\nsys.exit(3)",
    "shutdown": """
        import atexit, threading, time
        atexit.register(lambda: print('atexit ran'))
        def late():
            time.sleep(0.2)
            print('thread finished')
        threading.Thread(target=late).start()
        print('main done')
    """,
    "where": """
        import os, sys, sibling
        print(__name__, sys.argv[1:], os.path.basename(os.getcwd()), sibling.X, sys.stdin.read())
        print(os.environ['ZYGOTE_TEST'], sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
        import torch
        print(torch.tensor([1.0, 2.0]).sum().item(), file=sys.stderr)
    """,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("zygote")
    (d / "scripts").mkdir()
    (d / "scripts" / "sibling.py").write_text("X = 'sibling'\n")
    for name, text in SCRIPTS.items():
        (d / "scripts" / f"{name}.py").write_text(textwrap.dedent(text).strip() + "\n")
    (d / "cwd").mkdir()
    return d


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_as_a_new_interpreter(folder, zygote, name, monkeypatch):
    monkeypatch.setenv("ZYGOTE_TEST", "from the environment")
    argv = [sys.executable, str(folder / "scripts" / f"{name}.py"), "--a=1", "b"]
    cwd = folder / "cwd"
    real = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    forked = zygote.run(argv, cwd=cwd, env=dict(zygote.env, ZYGOTE_TEST="from the environment"))
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
    if name == "exception":
        assert "Traceback" in forked.stderr
        assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]
    else:
        assert forked.stderr == real.stderr
    assert real.returncode == {"exception": 1, "exit_message": 1, "exit_status": 3}.get(name, 0)


def test_dash_c(folder, zygote):
    code = "import sys, os; print(sys.argv, repr(sys.path[0]), __name__); sys.exit(4)"
    argv = [sys.executable, "-c", code, "--x=1"]
    real = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    forked = zygote.run(argv, cwd=folder)
    assert (forked.returncode, forked.stdout, forked.stderr) == (4, real.stdout, real.stderr)


def test_timeout_kills_the_command(folder, zygote):
    (folder / "scripts" / "forever.py").write_text("import time\nwhile True: time.sleep(1)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run([sys.executable, str(folder / "scripts" / "forever.py")], cwd=folder, timeout=1)
    # the server goes on serving
    p = zygote.run([sys.executable, str(folder / "scripts" / "exit_status.py")], cwd=folder)
    assert p.returncode == 3
