"""The cached C kernel is loaded only if this installation built it, from a folder only the
current user can write: planted, tampered or shared-folder libraries are never loaded (their
constructors never run) and never deleted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ticketlab.sparse.build as build
from ticketlab.errors import TicketlabError

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int tl_abi_version(void) { return 1; }
"""


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, private TICKETLAB_CACHE."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TICKETLAB_CACHE", str(root))
    return root


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library whose constructor writes a marker file, and that marker's path."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the planted library")
    marker = tmp_path / "marker"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    lib = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib),
                    str(src)], check=True, capture_output=True)
    # The planted library really does run its code when loaded (in another process)...
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True)
    assert marker.read_text() == "planted code ran\n"
    marker.unlink()  # ...so a marker that never appears below means it was never loaded
    return lib, marker


def private_kernel_dir() -> Path:
    """The kernel folder this source/compiler/CPU would use, created as ticketlab creates it."""
    folder = build.kernel_dir()
    for level in (build.cache_dir(), folder.parent, folder):
        level.mkdir(mode=0o700, exist_ok=True)
    return folder


def mapped(path: Path) -> bool:
    """Whether this file (by inode) is mapped into this process, i.e. was loaded."""
    ino = str(path.stat().st_ino)
    return any(len(f := line.split()) >= 6 and f[4] == ino
               for line in Path("/proc/self/maps").read_text().splitlines())


