"""
What every script shares: the error a user can fix, the command-line wrapper that prints it as one
line, the one way files are written (atomically), the lock that keeps two runs out of one folder,
and the setting checks for a required path and a device.
"""

import fcntl
import importlib.util
import os
import sys
from contextlib import contextmanager

import torch


class UserError(ValueError):
    """A problem the user can fix (a path, a setting, a file). Scripts print it as one line."""


def run_cli(main, argv=None):
    """Run a script's main(argv); a UserError or an OS error (disk full, permission, a file where a
    folder should be) becomes one line on stderr, 'error: ...', and a non-zero exit status."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)


@contextmanager
def atomic_write(path):
    """with atomic_write(path) as tmp: write the file at tmp. On success it replaces path in one
    rename, with the permissions an ordinary new file gets (the umask's); on any error the temporary
    file is removed and path is untouched. A crash leaves the old file or the new one, not half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # some writers create 0600 files; a serving account must read them
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove_stale_tmp(folder):
    """Remove temporary files (*.<pid>.tmp) left behind by a process that was killed mid-write."""
    for name in os.listdir(folder):
        if name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def lock_folder(folder):
    """An exclusive lock on folder/.lock, held until this process ends (the OS releases it when the
    holder dies, so a crash never leaves a stale lock). A second live process gets a UserError."""
    f = open(os.path.join(folder, ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(
            f"{folder}: another process is using this folder (it holds {folder}/.lock)"
        ) from None
    return f  # keep a reference: closing the file releases the lock


def importable(name):
    return importlib.util.find_spec(name) is not None


def required(value, settings=None):
    """A setting check (configurator) for a path that must be given."""
    return None if value else "a path (required)"


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name, settings=None):
    """A setting check (configurator): None if torch can run on this device here, else what it
    expects."""
    kind = name.split(":")[0]
    if kind == "cpu" and name == "cpu":
        return None
    if kind == "cuda" and torch.cuda.is_available():
        index = name[5:]
        return (
            None
            if index == "" or (index.isdigit() and int(index) < torch.cuda.device_count())
            else f"cuda or cuda:N with N < {torch.cuda.device_count()}"
        )
    if kind == "mps" and torch.backends.mps.is_available():
        return None
    return (
        "cpu"
        + ", cuda" * torch.cuda.is_available()
        + " (no CUDA device here)" * (not torch.cuda.is_available())
    )


# training telemetry: the model FLOPs utilization (MFU) and the memory train.py logs


def flops_per_token(config, trainable, finetune, seq_len):
    """Training FLOPs per token (PaLM appendix B / nanoGPT's estimate_mfu): the forward pass costs 2
    per weight and the backward pass 2 for the input gradients, +2 for the weight gradients only
    where weights train (all for 'full', the adapters otherwise); attention scores add 12·L·H·hd·T.
    lm_head is counted at every position, as model FLOPs are, though the step runs it only at the
    targets."""
    c = config
    per_layer = (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)) + 3 * c.dim * c.hidden_dim
    base = c.n_layers * per_layer + c.dim * c.vocab_size  # matmul weights (lm_head included)
    weights = 6 * base if finetune == "full" else 4 * base + 6 * trainable
    return weights + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def peak_memory_bytes(device_type):
    """Peak GPU memory allocated by torch, or on CPU the peak resident set size of this process."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# sizes a setting asks for, bounded by what this machine has


def check_seed(value, settings=None):
    """A setting check (configurator): a seed both torch and numpy accept."""
    return None if value is None or 0 <= value < 2**32 else "a seed in [0, 2^32)"


def check_threads(value, settings=None):
    """A setting check (configurator): 0 (torch's default) up to the CPU cores here."""
    cores = os.cpu_count() or 1
    return None if 0 <= value <= cores else f"a thread count in [0, {cores}] (the CPU cores here)"


def available_memory():
    """Bytes of memory this process may still take: MemAvailable (Linux), capped by what an
    address space limit (RLIMIT_AS) leaves; None where neither is known."""
    import resource

    def kib(path, key):
        try:
            with open(path) as f:
                return [int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":")]
        except OSError:
            return []

    known = kib("/proc/meminfo", "MemAvailable")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        known.append(limit - sum(kib("/proc/self/status", "VmSize")))
    return min(known) if known else None


def check_memory(need, what, device="cpu"):
    """Refuse, in one line naming what (the settings or file that size it), an allocation of need
    bytes that this machine's memory cannot hold (CPU: available_memory; CUDA: the device's)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        have = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        have = available_memory()
    if have is not None and need > have:
        raise UserError(
            f"{what}: needs {need / 2**30:.1f} GiB of memory, this machine has "
            f"{have / 2**30:.1f} GiB available"
        )
