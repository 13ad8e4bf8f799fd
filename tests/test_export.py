"""Shipping tickets: HF folders that plain transformers loads, compressed tickets, bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.export import (
    INFO_FILE,
    TICKET_FILE,
    export_level,
    export_model,
    load_level,
    load_ticket,
    ticket_sizes,
)
from ticketlab.hparams import DataHparams, ModelHparams, PruneHparams, RunHparams, TrainHparams
from ticketlab.imp import find_ticket
from ticketlab.masks import Mask
from ticketlab.train import Runtime

SENTENCES = ["a gripping, beautifully acted film .", "the plot is thin and the jokes fall flat .",
             "it 's not a masterpiece , but it 's fun ."]


def _hparams(model_dir: Path, glue_dir: Path, target: float) -> RunHparams:
    return RunHparams(
        model=ModelHparams(model=str(model_dir)),
        data=DataHparams(task="sst2", data_dir=str(glue_dir), max_train_samples=64,
                         max_eval_samples=32, max_length=32),
        train=TrainHparams(lr=1e-3, batch_size=16, epochs=1, seed=0),
        prune=PruneHparams(target_sparsity=target, rate=0.45),
    )


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))  # noqa: SIM115


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny IMP run with levels at 0, 45 and 90 % sparsity (weights stored), and one without
    weights (--no-save-weights)."""
    root = tmp_path_factory.mktemp("runs")
    run = find_ticket(_hparams(tiny_bert_dir, glue_dir, 0.9), root, Runtime(progress=False),
                      _quiet())
    light_root = tmp_path_factory.mktemp("light")
    light = find_ticket(_hparams(tiny_bert_dir, glue_dir, 0.45), light_root,
                        Runtime(progress=False, save_weights=False), _quiet())
    return {"root": root, "run": run, "light_root": light_root, "light": light}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (so -0.0 and +0.0 differ, and NaNs compare)."""
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_hf_export_loads_in_plain_transformers_with_identical_logits(runs, tmp_path):
    out = tmp_path / "hf"
    ticket = export_level(runs["run"].path.name, 2, out, runs["root"])
    assert {"config.json", "model.safetensors", INFO_FILE}.issubset(os.listdir(out))
    assert any(name.startswith("tokenizer") for name in os.listdir(out))
    # The exported weights: pruned entries are +0.0 exactly, kept ones untouched.
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    trained = ticket.model.state_dict()
    for name, keep in ticket.mask.tensors.items():
        w = stored[f"bert.{name}"]
        assert torch.equal(_bits(w[~keep]), torch.zeros_like(_bits(w[~keep])))
        assert torch.equal(w[keep], trained[f"bert.{name}"][keep])
    assert ticket.mask.sparsity == pytest.approx(0.9, abs=0.01)

    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()
        batch = tok({SENTENCES!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert not any(m.startswith("ticketlab") for m in sys.modules), "ticketlab imported"
        save_file({{"logits": logits, "input_ids": batch["input_ids"]}}, {str(tmp_path / "o")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = load_file(str(tmp_path / "o"))
    batch = ticket.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(plain["input_ids"], batch["input_ids"])
    with torch.no_grad():
        ours = ticket.model(**batch).logits
    assert torch.equal(plain["logits"], ours)


def test_compressed_round_trip_is_bit_exact(runs, tmp_path):
    hf, comp = tmp_path / "hf", tmp_path / "comp"
    ticket = export_level(runs["run"].path, 2, hf, runs["root"])
    export_level(runs["run"].path, 2, comp, runs["root"], compressed=True)
    assert TICKET_FILE in os.listdir(comp) and "model.safetensors" not in os.listdir(comp)
    restored = load_ticket(comp)
    reference = load_ticket(hf)  # the plain HF export, through from_pretrained
    a, b = restored.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
    batch = ticket.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, ticket.model(**batch).logits)
    info = json.loads((comp / INFO_FILE).read_text())
    assert info["level"] == 2 and info["format"] == "compressed"


def test_fp16_values_are_rounded_and_zeros_stay(runs, tmp_path):
    ticket = export_level(runs["run"].path, 2, tmp_path / "h", runs["root"], compressed=True,
                          fp16=True)
    export_level(runs["run"].path, 2, tmp_path / "f", runs["root"], compressed=True)
    restored = load_ticket(tmp_path / "h").state_dict()
    trained = ticket.model.state_dict()
    for name, keep in ticket.mask.tensors.items():
        w, ref = restored[f"bert.{name}"], trained[f"bert.{name}"]
        assert (w[~keep] == 0).all()
        assert torch.equal(w[keep], ref[keep].half().float())
    assert torch.equal(restored["bert.embeddings.word_embeddings.weight"],
                       trained["bert.embeddings.word_embeddings.weight"])  # dense stays fp32
    half = ticket_sizes(tmp_path / "h" / TICKET_FILE)
    full = ticket_sizes(tmp_path / "f" / TICKET_FILE)
    assert half["prunable_bytes"] < 0.6 * full["prunable_bytes"]


def test_minilm_at_90_percent_compresses_below_0131_computed_from_the_file(tmp_path):
    """The real MiniLM-L6 weights with a 90 % global magnitude mask: bytes from the header."""
    from ticketlab.models import load_model, load_tokenizer, prunable_parameters
    from ticketlab.pruning import prune

    model = load_model("minilm", "sequence-classification", num_labels=2).eval()
    params = prunable_parameters(model)
    mask = prune(params, Mask.ones_like(params), 0.9)
    mask.apply_(params)
    export_model(model, mask, tmp_path / "c32", load_tokenizer("minilm"), compressed=True)
    export_model(model, mask, tmp_path / "c16", compressed=True, fp16=True)
    ratios = {}
    for name in ("c32", "c16"):
        path = tmp_path / name / TICKET_FILE
        header = _header(path)
        meta = json.loads(header.pop("__metadata__")["ticketlab"])
        size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
        stored = sum(size[k + "::mask"] + size[k + "::values"] for k in meta["compressed"])
        dense = sum(4 * int(np.prod(params[n].shape)) for n in params)
        assert set(meta["compressed"]) == {f"bert.{n}" for n in params}
        ratios[name] = stored / dense
        assert ratios[name] == pytest.approx(ticket_sizes(path)["prunable_ratio"])
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        assert path.stat().st_size == 8 + header_len + max(end for _, end in (
            v["data_offsets"] for v in header.values()))
    assert ratios["c32"] <= 0.131
    assert ratios["c16"] <= 0.131 - 0.045
    restored = load_ticket(tmp_path / "c32").state_dict()
    for k, v in model.state_dict().items():
        expected = v.masked_fill(~mask.tensors[k[5:]], 0.0) if k[5:] in mask.tensors else v
        assert torch.equal(_bits(restored[k]), _bits(expected)), k


def _compressed(runs, tmp_path) -> Path:
    out = tmp_path / "c"
    export_level(runs["run"].path, 1, out, runs["root"], compressed=True)
    return out


def test_truncated_file_is_refused(runs, tmp_path):
    out = _compressed(runs, tmp_path)
    path = out / TICKET_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TicketlabError, match="damaged"):
        load_ticket(out)


@pytest.mark.parametrize("where", ["values", "metadata"])
def test_tampered_file_is_refused(runs, tmp_path, where):
    out = _compressed(runs, tmp_path)
    path = out / TICKET_FILE
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if where == "values":
        data[-10] ^= 0x01  # one bit of the last tensor's bytes
    else:  # a field no shape or count check covers: only the checksum can catch it
        header = data[8:8 + n].decode()
        i = header.index('\\"level\\": ') + len('\\"level\\": ')
        digit = header[i]
        header = header[:i] + str((int(digit) + 1) % 10) + header[i + 1:]
        data[8:8 + n] = header.encode()
    path.write_bytes(bytes(data))
    with pytest.raises(TicketlabError, match="checksum"):
        load_ticket(out)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_force_never_replaces_a_folder_ticketlab_did_not_write(runs, tmp_path):
    """Issue 10.1: --force replaces only an export ticketlab wrote, holding nothing else."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(TicketlabError, match="not empty") as e:
            export_level(runs["run"].path, 1, out, runs["root"], force=force)
        assert "keep.txt" in e.value.problem and "never deletes" in e.value.fix
    assert os.listdir(out) == ["keep.txt"]

    # The report: V holds the run store two folders down plus an unrelated file.
    shutil.copytree(runs["root"], tmp_path / "V" / "a" / "store")
    (tmp_path / "V" / "notes.txt").write_text("unrelated")
    before = _tree(tmp_path / "V")
    result = CliRunner().invoke(app, [
        "export", runs["run"].path.name, "--level", "2", "--to", str(tmp_path / "V"),
        "--force", "--root", str(tmp_path / "V" / "a" / "store")])
    assert result.exit_code == 2 and "Fix:" in result.output and "Traceback" not in result.output
    assert _tree(tmp_path / "V") == before

    # An export of ticketlab's is replaced by --force, and only while it is exactly that.
    ours = tmp_path / "ours"
    export_level(runs["run"].path, 1, ours, runs["root"])
    (ours / "notes.txt").write_text("added by a person")
    with pytest.raises(TicketlabError, match="notes.txt, which ticketlab did not write"):
        export_level(runs["run"].path, 2, ours, runs["root"], force=True)
    (ours / "notes.txt").unlink()
    (ours / "README.md").write_text("edited by a person")
    with pytest.raises(TicketlabError, match="README.md was changed"):
        export_level(runs["run"].path, 2, ours, runs["root"], force=True)
    assert (ours / "README.md").read_text() == "edited by a person"
    export_level(runs["run"].path, 1, tmp_path / "fresh", runs["root"])
    shutil.copy(tmp_path / "fresh" / "README.md", ours / "README.md")
    ticket = export_level(runs["run"].path, 2, ours, runs["root"], force=True)
    assert ticket.export.replaced and json.loads((ours / INFO_FILE).read_text())["level"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_export_into_a_run_store_is_refused(runs, tmp_path):
    """Issue 10.2: an export never goes into, or over, a run or a run store."""
    run = runs["run"]
    level2 = _tree(run.level_dir(2))
    targets = [run.level_dir(2), run.level_dir(2) / "sub", run.path, run.path / "exports",
               runs["root"], runs["root"] / "new-export"]
    for target in targets:
        result = CliRunner().invoke(app, ["export", run.path.name, "--level", "1", "--to",
                                          str(target), "--force", "--root", str(runs["root"])])
        assert result.exit_code == 2, (target, result.output)
        assert "run" in result.output and "Fix:" in result.output
        assert "Traceback" not in result.output
    assert run.levels() == [0, 1, 2] and _tree(run.level_dir(2)) == level2
    assert not (run.level_dir(2) / "sub").exists() and not (run.path / "exports").exists()
    assert not (runs["root"] / "new-export").exists()


def test_an_identical_export_is_done_and_a_different_one_needs_force(runs, tmp_path):
    """Issue 10.12: rerunning a finished export succeeds without writing; another level in
    the same folder needs --force."""
    out = tmp_path / "out"
    first = export_level(runs["run"].path, 1, out, runs["root"])
    assert not first.export.unchanged
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = export_level(runs["run"].path, 1, out, runs["root"])
    assert again.export.unchanged and not again.export.replaced
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(TicketlabError, match="holds another export") as e:
        export_level(runs["run"].path, 2, out, runs["root"])
    assert "--force" in e.value.fix

    # The report: killed just after the rename, the same command must now say "done".
    cmd = [sys.executable, "-m", "ticketlab.cli", "export", runs["run"].path.name, "--level",
           "2", "--to", str(tmp_path / "k"), "--root", str(runs["root"])]
    env = {**os.environ, "TICKETLAB_FAULT": "renamed:1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    env.pop("TICKETLAB_FAULT")
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already exported" in rerun.stdout and "nothing written" in rerun.stdout


def test_orphaned_staging_is_cleaned_only_when_its_lock_is_free(runs, tmp_path):
    """Issue 10.11: a kill before the rename leaves a model-sized staging folder; the next
    export beside it removes it, but never a live one or anything ticketlab did not write."""
    from ticketlab.export import STAGING_MARKER, clean_orphans, staged_dir

    cmd = [sys.executable, "-m", "ticketlab.cli", "export", runs["run"].path.name, "--level",
           "1", "--to", str(tmp_path / "out"), "--root", str(runs["root"])]
    killed = subprocess.run(cmd, env={**os.environ, "TICKETLAB_FAULT": "write:1"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    [orphan] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert (orphan / "new" / "model.safetensors").is_file()
    decoys = {".out.abcdefgh.tmp/data.bin": b"someone's", ".out.12345678.tmp": b"a file",
              ".x.tmp": b"other"}
    for name, data in decoys.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(RuntimeError, match="abandon"), staged_dir(tmp_path / "live", False):
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".live.")]
        export_level(runs["run"].path, 1, tmp_path / "other", runs["root"])  # cleans beside
        assert not orphan.exists()  # its owner is dead: removed
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".live.")] == live  # alive
        raise RuntimeError("abandon the live staging")
    assert {n: (tmp_path / n).read_bytes() for n in decoys} == decoys  # never touched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".live.")]

    # Killed between moving the old export aside and renaming the new one in: put it back.
    out = tmp_path / "other"
    exported = _tree(out)
    stage = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".other.", suffix=".tmp"))
    (stage / STAGING_MARKER).write_text(json.dumps({"ticketlab": "ticketlab export staging"}))
    os.replace(out, stage / "old")
    assert clean_orphans(tmp_path) == [stage.name]
    assert _tree(out) == exported and not stage.exists()


