"""`python SCRIPT ARGS...` without paying for torch's import each time (1.2 s of a bad-input case's
1.9 s): a server process imports torch, numpy, safetensors and sentencepiece once, then forks one
child per command. The child takes the command's working directory, environment, stdin (none),
stdout and stderr, sets sys.argv and sys.path as `python SCRIPT` (or `python -c CODE`) does: the
script's folder first, then PYTHONPATH's. It runs the script as __main__ from this file's top
level, so that an uncaught exception, sys.exit and interpreter shutdown (threads, atexit) behave
as in a new interpreter.

What differs from a new interpreter: those four packages are imported already (none of ours is),
and what they read from the environment at import (OMP_NUM_THREADS, say) is the server's, which
is why `Zygote` takes the environment to start with. The tests use one shared pair of servers
through `conftest.python`, which takes subprocess.run's arguments:

    with Zygote(env, n=2) as z:  # two servers: two threads may each run a command
        p = z.run([sys.executable, "train.py", "--max_iters=1"], cwd=ROOT, timeout=300)
        # p: a subprocess.CompletedProcess, with text stdout and stderr
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import time


class Zygote:
    """n servers, for up to n threads: run() takes a free one for each command."""

    def __init__(self, env=None, n=1):
        self.env = dict(os.environ if env is None else env)
        self.free = queue.Queue()
        for _ in range(n):
            self.free.put(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=self.env,
                    text=True,
                )
            )
        self.n = n

    def run(self, argv, cwd, env=None, timeout=600):
        """argv as for subprocess.run: [sys.executable, script, args...] or [.., "-c", code, ..]."""
        assert argv[0] == sys.executable and (argv[1].endswith(".py") or argv[1] == "-c"), argv
        server = self.free.get()
        try:
            with tempfile.TemporaryDirectory() as d:
                out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
                request = dict(
                    argv=argv[1:],
                    cwd=os.path.abspath(cwd),
                    env=dict(self.env if env is None else env),
                    stdout=out,
                    stderr=err,
                    timeout=timeout,
                )
                server.stdin.write(json.dumps(request) + "\n")
                server.stdin.flush()
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("the zygote server died")
                reply = json.loads(line)
                with open(out) as f, open(err) as g:
                    stdout, stderr = f.read(), g.read()
        finally:
            self.free.put(server)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, reply["returncode"], stdout, stderr)

    def close(self):
        for _ in range(self.n):
            server = self.free.get()
            server.stdin.close()
            server.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve():
    """Requests in, one JSON line each, until stdin closes; in a child, return its request."""
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        deadline, timed_out = time.monotonic() + request["timeout"], False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                timed_out = True
            time.sleep(0.005)
        reply = dict(returncode=os.waitstatus_to_exitcode(status), timed_out=timed_out)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def become(request):
    """This child turns into `python SCRIPT ARGS...` run in the request's folder."""
    for fd, path, mode in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        f = os.open(path, mode, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    first = "" if argv[0] == "-c" else os.path.dirname(os.path.abspath(argv[0]))
    sys.path[0:1] = [first] + [os.path.abspath(p) for p in extra]
    sys.argv = ["-c", *argv[2:]] if argv[0] == "-c" else list(argv)
    return argv


if __name__ == "__main__":
    import numpy  # noqa: F401  (imported for the children: the point of the server)
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import torch  # noqa: F401

    import runpy

    argv = become(serve())
    if argv[0] == "-c":
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        runpy.run_path(argv[0], run_name="__main__")
