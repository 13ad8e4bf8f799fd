"""Building and loading the C kernel (``kernel.c``) on first use, cached per machine -- safely.

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

Why loading is guarded (a shared library runs its constructors the moment it is loaded, so
loading a file someone else placed in the cache would run their code in this process):

- **Only a library this installation built is loaded.** The build writes the library under a
  fresh, unguessable name and then, atomically, a record ``kernel.json`` beside it with that
  name and the library's sha256. A load reads the record, opens the named file, hashes the open
  file and hands *that same open file* to the dynamic loader (``/proc/self/fd/N``), so the bytes
  checked are the bytes loaded. A missing or unreadable record, a library whose hash differs, a
  symbolic link or a file that is not a regular file means: build a new library under a new name
  (with a warning if a recorded library was changed). Files ticketlab did not write are never
  deleted or overwritten; a planted file is simply never loaded.
- **Only folders and files the current user owns, and that nobody else can write, are used.**
  The cache root and the folders below it are opened one by one (``O_NOFOLLOW`` below the root,
  by descriptor, so renaming a parent folder meanwhile cannot redirect the load) and refused
  with a :class:`~ticketlab.errors.TicketlabError` if they are group- or world-writable or owned
  by another user: a shared ``TICKETLAB_CACHE`` would let any other user of it run code here.
  Folders ticketlab creates are created ``0700``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from ticketlab.errors import TicketlabError

SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 7
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
#: Token-block widths compiled into the library (``tl_spmm_tb{TB}``).
TOKEN_BLOCKS = (16, 32, 64, 128)
#: The build record written beside each library (name and sha256 of the library it vouches for).
RECORD = "kernel.json"
RECORD_FORMAT = "ticketlab.kernel-build"
LIBRARY_PREFIX = "libticketlab_sparse-"
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


def _current_uid() -> int:
    """The user whose files may be loaded (a function so that tests can pretend otherwise)."""
    return os.geteuid()


def _build_key(cc: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*FLAGS, _compiler_version(cc), cpu_signature(), str(ABI_VERSION)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def kernel_dir() -> Path:
    """The cache folder of this source, compiler and CPU (nothing is created or checked)."""
    return cache_dir() / "kernels" / _build_key(_compiler())


def _check_owned(st: os.stat_result, path: Path, what: str) -> None:
    """Refuse a folder or file another user owns or can write: it could hold planted code."""
    uid = _current_uid()
    if st.st_uid != uid:
        raise TicketlabError(
            f"The sparse-kernel cache {what} {path} is owned by user id {st.st_uid}, not by you "
            f"(user id {uid}); ticketlab loads compiled code only from folders you own, because "
            "a library placed there by someone else would run its code in your process. "
            "Nothing in it was loaded, changed or deleted.",
            "Set TICKETLAB_CACHE to a folder of your own (the default is ~/.cache/ticketlab).",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group- and world" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH \
            else ("group" if st.st_mode & stat.S_IWGRP else "world")
        raise TicketlabError(
            f"The sparse-kernel cache {what} {path} is {who}-writable (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): other users could place a library there that "
            "would run its code in your process, so ticketlab does not use it. Nothing in it "
            "was loaded, changed or deleted.",
            f"Make it private (chmod go-w {path}), or set TICKETLAB_CACHE to a folder only you "
            "can write.",
        )


def _open_dir(name: str | Path, parent_fd: int | None, path: Path, create: bool) -> int:
    """Open (creating ``0700`` if asked and missing) one folder of the cache and check it.

    Below the cache root the folder is opened relative to its parent's descriptor and without
    following a symbolic link, so no rename of a parent folder can redirect what is opened.
    """
    flags = _DIR_FLAGS | (_NOFOLLOW if parent_fd is not None else 0)
    for attempt in range(2):
        try:
            fd = os.open(name, flags, dir_fd=parent_fd)
            break
        except FileNotFoundError:
            if not create or attempt:
                raise
            try:
                if parent_fd is None:
                    Path(name).parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass
        except OSError as e:
            raise TicketlabError(
                f"The sparse-kernel cache folder {path} cannot be used: {e.strerror} (a "
                "symbolic link or a file where ticketlab expects its own folder is refused).",
                "Set TICKETLAB_CACHE to a folder of your own, or move that entry away.",
            ) from e
    try:
        _check_owned(os.fstat(fd), path, "folder")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def _kernel_folder(key: str, create: bool = True) -> Iterator[int]:
    """A checked descriptor of ``<cache>/kernels/<key>``; every level is checked on the way."""
    root = cache_dir()
    fds: list[int] = []
    try:
        fds.append(_open_dir(root, None, root, create))
        fds.append(_open_dir("kernels", fds[-1], root / "kernels", create))
        fds.append(_open_dir(key, fds[-1], root / "kernels" / key, create))
        yield fds[-1]
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _open_file(name: str, dir_fd: int, path: Path) -> int | None:
    """A checked read-only descriptor of a regular file in the folder; None if there is none.

    A symbolic link or a non-regular file is reported as absent (it is never read or loaded),
    so the caller builds a fresh library; a file owned or writable by someone else is refused.
    """
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a symbolic link; anything else unreadable: not ours to use
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    try:
        _check_owned(st, path, "file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_record(dir_fd: int, folder: Path) -> dict[str, Any] | None:
    fd = _open_file(RECORD, dir_fd, folder / RECORD)
    if fd is None:
        return None
    try:
        record = json.loads(_read_fd(fd))
    except ValueError:
        return None
    finally:
        os.close(fd)
    ok = (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
          and isinstance(record.get("library"), str) and isinstance(record.get("sha256"), str)
          and record["library"].startswith(LIBRARY_PREFIX) and "/" not in record["library"])
    return record if ok else None


def _write_record(dir_fd: int, record: dict[str, Any]) -> None:
    """Write the build record atomically (temporary name, fsync, rename) inside the folder."""
    tmp = f".{RECORD}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, RECORD, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _fd_path(dir_fd: int, name: str, fallback: Path) -> str:
    """A path naming ``name`` inside the already-opened folder, usable by a child process
    (Linux: through this process's /proc entry, so the compiler writes into the very folder
    that was checked)."""
    proc = f"/proc/{os.getpid()}/fd/{dir_fd}"
    return f"{proc}/{name}" if os.path.isdir(proc) else str(fallback)


def _build(cc: str, key: str, dir_fd: int, folder: Path) -> dict[str, Any]:
    """Compile ``kernel.c`` into the folder under a fresh name and record its sha256."""
    name = f"{LIBRARY_PREFIX}{secrets.token_hex(8)}.so"
    tmp = f".build-{secrets.token_hex(8)}.so"
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", _fd_path(dir_fd, tmp, folder / tmp),
                               str(SOURCE)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise TicketlabError(
                f"Building the sparse kernel with {cc} failed:\n{tail}",
                "Install a gcc with OpenMP (libgomp), or set CC to one; --debug shows more.",
            )
        fd = _open_file(tmp, dir_fd, folder / tmp)
        if fd is None:
            raise TicketlabError(f"The compiler {cc} reported success but wrote no library.",
                                 "Check the compiler installation or set CC.")
        try:
            os.fchmod(fd, 0o500)  # read + execute for the owner only
            digest = hashlib.sha256(_read_fd(fd)).hexdigest()
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)  # our own temporary file, if it is still there
        except OSError:
            pass
    record = {"format": RECORD_FORMAT, "library": name, "sha256": digest, "key": key,
              "abi": ABI_VERSION, "compiler": _compiler_version(cc), "flags": list(FLAGS)}
    _write_record(dir_fd, record)
    return record


def _open_recorded(dir_fd: int, folder: Path, key: str) -> tuple[int, str] | None:
    """The recorded library, opened and hash-checked; None (and why, as a warning) if unusable."""
    record = _read_record(dir_fd, folder)
    if record is None or record.get("key") != key:
        return None
    name = record["library"]
    fd = _open_file(name, dir_fd, folder / name)
    if fd is None:
        return None
    if hashlib.sha256(_read_fd(fd)).hexdigest() != record["sha256"]:
        os.close(fd)
        warnings.warn(
            f"The cached sparse kernel {folder / name} does not match the sha256 recorded when "
            "ticketlab built it (changed or replaced since); it is not loaded and was left in "
            "place, and a new one is built.", RuntimeWarning, stacklevel=3)
        return None
    return fd, name


@contextmanager
def _verified_library() -> Iterator[tuple[int, Path]]:
    """The kernel library, built if needed: an open, hash-checked descriptor and its path."""
    cc = _compiler()
    key = _build_key(cc)
    folder = cache_dir() / "kernels" / key
    with _kernel_folder(key) as dir_fd:
        opened = _open_recorded(dir_fd, folder, key)
        if opened is None:
            record = _build(cc, key, dir_fd, folder)
            opened = _open_recorded(dir_fd, folder, key)
            if opened is None or opened[1] != record["library"]:
                raise TicketlabError(
                    f"The sparse kernel just built in {folder} changed before it was loaded.",
                    "Another process is writing to this cache folder; set TICKETLAB_CACHE to a "
                    "folder only this user writes.")
        fd, name = opened
        try:
            yield fd, folder / name
        finally:
            os.close(fd)


#: Names this process has passed to dlopen (see :func:`open_library`).
_LOADED_NAMES: set[str] = set()


def open_library() -> tuple[ctypes.CDLL, Path]:
    """Build if needed, verify and load the kernel library; its argument types declared.

    Returns the library and its path. Not cached: :func:`load_library` is the process-wide
    entry point; this one exists so that a test can load from a fresh cache.
    """
    with _verified_library() as (fd, path):
        # The loader opens the very file that was hashed (through its descriptor), not a path
        # whose file could have been swapped in between. The name must be new to this process:
        # dlopen returns an already-loaded object of the same name without opening anything,
        # and descriptor numbers are reused, so a second cache's library would silently be
        # the first one (seen in the full test suite). "/./" segments keep the file, change the
        # name.
        proc = f"/proc/self/fd/{fd}"
        while proc in _LOADED_NAMES:
            proc = proc.replace("/proc/self/", "/proc/self/./", 1)
        _LOADED_NAMES.add(proc)
        try:
            lib = ctypes.CDLL(proc if os.path.exists(proc) else str(path))
        except OSError as e:
            raise TicketlabError(
                f"The built sparse kernel {path} could not be loaded: {e}.",
                f"Delete {path.parent} to rebuild it.",
            ) from e
    if lib.tl_abi_version() != ABI_VERSION:
        raise TicketlabError(f"The cached sparse kernel {path} has another ABI version.",
                             f"Delete {path.parent} to rebuild it.")
    _declare(lib)
    return lib, path


def library_path() -> Path:
    """The verified kernel library for this source, compiler and CPU (built if missing)."""
    with _verified_library() as (_, path):
        return path


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    #: the fused epilogue shared by the products: act, res, gamma, beta, eps
    epilogue = [i32, p, p, p, f32]
    for tb in TOKEN_BLOCKS:
        fn = getattr(lib, f"tl_spmm_tb{tb}")
        # x, T, K, ws, kc, ncb, rowptr, idx, val, groups, tgroup, sptr, sidx, sval, ngroups,
        # N, bias, y, nthreads, epilogue...
        fn.argtypes = [p, i64, i32, p, i32, i32, p, p, p, p, p, p, p, p, i32, i32, p, p, i32,
                       *epilogue]
        fn.restype = None
    signatures: dict[str, list[Any]] = {
        "tl_gemm_nr": [],
        "tl_tile_rows": [],
        "tl_gemm_ws": [i64, i32, i32],  # T, K, nthreads -> scratch floats
        "tl_gemm_pack": [p, i32, i32, p],  # w, N, K, wp
        # x, T, K, wp, N, bias, y, nthreads, epilogue..., ws
        "tl_gemm": [p, i64, i32, p, i32, p, p, i32, *epilogue, p],
        # y, T, N, epilogue..., nthreads
        "tl_epilogue": [p, i64, i32, *epilogue, i32],
        # q, ldq, k, ldk, v, ldv, B, T, H, d, kbias, scale, out, ldo, ws, nthreads
        "tl_attention": [p, i64, p, i64, p, i64, i32, i32, i32, i32, p, f32, p, i64, p, i32],
        "tl_product_slots": [],
        # prog, fparams, x, B, T, kbias, q, k, v, ctx, a, ffn, y, ws, nthreads
        "tl_encoder_layer": [p, p, p, i32, i32, p, p, p, p, p, p, p, p, p, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = {"tl_gemm_nr": ctypes.c_int, "tl_tile_rows": ctypes.c_int,
                      "tl_product_slots": ctypes.c_int,
                      "tl_gemm_ws": ctypes.c_int64}.get(name)


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (once per machine), verify and load the kernel library (once per process)."""
    return open_library()[0]


