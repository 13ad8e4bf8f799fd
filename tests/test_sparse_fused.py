"""Fused encoder layers and the kernels around the sparse product: each matches PyTorch's own
computation, the fused path falls back where it does not apply, and unknown modules stay plain
PyTorch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ticketlab.sparse import CalibrationTable, accelerate_ticket, register_rewrite, sparse_layers
from ticketlab.sparse.calibration import DENSE, GEMM
from ticketlab.sparse.fused import fused_layers, key_bias
from ticketlab.sparse.kernels import (
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    Epilogue,
    apply_epilogue,
    attention,
    gemm,
    pack_dense,
    pack_weight,
    spmm,
)


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("TICKETLAB_CACHE")
    os.environ["TICKETLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["TICKETLAB_CACHE"]
    else:
        os.environ["TICKETLAB_CACHE"] = old


ACTS = {ACT_GELU: F.gelu, ACT_GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
        ACT_RELU: F.relu}


@pytest.mark.parametrize("shape", [(1, 40, 30), (7, 384, 384), (130, 100, 1024), (33, 96, 64),
                                   (500, 40, 1024), (421, 72, 48),  # few and many row blocks
                                   (130, 70, 3072), (300, 40, 2500)])  # K cut into chunks
def test_gemm_and_its_epilogues_match_torch(shape):
    t, n, k = shape
    g = torch.Generator().manual_seed(t)
    x, w, b = torch.randn(t, k, generator=g), torch.randn(n, k, generator=g) * 0.05, \
        torch.randn(n, generator=g)
    res, gamma, beta = torch.randn(t, n, generator=g), torch.randn(n, generator=g), \
        torch.randn(n, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    packed = pack_dense(w)
    for threads in (1, 2):
        assert (gemm(x, packed, b, threads) - ref).abs().max() <= 1e-4
        assert (gemm(x, packed, None, threads) - ref + b.double()).abs().max() <= 1e-4
        for act, fn in ACTS.items():
            assert (gemm(x, packed, b, threads, Epilogue(act)) - fn(ref)).abs().max() <= 1e-4
        ln = F.layer_norm(ref + res.double(), (n,), gamma.double(), beta.double(), 1e-12)
        out = gemm(x, packed, b, threads, Epilogue(residual=res, ln=(gamma, beta, 1e-12)))
        assert (out - ln).abs().max() <= 1e-4
        y = F.linear(x, w, b)  # the standalone epilogue, after MKL's product
        assert (apply_epilogue(y, Epilogue(residual=res, ln=(gamma, beta, 1e-12)), threads)
                - ln).abs().max() <= 1e-4


@pytest.mark.parametrize("tb", [16, 32, 64])
def test_sparse_product_epilogues_match_torch(tb):
    g = torch.Generator().manual_seed(tb)
    for t in (3, 64, 200):  # one token block, several, and many (each thread path)
        x = torch.randn(t, 96, generator=g)
        w = torch.randn(80, 96, generator=g) * (torch.rand(80, 96, generator=g) > 0.8)
        b = torch.randn(80, generator=g)
        res, gamma, beta = torch.randn(t, 80, generator=g), torch.randn(80), torch.randn(80)
        packed = pack_weight(w, 32)
        for threads in (1, 2):
            plain = spmm(x, packed, b, tb, threads)
            assert (plain - F.linear(x, w, b)).abs().max() <= 1e-5
            for act, fn in ACTS.items():
                out = spmm(x, packed, b, tb, threads, Epilogue(act))
                assert (out - fn(plain)).abs().max() <= 1e-5
            out = spmm(x, packed, b, tb, threads, Epilogue(residual=res, ln=(gamma, beta, 1e-5)))
            assert (out - F.layer_norm(plain + res, (80,), gamma, beta, 1e-5)).abs().max() <= 1e-4


def test_gelu_is_accurate_over_its_whole_range():
    x = torch.linspace(-20, 20, 100_001).reshape(1, -1).contiguous()
    y = apply_epilogue(x.clone(), Epilogue(ACT_GELU))
    assert (y.double() - F.gelu(x.double())).abs().max() <= 1e-6
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("b,t,h,d", [(1, 128, 12, 32), (2, 37, 4, 64), (3, 5, 2, 16),
                                     (1, 1, 1, 16)])
def test_attention_matches_sdpa_with_and_without_padding(b, t, h, d):
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b * t, 3 * h * d, generator=g)  # one fused projection: strided views
    q, k, v = qkv[:, :h * d], qkv[:, h * d:2 * h * d], qkv[:, 2 * h * d:]
    keep = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        keep[1, t // 2:] = False
    bias = torch.zeros(b, t).masked_fill_(~keep, torch.finfo(torch.float32).min)
    heads = [m.reshape(b, t, h, d).transpose(1, 2).double() for m in (q, k, v)]
    ref = F.scaled_dot_product_attention(*heads, attn_mask=keep[:, None, None, :])
    ref = ref.transpose(1, 2).reshape(b * t, h * d)
    for threads in (1, 2):
        out = attention(q, k, v, b, t, h, d, bias, d ** -0.5, threads)
        assert (out - ref).abs().max() <= 1e-5


def test_key_bias_reads_transformers_masks_and_refuses_per_query_masks():
    keep = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    four_d = keep[:, None, None, :].expand(2, 1, 5, 5)
    bias = key_bias(four_d.clone(), 2, 5)  # materialised, like create_bidirectional_mask
    assert torch.equal(bias == 0, keep)
    assert key_bias(torch.ones(2, 1, 5, 5, dtype=torch.bool), 2, 5) is None
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5).clone()
    assert key_bias(causal, 2, 5) is not None and not isinstance(key_bias(causal, 2, 5),
                                                                 torch.Tensor)


def tiny(kind: str, attn: str = "sdpa"):
    """A small random encoder of each supported family, hidden 64, head size 16/32."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=500, max_position_embeddings=80, num_labels=3,
                  attn_implementation=attn)
    if kind == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(
            dim=64, n_heads=4, n_layers=2, hidden_dim=128, **common)).eval()
    config_cls, model_cls = {
        "bert": (T.BertConfig, T.BertForSequenceClassification),
        "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification),
        "electra": (T.ElectraConfig, T.ElectraForSequenceClassification),
    }[kind]
    extra = {"embedding_size": 64} if kind == "electra" else {}
    config = config_cls(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                        intermediate_size=128, **extra, **common)
    if kind == "roberta":
        config.pad_token_id = 1
    return model_cls(config).eval()