def test_planted_library_without_a_record_is_never_loaded(cache, planted):
    lib, marker = planted
    folder = private_kernel_dir()
    # Where an attacker would guess the library lives: the old fixed name, and one that looks
    # like ticketlab's own naming.
    targets = [folder / "libticketlab_sparse.so",
               folder / "libticketlab_sparse-0123456789abcdef.so"]
    for t in targets:
        shutil.copy(lib, t)
    before = {t: t.read_bytes() for t in targets}

    loaded, path = build.open_library()

    assert not marker.exists(), "the planted library's constructor ran"
    assert path not in targets and path.parent == folder and mapped(path)
    assert loaded.tl_abi_version() == build.ABI_VERSION
    for t in targets:  # left in place, untouched
        assert t.read_bytes() == before[t]
        assert not mapped(t)
    record = json.loads((folder / build.RECORD).read_text())
    assert record["library"] == path.name
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tampered_recorded_hash_means_a_rebuild_and_the_old_file_stays(cache):
    _, first = build.open_library()
    folder = first.parent
    record_path = folder / build.RECORD
    record = json.loads(record_path.read_text())
    record["sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match="does not match the sha256"):
        _, second = build.open_library()
    assert second != first and first.is_file()  # rebuilt under a new name, old one kept
    assert json.loads(record_path.read_text())["library"] == second.name


def test_replaced_library_is_not_loaded(cache, planted):
    lib, marker = planted
    _, first = build.open_library()
    os.chmod(first, 0o700)
    # same name as recorded, other bytes: swapped in by rename, as a new file. (Rewriting the
    # loaded library in place would truncate pages this process has mapped: SIGBUS at exit.)
    staged = first.with_name(first.name + ".new")
    shutil.copy(lib, staged)
    os.replace(staged, first)
    with pytest.warns(RuntimeWarning, match="left in place"):
        _, second = build.open_library()
    assert not marker.exists()
    assert second != first and first.read_bytes() == lib.read_bytes()


def test_a_symlink_in_place_of_the_library_is_not_followed(cache, planted):
    lib, marker = planted
    _, first = build.open_library()
    first.unlink()
    first.symlink_to(lib)
    _, second = build.open_library()
    assert not marker.exists()
    assert second != first and first.is_symlink()


def test_group_writable_cache_folder_is_refused(cache, planted):
    lib, marker = planted
    folder = private_kernel_dir()
    shutil.copy(lib, folder / "libticketlab_sparse.so")
    for level in (cache, folder):
        os.chmod(level, 0o770)
        with pytest.raises(TicketlabError, match="group-writable") as e:
            build.open_library()
        assert f"chmod go-w {level}" in e.value.fix
        assert not marker.exists()
        os.chmod(level, 0o700)
    assert (folder / "libticketlab_sparse.so").is_file()
    assert not (folder / build.RECORD).exists()  # nothing was built in an unsafe folder


def test_world_writable_shared_cache_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: anyone can create files
    monkeypatch.setenv("TICKETLAB_CACHE", str(shared))
    with pytest.raises(TicketlabError, match="world-writable") as e:
        build.library_path()
    assert "TICKETLAB_CACHE" in e.value.fix
    assert list(shared.iterdir()) == []


def test_cache_folder_of_another_user_is_refused(cache, monkeypatch):
    build.open_library()  # built and owned by us
    monkeypatch.setattr(build, "_current_uid", lambda: os.geteuid() + 1)
    with pytest.raises(TicketlabError, match="not by you") as e:
        build.open_library()
    assert "folder of your own" in e.value.fix


def test_cache_folders_are_created_private(cache):
    path = build.library_path()
    for level in (cache, cache / "kernels", path.parent):
        assert level.stat().st_mode & 0o077 == 0
    assert path.stat().st_mode & 0o222 == 0  # the library itself is read-only


def test_two_caches_in_one_process_each_load_their_own_library(tmp_path, monkeypatch):
    """dlopen keys loaded objects by name, and /proc/self/fd/N names repeat as descriptors are
    reused: the second library must still be the one just verified, not the first again."""
    paths = []
    for name in ("a", "b"):
        monkeypatch.setenv("TICKETLAB_CACHE", str(tmp_path / name))
        lib, path = build.open_library()
        assert lib.tl_abi_version() == build.ABI_VERSION
        paths.append(path)
    assert paths[0] != paths[1]
    assert all(mapped(p) for p in paths)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the narrower x86 targets are built with x86 flags")
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_kernel_source_is_exact_on_narrower_vector_targets(tmp_path, monkeypatch, march):
    """The source also builds for 128-bit (baseline x86-64, the path aarch64 takes too) and
    256-bit (AVX2) vectors, and computes the same products there: this machine only ever
    builds its native AVX-512 variant, so a branch for the others could rot unseen (the
    baseline build once failed to compile: a ``return`` missing in ``vrcp``)."""
    import ctypes

    import torch
    import torch.nn.functional as F

    import ticketlab.sparse.kernels as kernels

    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the kernel")
    flags = [f"-march={march}" if f == "-march=native" else f for f in build.FLAGS]
    lib_path = tmp_path / f"kernel-{march}.so"
    subprocess.run(["gcc", *flags, "-o", str(lib_path), str(build.SOURCE)], check=True,
                   capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(lib_path))  # this test's own build, not a cache's file
    build._declare(lib)
    monkeypatch.setattr(kernels, "load_library", lambda: lib)
    assert lib.tl_gemm_nr() == (8 if march == "x86-64" else 16)  # 2 vectors of 4 / 8 floats
    gen = torch.Generator().manual_seed(0)
    for n, k, t, density in [(96, 64, 50, 0.3), (130, 200, 7, 0.9), (64, 96, 140, 0.6)]:
        w = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < density)
        x, bias = torch.randn(t, k, generator=gen), torch.randn(n, generator=gen)
        ref = F.linear(x, w, bias)
        for pair in (True, False):
            packed = kernels.pack_weight(w, 64, pair=pair)
            for tb in build.TOKEN_BLOCKS:
                y = kernels.spmm(x, packed, bias, tb, 1)
                assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), (march, n, pair, tb)
        assert torch.allclose(kernels.gemm(x, kernels.pack_dense(w), bias, 1), ref, atol=1e-4,
                              rtol=1e-5)
        gelu = kernels.spmm(x, kernels.pack_weight(w, 64), bias, 32, 1,
                            kernels.Epilogue(act=kernels.ACT_GELU))
        assert torch.allclose(gelu, F.gelu(ref), atol=1e-5, rtol=1e-5)  # vexp/verf/vrcp
