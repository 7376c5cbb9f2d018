"""fuse: Before/Expected graphs, the cost rule's cases, cases that must not fuse, and the paper's
four regions labelled in every layer of Llama and GPT-2."""

import functools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from dsc import zoo
from dsc.compiler import _load_passes
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.fuse import LABELS, region_nodes
from dsc.passes.manager import PassManager
from dsc.pipelines import backend, trunk
from dsc.target import Target
from tests.passes.helpers import context, export_fn, run

dsc = torch.ops.dsc
CUDA = Target(device="cuda")


def _fuse(fn, *inputs, weights=None):
    gm, weights = export_fn(fn, *inputs, weights=weights)
    expected = run(gm, weights, *inputs)
    gm = PassManager(context(weights, device="cuda")).run(gm, ["fuse"])
    got = run(gm, weights, *inputs)
    for a, b in zip(got, expected):  # the regions' reference op computes what the nodes did
        assert torch.equal(a, b)
    return gm


def structure(gm: fx.GraphModule) -> list[str]:
    """Each compute node as text: regions as `region(kind)[op, ...] inputs -> outputs`."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target.__name__ == "getitem":
            continue
        if node.target is dsc.fused_region.default:
            doc = json.loads(node.args[1])
            ops = ", ".join(o["op"].split("::")[1].split(".")[0] for o in doc["ops"])
            names = ", ".join(_name(a) for a in node.args[0])
            out.append(f"region({doc['kind']})[{ops}] ({names}) -> {len(doc['outputs'])}")
        else:
            out.append(getattr(node.target, "_opname", str(node.target)))
    return out


def _name(node: fx.Node) -> str:
    """Inputs by their graph names (x0, x1, ... and weight names), other nodes by node name."""
    return node.meta.get("dsc_input") or node.meta.get("dsc_weight") or node.name


def _region_ops(node: fx.Node) -> list[str]:
    return [o["op"] for o in json.loads(node.args[1])["ops"]]


# ---- Before / Expected --------------------------------------------------------------------
def test_residual_add_and_norm_become_one_region():
    def before(x, r, w):
        h = dsc.residual_add(x, r)
        return h, dsc.rms_norm(h, w, 1e-6, torch.float32)

    gm = _fuse(before, torch.randn(2, 3, 8), torch.randn(2, 3, 8), weights={"w": torch.randn(8)})
    # Expected: one node computes both; h is written once, as the region's first output.
    assert structure(gm) == ["region(pointwise)[residual_add, rms_norm] (x0, x1, w) -> 2"]


def test_gated_up_projection_becomes_a_gemm_region():
    def before(x, w):
        up = F.linear(x, w)
        return dsc.gated_activation(up[..., :16], up[..., 16:], "silu")

    gm = _fuse(before, torch.randn(3, 8), weights={"w": torch.randn(32, 8)})
    assert structure(gm) == ["region(gemm)[linear, slice, slice, gated_activation] (x0, w) -> 1"]


def test_views_between_gemm_and_activation_move_after_the_region():
    def before(x, b, w):
        return dsc.activation(torch.addmm(b, x.view(-1, 8), w).view(2, 3, 16), "gelu_tanh")

    gm = _fuse(
        before, torch.randn(2, 3, 8), weights={"b": torch.randn(16), "w": torch.randn(8, 16)}
    )
    assert structure(gm) == ["view", "region(gemm)[addmm, activation] (b, view, w) -> 1", "view"]


def test_residual_add_joins_the_norm_not_the_gemm_epilogue():
    def before(x, s, w, g):
        h = dsc.residual_add(s, F.linear(x, w))
        return h, dsc.rms_norm(h, g, 1e-6, torch.float32)

    gm = _fuse(
        before,
        torch.randn(3, 8),
        torch.randn(3, 8),
        weights={"w": torch.randn(8, 8), "g": torch.randn(8)},
    )
    assert structure(gm) == [
        "linear",
        "region(pointwise)[residual_add, rms_norm] (x1, linear, g) -> 2",
    ]


def test_input_norm_becomes_the_gemm_prologue(monkeypatch):
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")  # opt-in until measured on the GPU
    def before(x, g, w):
        return F.linear(dsc.rms_norm(x, g, 1e-6, torch.float32), w)

    gm = _fuse(before, torch.randn(3, 8), weights={"g": torch.randn(8), "w": torch.randn(12, 8)})
    # Expected: the paper's region (1), one node: the GEMM normalises its input rows itself.
    assert structure(gm) == ["region(gemm)[rms_norm, linear] (x0, g, w) -> 1"]


def test_residual_add_goes_to_the_gemm_when_the_norm_it_feeds_is_a_prologue(monkeypatch):
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")
    def before(x, s, wo, g, wu):
        h = dsc.residual_add(s, F.linear(x, wo))
        return h, F.linear(dsc.rms_norm(h, g, 1e-6, torch.float32), wu)

    weights = {"wo": torch.randn(8, 8), "g": torch.randn(8), "wu": torch.randn(12, 8)}
    gm = _fuse(before, torch.randn(3, 8), torch.randn(3, 8), weights=weights)
    # Expected: out projection + residual add (region 4), then norm + up projection: two
    # launches where add + norm would have been a third.
    assert structure(gm) == [
        "region(gemm)[linear, residual_add] (x0, wo, x1) -> 1",
        "region(gemm)[rms_norm, linear] (getitem, g, wu) -> 1",
    ]


def test_norm_read_twice_is_not_a_prologue(monkeypatch):
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")
    def before(x, g, w1, w2):
        y = dsc.layer_norm(x, g, None, 1e-5)
        return F.linear(y, w1), F.linear(y, w2)  # two readers: normalise once, not twice

    weights = {"g": torch.randn(8), "w1": torch.randn(4, 8), "w2": torch.randn(4, 8)}
    gm = _fuse(before, torch.randn(3, 8), weights=weights)
    assert structure(gm) == ["region(pointwise)[layer_norm] (x0, g) -> 1", "linear", "linear"]


def test_norm_prologue_is_on_by_default_and_can_be_turned_off(monkeypatch):
    def before(x, g, w):
        return F.linear(dsc.rms_norm(x, g, 1e-6, torch.float32), w)

    weights = {"g": torch.randn(8), "w": torch.randn(12, 8)}
    monkeypatch.delenv("DSC_NORM_PROLOGUE", raising=False)
    gm = _fuse(before, torch.randn(3, 8), weights=weights)
    assert structure(gm) == ["region(gemm)[rms_norm, linear] (x0, g, w) -> 1"]
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "0")
    gm = _fuse(before, torch.randn(3, 8), weights=weights)
    assert structure(gm) == ["region(pointwise)[rms_norm] (x0, g) -> 1", "linear"]
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "yes")
    with pytest.raises(ValueError, match="DSC_NORM_PROLOGUE='yes'"):
        _fuse(before, torch.randn(3, 8), weights=weights)


def test_residual_add_without_a_norm_folds_into_the_gemm():
    def before(x, s, w):
        return dsc.residual_add(s, F.linear(x, w))

    gm = _fuse(before, torch.randn(3, 8), torch.randn(3, 8), weights={"w": torch.randn(8, 8)})
    assert structure(gm) == ["region(gemm)[linear, residual_add] (x0, w, x1) -> 1"]


def test_lead_dim_view_sinks_past_the_norm():
    def before(x, r, w, b):  # OPT flattens the stream between the residual add and the norm
        h = dsc.residual_add(x, r).view(-1, 8)
        return h, dsc.layer_norm(h, w, b, 1e-5)

    gm = _fuse(
        before,
        torch.randn(2, 3, 8),
        torch.randn(2, 3, 8),
        weights={"w": torch.randn(8), "b": torch.randn(8)},
    )
    assert structure(gm) == [
        "region(pointwise)[residual_add, layer_norm] (x0, x1, w, b) -> 2",
        "view",
        "view",
    ]


def test_flattened_norm_stays_the_gemm_prologue_and_the_add_joins_the_producing_gemm():
    # OPT's MLP: the stream is flattened, normalised and read by fc1; its sum comes from the out
    # projection. Expected: [out + residual add], view, [layer_norm + fc1] — the view does not
    # sink past a norm its GEMM takes as a prologue, and the add sees through the view to it.
    def before(x, s, wo, g, b, w1):
        h = dsc.residual_add(s, F.linear(x, wo))
        flat = h.view(-1, 8)
        return flat, F.linear(dsc.layer_norm(flat, g, b, 1e-5), w1)

    weights = {"wo": torch.randn(8, 8), "g": torch.randn(8), "b": torch.randn(8),
               "w1": torch.randn(12, 8)}
    gm = _fuse(before, torch.randn(2, 3, 8), torch.randn(2, 3, 8), weights=weights)
    assert structure(gm) == [
        "region(gemm)[linear, residual_add] (x0, wo, x1) -> 1",
        "view",
        "region(gemm)[layer_norm, linear] (view, g, b, w1) -> 1",
    ]


# ---- the cost rule -------------------------------------------------------------------------
def test_value_read_outside_is_an_extra_output_computed_once():
    def before(x, w):
        h = x * 2.0 + 1.0
        return F.linear(h, w), h.exp()

    gm = _fuse(before, torch.randn(3, 8), weights={"w": torch.randn(4, 8)})
    assert structure(gm) == ["region(pointwise)[mul, add, exp] (x0) -> 2", "linear"]


def test_no_region_that_would_form_a_cycle():
    def before(x, w):
        a = x.exp()
        return a * F.linear(a, w)  # a and the product share a shape, but the GEMM sits between

    gm = _fuse(before, torch.randn(3, 8), weights={"w": torch.randn(8, 8)})
    assert structure(gm) == [
        "region(pointwise)[exp] (x0) -> 1",
        "linear",
        "region(pointwise)[mul] (getitem, linear) -> 1",
    ]


def test_cheap_cast_of_an_input_is_recomputed_not_stored():
    def before(x, w):
        c = x.float()
        a = c.exp()
        return c * F.linear(a, w)  # c is needed on both sides of the GEMM

    gm = _fuse(before, torch.randn(3, 8, dtype=torch.bfloat16), weights={"w": torch.randn(8, 8)})
    assert structure(gm) == [
        "region(pointwise)[_to_copy, exp] (x0) -> 1",
        "linear",
        "region(pointwise)[_to_copy, mul] (x0, linear) -> 1",
    ]


def test_independent_regions_meeting_at_one_consumer_launch_together():
    def before(q, k, c, s):
        return torch.cat([dsc.rotary(q, c, s), dsc.rotary(k, c, s)], 1)

    gm = _fuse(
        before,
        torch.randn(1, 4, 3, 8),
        torch.randn(1, 2, 3, 8),
        torch.randn(1, 1, 3, 8),
        torch.randn(1, 1, 3, 8),
    )
    assert structure(gm) == ["region(pointwise)[rotary, rotary] (x0, x2, x3, x1) -> 2", "cat"]
    (region,) = region_nodes(gm)
    assert len(json.loads(region.args[1])["groups"]) == 2  # one launch, two groups of programs


# ---- does not match --------------------------------------------------------------------------
def test_does_not_match():
    def before(x, y):
        return (
            y.sum(0, keepdim=True),  # a reduction over another dim than the row
            torch.softmax(y, 0),  # likewise
            x.double() * 2.0,  # float64
            (y > 0).to(torch.int32) + 1,  # integers
            y.mean(-1),  # no keepdim: not one value per row of the region
        )

    gm = _fuse(before, torch.randn(3, 8), torch.randn(3, 8))
    assert region_nodes(gm) == []


def test_linear_alone_stays_a_linear():
    gm = _fuse(lambda x, w: F.linear(x, w), torch.randn(3, 8), weights={"w": torch.randn(4, 8)})
    assert structure(gm) == ["linear"]


# ---- whole models: the paper's four regions in every layer ------------------------------------
@functools.cache
def _model_graph(name: str, prologues: str = "0"):  # (the env setting is part of the cache key)
    _load_passes()
    t = trace(
        zoo.build(name, init_std=0.3),
        dtype=torch.float32,
        max_batch=4,
        max_seq_len=64,
        position_ids=True,
    )
    ctx = PassContext(target=CUDA, weights=t.weights, info=t.info, inputs=t.inputs)
    manager = PassManager(ctx)
    gm = manager.run(t.gm, trunk(CUDA) + ["merge_projections"], program="forward")
    ids = torch.randint(0, t.info.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    feeds = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(5).expand(2, 5),
    }
    inputs = [feeds[n] for n in t.inputs]
    expected = run(gm, ctx.weights, *inputs)[0]
    gm = manager.run(gm, [p for p in backend(CUDA) if p == "fuse"], program="forward")
    return gm, expected, run(gm, ctx.weights, *inputs)[0], t.info.num_layers


def _layers(node: fx.Node) -> set[int]:
    """Layer indices named by the weights a node reads."""
    found = set()
    regions = node.args[0] if node.target is dsc.fused_region.default else []
    for arg in node.all_input_nodes + list(regions):
        name = arg.meta.get("dsc_weight", "") if isinstance(arg, fx.Node) else ""
        found |= {int(m) for m in re.findall(r"(?:layers|h)\.(\d+)\.", name)}
    return found


@pytest.mark.parametrize("name,prologues", [("tiny-llama", "0"), ("tiny-gpt2", "0"),
                                             ("tiny-llama", "1")])
def test_every_layer_has_the_four_regions(name, prologues, monkeypatch):
    monkeypatch.setenv("DSC_NORM_PROLOGUE", prologues)
    gm, expected, got, layers = _model_graph(name, prologues)
    assert torch.equal(got, expected)
    labelled = {label: [] for label in LABELS}
    for node in gm.graph.nodes:
        if "dsc_region" in node.meta:
            labelled[node.meta["dsc_region"]].append(node)
    every = set(range(layers))
    # norm_qkv: the QKV projection (and the norm feeding it); up_act: the up projection with its
    # activation; down_residual: the out and down projections; attention: one per layer.
    for label in ("norm_qkv", "up_act", "down_residual"):
        assert set().union(*(_layers(n) for n in labelled[label])) == every, label
    attentions = [n for n in labelled["attention"] if n.target is not dsc.fused_region.default]
    assert len(attentions) == layers
    # GEMM regions: the up projection with its activation; the QKV (and up) projection with its
    # input norm as prologue; the out/down projections with their residual add.
    for n in region_nodes(gm):
        ops = [o["op"] for o in json.loads(n.args[1])["ops"]]
        if json.loads(n.args[1])["kind"] != "gemm" or not _layers(n):
            continue  # (the final norm + LM head belongs to no layer and carries no label)
        if any("activation" in op for op in ops):
            assert n.meta.get("dsc_region") == "up_act", ops
        elif "dsc::residual_add.default" in ops:
            assert n.meta.get("dsc_region") == "down_residual", ops
        else:
            assert n.meta.get("dsc_region") == "norm_qkv" and "norm" in ops[0], ops
            assert prologues == "1"
    if prologues == "1":  # every layer: [norm + QKV], [O + add], [norm + up + act], [down + add]
        gemms = [n for n in region_nodes(gm) if json.loads(n.args[1])["kind"] == "gemm"
                 and _layers(n)]
        assert len(gemms) == 4 * layers
    if name == "tiny-llama":  # the rotary of q and k: one region per layer, in the attention
        rotary = [
            n
            for n in labelled["attention"]
            if n.target is dsc.fused_region.default and "dsc::rotary.default" in _region_ops(n)
        ]
        assert len(rotary) == layers
