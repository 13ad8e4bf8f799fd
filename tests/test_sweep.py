"""Experiment specs and sweeps: validation, resume after an interruption, the Ray backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import ticketlab.experiments.sweep as sweep
from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.experiments.sweep import Spec, cell_done, run_sweep, sweep_status
from ticketlab.train import Runtime

QUIET = Runtime(progress=False, save_weights=False)


def write_spec(tmp_path: Path, model: Path, glue: Path, grid: str, extra: str = "",
               target: float = 0.1) -> Path:
    """A spec for tiny, seconds-long runs (the same data and training as ``tiny_hparams``)."""
    path = tmp_path / "spec.toml"
    path.write_text(f"""
name = "tiny"
root = "runs"

[hparams]
model = "{model}"
data_dir = "{glue}"
max_train_samples = 64
max_eval_samples = 32
max_length = 32
lr = 1e-3
batch_size = 16
epochs = 1
weight_decay = 0.01
target_sparsity = {target}

[grid]
{grid}
{extra}""")
    return path


def test_a_spec_is_validated_before_anything_runs(tiny_bert_dir, glue_dir, tmp_path) -> None:
    spec = Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir,
                                'tasks = ["sst2", "cola"]\nseeds = 2\nbaselines = ["random"]',
                                '[task_hparams.cola]\nmax_train_samples = 32\n'
                                '[transfer]\nsparsity = 0.1\n'))
    assert spec.seeds == [0, 1] and spec.root == str(tmp_path / "runs")
    assert spec.hparams_for("cola", 1).data.max_train_samples == 32
    assert spec.hparams_for("sst2", 1).train.seed == 1
    assert spec.transfer["sources"] == ["sst2", "cola"] and spec.transfer["seeds"] == [0]
    assert len(spec.cells("imp")) == 4 and len(spec.cells("baselines")) == 4
    assert len(spec.cells("transfer")) == 2 * 4  # targets × (full, sst2, cola, one-shot)
    assert Spec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    fewer = Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir,
                                 'tasks = ["sst2"]\nseeds = 3\nbaselines = ["random"]\n'
                                 "baseline_seeds = 1"))
    assert [c.seed for c in fewer.cells("baselines")] == [0]
    assert [c.seed for c in fewer.cells("imp")] == [0, 1, 2]

    bad = {
        'tasks = ["sst2"]\nseeds = 2\nbaseline_seeds = [5]': "not all among the IMP seeds",
        'tasks = ["sst2"]\nseed = 2': "Unknown key(s) 'seed' in [grid]",
        'tasks = ["sst3"]': "unknown task 'sst3'",
        'tasks = ["sst2"]\nbaselines = ["randm"]': "Unknown baseline 'randm'",
        'tasks = ["sst2"]\nseeds = 0': "--seeds 0 must be at least 1",
        'tasks = ["sst2"]\nbaseline_levels = [0]': "baseline_levels [0]",
        'tasks = ["sst2"]\nbaseline_levels = [3]': "beyond sst2's target sparsity",
        'tasks = ["sst2"\n': "not valid TOML",
    }
    for grid, message in bad.items():
        with pytest.raises(TicketlabError) as e:
            Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir, grid))
        assert message in e.value.problem, (grid, e.value.problem)
    with pytest.raises(TicketlabError, match="not in \\[grid\\] tasks"):
        Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir, 'tasks = ["sst2"]',
                             '[transfer]\nsparsity = 0.1\ntargets = ["cola"]\n'))
    with pytest.raises(TicketlabError, match="beyond sst2's target sparsity"):
        Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir, 'tasks = ["sst2"]',
                             '[transfer]\nsparsity = 0.5\n'))
    with pytest.raises(TicketlabError, match="Unknown key\\(s\\) 'lr_rate'"):
        Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir, 'tasks = ["sst2"]',
                             '[task_hparams.sst2]\nlr_rate = 1\n')).hparams_for("sst2", 0)
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_sweep_resumes_without_redoing_finished_cells(
        tiny_bert_dir, glue_dir, tmp_path, monkeypatch) -> None:
    spec = Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir,
                                'tasks = ["sst2"]\nseeds = 2\nbaselines = ["random"]\n'
                                'baseline_levels = ["matching"]'))
    root = Path(spec.root)
    ran: list[str] = []
    real = sweep.run_cell

    def crash_on_third(spec, cell, root, runtime, console=None):
        if len(ran) == 2:
            raise KeyboardInterrupt  # killed while the third cell starts
        ran.append(cell.label())
        real(spec, cell, root, runtime, console)

    monkeypatch.setattr(sweep, "run_cell", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, root, QUIET)
    assert ran == ["imp sst2 seed 0", "imp sst2 seed 1"]
    status = dict((c.label(), done) for c, done in sweep_status(spec, root))
    assert status == {"imp sst2 seed 0": True, "imp sst2 seed 1": True,
                      "random sst2 level matching seed 0": False,
                      "random sst2 level matching seed 1": False}
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.json")}

    ran.clear()
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: (ran.append(a[1].label()), real(*a)))
    reports = run_sweep(spec, root, QUIET)
    assert ran == ["random sst2 level matching seed 0", "random sst2 level matching seed 1"]
    assert [(r.part, r.skipped, r.ran) for r in reports] == [("imp", 2, 0), ("baselines", 0, 2)]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished cells untouched
    assert all(cell_done(spec, c, root) for part in sweep.PARTS for c in spec.cells(part))

    ran.clear()
    run_sweep(spec, root, QUIET)
    assert ran == []  # a finished sweep does nothing

    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.toml"), "--dry-run"])
    assert result.exit_code == 0 and "4 of 4 cells finished" in result.output


def test_the_ray_backend_runs_a_two_cell_grid(tiny_bert_dir, glue_dir, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    spec = Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir, 'tasks = ["sst2"]\nseeds = 2',
                                target=0.0))
    root = tmp_path / "runs"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reports = run_sweep(spec, root, QUIET, backend="ray")
    finally:
        ray.shutdown()
    assert [(r.part, r.total, r.ran) for r in reports] == [("imp", 2, 2)]
    assert all(cell_done(spec, c, root) for c in spec.cells("imp"))
    runs = [root / spec.hparams_for("sst2", seed).run_id() for seed in (0, 1)]
    assert all((run / "level_0" / "metrics.json").is_file() for run in runs)


def test_a_cell_locked_by_another_process_is_skipped_not_failed(
        tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Two sweeps sharing a store: a cell another live process is running is left to it."""
    from ticketlab.store import Run

    spec = Spec.load(write_spec(tmp_path, tiny_bert_dir, glue_dir,
                                'tasks = ["sst2"]\nseeds = 2'))
    root = Path(spec.root)
    busy = Run(root / spec.hparams_for("sst2", 1).run_id())
    with busy.lock():  # this test process plays the other sweep
        reports = run_sweep(spec, root, QUIET)
    assert [(r.part, r.ran) for r in reports] == [("imp", 1)]
    status = dict((c.label(), done) for c, done in sweep_status(spec, root))
    assert status == {"imp sst2 seed 0": True, "imp sst2 seed 1": False}
    assert run_sweep(spec, root, QUIET)[0].ran == 1  # once free, the next sweep runs it
    assert all(done for _, done in sweep_status(spec, root))