def prune_randomly(model: torch.nn.Module, sparsity: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features > 3:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "distilbert"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_fused_layers_match_the_dense_model_for_each_family(kind, sparsity):
    model = tiny(kind)
    prune_randomly(model, sparsity)
    fast = accelerate_ticket(model, tokens=(60,), threads=(1,))
    assert len(fused_layers(fast)) == 2, kind
    ids = torch.randint(5, 500, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 17:] = 0  # padding in the second sequence
    with torch.inference_mode():
        for m in (None, mask):
            ref = model(input_ids=ids, attention_mask=m).logits
            out = fast(input_ids=ids, attention_mask=m).logits
            assert (ref - out).abs().max() <= 1e-4, (kind, sparsity)
    assert {type(x).__name__ for x in fused_layers(fast).values()} <= {
        "FusedBertLayer", "FusedRobertaLayer", "FusedElectraLayer", "FusedTransformerBlock"}


def test_fused_layer_falls_back_for_attentions_hidden_states_and_gradients():
    model = tiny("bert", attn="eager")  # sdpa returns no attention weights at all
    prune_randomly(model, 0.5)
    fast = accelerate_ticket(model, tokens=(40,), threads=(1,))
    ids = torch.randint(5, 500, (2, 20))
    with torch.inference_mode():
        ref = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        out = fast(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    for a, b in zip(ref.attentions + ref.hidden_states, out.attentions + out.hidden_states,
                    strict=True):
        assert (a - b).abs().max() <= 1e-5
    with torch.inference_mode():  # hidden states are collected on the fused path too
        fused = fast(input_ids=ids, output_hidden_states=True)
    for a, b in zip(ref.hidden_states, fused.hidden_states, strict=True):
        assert (a - b).abs().max() <= 1e-4
    layer = next(iter(fused_layers(fast).values()))
    h = torch.randn(2, 20, 64)
    with torch.inference_mode():
        assert layer._tl_fusable(h, (), {})
        assert not layer._tl_fusable(h, (), {"encoder_hidden_states": torch.ones(2, 5, 64)})
        assert not layer._tl_fusable(h, (torch.ones(2, 5, 64),), {})  # cross-attention input
        assert not layer._tl_fusable(h.double(), (), {})
    layer.train()
    assert not layer._tl_fusable(h, (), {})
    layer.eval()
    emb = fast.get_input_embeddings()(ids).requires_grad_(True)  # gradients: original forward
    fast(inputs_embeds=emb).logits.sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_unknown_modules_stay_plain_pytorch_and_new_rules_plug_in():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4 * 6 * 6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).flatten(1))

    net = Net().eval()
    table = CalibrationTable()
    fast = accelerate_ticket(net, tokens=(2,), threads=(1,), table=table)
    assert type(fast.conv) is torch.nn.Conv2d and set(sparse_layers(fast)) == {"head"}
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert (fast(x) - net(x)).abs().max() <= 1e-5

    class Marked(torch.nn.Conv2d):
        pass

    seen = []

    def rule(module, ctx):
        seen.append(type(module).__name__)
        return None  # declines: the walk descends as usual

    register_rewrite(Marked, rule)
    net.conv.__class__ = Marked
    accelerate_ticket(net, tokens=(2,), threads=(1,), table=table)
    assert seen == ["Marked"]


