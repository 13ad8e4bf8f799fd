"""The sparse engine: kernel correctness, accelerated models match dense, measured fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask
from ticketlab.pruning import prune
from ticketlab.sparse import CalibrationTable, accelerate_ticket, choose, sparse_layers, table_key
from ticketlab.sparse.build import TOKEN_BLOCKS, load_library
from ticketlab.sparse.calibration import (
    DENSE,
    DENSE_KINDS,
    GEMM,
    MAX_SPARSE_DENSITY,
    can_run_sparse,
    candidate_variants,
    confirm_close_call,
    evict_caches,
    measure_layer,
    time_candidates,
    token_bucket,
)
from ticketlab.sparse.fused import fused_layers
from ticketlab.sparse.kernels import Variant, pack_weight, spmm

VARIANTS = [Variant(tb, kc) for tb in TOKEN_BLOCKS for kc in (16, 64, 96, 512)]


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory: pytest.TempPathFactory):
    """Build the kernel and keep calibration tables in a temporary cache, not ~/.cache."""
    old = os.environ.get("TICKETLAB_CACHE")
    os.environ["TICKETLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["TICKETLAB_CACHE"]
    else:
        os.environ["TICKETLAB_CACHE"] = old


def sparse_matrix(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """BERT-scaled random weights with a random mask, plus an all-pruned row and column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w *= torch.rand(n, k, generator=g) >= sparsity
    w[n // 2] = 0
    w[:, k // 3] = 0
    return w


def unpack(p) -> torch.Tensor:
    """Dense matrix back from the packed layout (independent of the kernel): every row's own
    nonzeros, then each pair's shared columns."""
    out = torch.zeros(p.out_features, p.in_features)
    ntiles = p.tgroup.numel() - 1
    rowptr = p.rowptr.long().view(p.ncb, 2 * p.ngroups + ntiles)
    sptr = p.sptr.long().view(p.ncb, p.ngroups + ntiles)
    groups = p.groups.long().view(-1, 2).tolist()
    slots = [r for g in groups for r in g]  # CSR row 2g is row a of group g, 2g+1 row b
    tile_of = torch.searchsorted(p.tgroup.long(), torch.arange(p.ngroups), right=True) - 1
    for c in range(p.ncb):
        for slot, r in enumerate(slots):
            t = int(tile_of[slot // 2])  # one extra pointer per tile before this one
            lo, hi = int(rowptr[c, slot + t]), int(rowptr[c, slot + t + 1])
            if r < 0:
                assert lo == hi  # a single row's empty partner
                continue
            out[r, c * p.kc + p.idx[lo:hi].long()] = p.val[lo:hi]
        for g, (a, b) in enumerate(groups):
            t = int(tile_of[g])
            lo, hi = int(sptr[c, g + t]), int(sptr[c, g + t + 1])
            if b < 0:
                assert lo == hi  # a single row has no shared columns
                continue
            cols = c * p.kc + p.sidx[lo:hi].long()
            assert not out[a, cols].any() and not out[b, cols].any()  # each weight stored once
            out[a, cols] = p.sval[2 * lo:2 * hi:2]
            out[b, cols] = p.sval[2 * lo + 1:2 * hi:2]
    return out


@pytest.mark.parametrize("pair", [True, False])
@pytest.mark.parametrize("kc", [16, 50, 512])
def test_packing_round_trips(kc, pair):
    w = sparse_matrix(37, 130, 0.5)
    packed = pack_weight(w, kc, pair=pair)
    assert packed.nnz == int((w != 0).sum())
    assert torch.equal(unpack(packed), w)
    assert (packed.sval.numel() > 0) == pair



@pytest.mark.parametrize("kc", [16, 64])
def test_both_streams_are_stored_in_the_order_the_kernel_reads_them(kc):
    """Per token block the kernel visits tile by tile, chunk by chunk within a tile, then each
    pair's shared columns and each slot's own nonzeros: those ranges must tile ``sval`` and
    ``val`` front to back, so that a cold weight is one sequential stream (not one per chunk)."""
    w = sparse_matrix(3 * load_library().tl_tile_rows() + 9, 200, 0.5, seed=2)
    p = pack_weight(w, kc)
    ntiles = p.tgroup.numel() - 1
    rowptr = p.rowptr.long().view(p.ncb, 2 * p.ngroups + ntiles)
    sptr = p.sptr.long().view(p.ncb, p.ngroups + ntiles)
    own_end = shared_end = 0
    bounds = p.tgroup.tolist()
    for t in range(ntiles):
        for c in range(p.ncb):
            for g in range(bounds[t], bounds[t + 1]):
                assert sptr[c, g + t] == shared_end  # starts where the previous read ended
                shared_end = int(sptr[c, g + t + 1])
                for slot in (2 * g, 2 * g + 1):
                    assert rowptr[c, slot + t] == own_end
                    own_end = int(rowptr[c, slot + t + 1])
    assert own_end == p.val.numel() and shared_end == p.sidx.numel() > 0


def test_rows_are_paired_within_their_tile_by_shared_columns():
    tile = load_library().tl_tile_rows()
    w = sparse_matrix(2 * tile + 5, 90, 0.6, seed=3)
    w[3] = w[tile + 7]  # the same pattern in two tiles: may not be paired across them
    w[1] = torch.randn(90) + 1.0  # the densest row of its tile, taken first: its best partner
    w[4] = w[1] * 2.0  # (the same pattern, all columns shared) must be found
    packed = pack_weight(w, 64)
    groups = packed.groups.view(-1, 2).tolist()
    rows = [r for g in groups for r in g if r >= 0]
    assert sorted(rows) == list(range(w.shape[0]))  # every row exactly once
    assert packed.tgroup.tolist()[0] == 0 and packed.tgroup.tolist()[-1] == len(groups)
    starts = packed.tgroup.tolist()
    for t, (g0, g1) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        assert all(r // tile == t for g in groups[g0:g1] for r in g if r >= 0)
    assert [1, 4] in groups or [4, 1] in groups
    assert [w.shape[0] // 2, -1] in groups  # the all-pruned row shares nothing
    # more columns are shared than in consecutive pairs of this random mask
    nz = (w != 0).float()
    consecutive = float((nz[0:-1:2] * nz[1::2]).sum()) * 2
    assert packed.sval.numel() > consecutive


def test_rows_sharing_few_columns_per_chunk_stay_single():
    from ticketlab.sparse.kernels import PAIR_MIN_SHARED_PER_CHUNK

    w = torch.zeros(8, 64)
    w[0, :8] = w[1, :8] = 1.0  # 8 shared columns, in the first of the chunks
    w[2:, 40] = 1.0  # every other row shares one column
    for kc, paired in ((64, True), (8, False)):  # 8 per chunk on average vs 1 per chunk
        assert (8 * kc / 64 >= PAIR_MIN_SHARED_PER_CHUNK) == paired
        groups = pack_weight(w, kc).groups.view(-1, 2).tolist()
        assert ([0, 1] in groups or [1, 0] in groups) == paired
        assert sum(b >= 0 for _, b in groups) == (1 if paired else 0)
        assert torch.equal(unpack(pack_weight(w, kc)), w)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_kernel_matches_dense(sparsity):
    w = sparse_matrix(70, 200, sparsity, seed=1)
    b = torch.randn(70) * 0.1
    g = torch.Generator().manual_seed(2)
    for tokens in (1, 7, 16, 33, 130):
        x = torch.randn(tokens, 200, generator=g)
        ref = (x.double() @ w.double().T + b.double()).float()
        for v in VARIANTS:
            packed = pack_weight(w, v.kc)
            for threads in (1, 2):
                y = spmm(x, packed, b, v.tb, threads)
                err = (y - ref).abs().max().item()
                assert err <= 1e-5, (tokens, v, threads, err)
                assert torch.equal(y[:, 35], b[35].expand(tokens))  # all-pruned row: bias only


def test_all_pruned_matrix_and_no_bias():
    w = torch.zeros(24, 40)
    x = torch.randn(9, 40)
    b = torch.randn(24)
    for tb in TOKEN_BLOCKS:
        packed = pack_weight(w, 16)
        assert packed.nnz == 0
        assert torch.equal(spmm(x, packed, b, tb, 2), b.expand(9, 24))
        assert torch.equal(spmm(x, packed, None, tb, 1), torch.zeros(9, 24))
    assert spmm(torch.zeros(0, 40), pack_weight(w, 16), b, 16).shape == (0, 24)


class ForcedTable(CalibrationTable):
    """Every key says the given sparse variant beats dense: the kernel runs everywhere."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant

    def get(self, key: str) -> dict[str, float]:
        base = self.variant.removesuffix("-t1")  # what confirms it on one thread
        return {DENSE: 1.0, self.variant: 0.1, base: 0.2}


@pytest.fixture(scope="module")
def minilm():
    from ticketlab.models import load_model, load_tokenizer

    model = load_model("minilm", "sequence-classification", num_labels=2).eval()
    return model, load_tokenizer("minilm")


@pytest.fixture(scope="module")
def sst2_batch(minilm, glue_dir: Path):
    from ticketlab.tasks import DataSource, get_task

    examples = get_task("sst2").load(DataSource(glue_dir), "dev")[:12]
    return minilm[1]([e["text_a"] for e in examples], padding=True, return_tensors="pt")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_accelerated_minilm_matches_dense_on_real_and_random_inputs(minilm, sst2_batch, sparsity):
    import copy

    from ticketlab.models import prunable_parameters

    model = copy.deepcopy(minilm[0])
    params = prunable_parameters(model, prune_pooler=False)
    if sparsity:
        prune(params, Mask.ones_like(params), sparsity).apply_(params)
    g = torch.Generator().manual_seed(3)
    random_batch = {"input_ids": torch.randint(1000, 30000, (2, 100), generator=g),
                    "attention_mask": torch.ones(2, 100, dtype=torch.long)}
    for variant in ("tb16-kc128", "tb32-kc256-t1", "tb64-kc512"):
        fast = accelerate_ticket(model, table=ForcedTable(variant))
        layers = sparse_layers(fast)
        assert len(layers) == 6 * 6 + 1  # every encoder Linear and the pooler
        assert len(fused_layers(fast)) == 6  # every encoder layer runs fused
        for batch in (sst2_batch, random_batch):
            with torch.inference_mode():
                ref = model.bert(**batch).last_hidden_state
                out = fast.bert(**batch).last_hidden_state
                # Padding positions are excluded: their states are noise that nothing reads
                # (there even dense float32 and float64 differ by ~1e-4).
                real = batch["attention_mask"].bool()
                assert (ref - out)[real].abs().max().item() <= 1e-4
                assert (model(**batch).logits - fast(**batch).logits).abs().max() <= 1e-4
        tokens = int(random_batch["input_ids"].numel())
        for m in layers.values():  # forced everywhere except where density rules sparse out
            expected = variant if can_run_sparse(m.density) else DENSE
            assert m.decide(tokens, torch.get_num_threads()) == expected
        if sparsity == 0:
            assert all(not m.packed for m in layers.values())
    assert all(not p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the input model is untouched


def test_fallback_picks_dense_where_dense_is_faster(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a 90 %-sparse ticket: every layer is below the density ceiling
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= 0.9)
    threads = 1
    tokens = 128
    table = CalibrationTable()
    expected = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        density = float((m.weight != 0).float().mean())
        key = table_key(m.out_features, m.in_features, density, tokens, threads)
        if "attention" in name:  # dense is faster here
            table.entries[key] = {DENSE: 1.0, "tb32-kc128": 1.5, "tb64-kc128": 2.0}
            expected[name] = DENSE
        elif "intermediate" in name:  # sparse wins clearly
            table.entries[key] = {DENSE: 1.0, "tb32-kc128": 0.4, "tb64-kc128": 0.5}
            expected[name] = "tb32-kc128"
        else:  # sparse within the 5 % margin: not worth it
            table.entries[key] = {DENSE: 1.0, "tb32-kc128": 0.97}
            expected[name] = DENSE
    before = json.dumps(table.entries, sort_keys=True)
    fast = accelerate_ticket(model, tokens=(tokens,), threads=(threads,), table=table)
    layers = sparse_layers(fast)
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        assert layer.plan == {(token_bucket(tokens), threads): expected[name]}, name
        assert (expected[name] == DENSE) == (not layer.packed)  # dense layers pack nothing
    assert json.dumps(table.entries, sort_keys=True) == before  # nothing was measured
    x = torch.randint(1000, 30000, (2, 64))
    with torch.inference_mode():
        diff = (model(input_ids=x).last_hidden_state - fast(input_ids=x).last_hidden_state)
    assert diff.abs().max() <= 1e-5


def test_choose_rule():
    assert choose({DENSE: 1.0, "a": 0.5, "b": 0.4}) == "b"
    assert choose({DENSE: 1.0, "a": 1.2}) == DENSE
    assert choose({DENSE: 1.0, "a": 0.97}) == DENSE  # inside the margin
    assert choose({DENSE: 1.0, "a": 0.97}, margin=0.0) == "a"
    assert choose({DENSE: 1.0}) == DENSE
    # On several threads a variant must also be cheaper than dense on one thread.
    multi = {DENSE: 1.0, "a": 0.5, "b": 0.4}
    assert choose(multi, confirm={DENSE: 1.0, "a": 0.6, "b": 1.1}) == "a"
    assert choose(multi, confirm={DENSE: 1.0, "a": 1.3, "b": 1.1}) == DENSE
    # "-t1": the same kernel on the calling thread only; confirmed by its one-thread timing.
    assert choose({DENSE: 1.0, "tb32-kc64": 0.6, "tb32-kc64-t1": 0.5},
                  confirm={DENSE: 1.0, "tb32-kc64": 0.4}) == "tb32-kc64-t1"
    with pytest.raises(ValueError):
        choose({"a": 1.0})
    # Between the two dense kernels the GEMM (which fuses epilogues) wins unless MKL is faster
    # by the margin; a sparse variant is judged against the chosen one.
    assert choose({DENSE: 0.97, GEMM: 1.0}) == GEMM
    assert choose({DENSE: 0.90, GEMM: 1.0}) == DENSE
    assert choose({DENSE: 1.0, GEMM: 0.8, "a": 0.78}) == GEMM  # within the margin of the GEMM
    assert choose({DENSE: 1.0, GEMM: 0.8, "a": 0.7}) == "a"


def test_multithread_choice_needs_one_thread_confirmation():
    """Two-thread timings say sparse wins (a noisy dense measurement), one-thread CPU times say
    dense is cheaper: the layer stays dense. Where both agree it runs sparse."""
    w_dense = torch.randn(48, 64) * 0.05
    w_sparse = sparse_matrix(48, 64, 0.9)
    table = CalibrationTable()
    for w, one_thread in ((w_dense, {DENSE: 1.0, "tb32-kc64": 1.8}),
                          (w_sparse, {DENSE: 1.0, "tb32-kc64": 0.3})):
        density = float((w != 0).float().mean())
        table.entries[table_key(48, 64, density, 128, 2)] = {DENSE: 1.0, "tb32-kc64": 0.5}
        table.entries[table_key(48, 64, density, 128, 1)] = one_thread
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(64, 48))
    with torch.no_grad():
        net[0].weight.copy_(w_dense)
        net[1].weight.copy_(w_sparse)
    fast = accelerate_ticket(net, tokens=(128,), threads=(2,), table=table)
    plans = {n: m.plan[(128, 2)] for n, m in sparse_layers(fast).items()}
    assert plans == {"0": DENSE, "1": "tb32-kc64"}


def test_calibration_is_measured_cached_and_reused(tmp_path, monkeypatch):
    import ticketlab.sparse.engine as engine

    w = sparse_matrix(64, 96, 0.9)
    timings = measure_layer(w, None, 40, 1)
    assert set(timings) == {DENSE, GEMM} | {v.name for v in candidate_variants(96, 40)}
    assert all(t > 0 for t in timings.values())

    path = tmp_path / "calibration.json"
    layer = torch.nn.Linear(96, 64)
    with torch.no_grad():
        layer.weight.copy_(w)
    fast = accelerate_ticket(torch.nn.Sequential(layer), tokens=(128, 16), threads=(1,),
                             table=CalibrationTable.load(path))
    stored = json.loads(path.read_text())["entries"]
    density = float((w != 0).float().mean())
    assert sorted(stored) == sorted(table_key(64, 96, density, t, 1) for t in (128, 16))
    x = torch.randn(5, 96)
    with torch.inference_mode():
        assert (fast(x) - layer(x)).abs().max() <= 1e-5

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although the table has the entry")

    monkeypatch.setattr(engine, "measure_layer", no_measuring)
    again = accelerate_ticket(torch.nn.Sequential(layer), tokens=(100,), threads=(1,),
                              table=CalibrationTable.load(path))
    key = table_key(64, 96, density, 128, 1)
    # the exact kernel ("plan" folds MKL and the GEMM into "dense": comparing it with choose()
    # failed whenever the GEMM measured fastest)
    assert sparse_layers(again)["0"].kernels[(128, 1)] == choose(stored[key])
    path.write_text("{not json")
    assert CalibrationTable.load(path).entries == {}


def test_gradients_still_flow_through_the_dense_path():
    layer = torch.nn.Linear(32, 16)
    fast = accelerate_ticket(torch.nn.Sequential(layer), table=ForcedTable("tb16-kc128"))
    x = torch.randn(4, 32, requires_grad=True)
    fast(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    layer(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from ticketlab.sparse.build import library_path

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TICKETLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TicketlabError, match="C compiler") as e:
        library_path()
    assert "gcc" in e.value.fix


def test_bench_command_prints_the_table_and_writes_the_png(tiny_hparams, tmp_path):
    from ticketlab.cli import app
    from ticketlab.imp import find_ticket
    from ticketlab.train import Runtime

    hp = tiny_hparams(target_sparsity=0.5, rate=0.5)
    run = find_ticket(hp, tmp_path / "root", Runtime(progress=False),
                      Console(file=open(os.devnull, "w")))  # noqa: SIM115
    png = tmp_path / "speed.png"
    result = CliRunner().invoke(app, [
        "bench", run.path.name, "--level", "1", "--root", str(tmp_path / "root"),
        "--batch-sizes", "1,2", "--seq-len", "16", "--threads", "1", "--reps", "1",
        "--png", str(png)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dense ms" in text and "accel ms" in text and "CPU-time speed-up" in text
    assert "level 0: sparsity 0.0%" in text and "level 1: sparsity 50.0%" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["bench", run.path.name, "--level", "1", "--root",
                                   str(tmp_path / "root"), "--batch-sizes", "x"])
    assert bad.exit_code == 2 and "Fix:" in bad.output

    # The sweep times every level at its own sparsity: its mask on the dense θ0, not on the
    # benchmarked level's (already sparse) trained weights.
    from ticketlab.commands.ship import level_models
    from ticketlab.export import load_level
    from ticketlab.models import prunable_parameters

    seen = []
    for level, mask, net in level_models(load_level(run.path, 1, tmp_path / "root")):
        params = prunable_parameters(net, prune_pooler=True)
        zeros = sum(int((p == 0).sum()) for p in params.values())
        assert zeros / sum(p.numel() for p in params.values()) == mask.sparsity
        seen.append((level, mask.sparsity))
    assert seen == [(0, 0.0), (1, 0.5)]


def test_a_layer_above_the_density_ceiling_never_runs_sparse(monkeypatch):
    """Issue 14: at 0 % sparsity a noisy calibration ran 6 of 37 layers on the sparse kernel
    at density 1.0. Now such a layer is not even timed: even a table claiming the sparse kernel
    is 10x faster leaves a layer at density 1.0 (or just above the ceiling) dense."""
    import ticketlab.sparse.engine as engine

    def no_measuring(*args, sparse: bool = True, **kwargs):
        if sparse:
            raise AssertionError("a layer above the density ceiling was timed sparse")
        return {DENSE: 1.0, GEMM: 0.9}  # only the two dense kernels

    monkeypatch.setattr(engine, "measure_layer", no_measuring)
    above = sparse_matrix(64, 96, 1 - MAX_SPARSE_DENSITY - 0.05, seed=4)
    assert (above != 0).float().mean() > MAX_SPARSE_DENSITY
    for weight in (torch.randn(64, 96), above):
        layer = torch.nn.Linear(96, 64)
        with torch.no_grad():
            layer.weight.copy_(weight)
        for table in (ForcedTable("tb32-kc128"), CalibrationTable()):
            fast = accelerate_ticket(torch.nn.Sequential(layer), tokens=(1, 128, 4096),
                                     threads=(1, 2), table=table)
            m = sparse_layers(fast)["0"]
            assert set(m.plan.values()) == {DENSE} and not m.packed
            assert set(m.kernels.values()) <= set(DENSE_KINDS)
            x = torch.randn(7, 96, generator=torch.Generator().manual_seed(5))
            with torch.inference_mode():  # a dense computation, MKL's or the GEMM's
                # any summation order is within the float32 bound K·eps·(|x| @ |W|ᵀ + |b|)
                # (an absolute 1e-5 failed once on a sum of 96 terms of size ~3)
                scale = x.abs() @ layer.weight.abs().T + layer.bias.abs()
                bound = 96 * torch.finfo(torch.float32).eps * scale
                assert ((fast(x) - layer(x)).abs() <= bound).all()


class FakeClock:
    """A clock that each timed call advances by a scripted amount."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def call(self, costs: list[float]):
        it = iter(costs)

        def run() -> None:
            self.now += next(it)
        return run


def test_a_close_call_is_retimed_and_dropped_when_it_does_not_hold():
    """The first timing said sparse 0.93 vs dense 1.0 (dense measured under load); paired
    re-timing shows dense at 0.80, so the layer stays dense."""
    clock = FakeClock()
    fns = {DENSE: clock.call([0.80] * 12), "tb64-kc128": clock.call([0.93] * 12),
           "tb32-kc128": clock.call([])}
    first = {DENSE: 1.0, "tb64-kc128": 0.93, "tb32-kc128": 0.94}
    out = confirm_close_call(fns, first, clock=clock)
    assert out[DENSE] == pytest.approx(0.80)
    assert choose(out) == DENSE  # neither the re-timed winner nor the runner-up counts


def test_a_close_call_that_holds_keeps_its_win_and_clear_calls_are_not_retimed():
    clock = FakeClock()
    fns = {DENSE: clock.call([1.0] * 12), "tb64-kc128": clock.call([0.85] * 12)}
    out = confirm_close_call(fns, {DENSE: 1.0, "tb64-kc128": 0.9}, clock=clock)
    assert choose(out) == "tb64-kc128" and out["tb64-kc128"] == pytest.approx(0.85)
    # A clear win (2x) and a clear loss are not re-timed: the functions are never called.
    for first in ({DENSE: 1.0, "tb64-kc128": 0.5}, {DENSE: 1.0, "tb64-kc128": 1.3}):
        assert confirm_close_call({}, first) == first


def test_every_timed_call_follows_a_cache_eviction_outside_the_clock():
    """Calibration times a layer as a forward meets it: weights out of L2 (evict_caches before
    each call), and the eviction itself is not part of any timing."""
    clock = FakeClock()
    events: list[str] = []

    def before() -> None:
        events.append("evict")
        clock.now += 5.0  # would dominate every timing if it were inside the clock

    def timed(name: str, cost: float):
        def run() -> None:
            events.append(name)
            clock.now += cost
        return run

    fns = {DENSE: timed(DENSE, 1.0), "tb64-kc128": timed("tb64-kc128", 0.9)}
    best = time_candidates(fns, rounds=3, budget_s=1e9, clock=clock, before=before)
    assert best == {DENSE: pytest.approx(1.0), "tb64-kc128": pytest.approx(0.9)}
    timed_calls = events[2:]  # after one untimed warm-up each
    assert timed_calls == ["evict", DENSE, "evict", "tb64-kc128"] * 3
    events.clear()
    out = confirm_close_call(fns, best, clock=clock, before=before)
    assert events == ["evict", DENSE, "evict", "tb64-kc128", "evict", "tb64-kc128", "evict",
                      DENSE] * 6
    assert out["tb64-kc128"] == pytest.approx(0.9) and choose(out) == "tb64-kc128"
    x = torch.randn(8, 4)
    before_x = x.clone()
    evict_caches(x)
    assert torch.equal(x, before_x)


def test_ties_are_settled_by_timing_the_whole_forward():
    """Layers level with dense when timed alone are flipped only where the forward says so.

    The clock is driven by the kernels that actually ran: layer 0 (dense, tied) makes the
    forward faster when sparse, so it flips; layer 1 (sparse, a narrow win) makes it slower
    when dense, so it stays; layer 2 (a clear sparse win) and layer 3 (unpruned, whatever the
    table claims) are never tried."""
    from ticketlab.sparse import confirm_plan

    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    with torch.no_grad():
        for i, m in enumerate(net[:3]):  # distinct densities: one table key each
            m.weight.copy_(sparse_matrix(64, 64, 0.5 + 0.1 * i, seed=i))
    table = CalibrationTable()
    claims = [{DENSE: 1.0, "tb64-kc64": 0.98}, {DENSE: 1.0, "tb64-kc64": 0.92},
              {DENSE: 1.0, "tb64-kc64": 0.4}, {DENSE: 1.0, "tb64-kc64": 0.5}]
    for m, timings in zip(net, claims, strict=True):
        density = float((m.weight != 0).float().mean())
        table.entries[table_key(64, 64, density, 128, 1)] = timings
    #: forward cost of each layer by the kind of kernel it ran
    cost = {"0": {"dense": 1.0, "sparse": 0.8}, "1": {"dense": 1.2, "sparse": 1.0},
            "2": {"dense": 2.0, "sparse": 1.0}, "3": {"dense": 1.0, "sparse": 0.1}}
    clock = FakeClock()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast = accelerate_ticket(net, tokens=(128,), threads=(1,), table=table)
        layers = sparse_layers(fast)
        assert {n: m.plan[(128, 1)] for n, m in layers.items()} == {
            "0": DENSE, "1": "tb64-kc64", "2": "tb64-kc64", "3": DENSE}
        for name, m in layers.items():
            def tick(mod, args, out, name=name):
                kind = "dense" if mod.kernel(args[0].shape[0], 1) in DENSE_KINDS else "sparse"
                clock.now += cost[name][kind]
            m.register_forward_hook(tick)
        x = torch.randn(128, 64, generator=g)
        report = confirm_plan(fast, x, clock=clock)
    finally:
        torch.set_num_threads(previous)
    assert [(r["layers"], r["from"], r["flipped"]) for r in report] == [
        (["0"], "dense", True), (["1"], "sparse", False)]
    # the other layers add 3.0 (layers 1, 2, 3 as planned), then 2.8 (layer 0 now sparse)
    assert report[0]["median_ratio"] == pytest.approx((0.8 + 3.0) / (1.0 + 3.0))
    assert report[1]["median_ratio"] == pytest.approx((1.2 + 2.8) / (1.0 + 2.8))
    assert {n: m.plan[(128, 1)] for n, m in layers.items()} == {
        "0": "tb64-kc64", "1": "tb64-kc64", "2": "tb64-kc64", "3": DENSE}
    assert 64 in layers["0"].packed and not layers["3"].packed
    with torch.inference_mode():
        assert (fast(x) - net(x)).abs().max() <= 1e-5


def test_accelerate_ticket_with_an_example_reports_its_plan_check(tiny_bert_dir):
    """``example=`` runs the check on the real forward (real clock): the report names every
    tie it tried, the plan keeps only known kernels, and the outputs still match."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, m in model.named_modules():  # the pooler unpruned: never a tie
            if isinstance(m, torch.nn.Linear) and "pooler" not in name:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= 0.5)
    table = CalibrationTable()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):  # every pruned layer a tie
            density = float((m.weight != 0).float().mean())
            table.entries[table_key(m.out_features, m.in_features, density, 64, 1)] = {
                DENSE: 1.0, GEMM: 1.0, "tb32-kc64": 0.99}
    batch = {"input_ids": torch.randint(1000, 30000, (1, 64), generator=g)}
    fast = accelerate_ticket(model, tokens=(64,), threads=(1,), table=table, example=batch)
    tied = {n for n, m in sparse_layers(fast).items() if m.density <= MAX_SPARSE_DENSITY}
    assert tied and {n for r in fast.plan_check for n in r["layers"]} == tied
    assert all(r["from"] == "dense" and r["threads"] == 1 for r in fast.plan_check)
    layers = sparse_layers(fast)
    for r in fast.plan_check:
        expect = "tb32-kc64" if r["flipped"] else GEMM
        assert all(layers[n].kernels[(token_bucket(64), 1)] == expect for n in r["layers"])
    with torch.inference_mode():
        diff = (model(**batch).last_hidden_state - fast(**batch).last_hidden_state)
    assert diff.abs().max() <= 1e-4