def test_dry_run_of_a_large_grid_counts_first_and_resolves_each_level_once(
        tmp_path, monkeypatch) -> None:
    """Issue 10, item 14: a 300-seed grid printed nothing for 300 s. The count comes from the
    grid's sizes, the cells stream, and the matching level is resolved once per task."""
    path = tmp_path / "spec.toml"
    path.write_text('[hparams]\nmodel = "minilm"\n[grid]\ntasks = ["sst2", "mrpc"]\n'
                    'seeds = 300\nbaselines = ["random", "one-shot"]\n'
                    '[transfer]\nsparsity = 0.1\nseeds = 2\n')
    spec = Spec.load(path)
    assert spec.cell_counts() == {"imp": 600, "rewinding": 0, "baselines": 1200,
                                  "transfer": 16}
    assert spec.cell_count() == sum(len(spec.cells(p)) for p in sweep.PARTS)
    resolved = []
    real = Spec.resolve_level
    monkeypatch.setattr(Spec, "resolve_level",
                        lambda self, cell, root: resolved.append(cell.task) or real(
                            self, cell, root))
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--root",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("sweep: 1816 cells (imp 600, baselines 1200, transfer 16)")
    assert "0 of 1816 cells finished" in lines[-1]
    assert sorted(resolved) == ["mrpc", "sst2"]
