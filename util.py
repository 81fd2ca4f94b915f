"""
What every script shares: the error a user can fix, the command-line wrapper that prints it as one
line, the one way files are written (atomically), the lock that keeps two runs out of one folder,
and the setting checks for a required path and a device.
"""

import fcntl
import fnmatch
import importlib.util
import json
import os
import stat
import re
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
    file is removed and path is untouched. A crash leaves the old file or the new one, not half. A
    failed write (disk full, permission) is a UserError naming path and the cause."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # some writers create 0600 files; a serving account must read them
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        # the write itself failed (an error naming another file, a source being read, passes on)
        if e.filename not in (None, tmp, path):
            raise
        raise UserError(
            f"{path}: cannot write it ({e.strerror or e}); the file there before, if any, is kept"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove_stale_tmp(folder, names):
    """Remove the temporary files that atomic_write names (NAME.<pid>.tmp) for the names of files
    we write in folder (glob patterns), left behind by a process killed mid-write. Any other file,
    *.tmp or not, is the user's and stays."""
    for entry in os.listdir(folder):
        stem = re.fullmatch(r"(.+)\.\d+\.tmp", entry)
        if stem and any(fnmatch.fnmatchcase(stem[1], n) for n in names):
            os.remove(os.path.join(folder, entry))


def lock_folder(folder):
    """An exclusive lock on folder/.lock, held until this process ends (the OS releases it when the
    holder dies, so a crash never leaves a stale lock). A second live process gets a UserError, as
    does one that locked a .lock its holder removed meanwhile (export.py removes its own)."""
    path = os.path.join(folder, ".lock")
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        f.close()
        raise UserError(
            f"{folder}: another process is using this folder (it holds {folder}/.lock)"
        ) from None
    return f  # keep a reference: closing the file releases the lock


def check_output(path, setting, base=None, folder=False, ours=None):
    """The one check before a script writes `path`, given as --setting (as an argument: setting
    None), a file or (folder=True) a folder, run the same way on a fresh run and a resume: it is
    not, and is not inside, the base checkpoint `base` that the script reads; it is of its kind; it
    can be created where it is named; an existing file is replaced only when ours(path) says an
    earlier run of the same script wrote it. A folder's contents are its script's to judge (under
    its lock)."""
    real, where = os.path.realpath(path), f"--{setting}={path}" if setting else path
    if base and os.path.commonpath([real, os.path.realpath(base)]) == os.path.realpath(base):
        raise UserError(
            f"{where}: is {'inside ' * (real != os.path.realpath(base))}the base "
            f"checkpoint the script reads (--ckpt_dir={base}); write to a folder of its own"
        )
    if os.path.exists(path) and os.path.isdir(path) != folder:
        kind = "a folder" if folder else "a file"
        raise UserError(f"{where}: expected {kind}, it is {'not ' * folder}a folder")
    if not folder and os.path.lexists(path) and not (ours and os.path.isfile(path) and ours(path)):
        raise UserError(
            f"{where}: exists and is not an earlier result of this script; "
            f"choose a new path (a file the script did not write is never replaced)"
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # folders that do not exist yet are created
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise UserError(f"{where}: cannot be written ({parent} is not a writable folder)")


def json_with(*keys):
    """An `ours` for check_output: whether a file is a JSON object holding keys, as the script's
    own results do (a config.json or a user's notes do not)."""

    def ours(path):
        try:
            with open(path) as f:
                value = json.load(f)
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(value, dict) and set(keys) <= set(value)

    return ours


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


def open_regular(path, what="file", buffering=-1):
    """path opened for binary reading if it is a regular file (or a symlink to one: the Hugging
    Face cache is made of them). A FIFO, a device or a folder is refused before a byte is read;
    O_NONBLOCK: opening a FIFO does not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: not a regular file (a device, FIFO or folder); expected a {what}")
    return os.fdopen(fd, "rb", buffering=buffering)


def read_regular(path, limit, what="file"):
    """The bytes of a regular file (open_regular) of at most limit bytes, never more read."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: more than {limit} bytes, more than a {what} holds")
    return data
