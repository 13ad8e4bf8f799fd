"""SuperTickets runs end to end on a tiny BERT: the store's intervals, resume after a kill
inside an interval (bit-identical), reactivation, the plain HF export, the comparison with IMP
and the command line's bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ticketlab.errors import TicketlabError
from ticketlab.hparams import Runtime
from ticketlab.masks import Mask
from ticketlab.pruning import prune
from ticketlab.store import list_runs
from ticketlab.supertickets.hparams import SuperHparams
from ticketlab.supertickets.search import STATE_FILE, find_superticket

QUIET = Runtime(progress=False)


def quiet():
    from rich.console import Console

    return Console(quiet=True)


def st_hparams(tiny_hparams, **train):
    """8 steps of a tiny BERT on 64 SST-2 sentences (4 batches an epoch), pruned to 40 %."""
    return tiny_hparams(train={"max_steps": 8, **train}, target_sparsity=0.4, rate=0.2)


SP = SuperHparams(head_target=0.25, ffn_target=0.25, interval=3, gate_lr=0.05)


def files_of(run) -> dict[str, bytes]:
    out = {}
    for k in run.levels():
        for name in ("mask.safetensors", "model.safetensors", "structure.json"):
            out[f"{k}/{name}"] = (run.level_dir(k) / name).read_bytes()
        rec = run.metrics(k)
        out[f"{k}/numbers"] = json.dumps({key: rec[key] for key in (
            "metrics", "sparsity", "structure", "removed", "rho")} | {
            "loss": rec["train"]["loss"], "steps": rec["train"]["steps"]}, sort_keys=True
        ).encode()
    return out


def test_a_run_stores_one_level_per_interval_like_imp(tiny_hparams, tmp_path) -> None:
    hp = st_hparams(tiny_hparams)
    run = find_superticket(hp, SP, tmp_path, QUIET, quiet())
    assert run.path.name.startswith("supertickets-sst2-")
    assert run.levels() == [1, 2, 3]  # steps 0-3, 3-6, 6-8
    records = [run.metrics(k) for k in run.levels()]
    assert [r["steps"] for r in records] == [[0, 3], [3, 6], [6, 8]]
    assert [r["train"]["steps"] for r in records] == [3, 3, 2]
    # 20 % more of the prunable set per interval up to 40 %, removed units counted in
    assert [round(r["sparsity"], 3) for r in records] == [0.2, 0.4, 0.4]
    final = records[-1]["structure"]
    # 25 % of 4 heads and of 128 neurons, reached at the second interval (where 40 % is)
    assert (final["head"]["kept"], final["neuron"]["kept"]) == (3, 96)
    assert records[0]["structure"]["head"]["kept"] == 4  # half the target: floor(0.5)
    # only the newest state is kept, and none once the run is done
    assert not any((run.level_dir(k) / STATE_FILE).exists() for k in run.levels())
    mask = Mask.load(run.level_dir(3) / "mask.safetensors")
    assert mask.meta["kind"] == "supertickets" and mask.meta["level"] == 3
    structure = json.loads((run.level_dir(3) / "structure.json").read_text())
    assert sum(sum(g["keep"]) for g in structure["groups"] if g["kind"] == "head") == 3
    # the removed units are zero in the weight mask: their rows are gone from Q
    layer = next(g for g in structure["groups"] if g["kind"] == "head" and not all(g["keep"]))
    head = layer["keep"].index(False)
    q = mask.tensors[f"encoder.layer.{layer['layer']}.attention.self.query.weight"]
    assert not q[head * 16:(head + 1) * 16].any()  # head size 32 / 2 heads = 16
    # rerunning the finished run trains nothing and touches nothing
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.is_file()}
    find_superticket(hp, SP, tmp_path, QUIET, quiet())
    assert {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.is_file()} == before


def test_structural_targets_above_the_overall_target_are_refused(tiny_hparams,
                                                                 tmp_path) -> None:
    hp = tiny_hparams(train={"max_steps": 8}, target_sparsity=0.1, rate=0.1)
    with pytest.raises(TicketlabError, match="more than --target-sparsity 0.1"):
        find_superticket(hp, SuperHparams(head_target=0.5, ffn_target=0.5, interval=2),
                         tmp_path, QUIET, quiet())
    assert not any(tmp_path.iterdir())  # refused before a run directory exists


def test_imp_rewinding_is_refused_by_the_search(tiny_hparams, tmp_path) -> None:
    hp = tiny_hparams(train={"max_steps": 8}, target_sparsity=0.4, rate=0.2, rewind_step=2)
    with pytest.raises(TicketlabError, match="--rewind-step rewinds IMP's levels"):
        find_superticket(hp, SP, tmp_path, QUIET, quiet())
    assert not any(tmp_path.iterdir())


def test_reactivation_resets_to_a_full_mask_and_prunes_from_the_current_weights(
        tiny_hparams, tmp_path, monkeypatch) -> None:
    import ticketlab.supertickets.search as search

    calls = []
    real_train = search.train

    def spy(model, prunable, mask, *args, **kwargs):
        calls.append({"mask": mask})
        result = real_train(model, prunable, mask, *args, **kwargs)
        calls[-1]["weights"] = {n: p.detach().clone() for n, p in prunable.items()}
        return result

    monkeypatch.setattr(search, "train", spy)
    hp = st_hparams(tiny_hparams)
    sp = SuperHparams(interval=3, reactivate=True, threshold=0.0)  # no structure: pure weights
    run = find_superticket(hp, sp, tmp_path, QUIET, quiet())
    masks = [Mask.load(run.level_dir(k) / "mask.safetensors") for k in run.levels()]
    assert [round(m.sparsity, 3) for m in masks] == [0.2, 0.4, 0.4]
    # every interval after the first starts from an all-ones mask: pruned weights come back
    assert calls[0]["mask"].sparsity == 0.0
    assert all(c["mask"].sparsity == 0.0 and c["mask"].num_kept == c["mask"].num_total
               for c in calls[1:])
    # ... and the point after it prunes those weights again, from the weights just trained
    for k in (2, 3):
        trained = calls[k - 1]["weights"]
        expected = prune(trained, Mask.ones_like(trained), masks[k - 1].sparsity,
                         seed=hp.train.seed * 1000 + k)
        assert masks[k - 1].for_params(trained) == expected.for_params(trained)
    # some weights pruned at interval 1 were back (nonzero) before interval 2's pruning
    back = sum(int((calls[1]["weights"][n] != 0)[~masks[0].tensors[n]].sum())
               for n in masks[0].tensors)
    assert back > 0
    # without --reactivate an interval trains with the previous interval's mask
    calls.clear()
    plain = find_superticket(hp, SuperHparams(interval=3, threshold=0.0), tmp_path / "b",
                             QUIET, quiet())
    assert calls[1]["mask"] == Mask.load(plain.level_dir(1) / "mask.safetensors")


def command(model: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ticketlab.cli", "supertickets", "--task", "csv",
            "--data-dir", str(data), "--model", str(model), "--batch-size", "16",
            "--max-steps", "9", "--max-length", "16", "--lr", "1e-3", "--target-sparsity",
            "0.4", "--rate", "0.2", "--interval", "4", "--head-target", "0.25",
            "--ffn-target", "0.25", "--gate-lr", "0.05", "--penalty", "uniform", "--root",
            str(root), "--no-progress", *extra]


def launch(cmd: list[str], fault: str | None = None) -> int:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("TICKETLAB_FAULT", None)
    if fault:
        env["TICKETLAB_FAULT"] = fault
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}:\n{proc.stdout.decode()}"
                             f"{proc.stderr.decode()}")
    return proc.returncode


@pytest.mark.integration
def test_a_kill_inside_an_interval_resumes_bit_identically(tiny_bert_dir, csv_task_dir,
                                                           tmp_path) -> None:
    assert launch(command(tiny_bert_dir, csv_task_dir, tmp_path / "ref")) == 0
    [reference] = list_runs(tmp_path / "ref")
    expected = files_of(reference)
    assert reference.levels() == [1, 2, 3]
    assert [reference.metrics(k)["steps"] for k in (1, 2, 3)] == [[0, 4], [4, 8], [8, 9]]
    root = tmp_path / "killed"
    # 48 rows, batch 16: 3 batches an epoch; intervals are steps 0-4, 4-8 and 8-9, so every
    # interval crosses an epoch boundary. Each kill counts from its own process's start:
    # after step 5 (inside interval 2, one batch into epoch 2); while interval 2's weights
    # are being written (its third file); after step 6 (resumed at 4: epoch 3 starts at 6);
    # just after interval 3's metrics.json is renamed, before the older state is deleted.
    for fault in ("step:5", "write:3", "step:2", "renamed:10"):
        assert launch(command(tiny_bert_dir, csv_task_dir, root), fault) == -signal.SIGKILL
    assert launch(command(tiny_bert_dir, csv_task_dir, root)) == 0
    [resumed] = list_runs(root)
    assert files_of(resumed) == expected


def test_an_exported_superticket_loads_in_plain_transformers_with_the_same_logits(
        tiny_hparams, tmp_path, minilm_tokenizer) -> None:
    from transformers import AutoModelForSequenceClassification

    from ticketlab.supertickets.physical import (
        export_superticket,
        load_structured,
        load_superticket,
    )

    run = find_superticket(st_hparams(tiny_hparams), SP, tmp_path / "runs", QUIET, quiet())
    out = tmp_path / "ticket"
    info = export_superticket(run.path, out, tmp_path / "runs")
    assert (info["heads_kept"], info["neurons_kept"]) == (3, 96)
    ticket, _, keep = load_structured(run.path, tmp_path / "runs")
    gated_equivalent = ticket.model.eval()  # the last interval: gates folded into the weights
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    small = load_superticket(out)
    # the FFN is cut to the widest layer's kept neurons in the config itself
    widest = max(sum(bits) for bits in keep[1::2])
    assert plain.config.intermediate_size == widest < 64
    assert plain.bert.encoder.layer[0].intermediate.dense.out_features == widest
    sizes = [sum(p.numel() for p in m.parameters()) for m in (gated_equivalent, plain, small)]
    assert sizes[0] > sizes[1] > sizes[2]
    heads_kept = [sum(bits) for bits in keep[0::2]]
    assert [lay.attention.self.query.out_features // 16 for lay in small.bert.encoder.layer] \
        == heads_kept
    enc = minilm_tokenizer(["a gripping, beautifully acted film", "dull", "it is what it is"],
                           return_tensors="pt", padding=True)
    with torch.no_grad():
        want = gated_equivalent(**enc).logits
        assert torch.allclose(plain(**enc).logits, want, atol=1e-5)
        assert torch.allclose(small(**enc).logits, want, atol=1e-5)
    manifest = json.loads((out / "ticket.json").read_text())
    assert manifest["structure"]["heads"] and "SuperTickets" in (out / "README.md").read_text()
    with pytest.raises(TicketlabError, match="run store"):
        export_superticket(run.path, tmp_path / "runs" / "mine", tmp_path / "runs")


def test_an_unfinished_or_imp_run_is_not_exported_as_a_superticket(tiny_hparams,
                                                                   tmp_path) -> None:
    from ticketlab.imp import find_ticket
    from ticketlab.supertickets.physical import export_superticket

    imp = find_ticket(tiny_hparams(target_sparsity=0.1), tmp_path, QUIET, quiet())
    with pytest.raises(TicketlabError, match="is a 'imp' run, not a SuperTickets run"):
        export_superticket(imp.path, tmp_path / "out", tmp_path)
    run = find_superticket(st_hparams(tiny_hparams), SP, tmp_path, QUIET, quiet())
    (run.level_dir(3) / "metrics.json").unlink()  # as if killed in the last interval
    with pytest.raises(TicketlabError, match="is not finished") as e:
        export_superticket(run.path, tmp_path / "out", tmp_path)
    assert "Rerun the same `ticketlab supertickets` command" in e.value.fix
    assert not (tmp_path / "out").exists()


def test_compare_runs_imp_and_supertickets_at_equal_sparsity_and_writes_a_table(
        tiny_bert_dir, glue_dir, tmp_path) -> None:
    from ticketlab.supertickets.compare import Comparison, compare, markdown, write_report

    values = {"model": str(tiny_bert_dir), "data_dir": str(glue_dir), "max_train_samples": 64,
              "max_eval_samples": 32, "max_length": 32, "lr": 1e-3, "batch_size": 16,
              "max_steps": 8, "target_sparsity": 0.4, "rate": 0.2}
    spec = Comparison(task="sst2", values=values, sp=SP, seeds=(0, 1), imp_rate=0.2,
                      imp_epochs=1, transfer="mrpc")
    results = compare(spec, tmp_path, QUIET, quiet(), progress=lambda text: None)
    assert results["imp_level"] == 2 and len(results["per_seed"]) == 2
    cell = results["per_seed"][0]
    assert cell["imp"]["sparsity"] == pytest.approx(0.4, abs=1e-4)
    assert cell["super"]["sparsity"] == pytest.approx(0.4, abs=1e-4)
    # IMP trains 3 levels of one epoch (4 steps), SuperTickets one run of 8 steps
    assert (cell["imp"]["cost"]["steps"], cell["super"]["cost"]["steps"]) == (12, 8)
    assert cell["imp"]["cost"]["cpu_seconds"] > 0
    assert set(cell["transfer"]) == {"full", "imp", "super"}
    assert cell["transfer"]["super"]["sparsity"] == pytest.approx(0.4, abs=1e-4)
    js, md = write_report(results, tmp_path / "report")
    text = md.read_text()
    assert "| optimizer steps | 4 | 8 | 12 | 8 |" in text and "transfer to mrpc" in text
    assert cell["full_long"]["cost"]["steps"] == 8  # the dense control: as long as ST
    assert json.loads(js.read_text())["target"] == 0.4
    assert markdown(results) == text
    # a second call finds every cell in the store
    again = compare(spec, tmp_path, QUIET, quiet(), progress=lambda text: None)
    assert again["per_seed"] == results["per_seed"]


# --- the command line -------------------------------------------------------------------------
def test_cli_runs_a_search_and_refuses_imp_only_options(tiny_bert_dir, csv_task_dir,
                                                        tmp_path) -> None:
    from ticketlab.cli import app

    runner = CliRunner()
    args = command(tiny_bert_dir, csv_task_dir, tmp_path)[3:]

    def with_option(flag: str, value: str) -> list[str]:
        i = args.index(flag)
        return [*args[:i + 1], value, *args[i + 2:]]

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "interval  3/3" in result.output and "done" in result.output
    bad = runner.invoke(app, [*args, "--rewind-step", "2"])
    assert bad.exit_code == 2 and "No such option" in bad.output
    bad = runner.invoke(app, with_option("--head-target", "1.5"))
    assert bad.exit_code == 2 and "--head-target 1.5 is outside [0, 1)" in bad.output
    bad = runner.invoke(app, with_option("--interval", "9"))  # one pruning point: 20 %
    assert bad.exit_code == 2 and "reaches only 20%" in bad.output
    bad = runner.invoke(app, with_option("--penalty", "flops"))
    assert bad.exit_code == 2 and "Unknown --penalty 'flops'" in bad.output
    bad = runner.invoke(app, ["supertickets-bench", "x", "--imp", "nolevel"])
    assert bad.exit_code == 2 and "is not RUN:LEVEL" in bad.output
    bad = runner.invoke(app, ["supertickets-export", "nosuchrun", "--to", str(tmp_path / "o"),
                              "--root", str(tmp_path)])
    assert bad.exit_code == 2 and "No run 'nosuchrun'" in bad.output


def test_bench_times_the_structured_ticket_beside_dense_and_sparse(tiny_hparams, tmp_path,
                                                                   monkeypatch) -> None:
    from ticketlab.supertickets.bench import bench_superticket

    monkeypatch.setenv("TICKETLAB_CACHE", str(tmp_path / "cache"))  # calibration off ~/.cache
    run = find_superticket(st_hparams(tiny_hparams), SP, tmp_path / "runs", QUIET, quiet())
    out = bench_superticket(run.path, tmp_path / "runs", batch_sizes=(2,), seq_len=8,
                            threads=(1,), reps=1)
    [row] = out["rows"]
    assert (row["threads"], row["batch"], row["clock"]) == (1, 2, "cpu")
    assert {"dense_ms", "structured_ms", "structured+sparse_ms", "reference_ms"} <= set(row)
    assert row["max_abs_logit_diff"] < 1e-4  # smaller and accelerated: the same logits
    # one head (3 x (32x16 + 16) + 32x16) and 32 neurons (32 + 1 + 32 each) fewer
    assert out["parameters"]["full"] - out["parameters"]["structured"] == \
        3 * (32 * 16 + 16) + 32 * 16 + 32 * 65
    assert out["reference"] == "full size + sparse kernels"


def test_bench_times_an_imp_level_stored_without_weights_as_its_mask_on_theta0(
        tiny_hparams, tmp_path, monkeypatch) -> None:
    """A sweep stores IMP levels without trained weights; the bench's IMP reference is then θ0
    with that level's mask — the same zeros, so the same sparse-kernel time — not an error."""
    from ticketlab.imp import find_ticket
    from ticketlab.models import load_model
    from ticketlab.supertickets.bench import bench_superticket, imp_reference

    monkeypatch.setenv("TICKETLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    imp = find_ticket(tiny_hparams(target_sparsity=0.4, rate=0.2), root,
                      Runtime(progress=False, save_weights=False), quiet())
    assert not (imp.level_dir(2) / "model.safetensors").exists()
    run = find_superticket(st_hparams(tiny_hparams), SP, root, QUIET, quiet())
    info = {"model": tiny_hparams().model.model, "head": "sequence-classification",
            "num_labels": 2}
    model, name = imp_reference(imp.path, 2, root, info)
    assert name == "IMP level 2's mask on θ0 + sparse kernels"
    mask = Mask.load(imp.level_dir(2) / "mask.safetensors")
    params = dict(model.base_model.named_parameters())
    theta0 = dict(load_model(info["model"], info["head"], 2).base_model.named_parameters())
    for key, keep in mask.tensors.items():
        assert torch.equal(params[key] == 0, ~keep | (theta0[key] == 0)), key
        assert torch.equal(params[key][keep], theta0[key][keep]), key
    out = bench_superticket(run.path, root, imp=(imp.path, 2), batch_sizes=(2,), seq_len=8,
                            threads=(1,), reps=1)
    assert out["reference"] == name and out["rows"][0]["reference_ms"] > 0
    with pytest.raises(TicketlabError, match="not finished"):
        imp_reference(imp.path, 7, root, info)
    # an IMP run of another model than the SuperTicket's: one clear error, not a shape error
    with pytest.raises(TicketlabError, match="was found on .* the SuperTicket on 'other-model'"):
        imp_reference(imp.path, 2, root, {**info, "model": "other-model"})