def test_read_only_target_is_one_clear_error(runs, tmp_path, monkeypatch):
    """Issue 10.7: --to a place that cannot be written is one Error/Fix, exit 2."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: refuse writes there as the OS would
        real_mkdir = os.mkdir

        def mkdir(path, mode=0o777, **kwargs):
            if Path(path).is_relative_to(ro):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, mode, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        for target in (ro / "ticket", ro / "deeper" / "ticket"):
            result = CliRunner().invoke(app, ["export", runs["run"].path.name, "--level", "1",
                                              "--to", str(target), "--root", str(runs["root"])])
            assert result.exit_code == 2, result.output
            assert "Permission denied" in result.output and "Fix:" in result.output
            assert "Traceback" not in result.output
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_honour_the_umask(runs, tmp_path, umask):
    """Issue 10.13: a shipped ticket is readable by others unless the umask says otherwise
    (transformers writes model.safetensors 0600, mkdtemp makes folders 0700)."""
    old = os.umask(umask)
    try:
        for compressed in (False, True):
            out = tmp_path / f"out-{compressed}"
            export_level(runs["run"].path, 1, out, runs["root"], compressed=compressed)
            assert out.stat().st_mode & 0o777 == 0o777 & ~umask
            modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
            assert set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(old)


def test_failed_export_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    import ticketlab.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "encode_compressed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_level(runs["run"].path, 1, tmp_path / "out", runs["root"], compressed=True)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_export_is_one_clear_error(runs, tmp_path, monkeypatch):
    import ticketlab.export as export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "encode_compressed", full)
    with pytest.raises(TicketlabError, match="No space left") as e:
        export_level(runs["run"].path, 1, tmp_path / "out", runs["root"], compressed=True)
    assert "Free disk space" in e.value.fix
    assert list(tmp_path.iterdir()) == []


def test_run_without_weights_and_missing_level_are_clear_errors(runs, tmp_path):
    with pytest.raises(TicketlabError, match="--no-save-weights") as e:
        load_level(runs["light"].path, 1, runs["light_root"])
    assert "finetune" in e.value.fix
    with pytest.raises(TicketlabError, match="Level 7 .* is not finished") as e:
        load_level(runs["run"].path, 7, runs["root"])
    assert "[0, 1, 2]" in e.value.fix
    with pytest.raises(TicketlabError, match="no config.json"):
        load_ticket(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c"
    args = ["export", runs["run"].path.name, "--level", "2", "--to", str(out), "--compressed",
            "--root", str(runs["root"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "their dense fp32 size" in result.output and (out / TICKET_FILE).is_file()
    again = runner.invoke(app, args)  # the same export again: done, nothing written
    assert again.exit_code == 0 and "already exported" in again.output
    other = runner.invoke(app, [*args[:3], "1", *args[4:]])
    assert other.exit_code == 2 and "not empty" in other.output and "Fix:" in other.output
    assert "Traceback" not in other.output
    light = runner.invoke(app, ["export", str(runs["light"].path), "--level", "1", "--to",
                                str(tmp_path / "x")])
    assert light.exit_code == 2 and "--no-save-weights" in light.output
    assert not (tmp_path / "x").exists()
