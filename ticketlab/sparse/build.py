"""Building and loading the C kernel (``kernel.c``) on first use, cached per machine.

Why compile on the user's machine, at first use:

- The kernel's speed comes from the vector width of *this* CPU (``-march=native``: AVX2 on Zen 3,
  AVX-512 on Zen 4 / Ice Lake); a wheel compiled once for a generic x86-64 would lose half of it.
- ``kernel.c`` is plain C with raw pointers, called through :mod:`ctypes`: no torch or Python
  headers, so it builds in about a second with the system ``gcc`` (``torch.utils.cpp_extension``
  would pull in ninja and compile torch's headers for a minute). Nothing new to install: the
  README's ``pip install`` commands are unchanged.
- The built library is cached under ``$TICKETLAB_CACHE`` (default ``~/.cache/ticketlab``), in a
  folder named by a hash of the source, the flags, the compiler's version and the CPU's model
  and feature flags, so a new ticketlab, another compiler or another CPU never reuses a stale build.
  The build writes a temporary file and renames it, so concurrent first uses are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from ticketlab.errors import TicketlabError

SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 1
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
#: Token-block widths compiled into the library (``tl_spmm_tb{TB}``).
TOKEN_BLOCKS = (16, 32, 64)


def cache_dir() -> Path:
    """Where built kernels and calibration tables live: ``$TICKETLAB_CACHE`` or the XDG cache."""
    env = os.environ.get("TICKETLAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ticketlab"


def cpu_signature() -> str:
    """The CPU's model name and feature flags: what ``-march=native`` compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = flags = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.strip()
        if model and flags:
            break
    return f"{model}|{flags}"


def _compiler() -> str:
    cc = os.environ.get("CC", "gcc")
    path = shutil.which(cc) or (shutil.which("cc") if "CC" not in os.environ else None)
    if path is None:
        raise TicketlabError(
            f"The sparse kernel is built with a C compiler on first use, and {cc!r} was not "
            "found.",
            "Install gcc (Debian/Ubuntu: apt-get install gcc), or set CC to a C compiler with "
            "OpenMP support.",
        )
    return path


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TicketlabError(f"Could not run the C compiler {cc}: {e}.",
                             "Check the compiler installation or set CC.") from e
    return out.stdout.splitlines()[0] if out.stdout else cc


def library_path() -> Path:
    """The cached library for this source, compiler and CPU (built if missing)."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    h = hashlib.sha256(source)
    for part in (*FLAGS, _compiler_version(cc), cpu_signature(), str(ABI_VERSION)):
        h.update(b"\0" + part.encode())
    out = cache_dir() / "kernels" / h.hexdigest()[:16] / "libticketlab_sparse.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise TicketlabError(
                f"Building the sparse kernel with {cc} failed:\n{tail}",
                "Install a gcc with OpenMP (libgomp), or set CC to one; --debug shows more.",
            )
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (once per machine) and load the kernel library, with argument types declared."""
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise TicketlabError(
            f"The built sparse kernel {path} could not be loaded: {e}.",
            f"Delete {path.parent} to rebuild it.",
        ) from e
    if lib.tl_abi_version() != ABI_VERSION:
        raise TicketlabError(f"The cached sparse kernel {path} has another ABI version.",
                             f"Delete {path.parent} to rebuild it.")
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for tb in TOKEN_BLOCKS:
        fn = getattr(lib, f"tl_spmm_tb{tb}")
        # x, T, K, ws, kc, ncb, rowptr, idx, val, N, bias, y, nthreads
        fn.argtypes = [p, i64, i32, p, i32, i32, p, p, p, i32, p, p, i32]
        fn.restype = None
    return lib