def test_dense_layers_pick_a_dense_kernel_and_report_dense():
    model = tiny("bert")  # unpruned: every layer above the density ceiling
    fast = accelerate_ticket(model, tokens=(40,), threads=(1,))
    layers = sparse_layers(fast).values()
    assert all(m.decide(40, 1) == DENSE for m in layers)
    assert all(m.kernel(40, 1) in (DENSE, GEMM) for m in layers)
    assert all(not m.packed for m in layers)


def test_reused_scratch_buffers_never_leak_into_outputs():
    """The fused layers reuse buffers for their temporaries; what they return must not be one:
    a later call may not change an earlier call's outputs or hidden states."""
    model = tiny("bert")
    prune_randomly(model, 0.5)
    fast = accelerate_ticket(model, tokens=(40,), threads=(1,))
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randint(5, 500, (2, 20), generator=g) for _ in range(2))
    with torch.inference_mode():
        first = fast(input_ids=a, output_hidden_states=True)
        kept = [h.clone() for h in first.hidden_states] + [first.logits.clone()]
        fast(input_ids=b, output_hidden_states=True)
        for before, now in zip(kept, list(first.hidden_states) + [first.logits], strict=True):
            assert torch.equal(before, now)
        ref = model(input_ids=a).logits
    assert (ref - first.logits).abs().max() <= 1e-5
    with torch.no_grad():  # outside inference mode: its own buffers (inference ones are frozen)
        assert (fast(input_ids=a).logits - ref).abs().max() <= 1e-5


def test_layer_program_is_one_call_and_equals_the_per_product_path(monkeypatch):
    """With every product on ticketlab's kernels a fused layer runs as one C call; it computes
    exactly what the seven calls from Python compute, and a changed plan rebuilds it."""
    from ticketlab.sparse import fused

    model = tiny("bert")
    prune_randomly(model, 0.7)
    fast = accelerate_ticket(model, tokens=(40,), threads=(1,))
    for i, m in enumerate(sparse_layers(fast).values()):  # MKL cannot be called from C
        m.set_kernel(40, 1, ("tb16-kc64", "tb32-kc128", GEMM)[i % 3])
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 13:] = 0
    torch.set_num_threads(1)
    with torch.inference_mode():
        out = fast(input_ids=ids, attention_mask=mask).logits
        layers = list(fused_layers(fast).values())
        progs = [fused._programs[layer][(2, 20, 1)] for layer in layers]
        monkeypatch.setattr(fused, "LAYER_PROGRAMS", False)
        per_product = fast(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(fused, "LAYER_PROGRAMS", True)
        assert torch.equal(out, per_product)
        assert (out - model(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-4
        kinds = {int(k) for p in progs for k in p.ints[:6 * 16:16]}
        assert kinds == {0, 16, 32}, kinds  # GEMM and sparse products inside the program
        layers[0]._tl_parts.query.set_kernel(40, 1, "tb64-kc64")
        again = fast(input_ids=ids, attention_mask=mask).logits
        assert fused._programs[layers[0]][(2, 20, 1)] is not progs[0]  # rebuilt
        assert fused._programs[layers[1]][(2, 20, 1)] is progs[1]  # untouched
        assert (again - out).abs().max() <= 1e-5
        layers[0]._tl_parts.ffn_out.set_kernel(40, 1, DENSE)  # MKL: product by product
        assert layers[0]._tl_program(2, 20) is None
        assert (fast(input_ids=ids, attention_mask=mask).logits - out).abs().max() <= 1e-5
